"""Every verb, driven with generated hostile arguments, YAML and texts (hypothesis).

The rule under test (app/cli.py): each call ends in success (0), or in exactly one line
`maria <verb>: error: ...` with exit code 2 (bad usage or input) or 3 (corrupt data), never a
traceback; and nothing half-written is left behind, nor any input changed. `maria extract` also runs
for real (on the session's embedded Ray) over generated corpus files of every kind, good or hostile,
compressed or wrongly so, and over corpus and store URLs no backend here serves: an error within 20 s.
Cheap verbs (verify, train, eval, export, infill, generate) run for real on tiny fixtures
(training stops after 2 steps: run_train's stop_after). The expensive ones (extract, demo,
pretrain-mlm, bench) run with --print-config: parsing and the configs' own validation, which is
where their flags are checked; their runtime inputs have tests of their own (corpus, window length).
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import json
import os
import string
import tempfile
import typing
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from store_fixtures import make_store

from maria_app.cli import VERBS, main

pytestmark = pytest.mark.timeout(900)
CHEAP = ("verify", "train", "eval", "export", "infill", "generate")


def digest(path: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(path.rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(path)).encode() + p.read_bytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def world(pairs, tmp_path_factory):
    """A store, a finished head, a checkpoint, a corpus and some junk files: the inputs verbs read."""
    from maria.backbones import load_backbones
    from maria.head import init_head, save_head
    from maria.modeling_maria import MariaModel

    root = tmp_path_factory.mktemp("world")
    mlm, ar = pairs["modernbert-olmo"]
    bb = load_backbones(mlm, ar)
    make_store(root / "store", bb, 32, seed=1, windows_per_block=8)
    save_head(root / "head", init_head("poe", bb.expert_weights()), {**bb.describe(), "complete": True})
    MariaModel.from_parts(bb, init_head("poe", bb.expert_weights())).save_pretrained(root / "ckpt")
    (root / "corpus.jsonl").write_text('{"text": "hello world, a short document."}\n')
    (root / "texts.jsonl").write_text('{"text": "Paris is the {{2}} of France."}\n{"text": "{{3}}"}\n')
    (root / "empty.jsonl").write_text("")
    (root / "junk.bin").write_bytes(os.urandom(64))
    (root / "dir").mkdir()
    return {"root": root, "mlm": mlm, "ar": ar}


def value_pool(world: dict) -> dict[str, list[str]]:
    r = world["root"]
    paths = [str(r / n) for n in ("store", "head", "ckpt", "corpus.jsonl", "texts.jsonl", "empty.jsonl", "junk.bin", "dir", "nope")]
    paths += [world["mlm"], world["ar"], "..", "/", "", "s3://no-such-bucket/x", "nobody/nothing"]
    return {
        "int": ["-1", "0", "1", "2", "3", "99999999999", "1.5", "x", ""],
        "float": ["-1", "0", "0.5", "1", "1e-1", "nan", "inf", "-inf", "abc", "1e400"],
        "str": paths + ["auto", "cpu", "cuda", "token", "poe", "mix", "{{999999}}", "a {{2}} b", "{{0}}", "}}{{", "ü ß ∂ \u200b"],
    }


def kind_of(hint) -> str:
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    base = args[0] if args else hint
    base = typing.get_args(base)[0] if typing.get_origin(base) is list else base
    return {int: "int", float: "float", bool: "bool"}.get(base, "str")


def valid_base(verb: str, world: dict, n: int) -> list[str]:
    r, out = world["root"], str(world["root"] / "dir" / f"out-{n}")
    return {
        "verify": ["--store", str(r / "store")],
        "train": ["--store", str(r / "store"), "--out", out, "--batch-size", "16", "--eval-every", "1"],
        "eval": ["--store", str(r / "store"), "--head", str(r / "head")],
        "export": ["--mlm", world["mlm"], "--ar", world["ar"], "--head", str(r / "head"), "--out", out],
        "infill": ["--model", str(r / "ckpt"), "--text", "Paris is the {{2}} of France."],
        "serve": ["--model", str(r / "ckpt")],
        "generate": ["--model", str(r / "ckpt"), "--steps", "1", "--length", "8", "--chains", "1"],
        "extract": ["--mlm", world["mlm"], "--ar", world["ar"], "--corpus", str(r / "corpus.jsonl"), "--store", out],
        "pretrain-mlm": ["--tokenizer-from", world["ar"], "--corpus", str(r / "corpus.jsonl"), "--out", out],
        "demo": [],
        "bench": ["--what", "decode"],
    }[verb]


@st.composite
def hostile_call(draw, verb: str, world: dict):
    module, config_name, *_ = VERBS[verb]
    cls = getattr(importlib.import_module(module), config_name)
    hints, pool = typing.get_type_hints(cls), value_pool(world)
    chosen = draw(st.lists(st.sampled_from([f.name for f in dataclasses.fields(cls)]), max_size=5, unique=True))
    values = {}
    for name in chosen:
        kind = kind_of(hints[name])
        values[name] = draw(st.booleans()) if kind == "bool" else draw(st.sampled_from(pool[kind] + ["None"]))
    if verb == "generate" and values.get("steps", "").isdigit():
        values["steps"] = str(min(int(values["steps"]), 2))  # a billion annealing steps is a valid, endless request
    argv = valid_base(verb, world, draw(st.integers(0, 10**9)))  # reach past parsing: hostile values override these
    as_yaml = draw(st.sampled_from(["flags", "flags", "yaml", "broken-yaml"]))
    if as_yaml == "flags":
        for name, v in values.items():
            flag = "--" + name.replace("_", draw(st.sampled_from(["-", "_"])))
            argv += ([flag] if v else ["--no-" + flag[2:]]) if isinstance(v, bool) else [flag, v]
    else:
        cfg = world["root"] / f"cfg-{verb}-{draw(st.integers(0, 10**9))}.yaml"
        typed = {k: (None if v == "None" else yaml.safe_load(v) if isinstance(v, str) and v[:1] in tuple("-0123456789") else v) for k, v in values.items()}
        text = yaml.safe_dump(typed) if as_yaml == "yaml" else "a: [b\n" + draw(st.text(string.printable, max_size=20))
        cfg.write_text(text)
        argv += ["--config", str(cfg)]
    if draw(st.booleans()):
        argv += draw(st.sampled_from([["--bogus", "1"], ["stray"], ["--"], ["--lr"]]))
    return argv


def check_call(verb: str, argv: list[str], world: dict, capsys) -> None:
    root = world["root"]
    before = {n: digest(root / n) for n in ("store", "head", "ckpt")}
    code = main([verb] + argv + (["--print-config"] if verb not in CHEAP else []), **({"stop_after": 2} if verb == "train" else {}))
    err = capsys.readouterr().err
    assert "Traceback" not in err, err[-3000:]
    assert code in (0, 2, 3), f"exit {code} for maria {verb} {argv}: {err[-1500:]}"
    if code:
        lines = [ln for ln in err.splitlines() if ln.strip() and not ln.rstrip().endswith("/s]")]
        assert len(lines) == 1 and lines[0].startswith(f"maria {verb}: error: "), f"maria {verb} {argv}:\n{err[-1500:]}"
        assert len(lines[0].split("error: ", 1)[1]) > 25, f"a bare title is not a message naming the fix: {lines[0]}"
    left = [p for p in root.rglob("*") if p.name.endswith((".tmp", ".partial")) or ".partial" in p.name]
    assert not left, f"half-written files after maria {verb} {argv}: {left}"
    assert before == {n: digest(root / n) for n in before}, f"maria {verb} {argv} changed an input"


@pytest.mark.parametrize("verb", list(VERBS))
def test_hostile_arguments(verb, world, capsys, monkeypatch):
    monkeypatch.chdir(world["root"] / "dir")  # relative outputs land in a scratch folder

    @settings(max_examples=12 if verb in CHEAP else 25, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
    @given(hostile_call(verb, world))
    def run(argv):
        check_call(verb, argv, world, capsys)

    run()


@pytest.mark.parametrize("text", ["{{999999}}", "word " * 30000, "a {{0}} b", "{{", "\x00\x01", "", "{{3}}" * 400])
def test_hostile_texts_are_refused_in_one_line_or_filled(text, world, capsys, tmp_path):
    code = main(["infill", "--model", str(world["root"] / "ckpt"), "--text", text, "--device", "cpu"])
    err = capsys.readouterr().err
    assert code in (0, 2) and "Traceback" not in err, err[-2000:]
    if code:
        assert len([ln for ln in err.splitlines() if ln.strip()]) == 1, err


# --- corpora, compression and URLs: `maria extract` for real, on the session's embedded Ray -------------------------

DOC = "The quick brown fox jumps over the lazy dog, then sleeps in the sun for a while by the door."


def jsonl(*rows) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


def parquet(table_rows: dict) -> bytes:
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    buf = io.BytesIO()
    pq.write_table(pa.table(table_rows), buf)
    return buf.getvalue()


BODIES = {  # per file kind: named bodies, good and hostile (a callable draws its own)
    "jsonl": {
        "ok": jsonl({"text": DOC}, {"text": DOC * 2}),
        "broken line": jsonl({"text": DOC}) + b'{"text": "open\n',
        "not objects": b'[1, 2]\n"text"\n',
        "no text key": jsonl({"body": DOC}),
        "number text": jsonl({"text": 5}),
        "list text": jsonl({"text": ["a"]}),
        "mixed types": jsonl({"text": DOC}, {"text": 5}),
        "nulls": jsonl({"text": None}, {"text": DOC}),
        "surrogate": b'{"text": "a \\ud800 b"}\n',
        "not utf-8": b'{"text": "caf\xe9 au lait"}\n',
        "bom": b"\xef\xbb\xbf" + jsonl({"text": DOC}),
        "empty": b"",
        "blank docs": jsonl({"text": "  "}, {"text": ""}),
        "random bytes": st.binary(max_size=300),
        "random text": st.text(max_size=300).map(str.encode),
    },
    "csv": {
        "ok": f'text,n\n"{DOC}",1\n"{DOC}, again",2\n'.encode(),
        "open quote": f'text,n\n"{DOC},1\nnext,2\n'.encode(),
        "text after quote": b'text,n\n"a" b,1\n',
        "short row": f"text,n\n{DOC},1\nshort\n".encode(),
        "no text column": b"body,n\nx,1\n",
        "bom": f"\ufefftext\n{DOC}\n".encode(),
        "empty": b"",
        "random text": st.text(max_size=300).map(str.encode),
    },
    "txt": {"ok": DOC.encode() * 3, "not utf-8": b"caf\xe9 " * 40, "empty": b"", "random bytes": st.binary(max_size=300)},
    "parquet": {
        "ok": lambda: parquet({"text": [DOC, DOC * 2]}),
        "number column": lambda: parquet({"text": [1, 2]}),
        "no text column": lambda: parquet({"body": [DOC]}),
        "random bytes": st.binary(max_size=300),
    },
}
WRAPS = {
    "none": ("", None),
    "gzip": (".gz", "gzip"),
    "zstd": (".zst", "zstd"),
    "not gzip": (".gz", None),
    "cut gzip": (".gz", "cut"),
    "not zstd": (".zst", None),
}


@st.composite
def hostile_corpus(draw, root: Path):
    """A folder holding one corpus file: a kind, a body (good or hostile) and a compression (or a wrong one)."""
    import gzip

    import pyarrow as pa

    kind, name = draw(st.sampled_from([(k, n) for k in sorted(BODIES) for n in sorted(BODIES[k])]))
    body = BODIES[kind][name]
    data = draw(body) if isinstance(body, st.SearchStrategy) else body() if callable(body) else body
    wrap = "none" if kind == "parquet" else draw(st.sampled_from(sorted(WRAPS)))
    suffix, codec = WRAPS[wrap]
    if codec == "gzip":
        data = gzip.compress(data)
    elif codec == "zstd":
        data = pa.compress(data, codec="zstd", asbytes=True)
    elif codec == "cut":
        data = gzip.compress(data)[:-9]
    folder = Path(tempfile.mkdtemp(prefix="corpus-", dir=root))  # hypothesis replays a failing example: a fresh folder each time
    (folder / f"docs.{kind}{suffix}").write_bytes(data)
    return folder, f"{kind}/{name}/{wrap}"


def check_extract(world: dict, corpus: str, root: Path, capsys, label: str) -> int:
    """One `maria extract`: success, or one line with exit 2/3 within 20 s (an input error is never retried); nothing
    half-written; the corpus unchanged; a store a failed run leaves is one a re-run resumes (never a corrupt one).
    A success does the whole job (two backbone loads on a 2-CPU Ray): it is only held to finishing at all."""
    import time

    from maria_storage import verify_store

    store = root / f"store-{abs(hash(label)) % 10**9}-{time.monotonic_ns()}"
    local = Path(corpus) if "://" not in corpus and Path(corpus).exists() else None
    before = digest(local) if local and local.is_dir() else None
    start = time.monotonic()
    code = main(
        ["extract", "--mlm", world["mlm"], "--ar", world["ar"], "--corpus", corpus, "--store", str(store), "--window-length", "16", "--docs-per-block", "2"]
    )
    took = time.monotonic() - start
    err = capsys.readouterr().err
    assert "Traceback" not in err and code in (0, 2, 3), f"{label}: exit {code}: {err[-2000:]}"
    if code:
        lines = [ln for ln in err.splitlines() if ln.strip() and not ln.rstrip().endswith("/s]")]
        assert len(lines) == 1 and lines[0].startswith("maria extract: error: "), f"{label}: {err[-2000:]}"
        assert "attempts (total backoff" not in lines[0] and len(lines[0]) < 700, f"{label}: Ray's retry text: {lines[0]}"
    assert took < (20 if code else 300), f"{label}: exit {code} after {took:.1f} s"
    left = [p for p in root.rglob("*") if p.name.endswith((".tmp", ".partial")) or ".partial" in p.name]
    assert not left, f"{label}: half-written files {left}"
    if store.exists():
        assert not verify_store(str(store)).corrupt, f"{label}: a run left a corrupt store"
        assert code or verify_store(str(store)) == [], f"{label}: exit 0 but the store is not complete"
    if before is not None:
        assert digest(local) == before, f"{label}: the corpus changed"
    return code


@pytest.mark.ray
def test_hostile_corpora(world, ray_local, tmp_path, capsys):
    """Generated corpus files of every kind, good or hostile, compressed or wrongly so."""

    @settings(max_examples=30, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
    @given(hostile_corpus(tmp_path))
    def run(case):
        folder, label = case
        check_extract(world, str(folder), tmp_path, capsys, label)

    run()


@pytest.mark.ray
@pytest.mark.parametrize(
    "corpus",
    [
        "s3://maria-test/no-such-corpus/",
        "s3://no-such-bucket/corpus/",
        "ftp://127.0.0.1:9/c/",
        "http://127.0.0.1:9/c.jsonl",
        "gs://bucket/corpus/",
        "foo://x",
        "hf://datasets/x/y",
        "{root}/nothing-*.jsonl",
        "{root}/mixed",
        "{root}/missing.jsonl",
    ],
)
def test_hostile_corpus_urls(world, ray_local, tmp_path, capsys, corpus):
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    (mixed / "a.jsonl").write_bytes(jsonl({"text": DOC}))
    (mixed / "b.csv").write_text(f"text\n{DOC}\n")
    assert check_extract(world, corpus.format(root=tmp_path), tmp_path, capsys, corpus) == 2


@pytest.mark.ray
def test_hostile_store_urls(world, ray_local, tmp_path, capsys, monkeypatch):
    import s3fs

    corpus = tmp_path / "c.jsonl"
    corpus.write_bytes(jsonl({"text": DOC * 3}))
    for store in ("ftp://127.0.0.1:9/s", "gs://bucket/s", "foo://s", "s3://no-such-bucket/s"):
        code = main(["extract", "--mlm", world["mlm"], "--ar", world["ar"], "--corpus", str(corpus), "--store", store])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and err[0].startswith("maria extract: error: "), (store, err)
    for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(k)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    s3fs.S3FileSystem.clear_instance_cache()
    try:
        assert main(["extract", "--mlm", world["mlm"], "--ar", world["ar"], "--corpus", str(corpus), "--store", "s3://maria-test/s"]) == 2
        assert "no credentials" in capsys.readouterr().err
    finally:
        s3fs.S3FileSystem.clear_instance_cache()
