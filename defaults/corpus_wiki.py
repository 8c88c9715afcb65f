"""The offline demo corpus: the English Wikipedia sample shipped inside the gensim wheel.

Why this route: the hub is unreachable but PyPI is not. The `gensim==4.4.0` wheel carries a
shortened enwiki dump (~6 MB of XML, ~200 pages) as test data. We download the wheel with
`pip download --no-deps`, open it as the zip it is, and extract that one file; gensim itself is
never installed or imported. The dump is cleaned of wiki markup with a few regular expressions
(good enough for language-model text, not a full MediaWiki parser) and split by article.
"""

from __future__ import annotations

import bz2
import importlib.util
import random
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from xml.etree import ElementTree

import pyarrow as pa
import pyarrow.parquet as pq

from maria.io import atomic_file
from maria_extract.corpus import CorpusError

GENSIM_PIP = "gensim==4.4.0"
DUMP_MEMBER = "gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
DUMP_NAME = Path(DUMP_MEMBER).name
MIN_CHARS = 500  # articles shorter than this after cleaning are stubs or disambiguation pages


def find_or_fetch_wiki_dump(cache_dir: str | Path) -> Path:
    """Path of the enwiki sample: an installed gensim's copy, else a cached one, else fetched from PyPI."""
    spec = importlib.util.find_spec("gensim")
    if spec is not None and spec.submodule_search_locations:
        for location in spec.submodule_search_locations:
            p = Path(location).parent / DUMP_MEMBER
            if p.exists():
                return p
    cached = Path(cache_dir) / DUMP_NAME
    if cached.exists():
        return cached
    cached.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cached.parent) as tmp:
        print(f"fetching the Wikipedia sample from the {GENSIM_PIP} wheel on PyPI (~28 MB, one-off)")
        cmd = [sys.executable, "-m", "pip", "download", GENSIM_PIP, "--no-deps", "--only-binary=:all:", "-d", tmp, "-q"]
        done = subprocess.run(cmd, capture_output=True, text=True)
        wheels = sorted(Path(tmp).glob("gensim-*.whl"))
        if done.returncode != 0 or not wheels:
            raise CorpusError(
                f"could not download {GENSIM_PIP} from PyPI ({done.stderr.strip()[-300:]}); "
                f"check network access to PyPI, or place {DUMP_NAME} in {cached.parent}"
            )
        with zipfile.ZipFile(wheels[0]) as z, z.open(DUMP_MEMBER) as src, open(Path(tmp) / DUMP_NAME, "wb") as dst:
            shutil.copyfileobj(src, dst)
        # rename inside one filesystem: a crash never leaves a truncated dump in the cache
        (Path(tmp) / DUMP_NAME).rename(cached)
    return cached


def _drop_nested(text: str, open_: str, close: str) -> str:
    """Remove balanced open_ ... close spans (templates and tables nest, so a regex cannot)."""
    out, depth, i = [], 0, 0
    while i < len(text):
        if text.startswith(open_, i):
            depth, i = depth + 1, i + len(open_)
        elif depth and text.startswith(close, i):
            depth, i = depth - 1, i + len(close)
        else:
            if not depth:
                out.append(text[i])
            i += 1
    return "".join(out)


def _drop_links(text: str, prefixes: tuple[str, ...]) -> str:
    """Remove [[File:...]]-style links, whose captions may themselves contain [[links]]."""
    pattern = re.compile(r"\[\[\s*(?:" + "|".join(prefixes) + r")\s*:", re.IGNORECASE)
    while (m := pattern.search(text)) is not None:
        depth, i = 0, m.start()
        while i < len(text):
            if text.startswith("[[", i):
                depth, i = depth + 1, i + 2
            elif text.startswith("]]", i):
                depth, i = depth - 1, i + 2
                if depth == 0:
                    break
            else:
                i += 1
        text = text[: m.start()] + text[i:]
    return text


