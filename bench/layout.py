"""Measure the feature store's chunk layouts: `python -m maria_bench.layout --out DIR [--dims 1152 5120]`.

For each layout (chunks or shards; crc32c on the small arrays only, or on features too) and feature width D, writes the same
float16 blocks through FeatureStore.write_block, then reads one epoch with the trainer's ShuffledReader
(verify=True, its default: each block is read whole and checksummed at first touch; verify=False: lazy
row-range reads). Repeats interleave the layouts; prints median and [min, max] as a Markdown table and
writes JSON. Reads come from the page cache (the blocks were just written): they measure CPU cost, and the
file count stands in for the request count an object store would see.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import time

import numpy as np
import zarr
from zarr.codecs import Crc32cCodec

from maria_storage import ShuffledReader, create_store, layout

# name: (crc32c on small arrays, crc32c on features, features sharded)
LAYOUTS = {
    "chunks (format 1)": (False, False, False),
    "chunks, crc32c small (chosen)": (True, False, False),
    "chunks, crc32c all": (True, True, False),
    "shards, crc32c small": (True, False, True),
    "shards, crc32c all": (True, True, True),
}


def _blocks(d: int, rows: int, n: int) -> list[dict]:
    rng = np.random.default_rng(0)
    return [
        {
            "features": (rng.standard_normal((rows, d), np.float32) * 2).astype(np.float16),
            "targets": rng.integers(0, 50000, rows).astype(np.int32),
            "doc_ids": np.full(rows, i, np.int64),
            "window_ids": np.arange(rows) // 100,
            "positions": (np.arange(rows) % 512).astype(np.int32),
            "mask_rates": rng.random(rows).astype(np.float32),
        }
        for i in range(n)
    ]


def _files(path: str) -> int:
    return sum(len(files) for _, _, files in os.walk(path))


def variant(checksum_small: bool, checksum_features: bool, shard_features: bool):
    """storage.layout.array_metadata for a layout the store did not choose (what this bench compares)."""

    def array_metadata(name, a, dims, attrs, compress, features=False):
        rows = layout.feature_chunk_rows(a.shape[1], a.itemsize) if a.ndim == 2 else layout.SMALL_CHUNK_ROWS
        chunk = (max(1, min(len(a), rows)),) + a.shape[1:]
        shards = (-(-len(a) // chunk[0]) * chunk[0],) + a.shape[1:] if shard_features and features and len(a) > chunk[0] else None
        crc = (Crc32cCodec(),) if (checksum_features if features else checksum_small) else ()
        return zarr.create_array(
            zarr.storage.MemoryStore(),
            name=name,
            shape=a.shape,
            dtype=a.dtype,
            chunks=chunk,
            shards=shards,
            compressors=tuple(layout.SMALL_COMPRESSORS if compress else ()) + crc,
            dimension_names=dims,
            attributes=attrs,
            fill_value=0,
        ).metadata

    return array_metadata


CHOSEN = layout.array_metadata


def run_once(out: str, name: str, d: int, blocks: list[dict]) -> dict:
    layout.array_metadata = CHOSEN if name.endswith("(chosen)") else variant(*LAYOUTS[name])
    url = os.path.join(out, f"layout{list(LAYOUTS).index(name)}-{d}")
    shutil.rmtree(url, ignore_errors=True)
    manifest = {"mlm": "m", "ar": "a", "d_mlm": d // 2, "d_ar": d - d // 2, "vocab_size": 50000}
    store = create_store(url, manifest)
    t, c = time.perf_counter(), time.process_time()
    for i, b in enumerate(blocks):
        store.write_block(f"b{i:06d}", b)
    write_s, write_cpu = time.perf_counter() - t, time.process_time() - c
    rows, mb = sum(len(b["targets"]) for b in blocks), sum(b["features"].nbytes for b in blocks) / 1e6
    result = {"write_MBps": mb / write_s, "write_MB_per_cpu_s": mb / write_cpu, "files_per_Mrows": _files(url) / rows * 1e6}
    for verify in (True, False):
        t, c = time.perf_counter(), time.process_time()
        n = sum(len(batch["targets"]) for batch in ShuffledReader(url, batch_size=4096, verify=verify))
        assert n == rows
        tag = "" if verify else "_lazy"
        result[f"read_rows_per_s{tag}"] = rows / (time.perf_counter() - t)
        result[f"read_rows_per_cpu_s{tag}"] = rows / (time.process_time() - c)
    shutil.rmtree(url)
    layout.array_metadata = CHOSEN
    return result


def raw_write(out: str, blocks: list[dict]) -> float:
    """The same feature bytes written with plain np.tofile (the disk's ceiling), MB/s."""
    t = time.perf_counter()
    for i, b in enumerate(blocks):
        b["features"].tofile(os.path.join(out, f"raw{i}"))
    s = time.perf_counter() - t
    for i in range(len(blocks)):
        os.remove(os.path.join(out, f"raw{i}"))
    return sum(b["features"].nbytes for b in blocks) / s / 1e6


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--dims", type=int, nargs="+", default=[1152, 5120])
    p.add_argument("--rows", type=int, default=15000, help="rows per block (demo blocks hold ~10-25k)")
    p.add_argument("--mb", type=int, default=400, help="feature megabytes written per layout and repeat")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    os.makedirs(args.out, exist_ok=True)
    results = {}
    for d in args.dims:
        blocks = _blocks(d, args.rows, max(2, round(args.mb * 1e6 / (args.rows * d * 2))))
        runs = {name: [] for name in LAYOUTS}
        raw = []
        for r in range(args.repeats):
            names = list(LAYOUTS)[r % len(LAYOUTS) :] + list(LAYOUTS)[: r % len(LAYOUTS)]  # rotate: no order bias
            for name in names:
                runs[name].append(run_once(args.out, name, d, blocks))
            raw.append(raw_write(args.out, blocks))
        results[d] = {
            "raw_write_MBps": raw,
            "blocks": len(blocks),
            "rows_per_block": args.rows,
            **{name: {k: [x[k] for x in v] for k in v[0]} for name, v in runs.items()},
        }
    json.dump(results, open(os.path.join(args.out, "bench_layout.json"), "w"), indent=1)
    print(_table(results))


def _fmt(xs: list[float]) -> str:
    return f"{statistics.median(xs):,.0f} [{min(xs):,.0f}, {max(xs):,.0f}]"


def _table(results: dict) -> str:
    lines = [
        "| D | layout | write MB/s | write MB/CPU-s | read rows/s (verify) | read rows/CPU-s (verify) | "
        "read rows/s (lazy) | read rows/CPU-s (lazy) | files per M rows |",
        "|---" * 9 + "|",
    ]
    keys = ("write_MBps", "write_MB_per_cpu_s", "read_rows_per_s", "read_rows_per_cpu_s", "read_rows_per_s_lazy", "read_rows_per_cpu_s_lazy")
    for d, r in results.items():
        for name in LAYOUTS:
            x = r[name]
            cells = " | ".join(_fmt(x[k]) for k in keys)
            lines.append(f"| {d} | {name} | {cells} | {statistics.median(x['files_per_Mrows']):,.0f} |")
        lines.append(f"| {d} | raw np.tofile | {_fmt(r['raw_write_MBps'])} |" + " |" * 7)
    return "\n".join(lines)


if __name__ == "__main__":
    main()
