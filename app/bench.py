"""`maria bench <what>`: benchmarks that measure (never tests). JSON out, a PNG beside it.

decode   app/bench_decode.py   infilling tokens/s against plain AR generation and MLM decoding (Figure 3)
extract  app/bench_extract.py  the extraction job against bare backbone forwards; store write speed
train    app/bench_train.py    head training rows/s against its read and head-step bounds
anneal   app/bench_anneal.py   generative perplexity against wall-clock time (Figure 5)
quality  app/bench_quality.py  MARIA's gain over the AR alone against MLM strength (the demo's MLM and its snapshots)
Shared set-up (config, presets, random backbones): app/bench_setup.py.
"""
from __future__ import annotations

import json
from pathlib import Path

from app import bench_anneal, bench_decode, bench_extract, bench_quality, bench_train
from app.bench_setup import BenchConfig
from maria.io import atomic_write, guard_output_file

__all__ = ["BenchConfig", "run_bench"]
RUNNERS = {"decode": bench_decode.bench_decode, "extract": bench_extract.bench_extract,
           "train": bench_train.bench_train_cli, "anneal": bench_anneal.bench_anneal, "quality": bench_quality.bench_quality}


def run_bench(cfg: BenchConfig) -> dict:
    out = Path(cfg.json)
    guard_output_file(out, cfg.overwrite, lambda t: '"benchmark"' in t, flag="--json")
    result = RUNNERS[cfg.what](cfg)
    atomic_write(out, json.dumps(result, indent=2))
    print(json.dumps(result.get("targets", result), indent=2))
    print(f"wrote {out} and {out.with_suffix('.png')}")
    return result
