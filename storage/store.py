"""FeatureStore: create/open a MARIA feature store, write blocks idempotently, read them back.

Writers (Ray tasks) call `write_block`; only the driver calls `create_store` and `finalize`, so the root
metadata has exactly one writer. See storage/format.py for the layout.
"""
from __future__ import annotations

import json
import os
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import zarr
from zarr.codecs import ZstdCodec
from zarr.core.group import GroupMetadata

from storage.format import (BLOCK_ARRAYS, FORMAT_VERSION, IDENTITY_KEYS, INIT_ARRAYS, MANIFEST_KEY,
                            CorruptBlockError, Location, StoreError, StoreMismatchError, StoreNotFoundError,
                            check_block_id, feature_chunk_rows, features_finite, init_shapes, sha256_of, stored_feature_dtype, to_store_features)

# Features are near-incompressible float16 (measured: zstd-1 saves ~8% at ~300 MB/s per core, lz4 saves nothing),
# so they are stored raw. The small per-row arrays compress well and cost nothing to compress.
FEATURE_COMPRESSORS = None
SMALL_COMPRESSORS = (ZstdCodec(level=1),)
SMALL_CHUNK_ROWS = 1 << 16  # a reader chunk (4096 rows) then fetches at most 256-512 KB of these
# write_empty_chunks=True: every chunk is a file (a missing one is damage, not zeros), and zarr skips its
# "is this chunk all fill value?" scan over the data.
ARRAY_CONFIG = {"write_empty_chunks": True}
_ZARR_MISSING = (FileNotFoundError, KeyError, zarr.errors.NodeNotFoundError, zarr.errors.GroupNotFoundError,
                 zarr.errors.ArrayNotFoundError)


def _chunk_shape(a: np.ndarray) -> tuple[int, ...]:
    rows = feature_chunk_rows(a.shape[1], a.itemsize) if a.ndim == 2 else SMALL_CHUNK_ROWS
    return (max(1, min(len(a), rows)),) + a.shape[1:]


def _array_metadata(name: str, a: np.ndarray):
    """Zarr metadata of one block array (built in memory; nothing is written)."""
    template = zarr.create_array(zarr.storage.MemoryStore(), name=name, shape=a.shape, dtype=a.dtype,
                                 chunks=_chunk_shape(a),
                                 compressors=FEATURE_COMPRESSORS if name == "features" else SMALL_COMPRESSORS)
    return template.metadata


def _normalize_manifest(manifest: dict) -> dict:
    """JSON round trip (tuples -> lists, so stored and fresh manifests compare equal) plus required fields."""
    if not isinstance(manifest, dict):
        raise StoreError(f"manifest must be a dict, got {type(manifest).__name__}")
    try:
        m = json.loads(json.dumps(manifest))
    except (TypeError, ValueError) as e:
        raise StoreError(f"manifest is not JSON-serialisable ({e}); pass plain str/int/float/list/dict values") from e
    for key in ("d_mlm", "d_ar", "vocab_size"):
        if not isinstance(m.get(key), int) or m[key] <= 0:
            raise StoreError(f"manifest needs a positive int {key!r}, got {m.get(key)!r}")
    m.setdefault("feature_dtype", "float16")
    stored_feature_dtype(m)  # validates the name
    m["format_version"] = FORMAT_VERSION
    return m


def _read_manifest(loc: Location) -> dict | None:
    """The manifest from the root zarr.json, or None when there is no MARIA store here."""
    try:
        root = json.loads(loc.read_bytes("zarr.json"))
    except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
        return None
    except ValueError as e:
        raise StoreError(f"{loc.url}/zarr.json is not valid JSON ({e}); the store's root metadata is damaged") from e
    manifest = root.get("attributes", {}).get(MANIFEST_KEY)
    return manifest if isinstance(manifest, dict) else None


def _check_identity(stored: dict, new: dict, url: str) -> None:
    for key in IDENTITY_KEYS:
        if (key in stored or key in new) and stored.get(key) != new.get(key):
            raise StoreMismatchError(
                f"{url} holds features of another extraction: {key} is {stored.get(key)!r} there but {new.get(key)!r} "
                f"now; use another --out or delete that store")


