"""The store's Zarr metadata: what every group and array is, in attributes a plain Zarr reader can follow.

Only metadata is built here (nothing is written). Every array has `dimension_names` and a `description`;
block arrays share the dimensions ("row",) / ("row", "feature"), so one attempt group opens as one
xarray Dataset. Group metadata is serialised here and written by the caller with one atomic PUT/replace.
"""

from __future__ import annotations

import json

import numpy as np
import zarr
from zarr.codecs import Crc32cCodec, ZstdCodec

from maria_storage import float8
from maria_storage.format import FORMAT_VERSION, SCALES, SMALL_CHUNK_ROWS, feature_chunk_rows
from maria_storage.zarr_compat import group_metadata, metadata_json

# Codec choices, measured by `python -m maria_bench.layout` (README "The feature store"). Features are
# near-incompressible float16, so they are stored raw; the small per-row arrays and init/ compress or weigh
# little. Their chunks end in a crc32c, so a damaged chunk fails loudly on any read (a bad zstd frame could
# otherwise decode to wrong numbers or crash the codec). Features get none: a crc32c there cost 11-25% of the
# write CPU and up to 19% of the read CPU (two runs; zarr's encoder copies each chunk to append it); their
# integrity is the per-array sha256 in the commit marker, checked by the trainer's reader on a block's first
# read and by verify. Sharding cut files by 16-47% but cost up to 12% of the write CPU and 7-19% of the read
# CPU, and per-block metadata dominates the file count anyway.
SMALL_COMPRESSORS = (ZstdCodec(level=1),)

LAYOUT_NOTE = (
    "A block is committed when blocks/<block_id> has group metadata; its attribute maria_commit.attempt names "
    "the subgroup blocks/<block_id>/<attempt> holding the block's arrays (its consolidated metadata lists only "
    "that subgroup). Any other subgroup of a block, and a block folder without group metadata, is an unfinished "
    "or superseded write attempt: never read it. commits/<block_id>.json are the same commits as JSON files "
    "(not Zarr nodes). Rows of all committed blocks together are the data set; row order carries no meaning."
)

BLOCK_DESCRIPTIONS = {
    "targets": "the masked token's id in the AR tokenizer's vocabulary (AR ids, 0 <= id < vocab_size): the label to predict from this row's features",
    "doc_ids": "index of the corpus document the row comes from",
    "window_ids": "index of the window within its document",
    "positions": "position of the masked token within its window (0-based)",
    "mask_rates": "fraction of the window's tokens masked in the mask draw this row belongs to",
    SCALES: "float8 stores only: the row's scale; the row's features are E4M3FN[features code] * this "
    "(the row's largest |value| / 448). See the features array's `encoding` attribute",
}


def _features_description(manifest: dict) -> dict:
    d_mlm, d_ar = manifest["d_mlm"], manifest["d_ar"]
    attrs = {
        "description": (
            f"features of one masked token: [h_mlm ; h_ar]. Columns [0, {d_mlm}) are h_mlm, the "
            f"MLM's final hidden state (input of its output projection) at the masked position; "
            f"columns [{d_mlm}, {d_mlm + d_ar}) are h_ar, the AR's final hidden state after the "
            f"tokens before that position (the state that predicts it)"
        ),
        "d_mlm": d_mlm,
        "d_ar": d_ar,
        "h_mlm_columns": [0, d_mlm],
        "h_ar_columns": [d_mlm, d_mlm + d_ar],
        "dtype": manifest.get("feature_dtype", "float16"),
    }
    if attrs["dtype"] == "bfloat16":
        attrs["encoding"] = (
            "bfloat16 bit patterns stored as uint16: NOT integers. Decode with (x.astype('uint32') << 16).view('float32'), or x.view(ml_dtypes.bfloat16)"
        )
    if attrs["dtype"] == "float8":
        attrs.update(dtype="float8_e4m3fn", scale_array=SCALES, encoding=float8.DECODE_RECIPE)
    return attrs


def _codecs(compressors: tuple, features: bool) -> tuple:
    return tuple(compressors) + (() if features else (Crc32cCodec(),))


