"""Writing one block exactly once: validate, write a fresh attempt group, commit, publish.

    1. the attempt's arrays go into blocks/<id>/<attempt>/ (a fresh random name: no writer shares a file);
    2. the commit marker commits/<id>.json is written in one atomic step (os.replace locally, one PUT on S3:
       object stores have no rename, but a single PUT is all-or-nothing); it decides, and the last one wins;
    3. the block group blocks/<id>/zarr.json, naming the same attempt, is written the same way right after.

A crash before 2 leaves an attempt nobody reads (gc_uncommitted removes it); a crash between 2 and 3, or two
attempts racing, leaves a block group missing or naming another complete attempt: `repair_block_groups`
(run by gc_uncommitted at the end of every extraction) rewrites it from the marker, and verify reports it.
"""

from __future__ import annotations

import json
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import zarr

from maria_storage import layout
from maria_storage.format import (
    BLOCK_ARRAYS,
    BLOCK_ID_RE,
    SCALES,
    StoreError,
    block_array_dtypes,
    check_block_id,
    features_finite,
    scales_valid,
    sha256_of,
    to_store_features,
)
from maria_storage.zarr_compat import array_metadata_from_json, metadata_json

# write_empty_chunks=True: every chunk is a file (a missing one is damage, not zeros), and zarr skips its
# "is this chunk all fill value?" scan over the data.
ARRAY_CONFIG = {"write_empty_chunks": True}


def validate_block(store, arrays: dict) -> dict[str, np.ndarray]:
    """Check and convert everything before the first byte is written (a float8 store's per-row scales are
    computed here, from the float features callers pass)."""
    missing = [k for k in BLOCK_ARRAYS if k not in arrays]
    unknown = [k for k in arrays if k not in BLOCK_ARRAYS]
    if missing or unknown:
        raise StoreError(f"block arrays: missing {missing}, unknown {unknown}; pass exactly {list(BLOCK_ARRAYS)}")
    out = to_store_features(arrays["features"], store.manifest)
    for name, dtype in BLOCK_ARRAYS.items():
        if name != "features":
            a = np.asarray(arrays[name])
            if a.dtype.kind not in "iuf" or (a.dtype.kind == "f" and name != "mask_rates"):
                raise StoreError(f"block array {name} has dtype {a.dtype}; it must be {dtype.name}-compatible")
            out[name] = np.ascontiguousarray(a, dtype=dtype)
    f = out["features"]
    if f.ndim != 2 or f.shape[1] != store.feature_dim:
        raise StoreError(f"features have shape {f.shape}, expected (N, {store.feature_dim}) = (N, d_mlm + d_ar)")
    n = f.shape[0]
    for name, a in out.items():
        if name != "features" and a.shape != (n,):
            raise StoreError(f"block array {name} has shape {a.shape}, expected ({n},) like features' rows")
    if not features_finite(f) or (SCALES in out and not scales_valid(out[SCALES])):
        raise StoreError(
            f"features contain NaN or inf (before or after conversion to {store.manifest['feature_dtype']}); check the extraction (fp16 overflow?)"
        )
    t = out["targets"]
    if n and (t.min() < 0 or t.max() >= store.vocab_size):
        raise StoreError(f"targets must be AR token ids in [0, {store.vocab_size}); got [{t.min()}, {t.max()}]")
    return out


def write_hierarchy(zarr_store, group_meta, arrays: dict[str, np.ndarray], metas: dict) -> dict[str, str]:
    """Write a group and its arrays into `zarr_store` (a sub-store rooted at the group); sha256 per array.
    All metadata goes in one concurrent batch (create_hierarchy), not array by array: on S3 per-array
    creation costs ~8 requests of existence checks each."""
    nodes = {"": group_meta, **metas}
    created = dict(zarr.create_hierarchy(store=zarr_store, nodes=nodes))
    # Hash in a thread while zarr writes: hashlib releases the GIL, so the checksums are nearly free.
    with ThreadPoolExecutor(max_workers=1) as pool:
        hashes = {name: pool.submit(sha256_of, a) for name, a in arrays.items()}
        for name, a in arrays.items():
            if a.size:
                created[name].with_config(ARRAY_CONFIG)[...] = a
        return {name: h.result() for name, h in hashes.items()}