def _check_format_version(manifest: dict, url: str) -> None:
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise StoreError(f"{url} has store format_version {version!r}, this code reads version {FORMAT_VERSION}; "
                         f"use a matching MARIA version or re-extract")


def create_store(url: str, manifest: dict, init_weights: dict[str, np.ndarray] | None = None,
                 storage_options: dict | None = None) -> "FeatureStore":
    """Create the store (driver only), or reopen it when an extraction with the same identity made it."""
    manifest = _normalize_manifest(manifest)
    loc = Location(url, storage_options)
    existing = _read_manifest(loc)
    if existing is not None:
        _check_format_version(existing, url)
        _check_identity(existing, manifest, url)
        return FeatureStore(loc, existing)
    if loc.local and loc.exists() and not os.path.isdir(loc.root):
        raise StoreMismatchError(f"{url} is a file, not a MARIA feature store; use another --out")
    # Only our own layout may be there already (a create that crashed before writing the manifest).
    foreign = sorted(set(loc.listdir()) - {"zarr.json", "init", "blocks", "commits"})
    if foreign or loc.listdir("commits"):
        found = foreign[:3] or ["commit markers without a manifest"]
        raise StoreMismatchError(f"{url} exists and is not a MARIA feature store (found {found}); "
                                 f"use another --out or delete it")
    manifest["has_init"] = init_weights is not None
    if init_weights is not None:
        for name, array in _check_init_weights(init_weights, manifest).items():
            zarr.create_array(store=loc.zarr_store, name=f"init/{name}", data=array, overwrite=True, config=ARRAY_CONFIG,
                              chunks=_chunk_shape(array))
    # The manifest goes in last: a store is "there" only once everything create_store writes is complete.
    root = zarr.open_group(loc.zarr_store, mode="a")
    root.attrs[MANIFEST_KEY] = manifest
    return FeatureStore(loc, manifest)


def _check_init_weights(init_weights: dict, m: dict) -> dict[str, np.ndarray]:
    missing = [k for k in INIT_ARRAYS if k not in init_weights]
    if missing:
        raise StoreError(f"init_weights lacks {missing}; pass all of {list(INIT_ARRAYS)}")
    out = {k: np.ascontiguousarray(np.asarray(init_weights[k]),
                                   dtype="<i8" if k == "vocab_map" else "<f4") for k in INIT_ARRAYS}
    V = m["vocab_size"]
    for name, shape in init_shapes(m).items():
        if out[name].shape != shape:
            raise StoreError(f"init weight {name} has shape {out[name].shape}, the manifest implies {shape} "
                             f"(vocab_size, d_mlm, d_ar); fix the manifest or the weights")
    if out["vocab_map"].ndim != 1 or (out["vocab_map"] >= V).any() or (out["vocab_map"] < -1).any():
        raise StoreError(f"init vocab_map must be 1-D with values in [-1, {V}); got shape {out['vocab_map'].shape}")
    return out


def open_store(url: str, storage_options: dict | None = None) -> "FeatureStore":
    loc = Location(url, storage_options)
    manifest = _read_manifest(loc)
    if manifest is None:
        raise StoreNotFoundError(f"no MARIA feature store at {url}; check the path or run extraction with --out {url}")
    _check_format_version(manifest, url)
    return FeatureStore(loc, manifest)


