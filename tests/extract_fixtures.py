"""Shared helpers for the extraction tests (the fixtures themselves live in conftest.py)."""

import sys

from maria_app.cli import parse
from maria_extract.job import ExtractConfig

ARRAYS = ("features", "targets", "doc_ids", "window_ids", "positions", "mask_rates")


def config(pairs, corpus, out, kind="modernbert-olmo", **kw):
    kw = {"window_length": 24, "docs_per_block": 3, "batch_size": 4, "masks_per_window": 2, **kw}
    return ExtractConfig(mlm=pairs[kind][0], ar=pairs[kind][1], corpus=corpus, store=str(out), **kw)


def block(file: int, row: int) -> str:
    from maria_extract.corpus import block_id

    return block_id(file, row)


def read_all(url, **kw):
    from maria_storage import open_store

    store = open_store(url, **kw)
    return {b: store.read_block(b) for b in store.committed_blocks()}


def maria_command(*args) -> list[str]:
    """The `maria` CLI as a subprocess command (one line to change when the CLI module moves)."""
    return [sys.executable, "-m", "maria_app.cli", *map(str, args)]


def config_from_args(argv: list[str]) -> ExtractConfig:
    """`maria extract` arguments -> ExtractConfig through the real CLI parser (tyro, as `maria` parses them)."""
    config, _ = parse("extract", [str(a) for a in argv])
    return config