def array_metadata(name: str, a: np.ndarray, dims: tuple[str, ...], attrs: dict, compress: bool, features: bool = False):
    """Zarr v3 metadata of one array of `a`'s shape and dtype (built in memory; nothing is written)."""
    rows = feature_chunk_rows(a.shape[1], a.itemsize) if a.ndim == 2 else SMALL_CHUNK_ROWS
    chunk = (max(1, min(len(a), rows)),) + a.shape[1:]
    template = zarr.create_array(
        zarr.storage.MemoryStore(),
        name=name,
        shape=a.shape,
        dtype=a.dtype,
        chunks=chunk,
        compressors=_codecs(SMALL_COMPRESSORS if compress else (), features),
        dimension_names=dims,
        attributes=attrs,
        fill_value=0,
    )
    return template.metadata


def block_array_metadata(name: str, a: np.ndarray, manifest: dict):
    if name == "features":
        return array_metadata(name, a, ("row", "feature"), _features_description(manifest), compress=False, features=True)
    return array_metadata(name, a, ("row",), {"description": BLOCK_DESCRIPTIONS[name]}, compress=True)


def init_array_metadata(name: str, a: np.ndarray, manifest: dict):
    """The PoE init: logits = h_mlm @ W1.T + b1 + h_ar @ W2.T + b2, all in AR ids."""
    d = {
        "W1": (
            ("ar_token", "mlm_feature"),
            "the MLM's output projection with its rows moved to AR ids "
            "(row j = MLM token mapped to AR id j; zero rows for AR tokens the MLM lacks): h_mlm @ W1.T + b1",
        ),
        "b1": (("ar_token",), "the MLM's output bias in AR ids (zero where the MLM lacks the token)"),
        "W2": (("ar_token", "ar_feature"), "the AR's output projection: h_ar @ W2.T + b2"),
        "b2": (("ar_token",), "the AR's output bias (zeros when it has none)"),
        "vocab_map": (
            ("mlm_token",),
            "vocab_map[i] = the AR id of MLM token i, or -1 when the AR vocabulary has no identical token (that MLM token is dropped)",
        ),
    }[name]
    return array_metadata(name, a, d[0], {"description": d[1]}, compress=False)


def attempt_group(block_id: str, attempt: str, arrays: dict):
    """An attempt's group; its consolidated metadata lists its arrays (xarray opens it without probing)."""
    return group_metadata(
        {
            "maria_attempt": {
                "block_id": block_id,
                "attempt": attempt,
                "note": "one write attempt; it is data only if blocks/<block_id> names it in maria_commit.attempt",
            }
        },
        arrays,
    )


def block_group(marker: dict, attempt_meta):
    """A committed block's group: the commit as attributes, and consolidated metadata listing only the
    committed attempt, so walking the hierarchy never meets another attempt as a member."""
    return group_metadata({"maria_commit": marker}, {marker["attempt"]: attempt_meta})


def root_attributes(manifest: dict, plan: dict | None = None) -> dict:
    attrs = {
        "maria": manifest,
        "maria_layout": {
            "format_version": FORMAT_VERSION,
            "kind": "MARIA feature store",
            "blocks": LAYOUT_NOTE,
            "features": "blocks/<id>/<attempt>/features: (row, feature) = [h_mlm ; h_ar], d_mlm and d_ar in attrs['maria']",
            "targets": "blocks/<id>/<attempt>/targets: AR token ids",
        },
    }
    if plan is not None:
        attrs["maria_plan"] = plan
    return attrs


def group_json(attributes: dict, consolidated: dict | None = None) -> bytes:
    """zarr.json bytes of a group (consolidated: {relative path: metadata} of its descendants)."""
    return metadata_json(group_metadata(attributes, consolidated))


def group_attributes(data: bytes | None) -> dict | None:
    """Attributes of a group's zarr.json bytes; None when absent or not a group."""
    if data is None:
        return None
    doc = json.loads(data)
    return doc.get("attributes", {}) if doc.get("node_type") == "group" else None