class FeatureStore:
    def __init__(self, location: Location, manifest: dict):
        self._loc = location
        self.url = location.url
        self.manifest = manifest

    def __repr__(self):
        return f"FeatureStore({self.url!r}, D={self.feature_dim}, dtype={self.manifest.get('feature_dtype')})"

    @property
    def d_mlm(self) -> int:
        return self.manifest["d_mlm"]

    @property
    def d_ar(self) -> int:
        return self.manifest["d_ar"]

    @property
    def vocab_size(self) -> int:
        return self.manifest["vocab_size"]

    @property
    def feature_dim(self) -> int:
        return self.d_mlm + self.d_ar

    @property
    def feature_dtype(self) -> np.dtype:
        return stored_feature_dtype(self.manifest)

    # --- commits ---------------------------------------------------------------------------------

    def committed_blocks(self) -> list[str]:
        return sorted(n[:-len(".json")] for n in self._loc.listdir("commits")
                      if n.endswith(".json") and not n.startswith("."))

    def is_committed(self, block_id: str) -> bool:
        return self._loc.exists("commits", f"{check_block_id(block_id)}.json")

    def commit_info(self, block_id: str) -> dict:
        try:
            data = self._loc.read_bytes("commits", f"{check_block_id(block_id)}.json")
        except FileNotFoundError:
            raise StoreError(f"block {block_id} is not committed in {self.url}; "
                             f"see committed_blocks() or re-run extraction for it") from None
        try:
            return json.loads(data)
        except ValueError as e:
            raise CorruptBlockError(block_id, f"its commit marker is not valid JSON ({e})", self.url) from e

    def num_rows(self, blocks: list[str] | None = None) -> int:
        """Rows in `blocks` (default: every committed block), from their commit markers."""
        return sum(self.commit_info(b)["rows"] for b in (self.committed_blocks() if blocks is None else blocks))

    # --- writing ---------------------------------------------------------------------------------

    def _validate(self, arrays: dict) -> dict[str, np.ndarray]:
        """Check and convert everything before the first byte is written."""
        missing = [k for k in BLOCK_ARRAYS if k not in arrays]
        unknown = [k for k in arrays if k not in BLOCK_ARRAYS]
        if missing or unknown:
            raise StoreError(f"block arrays: missing {missing}, unknown {unknown}; pass exactly {list(BLOCK_ARRAYS)}")
        out = {"features": to_store_features(arrays["features"], self.manifest)}
        for name, dtype in BLOCK_ARRAYS.items():
            if name != "features":
                a = np.asarray(arrays[name])
                if a.dtype.kind not in "iuf" or (a.dtype.kind == "f" and name != "mask_rates"):
                    raise StoreError(f"block array {name} has dtype {a.dtype}; it must be {dtype.name}-compatible")
                out[name] = np.ascontiguousarray(a, dtype=dtype)
        f = out["features"]
        if f.ndim != 2 or f.shape[1] != self.feature_dim:
            raise StoreError(f"features have shape {f.shape}, expected (N, {self.feature_dim}) = (N, d_mlm + d_ar)")
        n = f.shape[0]
        for name, a in out.items():
            if name != "features" and a.shape != (n,):
                raise StoreError(f"block array {name} has shape {a.shape}, expected ({n},) like features' rows")
        if not features_finite(f):
            raise StoreError("features contain NaN or inf (before or after conversion to "
                             f"{self.manifest['feature_dtype']}); check the extraction (fp16 overflow?)")
        t = out["targets"]
        if n and (t.min() < 0 or t.max() >= self.vocab_size):
            raise StoreError(f"targets must be AR token ids in [0, {self.vocab_size}); got [{t.min()}, {t.max()}]")
        return out

    def write_block(self, block_id: str, arrays: dict[str, np.ndarray], stats: dict | None = None,
                    overwrite: bool = False) -> bool:
        """Write and commit one block; False (and nothing written) when it is already committed. Safe to retry
        and to run concurrently: each attempt writes its own group, the marker written last decides."""
        check_block_id(block_id)
        if not overwrite and self.is_committed(block_id):
            return False
        data = self._validate(arrays)
        try:
            stats = json.loads(json.dumps(stats or {}))
        except (TypeError, ValueError) as e:
            raise StoreError(f"block {block_id}: stats are not JSON-serialisable ({e})") from e
        attempt = uuid.uuid4().hex[:16]
        # All metadata in one concurrent batch (create_hierarchy), not array by array: on S3, per-array creation
        # costs ~8 requests of existence checks each.
        nodes = {"": GroupMetadata(attributes={"block_id": block_id, "attempt": attempt})}
        nodes.update({name: _array_metadata(name, a) for name, a in data.items()})
        created = dict(zarr.create_hierarchy(store=self._loc.sub_store(f"blocks/{block_id}/{attempt}"), nodes=nodes))
        # Hash in a thread while zarr writes: hashlib releases the GIL, so the checksums are nearly free.
        with ThreadPoolExecutor(max_workers=1) as pool:
            hashes = {name: pool.submit(sha256_of, a) for name, a in data.items()}
            for name, a in data.items():
                if len(a):
                    created[name].with_config(ARRAY_CONFIG)[...] = a
            checksums = {name: h.result() for name, h in hashes.items()}
        marker = {"block_id": block_id, "attempt": attempt, "rows": int(len(data["features"])),
                  "feature_dtype": self.manifest["feature_dtype"], "checksums": checksums, "stats": stats,
                  "written_at": time.time()}
        self._write_marker(block_id, json.dumps(marker, indent=1).encode())
        return True

    def _write_marker(self, block_id: str, data: bytes) -> None:  # separate so tests can simulate a crash here
        self._loc.write_atomic(data, "commits", f"{block_id}.json")

    # --- reading ---------------------------------------------------------------------------------

    def block_arrays(self, block_id: str, info: dict | None = None) -> dict[str, zarr.Array]:
        """Lazy zarr arrays of a committed block (for row-range reads); CorruptBlockError when any is missing."""
        info = info or self.commit_info(block_id)
        store = self._loc.sub_store(f"blocks/{block_id}/{info['attempt']}", read_only=True)
        out = {}
        for name in BLOCK_ARRAYS:
            try:
                out[name] = zarr.open_array(store, path=name, mode="r", zarr_format=3)  # 3: no v2 probes
            except _ZARR_MISSING:
                raise CorruptBlockError(block_id, f"array {name} of attempt {info['attempt']} is missing",
                                        self.url) from None
        return out

    def read_block(self, block_id: str, verify: bool = False) -> dict[str, np.ndarray]:
        """All arrays of a block; features in the stored dtype (see as_float32)."""
        info = self.commit_info(block_id)
        data = {name: arr[...] for name, arr in self.block_arrays(block_id, info).items()}
        if verify:
            problem = block_problem(data, info, self)
            if problem:
                raise CorruptBlockError(block_id, problem, self.url)
        return data

    def init_weights(self) -> dict[str, np.ndarray]:
        if not self.manifest.get("has_init", True):
            raise StoreError(f"{self.url} was created without init weights; re-create it with them, "
                             f"or train from a random init")
        out = {}
        for name in INIT_ARRAYS:
            try:
                out[name] = zarr.open_array(self._loc.zarr_store, path=f"init/{name}", mode="r", zarr_format=3)[...]
            except _ZARR_MISSING:
                raise StoreError(f"{self.url} lacks init/{name}; run `maria verify {self.url}` and re-extract") from None
        return out

    # --- maintenance (driver only) -----------------------------------------------------------------

    def gc_uncommitted(self) -> int:
        """Delete attempts no marker names. Only while no writer runs: an in-flight attempt looks uncommitted."""
        keep = {b: self.commit_info(b)["attempt"] for b in self.committed_blocks()}
        removed = 0
        for block_id in self._loc.listdir("blocks"):
            if block_id == "zarr.json":
                continue
            attempts = [a for a in self._loc.listdir("blocks", block_id) if a != keep.get(block_id)]
            for attempt in attempts:
                self._loc.remove_tree("blocks", block_id, attempt)
                removed += 1
            if block_id not in keep:
                self._loc.remove_tree("blocks", block_id)
        return removed

    def finalize(self) -> None:
        """Record the totals in the manifest (driver only, after all blocks are written)."""
        blocks = self.committed_blocks()
        self.manifest = dict(self.manifest, rows=self.num_rows(blocks), blocks=len(blocks))
        zarr.open_group(self._loc.zarr_store, mode="r+").attrs[MANIFEST_KEY] = self.manifest


def block_problem(data: dict[str, np.ndarray], info: dict, store: FeatureStore) -> str | None:
    """First thing wrong with a block's arrays against its marker and the manifest, or None."""
    rows = info.get("rows")
    for name in BLOCK_ARRAYS:
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
    for name in BLOCK_ARRAYS:
        if name not in checksums:
            return f"commit marker has no checksum for {name}"
        if sha256_of(data[name]) != checksums[name]:
            return f"checksum of {name} does not match its commit marker (data damaged)"
    if not features_finite(f):
        return "features contain NaN or inf"
    return None
