"""Shared helpers for the extraction tests (the fixtures themselves live in conftest.py)."""
from extract.job import ExtractConfig

ARRAYS = ("features", "targets", "doc_ids", "window_ids", "positions", "mask_rates")


def config(pairs, corpus, out, kind="modernbert-olmo", **kw):
    kw = {"window_length": 24, "docs_per_block": 3, "batch_size": 4, "masks_per_window": 2, **kw}
    return ExtractConfig(mlm=pairs[kind][0], ar=pairs[kind][1], corpus=corpus, out=str(out), **kw)


def read_all(url, **kw):
    from storage import open_store

    store = open_store(url, **kw)
    return {b: store.read_block(b) for b in store.committed_blocks()}
