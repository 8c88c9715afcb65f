"""The on-disk format of a MARIA feature store: constants, errors, dtypes, checksums, locations.

A store is a Zarr v3 hierarchy (local directory or fsspec URL such as s3://bucket/path):

    zarr.json                      root group; attrs["maria"] = the manifest (written once, by the driver)
    init/{W1,b1,W2,b2,vocab_map}   the two experts' output projections (W1 already in AR ids)
    blocks/<block_id>/<attempt>/   one group per write attempt: features, targets, doc_ids, ...
    commits/<block_id>.json        commit marker, written last and atomically; names the attempt

Readers only see blocks with a commit marker, so a crashed or concurrent write never shows up
half-done; each attempt writes into its own fresh group, so two writers never share a file.
"""
from __future__ import annotations

import hashlib
import os
import re

import numpy as np

FORMAT_VERSION = 1
MANIFEST_KEY = "maria"

# Manifest keys that decide whether two extraction runs may share a store (resume vs. refuse).
IDENTITY_KEYS = ("mlm", "ar", "tokenizer_fingerprint", "d_mlm", "d_ar", "vocab_size", "feature_dtype", "masking",
                 "seed", "corpus_fingerprint", "window_length", "docs_per_block")  # block ids number docs_per_block-sized runs
FEATURE_DTYPES = ("float16", "bfloat16")

# Row-aligned arrays of a block and their stored dtypes ("features" depends on the manifest).
BLOCK_ARRAYS = {
    "features": None,
    "targets": np.dtype("<i4"),
    "doc_ids": np.dtype("<i8"),
    "window_ids": np.dtype("<i8"),
    "positions": np.dtype("<i4"),
    "mask_rates": np.dtype("<f4"),
}
INIT_ARRAYS = ("W1", "b1", "W2", "b2", "vocab_map")
BLOCK_ID_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")
CHUNK_ROWS = 4096  # the reader's default row-range size; stored feature chunks divide it (see below)
FEATURE_CHUNK_BYTES = 16 << 20


def init_shapes(manifest: dict) -> dict[str, tuple[int, ...]]:
    """Shapes of the PoE init weights a manifest implies (W1/W2 already mapped into AR ids)."""
    V = manifest["vocab_size"]
    return {"W1": (V, manifest["d_mlm"]), "b1": (V,), "W2": (V, manifest["d_ar"]), "b2": (V,)}


def feature_chunk_rows(feature_dim: int, itemsize: int = 2) -> int:
    """Rows per stored chunk of `features`: a power of two <= CHUNK_ROWS keeping a chunk <= 16 MiB (e.g. 2048
    rows at D=3072, 1024 at D=5120). Bigger chunks cost zarr ~2x more CPU per byte on write (fresh mmap'd
    buffers above glibc's 32 MiB threshold); a power of two keeps reader ranges chunk-aligned."""
    rows = CHUNK_ROWS
    while rows > 1 and rows * feature_dim * itemsize > FEATURE_CHUNK_BYTES:
        rows //= 2
    return rows


class StoreError(ValueError):
    """Base class of every feature-store error (a ValueError, so CLIs can print it as one line)."""


class StoreMismatchError(StoreError):
    """The store at this URL was made by a different extraction (model, tokenizer, masking, ...)."""


class CorruptBlockError(StoreError):
    """A committed block's data does not match its commit marker. `block_id` and `reason` let callers
    (the reader, verify) phrase their own fix."""

    def __init__(self, block_id: str, reason: str, url: str, fix: str | None = None):
        self.block_id, self.reason = block_id, reason
        fix = fix or (f"run `maria verify {url}` and re-extract the block "
                      f"(delete commits/{block_id}.json, re-run extraction)")
        super().__init__(f"block {block_id} of {url} is corrupt: {reason}; {fix}")


class StoreNotFoundError(StoreError):
    """No MARIA store at this URL."""


# ---------------------------------------------------------------------------------------------
# dtypes

