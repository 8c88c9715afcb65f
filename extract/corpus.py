"""Corpora in, masked windows out: loading, windowing and masking (METHOD.md, "Masking").

Everything here is deterministic from (seed, document, window, mask index), so a re-run of the
job produces identical windows and masks, and any block can be recomputed alone.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np


class CorpusError(ValueError):
    """A corpus the job cannot use; the message names the fix."""


@dataclass
class MaskingConfig:
    mode: str = "token"  # token (independent) | word (all tokens of a word) | span (contiguous spans)
    rate: float | None = None  # fixed mask rate; None = a rate r ~ Uniform(min_rate, max_rate) per window
    min_rate: float = 0.0  # lower end of the uniform rate
    max_rate: float = 1.0  # upper end of the uniform rate
    span_mean: float = 3.0  # mean span length in tokens (mode span)
    masks_per_window: int = 1  # K masks of each window; the AR runs once for all K

    def __post_init__(self):
        if self.mode not in ("token", "word", "span"):
            raise CorpusError(f"masking mode {self.mode!r} is unknown; use token, word or span")
        for name in ("rate", "min_rate", "max_rate"):
            v = getattr(self, name)
            if v is not None and not 0.0 <= v <= 1.0:
                raise CorpusError(f"mask {name.replace('_', ' ')} {v} is outside [0, 1]; pick a rate between 0 and 1")
        if self.min_rate > self.max_rate:
            raise CorpusError(f"mask min rate {self.min_rate} is above max rate {self.max_rate}")
        if self.masks_per_window < 1 or self.span_mean < 1:
            raise CorpusError("masks per window and span mean must be >= 1")


def load_corpus(path: str, text_column: str = "text", max_docs: int | None = None) -> list[str]:
    """Documents from a `datasets` folder (save_to_disk), parquet, JSONL/JSON, or .txt files.

    Empty and whitespace-only documents are dropped; an empty corpus, a missing or non-text
    column, and undecodable bytes are refused."""
    p = Path(path).expanduser()
    if not p.exists():
        raise CorpusError(f"corpus {path} does not exist; pass a datasets folder, parquet, JSONL or .txt files")
    if p.is_dir() and ((p / "dataset_info.json").exists() or (p / "state.json").exists() or (p / "dataset_dict.json").exists()):
        import datasets

        ds = datasets.load_from_disk(str(p))
        if isinstance(ds, datasets.DatasetDict):
            ds = ds["train"] if "train" in ds else ds[next(iter(ds))]
    else:
        files = sorted(p.rglob("*")) if p.is_dir() else [p]
        files = [f for f in files if f.is_file() and f.suffix in (".parquet", ".jsonl", ".json", ".txt")]
        if not files:
            raise CorpusError(f"corpus {path} holds no .parquet, .jsonl, .json or .txt files")
        if all(f.suffix == ".txt" for f in files):
            texts = []
            for f in files:
                try:
                    texts.append(f.read_bytes().decode("utf-8"))
                except UnicodeDecodeError as e:
                    raise CorpusError(f"{f} is not valid UTF-8 (byte {e.start}); re-encode it as UTF-8") from None
            return _clean(texts, path, max_docs)
        import datasets

        datasets.disable_progress_bars()  # a corpus loads in seconds; its bars would bury our one-line errors
        kind = {".parquet": "parquet", ".jsonl": "json", ".json": "json"}[files[0].suffix]
        try:
            ds = datasets.load_dataset(kind, data_files=[str(f) for f in files], split="train")
        except Exception as e:  # noqa: BLE001 -- arrow/json errors: name the file problem on one line
            raise CorpusError(f"cannot read corpus {path} as {kind}: {str(e).splitlines()[0][:200]}") from None
    if text_column not in ds.column_names:
        raise CorpusError(f"corpus {path} has no column {text_column!r} (columns: {ds.column_names}); pass --text-column")
    feature = ds.features[text_column]
    if getattr(feature, "dtype", None) not in ("string", "large_string"):
        raise CorpusError(f"column {text_column!r} of {path} holds {feature}, not text; pass --text-column naming a text column")
    n = len(ds) if max_docs is None else min(len(ds), max_docs)
    return _clean(ds.select(range(n))[text_column], path, None)


def _clean(texts: list, path: str, max_docs: int | None) -> list[str]:
    docs = [t for t in texts if isinstance(t, str) and t.strip()]
    if max_docs is not None:
        docs = docs[:max_docs]
    if not docs:
        raise CorpusError(f"corpus {path} has no non-empty documents; check the path and --text-column")
    return docs


def corpus_fingerprint(docs: list[str]) -> str:
    h = hashlib.sha256()
    for d in docs:
        h.update(hashlib.sha256(d.encode()).digest())
    return h.hexdigest()[:16]


def cut_windows(ids: list[int], window_length: int, min_length: int = 8) -> list[list[int]]:
    """Consecutive windows of one document (never two documents in one window); a short tail
    window is kept if it has at least min_length tokens."""
    windows = [ids[i : i + window_length] for i in range(0, len(ids), window_length)]
    return [w for w in windows if len(w) >= min(min_length, window_length)]


def word_starts(tokenizer, vocab_size: int) -> np.ndarray:
    """starts[v] = True when token v begins a new word (a leading space marker or whitespace)."""
    starts = np.zeros(vocab_size, dtype=bool)
    for v, tok in enumerate(tokenizer.convert_ids_to_tokens(list(range(min(vocab_size, len(tokenizer)))))):
        starts[v] = tok is not None and (tok[:1] in ("Ġ", "▁", " ", "Ċ", "\n") or not tok[:1].isalnum())
    return starts


def sample_mask(ids: np.ndarray, cfg: MaskingConfig, seed: int, doc: int, window: int, k: int,
                starts: np.ndarray | None = None, first_maskable: int = 0) -> tuple[np.ndarray, float]:
    """(mask, rate) for one window, from its own RNG stream (seed, doc, window, k)."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, doc, window, k]))
    n = len(ids)
    rate = cfg.rate if cfg.rate is not None else float(rng.uniform(cfg.min_rate, cfg.max_rate))
    if cfg.mode == "token":
        mask = rng.random(n) < rate
    elif cfg.mode == "word":
        word = np.cumsum(starts[ids] if starts is not None else np.ones(n, dtype=bool)) - 1
        word -= word.min() if n else 0
        mask = (rng.random(int(word.max()) + 1 if n else 0) < rate)[word]
    else:  # span: place geometric-length spans until the rate is reached
        mask = np.zeros(n, dtype=bool)
        target = int(round(rate * n))
        while mask.sum() < target:
            length = min(int(rng.geometric(1.0 / cfg.span_mean)), target - int(mask.sum()))
            start = int(rng.integers(0, max(1, n - length + 1)))
            mask[start : start + length] = True
    mask[:first_maskable] = False
    return mask, rate
