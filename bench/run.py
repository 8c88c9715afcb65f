"""`maria bench <what>`: dispatch to one benchmark, write its JSON (the PNG is written beside it by the benchmark)."""

from __future__ import annotations

import json
from pathlib import Path

from maria.io import atomic_write, guard_output_file
from maria_bench import anneal, checksum, decode, extract, fp8, quality, serve, shapes, train
from maria_bench.setup import BenchConfig

__all__ = ["BenchConfig", "run_bench"]
RUNNERS = {
    "decode": decode.bench_decode,
    "extract": extract.bench_extract,
    "train": train.bench_train_cli,
    "anneal": anneal.bench_anneal,
    "quality": quality.bench_quality,
    "fp8": fp8.bench_fp8,
    "shapes": shapes.bench_shapes,
    "serve": serve.bench_serve,
    "checksum": checksum.bench_checksum,
}


def run_bench(cfg: BenchConfig) -> dict:
    out = Path(cfg.json)
    guard_output_file(out, cfg.overwrite, lambda t: '"benchmark"' in t, flag="--json")
    result = RUNNERS[cfg.what](cfg)
    atomic_write(out, json.dumps(result, indent=2))
    print(json.dumps(result.get("targets", result), indent=2))
    print(f"wrote {out} and {out.with_suffix('.png')}")
    return result
