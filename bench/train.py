"""`maria bench train`: is head training bound by its data path or by the head's arithmetic?

One run measures, on the same store and batch size:
    train_rows_per_s  end to end through the real trainer (run_train: RAM or streamed data path),
                      timed over the training steps only (load, validation, checkpoint excluded)
    read_rows_per_s   (a) raw read of every committed block's arrays through the store, no decoding
    step_rows_per_s   (b) bare head steps (forward, loss, backward, AdamW) on features already on the device
    train_over_bound  train / min(a, b): 1.0 means the trainer runs at the speed of its slower bound
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from maria.device import resolve_device
from maria.head import FusionHead
from maria.plots import bar_plot
from maria_bench.setup import PRESETS
from maria_storage import create_store, open_store
from maria_train_head.checkpoint import read_metrics
from maria_train_head.step import make_optimizer, train_step
from maria_train_head.train import TrainConfig, run_train


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def read_rows_per_s(store) -> dict:
    """(a): every committed block's arrays read through the store as stored (no decode, no shuffle)."""
    rows = nbytes = 0
    t0 = time.perf_counter()
    for b in store.committed_blocks():
        arrays = store.read_block(b)
        rows += len(arrays["targets"])
        nbytes += sum(a.nbytes for a in arrays.values())
    dt = time.perf_counter() - t0
    return {"read_rows_per_s": rows / dt, "read_mb_per_s": nbytes / dt / 1e6, "rows": rows}


def step_rows_per_s(d_mlm: int, d_ar: int, vocab_size: int, batch_size: int, steps: int, device: str) -> float:
    """(b): the trainer's own step (`train_step` with the default TrainConfig: same head, optimizer,
    precision, clipping, pull toward init) with the batch already on the device."""
    cfg = TrainConfig(store="-", out="-")
    head = FusionHead(d_mlm, d_ar, vocab_size).to(device)
    init = [p.detach().clone() for p in head.parameters()]
    opt = make_optimizer(head, cfg)
    f = torch.randn(batch_size, d_mlm + d_ar, device=device)
    t = torch.randint(0, vocab_size, (batch_size,), device=device)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.startswith("cuda"))

    def step():
        train_step(head, opt, f, t, init, cfg, autocast)

    for _ in range(min(3, steps)):  # warm-up: allocator, kernels, AdamW state
        step()
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    _sync(device)
    return batch_size * steps / (time.perf_counter() - t0)


def bench_train(store_url: str, batch_size: int, steps: int, device: str = "auto", data_mode: str = "auto") -> dict:
    device = resolve_device(device)
    store = open_store(store_url)
    read = read_rows_per_s(store)
    bare = step_rows_per_s(store.d_mlm, store.d_ar, store.vocab_size, batch_size, steps, device)
    with tempfile.TemporaryDirectory(prefix="maria-bench-train-") as out:
        t0 = time.perf_counter()
        summary = run_train(
            TrainConfig(
                store=store_url,
                out=out,
                max_steps=steps,
                batch_size=batch_size,
                eval_every=steps,
                save_every=steps,
                early_stopping_patience=0,
                warmup_steps=min(10, steps),
                device=device,
                data_mode=data_mode,
            )
        )
        wall = time.perf_counter() - t0
        train = read_metrics(Path(out) / "metrics.jsonl")[-1]["rows_per_s"]
    bound = min(read["read_rows_per_s"], bare)
    return {
        "benchmark": "train",
        "store": store_url,
        "device": device,
        "threads": torch.get_num_threads(),
        "rows": read["rows"],
        "d_mlm": store.d_mlm,
        "d_ar": store.d_ar,
        "vocab_size": store.vocab_size,
        "feature_dtype": store.manifest.get("feature_dtype"),
        "batch_size": batch_size,
        "steps": steps,
        "data_mode": summary["data_mode"],
        "train_rows_per_s": train,
        "read_rows_per_s": read["read_rows_per_s"],
        "read_mb_per_s": read["read_mb_per_s"],
        "step_rows_per_s": bare,
        "train_wall_s": wall,
        "train_over_bound": train / bound,
        "bound": "read" if read["read_rows_per_s"] < bare else "head step",
        "targets": {"train_over_bound": train / bound, "train_over_bound_goal": 0.8},
    }


def make_synthetic_store(url: str, rows: int, d_mlm: int, d_ar: int, vocab_size: int, seed: int = 0, rows_per_block: int = 8192):
    """Random features (unit-scale, float16) and Zipf-like targets at real dims: throughput only."""
    rng = np.random.default_rng(seed)
    init = {
        "W1": rng.normal(0, 0.02, (vocab_size, d_mlm)).astype(np.float32),
        "b1": np.zeros(vocab_size, np.float32),
        "W2": rng.normal(0, 0.02, (vocab_size, d_ar)).astype(np.float32),
        "b2": np.zeros(vocab_size, np.float32),
        "vocab_map": np.arange(vocab_size, dtype=np.int64),
    }
    fake = {"id": "synthetic", "revision": None, "fingerprint": "synthetic"}
    manifest = {
        "mlm": fake,
        "ar": fake,
        "tokenizer_fingerprint": "synthetic",
        "d_mlm": d_mlm,
        "d_ar": d_ar,
        "vocab_size": vocab_size,
        "feature_dtype": "float16",
        "masking": {},
        "seed": seed,
        "corpus_fingerprint": "synthetic",
        "window_length": 0,
    }
    store = create_store(url, manifest, init)
    for j, s in enumerate(range(0, rows, rows_per_block)):
        n = min(rows_per_block, rows - s)
        store.write_block(
            f"b{j:06d}",
            {
                "features": rng.standard_normal((n, d_mlm + d_ar), dtype=np.float32).astype(np.float16),
                "targets": np.minimum(rng.zipf(1.2, n) - 1, vocab_size - 1).astype(np.int32),
                "doc_ids": np.arange(s, s + n),
                "window_ids": np.zeros(n, np.int64),
                "positions": np.zeros(n, np.int32),
                "mask_rates": rng.random(n, dtype=np.float32),
            },
        )
    return store


def bench_train_cli(cfg) -> dict:
    """`maria bench train`: on --store, or on a synthetic 50k-row store at the --preset's dims.
    --batch-size 1 (the default) means 1024 rows per step here."""
    batch = cfg.batch_size if cfg.batch_size > 1 else 1024
    if cfg.store:
        result = bench_train(cfg.store, batch, cfg.steps, cfg.device)
    else:
        hm, _, ha, _, v = PRESETS[cfg.preset]
        with tempfile.TemporaryDirectory(prefix="maria-bench-store-") as tmp:
            make_synthetic_store(str(Path(tmp) / "store"), 50_000, hm, ha, v, cfg.seed)
            result = bench_train(str(Path(tmp) / "store"), batch, cfg.steps, cfg.device)
        result["store"] = f"synthetic ({cfg.preset}: 50k rows)"
    print(json.dumps({k: v for k, v in result.items() if k != "targets"}, indent=1))
    bar_plot(
        Path(cfg.json).with_suffix(".png"),
        {"trainer end to end": result["train_rows_per_s"], "raw store read": result["read_rows_per_s"], "bare head step": result["step_rows_per_s"]},
        "feature rows / s",
        f"Head training throughput ({result['device']}, batch {result['batch_size']})",
    )
    return result
