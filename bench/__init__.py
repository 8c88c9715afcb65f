"""`maria bench <what>`: benchmarks that measure (never tests). JSON out, a PNG beside it.

decode   bench/decode.py   infilling tokens/s against plain AR generation and MLM decoding (Figure 3)
extract  bench/extract.py  the extraction job against bare backbone forwards; store write speed
train    bench/train.py    head training rows/s against its read and head-step bounds
anneal   bench/anneal.py   generative perplexity against wall-clock time (Figure 5)
quality  bench/quality.py  MARIA's gain over the AR alone against MLM strength (the demo's MLM and its snapshots)
checksum bench/checksum.py checking a checkpoint's sha256 digests at load, against reading its weights
Shared set-up (config, presets, random backbones): bench/setup.py.
"""
from __future__ import annotations

import json
from pathlib import Path

from maria_bench import anneal, checksum, decode, extract, quality, train
from maria_bench.setup import BenchConfig
from maria.io import atomic_write, guard_output_file

__all__ = ["BenchConfig", "run_bench"]
RUNNERS = {"decode": decode.bench_decode, "extract": extract.bench_extract,
           "train": train.bench_train_cli, "anneal": anneal.bench_anneal, "quality": quality.bench_quality,
           "checksum": checksum.bench_checksum}


def run_bench(cfg: BenchConfig) -> dict:
    out = Path(cfg.json)
    guard_output_file(out, cfg.overwrite, lambda t: '"benchmark"' in t, flag="--json")
    result = RUNNERS[cfg.what](cfg)
    atomic_write(out, json.dumps(result, indent=2))
    print(json.dumps(result.get("targets", result), indent=2))
    print(f"wrote {out} and {out.with_suffix('.png')}")
    return result
