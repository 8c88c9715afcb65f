"""verify_store: list everything wrong with a feature store (empty list = fine). Backs `maria verify STORE`."""
from __future__ import annotations

import numpy as np
import zarr

from storage.format import INIT_ARRAYS, StoreError, init_shapes
from storage.store import _ZARR_MISSING, FeatureStore, block_problem, open_store


def _check_init(store: FeatureStore) -> list[str]:
    if not store.manifest.get("has_init", True):
        return []
    expected = init_shapes(store.manifest)
    problems = []
    for name in INIT_ARRAYS:
        try:
            arr = zarr.open_array(store._loc.zarr_store, path=f"init/{name}", mode="r", zarr_format=3)
        except _ZARR_MISSING:
            problems.append(f"init: array {name} is missing")
            continue
        if name == "vocab_map":
            if arr.ndim != 1 or arr.dtype != np.int64:
                problems.append(f"init: vocab_map has shape {arr.shape} dtype {arr.dtype}, expected 1-D int64")
        elif arr.shape != expected[name]:
            problems.append(f"init: {name} has shape {arr.shape}, the manifest implies {expected[name]}")
    return problems


def _check_block(store: FeatureStore, block_id: str, check_data: bool) -> str | None:
    try:
        info = store.commit_info(block_id)
        for key in ("attempt", "rows", "checksums"):
            if key not in info:
                return f"commit marker lacks {key!r}"
        arrays = store.block_arrays(block_id, info)
    except StoreError as e:  # CorruptBlockError carries the bare reason
        return getattr(e, "reason", str(e))
    for name, arr in arrays.items():  # metadata-only checks first: cheap, and they explain the data checks
        if arr.shape[0] != info["rows"]:
            return f"array {name} has {arr.shape[0]} rows, the commit marker says {info['rows']}"
    f = arrays["features"]
    if f.ndim != 2 or f.shape[1] != store.feature_dim:
        return f"features have shape {f.shape}, expected (N, {store.feature_dim}) = (N, d_mlm + d_ar)"
    if not check_data:
        return None
    try:
        data = {name: arr[...] for name, arr in arrays.items()}
    except Exception as e:  # a damaged chunk can fail to decode (compressed arrays) or have the wrong size
        return f"cannot read its arrays ({type(e).__name__}: {e})"
    return block_problem(data, info, store)


def verify_store(url: str, check_data: bool = True, storage_options: dict | None = None) -> list[str]:
    """Problems found, each naming what it concerns ("block b000123: ..."); [] when the store is sound.
    check_data=False skips reading the arrays (no checksums, no NaN scan): metadata and shapes only."""
    try:
        store = open_store(url, storage_options)
    except StoreError as e:
        return [str(e)]
    m = store.manifest  # open_store has already refused other format versions
    missing = [k for k in ("d_mlm", "d_ar", "vocab_size") if not isinstance(m.get(k), int)]
    if missing:
        return [f"manifest: lacks {missing}"]
    problems = _check_init(store)
    blocks = store.committed_blocks()
    for block_id in blocks:
        problem = _check_block(store, block_id, check_data)
        if problem:
            problems.append(f"block {block_id}: {problem}")
    if "rows" in m and not problems:
        rows = store.num_rows(blocks)
        if m["rows"] != rows:
            problems.append(f"manifest: rows is {m['rows']} but the committed blocks hold {rows} (blocks committed after finalize?)")
    return problems