def stored_feature_dtype(manifest: dict) -> np.dtype:
    """bfloat16 has no numpy dtype: it is stored as its raw 16 bits in uint16."""
    kind = manifest.get("feature_dtype", "float16")
    if kind not in FEATURE_DTYPES:
        raise StoreError(f"manifest feature_dtype {kind!r} is unknown; use one of {FEATURE_DTYPES}")
    return np.dtype("<u2") if kind == "bfloat16" else np.dtype("<f2")


def float32_to_bf16_bits(x: np.ndarray) -> np.ndarray:
    """Round-to-nearest-even float32 -> bfloat16, returned as uint16 bits (what torch does)."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounded = u + (np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1)))
    return (rounded >> np.uint32(16)).astype("<u2")


def as_float32(features: np.ndarray, manifest: dict | None = None) -> np.ndarray:
    """Stored features (float16, or uint16 holding bfloat16 bits) -> float32."""
    bf16 = features.dtype == np.uint16 or (manifest is not None and manifest.get("feature_dtype") == "bfloat16")
    if bf16:
        if features.dtype != np.uint16:
            raise StoreError(f"bfloat16 features must be stored as uint16 bits, got {features.dtype}")
        return (features.astype(np.uint32) << np.uint32(16)).view(np.float32)
    return features.astype(np.float32)


def to_store_features(features, manifest: dict) -> np.ndarray:
    """Convert caller features (float32/float16/bfloat16 torch tensor, or uint16 bf16 bits) to the stored dtype."""
    if hasattr(features, "detach"):  # a torch tensor: bf16 has no numpy twin, so go through float32
        features = features.detach().cpu()
        features = (features.float() if str(features.dtype) == "torch.bfloat16" else features).numpy()
    features = np.asarray(features)
    target = stored_feature_dtype(manifest)
    if target == np.uint16:
        if features.dtype == np.uint16:
            return np.ascontiguousarray(features, dtype="<u2")
        if features.dtype.kind != "f":
            raise StoreError(f"features must be floating point (or uint16 bfloat16 bits), got {features.dtype}")
        return float32_to_bf16_bits(features)
    if features.dtype.kind != "f":
        raise StoreError(f"features must be floating point for a float16 store, got {features.dtype}")
    with np.errstate(over="ignore"):  # overflow becomes inf, which the caller's finiteness check reports
        return np.ascontiguousarray(features, dtype="<f2")


def features_finite(features: np.ndarray) -> bool:
    """No NaN/inf. On the raw bits (non-finite <=> all exponent bits set): 3x faster than np.isfinite on fp16."""
    if features.dtype == np.uint16:  # bfloat16 bits
        exponent = np.uint16(0x7F80)
    elif features.dtype == np.float16:
        exponent, features = np.uint16(0x7C00), features.view(np.uint16)
    else:
        return bool(np.isfinite(features).all())
    features = np.ascontiguousarray(features)
    flat = features.reshape(-1)
    step = 1 << 20  # slices keep the temporaries in cache: 3-10x faster than one pass over a 200 MB block
    return not any(np.any((flat[i:i + step] & exponent) == exponent) for i in range(0, len(flat), step))


def sha256_of(array: np.ndarray) -> str:
    """sha256 of the array's raw little-endian C-order bytes (what the commit marker records)."""
    a = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<"))
    return hashlib.sha256(a.reshape(-1).view(np.uint8)).hexdigest()


def check_block_id(block_id) -> str:
    if not isinstance(block_id, str) or not BLOCK_ID_RE.match(block_id):
        raise StoreError(f"block id {block_id!r} is invalid; use letters, digits, '_', '-', '.' (e.g. 'b000123')")
    return block_id


# ---------------------------------------------------------------------------------------------
# locations: a local directory or an fsspec URL

def is_local(url: str) -> bool:
    return "://" not in url or url.startswith("file://")


def local_path(url: str) -> str:
    return os.path.abspath(os.path.expanduser(url[len("file://"):] if url.startswith("file://") else url))


