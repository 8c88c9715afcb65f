"""The on-disk format of a MARIA feature store: constants, errors, dtypes, checksums.

A store is one Zarr v3 hierarchy (local directory or fsspec URL such as s3://bucket/path); storage/layout.py
builds its metadata and says what each node holds:

    zarr.json                        root group; attrs["maria"] = the manifest, attrs["maria_plan"] = the plan
    init/{W1,b1,W2,b2,vocab_map}     group of the two experts' output projections (W1 already in AR ids)
    blocks/                          group of the blocks
    blocks/<block_id>/               a block's group: exists once the block is committed; its attributes
                                     (maria_commit) and consolidated metadata name the committed attempt
    blocks/<block_id>/<attempt>/     one group per write attempt: features, targets, doc_ids, ...
    commits/<block_id>.json          commit marker, written atomically after the attempt; names the attempt

This project's code decides "committed" by the marker (one listing of commits/ finds every block, even on
S3); the block group, written right after it, is the same fact for plain Zarr readers. Each attempt writes
into its own fresh group, so two writers never share a file, and a crashed write never shows up.
"""

from __future__ import annotations

import hashlib
import re

import ml_dtypes
import numpy as np

from maria_storage import float8

FORMAT_VERSION = 2  # 2: self-describing hierarchy, bf16 attributes, crc32c chunks, init checksums, plan
READABLE_FORMATS = (1, 2)  # version 1 stores differ only in metadata this code does not need to read
MANIFEST_KEY = "maria"

# Manifest keys that decide whether two extraction runs may share a store (resume vs. refuse).
IDENTITY_KEYS = (
    "mlm",
    "ar",
    "tokenizer_fingerprint",
    "d_mlm",
    "d_ar",
    "vocab_size",
    "mlm_offset",
    "feature_dtype",
    "masking",
    "seed",
    "corpus_fingerprint",
    "window_length",
    "docs_per_block",
)  # block ids number docs_per_block-sized runs
IDENTITY_DEFAULTS = {"mlm_offset": 0}  # a manifest written before the key existed has this value
FEATURE_DTYPES = ("float16", "bfloat16", "float8")  # float8: e4m3fn codes + a per-row scale (storage/float8.py)

# Row-aligned arrays of a block and their stored dtypes ("features" depends on the manifest).
BLOCK_ARRAYS = {
    "features": None,
    "targets": np.dtype("<i4"),
    "doc_ids": np.dtype("<i8"),
    "window_ids": np.dtype("<i8"),
    "positions": np.dtype("<i4"),
    "mask_rates": np.dtype("<f4"),
}
SCALES = float8.SCALES  # float8 stores only: the per-row float32 scale of `features`
INIT_ARRAYS = ("W1", "b1", "W2", "b2", "vocab_map")
BLOCK_ID_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")
CHUNK_ROWS = 4096  # the reader's default row-range size; stored feature chunks divide it (see below)
FEATURE_CHUNK_BYTES = 16 << 20
SMALL_CHUNK_ROWS = 1 << 16  # a reader chunk (4096 rows) then fetches at most 256-512 KB of the small arrays


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


class StoreNotFoundError(StoreError):
    """No MARIA store at this URL."""


class StoreAccessError(StoreError):
    """A URL that cannot be used: an unsupported scheme, a backend package not installed, no credentials, access
    denied, or no server answering. Bad input (exit code 2), reported at the first contact, never retried."""


class IncompleteStoreError(StoreError):
    """The store's extraction has not finished: planned blocks are missing (or it was never finalized).
    Re-running the recorded extraction command finishes it; nothing stored is wrong."""


class CorruptStoreError(StoreError):
    """Stored data or metadata is damaged (checksum mismatch, undecodable chunk, missing array)."""


class CorruptBlockError(CorruptStoreError):
    """A committed block's data does not match its commit marker or cannot be decoded. `block_id` and
    `reason` let callers (the reader, verify) phrase their own fix."""

    def __init__(self, block_id: str, reason: str, url: str, fix: str | None = None):
        self.block_id, self.reason, self.url = block_id, reason, url
        fix = fix or (f"run `maria verify --store {url}`, then delete commits/{block_id}.json in the store and re-run the extraction to rewrite the block")
        super().__init__(f"block {block_id} of {url} is corrupt: {reason}; {fix}")


# ---------------------------------------------------------------------------------------------
# dtypes


def stored_feature_dtype(manifest: dict) -> np.dtype:
    """bfloat16 and float8 have no numpy dtype: their raw bits are stored as uint16 / uint8."""
    kind = manifest.get("feature_dtype", "float16")
    if kind not in FEATURE_DTYPES:
        raise StoreError(f"manifest feature_dtype {kind!r} is unknown; use one of {FEATURE_DTYPES}")
    return {"float16": np.dtype("<f2"), "bfloat16": np.dtype("<u2"), "float8": np.dtype("u1")}[kind]