def write_attempt(store, block_id: str, data: dict[str, np.ndarray], stats: dict) -> tuple[dict, bytes]:
    """Write a fresh attempt of the block; (its commit marker, the block group's zarr.json bytes)."""
    attempt = uuid.uuid4().hex[:16]
    metas = {name: layout.block_array_metadata(name, a, store.manifest) for name, a in data.items()}
    group = layout.attempt_group(block_id, attempt, metas)
    checksums = write_hierarchy(store._loc.sub_store(f"blocks/{block_id}/{attempt}"), group, data, metas)
    marker = {
        "block_id": block_id,
        "attempt": attempt,
        "rows": int(len(data["features"])),
        "feature_dtype": store.manifest["feature_dtype"],
        "checksums": checksums,
        "stats": stats,
        "written_at": time.time(),
    }
    return marker, metadata_json(layout.block_group(marker, group))


def jsonable_stats(block_id: str, stats: dict | None) -> dict:
    try:
        return json.loads(json.dumps(stats or {}))
    except (TypeError, ValueError) as e:
        raise StoreError(f"block {block_id}: stats are not JSON-serialisable ({e})") from e


def block_group_from_marker(store, marker: dict) -> bytes:
    """Rebuild a block group's zarr.json from its marker and the attempt's own metadata (for repairs)."""
    loc, block_id, attempt = store._loc, marker["block_id"], marker["attempt"]
    metas = {}
    for name in block_array_dtypes(store.manifest):
        doc = json.loads(loc.read_bytes("blocks", block_id, attempt, name, "zarr.json"))
        metas[name] = array_metadata_from_json(doc)
    return metadata_json(layout.block_group(marker, layout.attempt_group(block_id, attempt, metas)))


def published_attempt(store, block_id: str) -> str | None:
    """The attempt the block's Zarr group names, or None when it has none (or it is unreadable)."""
    try:
        attrs = layout.group_attributes(store._loc.read_optional("blocks", check_block_id(block_id), "zarr.json"))
    except ValueError:
        return None
    return ((attrs or {}).get("maria_commit") or {}).get("attempt")


def repair_block_groups(store, markers: dict[str, dict]) -> int:
    """Make every committed block's group name its marker's attempt (after a crash between commit and
    publish, or two attempts racing). Driver only, with no writer running. Returns how many it rewrote."""
    fixed = 0
    for block_id, marker in markers.items():
        if published_attempt(store, block_id) != marker["attempt"]:
            store._loc.write_atomic(block_group_from_marker(store, marker), "blocks", block_id, "zarr.json")
            fixed += 1
    return fixed


def marker_problem(info) -> str | None:
    """What is wrong with a parsed commit marker's shape (before anything trusts its fields), or None."""
    if not isinstance(info, dict):
        return f"is a JSON {type(info).__name__}, not an object"
    if not isinstance(info.get("attempt"), str) or not BLOCK_ID_RE.match(info["attempt"]):
        return f"names no valid attempt ({info.get('attempt')!r})"
    if not isinstance(info.get("rows"), int) or isinstance(info["rows"], bool) or info["rows"] < 0:
        return f"has no valid row count ({info.get('rows')!r})"
    if not isinstance(info.get("checksums"), dict):
        return "has no checksums"
    return None


def block_problem(data: dict[str, np.ndarray], info: dict, store) -> str | None:
    """First thing wrong with a block's arrays against its marker and the manifest, or None."""
    rows = info.get("rows")
    names = block_array_dtypes(store.manifest)  # BLOCK_ARRAYS, and a float8 store's per-row scales
    for name in names:
        if name not in data:
            return f"array {name} is missing"
        if len(data[name]) != rows:
            return f"array {name} has {len(data[name])} rows, the commit marker says {rows}"
    f = data["features"]
    if f.ndim != 2 or f.shape[1] != store.feature_dim:
        return f"features have shape {f.shape}, expected (N, {store.feature_dim})"
    if f.dtype != store.feature_dtype:
        return f"features have dtype {f.dtype}, the manifest says {store.feature_dtype}"
    checksums = info.get("checksums", {})
    for name in names:
        if name not in checksums:
            return f"commit marker has no checksum for {name}"
        if sha256_of(data[name]) != checksums[name]:
            return f"checksum of {name} does not match its commit marker (data damaged)"
    if not features_finite(f):
        return "features contain NaN or inf"
    if SCALES in names and not scales_valid(data[SCALES]):
        return f"{SCALES} hold a value that is not finite and positive"
    return None
