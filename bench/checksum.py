"""`maria bench checksum`: what checking a checkpoint's sha256 digests costs at load, against reading the weights.

Export writes checksums.json (the sha256 of every safetensors file) and loading checks it before anything else
(maria/checkpoint.py). This times, over the same files (warm page cache, the median of --repeats): hashing them
all, and reading every byte of them (what any load pays at least: safetensors' load_file alone maps the files and
reads a page only when a tensor touches it). With --model, a MARIA checkpoint's own files and its full
`from_pretrained`; else a preset's random backbones written as safetensors.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file, save_model

from maria.io import file_sha256
from maria.modeling_maria import MariaModel
from maria.plots import bar_plot
from maria_bench.setup import poe_head, random_backbones


def _files(cfg, tmp: Path) -> list[Path]:
    if cfg.model:
        return sorted(Path(cfg.model).rglob("*.safetensors"))
    bb = random_backbones(cfg.preset, "cpu", torch.float32, cfg.seed)
    for name, model in (("mlm", bb.mlm), ("ar", bb.ar)):
        save_model(model, str(tmp / f"{name}.safetensors"), metadata={"format": "pt"})  # tied weights stored once
    save_file(poe_head(bb).state_dict(), str(tmp / "head.safetensors"), metadata={"format": "pt"})
    return sorted(tmp.glob("*.safetensors"))


def _seconds(fn, repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def bench_checksum(cfg) -> dict:
    with tempfile.TemporaryDirectory(prefix="maria-bench-checksum-") as tmp:
        files = _files(cfg, Path(tmp))
        size = sum(f.stat().st_size for f in files)
        for f in files:  # warm the page cache: both timings then read memory, not the disk
            file_sha256(f)
        sha = _seconds(lambda: [file_sha256(f) for f in files], cfg.repeats)
        read = _seconds(lambda: [f.read_bytes() for f in files], cfg.repeats)
    result = {
        "benchmark": "checksum",
        "source": cfg.model or f"random {cfg.preset} backbones",
        "files": len(files),
        "bytes": size,
        "repeats": cfg.repeats,
        "sha256_seconds": sha,
        "read_seconds": read,
        "sha256_MB_per_s": size / 1e6 / statistics.median(sha),
        "read_MB_per_s": size / 1e6 / statistics.median(read),
    }
    bars = {"sha256 of every file": statistics.median(sha), "read every byte": statistics.median(read)}
    if cfg.model:
        load = _seconds(lambda: MariaModel.from_pretrained(cfg.model), cfg.repeats)
        result["from_pretrained_seconds"] = load
        bars["from_pretrained (checks included)"] = statistics.median(load)
    base = statistics.median(load if cfg.model else read)
    result["targets"] = {
        "sha256_over_baseline": statistics.median(sha) / base,
        "baseline": "from_pretrained" if cfg.model else "read every byte",
        "sha256_MB_per_s": result["sha256_MB_per_s"],
        "bytes": size,
    }
    bar_plot(
        Path(cfg.json).with_suffix(".png"),
        {k: v * 1000 for k, v in bars.items()},
        "milliseconds (median)",
        f"Checkpoint checksums: {size / 1e6:.0f} MB in {len(files)} files",
    )
    return result