def block_array_dtypes(manifest: dict) -> dict[str, np.dtype]:
    """A block's arrays and their stored dtypes under this manifest: float8 stores add the per-row scales."""
    arrays = {**BLOCK_ARRAYS, "features": stored_feature_dtype(manifest)}
    if manifest.get("feature_dtype") == "float8":
        arrays[SCALES] = np.dtype("<f4")
    return arrays


def float32_to_bf16_bits(x: np.ndarray) -> np.ndarray:
    """Round-to-nearest-even float32 -> bfloat16 (ml_dtypes, as torch rounds), returned as its uint16 bits."""
    return np.ascontiguousarray(x, dtype=np.float32).astype(ml_dtypes.bfloat16).view("<u2")


def as_float32(features: np.ndarray, manifest: dict | None = None, scales: np.ndarray | None = None) -> np.ndarray:
    """Stored features (float16; uint16 holding bfloat16 bits; uint8 float8 codes with their per-row `scales`)
    -> float32."""
    kind = (manifest or {}).get("feature_dtype")
    if features.dtype == np.uint8 or kind == "float8":
        if features.dtype != np.uint8 or scales is None:
            raise StoreError(
                f"float8 features are uint8 codes decoded with their {SCALES}; got {features.dtype}{'' if scales is not None else ' without scales'}"
            )
        return float8.decode(features, scales)
    if features.dtype == np.uint16 or kind == "bfloat16":
        if features.dtype != np.uint16:
            raise StoreError(f"bfloat16 features must be stored as uint16 bits, got {features.dtype}")
        return features.view(ml_dtypes.bfloat16).astype(np.float32)
    return features.astype(np.float32)


def to_store_features(features, manifest: dict) -> dict[str, np.ndarray]:
    """Caller features (float32/float16/bfloat16 torch tensor or numpy array; uint16 bf16 bits for a bfloat16
    store) -> {"features": in the stored dtype, plus SCALES for a float8 store}."""
    if hasattr(features, "detach"):  # a torch tensor: bf16 has no numpy twin, so go through float32
        features = features.detach().cpu()
        features = (features.float() if str(features.dtype) == "torch.bfloat16" else features).numpy()
    features = np.asarray(features)
    target = stored_feature_dtype(manifest)
    if target == np.uint16 and features.dtype == np.uint16:
        return {"features": np.ascontiguousarray(features, dtype="<u2")}
    if features.dtype.kind != "f":
        raise StoreError(f"features must be floating point (or uint16 bfloat16 bits for a bfloat16 store), got {features.dtype}")
    if target == np.uint16:
        return {"features": float32_to_bf16_bits(features)}
    if target == np.uint8:
        if features.ndim != 2:
            raise StoreError(f"features have shape {features.shape}, expected (N, d_mlm + d_ar)")
        codes, scales = float8.encode(features)
        return {"features": codes, SCALES: scales}
    with np.errstate(over="ignore"):  # overflow becomes inf, which the caller's finiteness check reports
        return {"features": np.ascontiguousarray(features, dtype="<f2")}


def features_finite(features: np.ndarray) -> bool:
    """No NaN/inf. On the raw bits (non-finite <=> all exponent bits set): 3x faster than np.isfinite on fp16.
    float8 (e4m3fn codes) has no infinities; its NaNs are the codes with every bit but the sign set."""
    if features.dtype == np.uint8:
        exponent = np.uint8(0x7F)
    elif features.dtype == np.uint16:  # bfloat16 bits
        exponent = np.uint16(0x7F80)
    elif features.dtype == np.float16:
        exponent, features = np.uint16(0x7C00), features.view(np.uint16)
    else:
        return bool(np.isfinite(features).all())
    features = np.ascontiguousarray(features)
    flat = features.reshape(-1)
    step = 1 << 20  # slices keep the temporaries in cache: 3-10x faster than one pass over a 200 MB block
    return not any(np.any((flat[i : i + step] & exponent) == exponent) for i in range(0, len(flat), step))


def scales_valid(scales: np.ndarray) -> bool:
    """float8 row scales: finite and positive (an all-zero row has scale 1)."""
    return bool(np.isfinite(scales).all() and (scales > 0).all())


def sha256_of(array: np.ndarray) -> str:
    """sha256 of the array's raw little-endian C-order bytes (what the commit marker records)."""
    a = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<"))
    return hashlib.sha256(a.reshape(-1).view(np.uint8)).hexdigest()


def check_block_id(block_id) -> str:
    if not isinstance(block_id, str) or not BLOCK_ID_RE.match(block_id):
        raise StoreError(f"block id {block_id!r} is invalid; use letters, digits, '_', '-', '.' (e.g. 'b000123')")
    return block_id
