"""MARIA feature store: aligned hidden-state features of masked tokens, as a Zarr v3 store (local or fsspec URL).

    store = create_store(url, manifest, init_weights)   # driver, once
    store.write_block("b000123", arrays)                # extraction workers, idempotent
    for batch in ShuffledReader(url, batch_size=4096):  # training
        ...
"""
from storage.format import (FORMAT_VERSION, IDENTITY_KEYS, CorruptBlockError, StoreError, StoreMismatchError,
                            StoreNotFoundError, as_float32)
from storage.reader import ShuffledReader, load_all
from storage.store import FeatureStore, create_store, open_store
from storage.verify import verify_store

__all__ = ["FORMAT_VERSION", "IDENTITY_KEYS", "StoreError", "StoreMismatchError", "CorruptBlockError",
           "StoreNotFoundError", "as_float32", "create_store", "open_store", "FeatureStore", "verify_store",
           "ShuffledReader", "load_all"]
