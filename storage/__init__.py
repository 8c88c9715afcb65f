"""MARIA feature store: aligned hidden-state features of masked tokens, as a Zarr v3 store (local or fsspec URL).

    store = create_store(url, manifest, init_weights)   # driver, once
    store.write_plan(block_ids, command)                # driver: what "complete" means, and how to finish
    store.write_block("b000123", arrays)                # extraction workers, idempotent
    for batch in ShuffledReader(url, batch_size=4096):  # training
        ...

Imports no torch, transformers or ray (tests/test_storage_readers.py checks it).
"""

from maria_storage.format import (
    FEATURE_DTYPES,
    FORMAT_VERSION,
    IDENTITY_KEYS,
    SCALES,
    CorruptBlockError,
    CorruptStoreError,
    IncompleteStoreError,
    StoreAccessError,
    StoreError,
    StoreMismatchError,
    StoreNotFoundError,
    as_float32,
)
from maria_storage.reader import ShuffledReader, load_all
from maria_storage.store import BlockArray, FeatureStore, create_store, open_store, probe_store
from maria_storage.verify import CORRUPT, INCOMPLETE, UNREADABLE, Problem, VerifyReport, verify_store

__all__ = [
    "FEATURE_DTYPES",
    "FORMAT_VERSION",
    "IDENTITY_KEYS",
    "SCALES",
    "StoreError",
    "StoreMismatchError",
    "CorruptStoreError",
    "CorruptBlockError",
    "IncompleteStoreError",
    "StoreNotFoundError",
    "StoreAccessError",
    "as_float32",
    "create_store",
    "open_store",
    "probe_store",
    "FeatureStore",
    "BlockArray",
    "verify_store",
    "VerifyReport",
    "Problem",
    "CORRUPT",
    "INCOMPLETE",
    "UNREADABLE",
    "ShuffledReader",
    "load_all",
]
