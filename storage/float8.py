"""float8 features: each row scaled by its own float32 factor, then stored as float8 e4m3fn codes in uint8.

    scale[r] = max |x[r, :]| / 448           (448: the largest finite e4m3fn value; an all-zero row gets 1)
    code[r, c] = e4m3fn(x[r, c] / scale[r])  (round to nearest even), its 8 bits stored as uint8
    x[r, c] ~= E4M3FN[code[r, c]] * scale[r]

Half the bytes of float16. Error per value: at most 2^-4 of it (3 mantissa bits, round to nearest), or
2^-10 x scale for the few values under 2^-6 x scale (e4m3fn's subnormals), whichever is larger.
Zarr 3.1 has no float8 data type, so the codes are stored as uint8 (attributes say so) and the scales in a
per-row array `feature_scales`; E4M3FN is a 256-entry table any numpy can build (see `decode_table`), so
plain zarr + numpy reads a store. ml_dtypes (no torch) does the rounding when writing.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np

E4M3_MAX = 448.0
SCALES = "feature_scales"  # the per-row scale array beside `features` in a float8 block

DECODE_RECIPE = (
    "float8 e4m3fn bit patterns stored as uint8: NOT integers. Each row is scaled: "
    "value = E4M3FN[code] * feature_scales[row], with E4M3FN = a 256-entry table, in numpy: "
    "c = np.arange(256); e = (c >> 3) & 15; m = c & 7; "
    "E4M3FN = np.where(e == 0, m / 8 * 2.0**-6, (1 + m / 8) * 2.0**(e - 7)) * np.where(c & 128, -1, 1) "
    "(or x.view(ml_dtypes.float8_e4m3fn).astype('float32') * feature_scales[:, None])"
)


def decode_table() -> np.ndarray:
    """float32 value of each of the 256 e4m3fn codes (0x7F and 0xFF are NaN), from the bit layout alone."""
    c = np.arange(256)
    e, m = (c >> 3) & 15, c & 7
    table = np.where(e == 0, m / 8 * 2.0**-6, (1 + m / 8) * 2.0 ** (e - 7)) * np.where(c & 128, -1, 1)
    table[(c & 0x7F) == 0x7F] = np.nan
    return table.astype(np.float32)


TABLE = decode_table()


def encode(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """float (N, D) -> (uint8 codes (N, D), float32 scales (N,)). Non-finite input gives a non-finite scale
    (which the block's finiteness check refuses), never a silently clipped value."""
    x = np.asarray(features, dtype=np.float32)
    amax = np.abs(x).max(axis=1) if x.shape[1] else np.zeros(len(x), np.float32)
    scales = np.where(amax > 0, amax / np.float32(E4M3_MAX), np.float32(1)).astype("<f4")
    with np.errstate(invalid="ignore", over="ignore"):
        scaled = np.clip(x / scales[:, None], -E4M3_MAX, E4M3_MAX)  # x / scale can round a hair above 448
    return np.ascontiguousarray(scaled.astype(ml_dtypes.float8_e4m3fn).view(np.uint8)), scales


def decode(codes: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """(uint8 codes (N, D), scales (N,)) -> float32 (N, D)."""
    out = TABLE[codes]
    out *= np.asarray(scales, dtype=np.float32)[:, None]
    return out