def resolve_storage_options(url: str, storage_options: dict | None) -> dict:
    """Copy of storage_options; for s3:// adds the endpoint from MARIA_S3_ENDPOINT_URL / AWS_ENDPOINT_URL(_S3)
    unless one is given (s3fs only reads the standard variable in some versions, and never ours)."""
    options = dict(storage_options or {})
    if url.startswith(("s3://", "s3a://")):
        given = "endpoint_url" in options or "endpoint_url" in options.get("client_kwargs", {})
        env = (os.environ.get("MARIA_S3_ENDPOINT_URL") or os.environ.get("AWS_ENDPOINT_URL_S3")
               or os.environ.get("AWS_ENDPOINT_URL"))
        if env and not given:
            options["endpoint_url"] = env
    return options


class Location:
    """Where a store lives: a zarr store for the arrays plus plain file operations for markers and cleanup."""

    def __init__(self, url: str, storage_options: dict | None = None):
        import fsspec
        import zarr

        self.url = url
        self.local = is_local(url)
        if self.local:
            self.root = local_path(url)
            self.fs = None  # plain os calls: os.replace gives the atomic marker write
            self.zarr_store = zarr.storage.LocalStore(self.root)
        else:
            options = resolve_storage_options(url, storage_options)
            self.fs, path = fsspec.url_to_fs(url, **options)
            self.root = path.rstrip("/")
            self.zarr_store = zarr.storage.FsspecStore.from_url(url, storage_options=options)

    def sub_store(self, subpath: str, read_only: bool = False):
        """A zarr store rooted at a sub-folder: a block attempt is written as its own small hierarchy, so a
        writer never checks or touches the parents' metadata (fewer requests on S3, no shared files)."""
        import zarr

        if self.local:
            return zarr.storage.LocalStore(self.path(subpath), read_only=read_only)
        return zarr.storage.FsspecStore(self.zarr_store.fs, path=self.path(subpath), read_only=read_only)

    def path(self, *parts: str) -> str:
        return "/".join((self.root,) + parts)

    def exists(self, *parts: str) -> bool:
        if self.local:
            return os.path.exists(self.path(*parts))
        self.fs.invalidate_cache(self.path(*parts))
        return self.fs.exists(self.path(*parts))

    def listdir(self, *parts: str) -> list[str]:
        """Names (not paths) directly under a folder; [] when it does not exist. Never cached: other
        processes add markers while we run."""
        if self.local:
            try:
                return sorted(os.listdir(self.path(*parts)))
            except (FileNotFoundError, NotADirectoryError):
                return []
        folder = self.path(*parts)
        self.fs.invalidate_cache(folder)
        try:
            entries = self.fs.ls(folder, detail=False)
        except FileNotFoundError:
            return []
        return sorted({e.rstrip("/").rsplit("/", 1)[-1] for e in entries} - {""})

    def read_bytes(self, *parts: str) -> bytes:
        if self.local:
            with open(self.path(*parts), "rb") as f:
                return f.read()
        return self.fs.cat_file(self.path(*parts))

    def write_atomic(self, data: bytes, *parts: str) -> None:
        """Local: temp file + os.replace; object stores: one PUT, which is atomic."""
        target = self.path(*parts)
        if not self.local:
            self.fs.pipe_file(target, data)
            return
        os.makedirs(os.path.dirname(target), exist_ok=True)
        tmp = f"{os.path.dirname(target)}/.{os.path.basename(target)}.{os.getpid()}.{os.urandom(4).hex()}.tmp"
        try:
            with open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, target)
        except BaseException:
            if os.path.exists(tmp):
                os.remove(tmp)
            raise

    def remove_tree(self, *parts: str) -> None:
        target = self.path(*parts)
        if self.local:
            import shutil
            shutil.rmtree(target, ignore_errors=True)
        elif self.exists(*parts):  # not the cached listing: another process may have written here
            self.fs.rm(target, recursive=True)