def clean_wiki_markup(text: str) -> str:
    """Wikitext -> plain prose: templates, tables, refs, comments, tags and media links go; link text stays."""
    text = re.sub(r"<!--.*?-->", "", text, flags=re.DOTALL)
    text = re.sub(r"<ref[^>]*/>", "", text, flags=re.IGNORECASE)
    text = re.sub(r"<ref[^>]*>.*?</ref>", "", text, flags=re.DOTALL | re.IGNORECASE)
    text = _drop_nested(text, "{{", "}}")
    text = _drop_nested(text, "{|", "|}")
    text = re.sub(r"<(math|gallery|timeline|source|syntaxhighlight)[^>]*>.*?</\1>", "", text, flags=re.DOTALL | re.IGNORECASE)
    text = re.sub(r"</?[a-zA-Z][^>]*>", "", text)  # remaining html tags: keep their content
    text = _drop_links(text, ("File", "Image", "Category", "Media"))
    text = re.sub(r"\[\[[a-z\-]{2,12}:[^\]]*\]\]", "", text)  # interlanguage links ([[de:...]])
    text = re.sub(r"\[\[(?:[^\]|]*\|)?([^\]|]*)\]\]", r"\1", text)  # [[a|b]] -> b, [[a]] -> a
    text = re.sub(r"\[(?:https?:)?//[^\s\]]+\s+([^\]]*)\]", r"\1", text)  # [http://x y] -> y
    text = re.sub(r"\[(?:https?:)?//[^\s\]]+\]", "", text)  # bare [http://x]
    text = re.sub(r"'{2,}", "", text)  # bold / italic quotes
    text = re.sub(r"^[ \t]*(=+)[ \t]*(.*?)[ \t]*\1[ \t]*$", r"\2", text, flags=re.MULTILINE)  # == X == -> X
    text = re.sub(r"^[*#:;]+[ \t]*", "", text, flags=re.MULTILINE)  # list / indent markers
    text = text.replace("&nbsp;", " ").replace("&ndash;", "–").replace("&mdash;", "—")
    text = re.sub(r"[ \t]+\n", "\n", text)
    text = re.sub(r"\n{3,}", "\n\n", text)
    return text.strip()


def parse_articles(bz2_path: str | Path, min_chars: int = MIN_CHARS) -> list[dict]:
    """Main-namespace, non-redirect articles of a MediaWiki XML dump as [{title, text}], cleaned."""
    articles = []
    with bz2.open(bz2_path, "rb") as f:
        for _, elem in ElementTree.iterparse(f, events=("end",)):
            if elem.tag.rsplit("}", 1)[-1] != "page":
                continue
            fields = {child.tag.rsplit("}", 1)[-1]: child for child in elem.iter()}
            title = fields["title"].text if "title" in fields else ""
            ns = fields["ns"].text if "ns" in fields else "0"
            raw = (fields["text"].text or "") if "text" in fields else ""
            is_redirect = "redirect" in fields or raw.lstrip().upper().startswith("#REDIRECT")
            if ns == "0" and not is_redirect:
                text = clean_wiki_markup(raw)
                if len(text) >= min_chars:
                    articles.append({"title": title, "text": text})
            elem.clear()  # streaming: free each page once read
    return articles


def prepare_wiki_corpus(out_dir: str | Path, val_fraction: float = 0.1, seed: int = 0) -> tuple[Path, Path]:
    """Write train.parquet / val.parquet (doc_id, title, text), split by article; cached."""
    if not 0.0 < val_fraction < 1.0:
        raise CorpusError(f"val_fraction must be in (0, 1), got {val_fraction}")
    out_dir = Path(out_dir)
    suffix = f"v{val_fraction:g}-s{seed}"
    train_path, val_path = out_dir / f"wiki-train-{suffix}.parquet", out_dir / f"wiki-val-{suffix}.parquet"
    if train_path.exists() and val_path.exists():
        return train_path, val_path
    articles = parse_articles(find_or_fetch_wiki_dump(out_dir))
    if len(articles) < 2:
        raise CorpusError(f"only {len(articles)} articles parsed from the dump; delete {out_dir / DUMP_NAME} and retry")
    order = list(range(len(articles)))
    random.Random(seed).shuffle(order)
    n_val = max(1, round(val_fraction * len(articles)))
    splits = {val_path: sorted(order[:n_val]), train_path: sorted(order[n_val:])}
    out_dir.mkdir(parents=True, exist_ok=True)
    for path, ids in splits.items():
        table = pa.table({"doc_id": pa.array(ids, pa.int64()), "title": [articles[i]["title"] for i in ids], "text": [articles[i]["text"] for i in ids]})
        with atomic_file(path) as tmp:
            pq.write_table(table, tmp)
    print(f"wiki corpus: {len(articles)} articles -> {len(splits[train_path])} train, {n_val} val in {out_dir}")
    return train_path, val_path
