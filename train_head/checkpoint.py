"""What the trainer writes besides the head folder: resumable checkpoints, metrics and the loss curve.

    out/head.safetensors, out/head.json   the BEST head by validation loss (maria/head.py's format);
                                          head.json says whether the run is `complete`
    out/metrics.jsonl      one line per validation: time, step, train_loss, val_loss, val_ppl, lr, rows_per_s
    out/loss.png           the loss curves
    out/ckpt/state.safetensors  head, best head, AdamW moments and step, torch RNG states
    out/ckpt/state.json         step, data-reader state, best so far, counters, config
Everything is safetensors or JSON (no pickle). A checkpoint folder is built beside the old one
and swapped in (maria.io.atomic_dir), so a crash at any point leaves one complete checkpoint.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from maria.head import FusionHead
from maria.io import atomic_dir, atomic_write, previous_dir
from maria.plots import line_plot

RUN_FILES = ("head.json", "head.safetensors", "metrics.jsonl", "loss.png")


def save_checkpoint(out: Path, head: FusionHead, best: dict[str, torch.Tensor], opt: torch.optim.Optimizer, state: dict) -> None:
    tensors = {
        "head.weight": head.proj.weight,
        "head.bias": head.proj.bias,
        "best.weight": best["weight"],
        "best.bias": best["bias"],
        "rng.torch_cpu": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        tensors["rng.torch_cuda"] = torch.cuda.get_rng_state()
    for i, p in enumerate(head.parameters()):
        for k, v in opt.state.get(p, {}).items():
            tensors[f"adam.{i}.{k}"] = v.reshape(-1) if k == "step" else v
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    with atomic_dir(out / "ckpt") as tmp:
        save_file(tensors, str(tmp / "state.safetensors"), metadata={"format": "pt"})
        (tmp / "state.json").write_text(json.dumps(state, indent=1))


def clear_run(out: Path) -> None:
    for d in (out / "ckpt", previous_dir(out / "ckpt", "old"), previous_dir(out / "ckpt", "partial")):
        shutil.rmtree(d, ignore_errors=True)
    for f in RUN_FILES:
        (out / f).unlink(missing_ok=True)


def load_checkpoint(out: Path) -> tuple[dict[str, torch.Tensor], dict] | None:
    """The newest complete checkpoint (a crash mid-swap leaves the previous one in .ckpt.old)."""
    for d in (out / "ckpt", previous_dir(out / "ckpt", "old")):
        if (d / "state.json").exists() and (d / "state.safetensors").exists():
            return load_file(str(d / "state.safetensors")), json.loads((d / "state.json").read_text())
    return None


def restore(tensors: dict, head: FusionHead, opt: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """Head weights, AdamW state and RNG from a checkpoint; returns the best head so far."""
    dev = head.proj.weight.device
    with torch.no_grad():
        head.proj.weight.copy_(tensors["head.weight"]), head.proj.bias.copy_(tensors["head.bias"])
    sd = opt.state_dict()
    sd["state"] = {}
    for i, _ in enumerate(head.parameters()):
        if f"adam.{i}.step" in tensors:
            sd["state"][i] = {
                "step": tensors[f"adam.{i}.step"].reshape(()),
                "exp_avg": tensors[f"adam.{i}.exp_avg"],
                "exp_avg_sq": tensors[f"adam.{i}.exp_avg_sq"],
            }
    opt.load_state_dict(sd)
    torch.set_rng_state(tensors["rng.torch_cpu"])
    if "rng.torch_cuda" in tensors and dev.type == "cuda":
        torch.cuda.set_rng_state(tensors["rng.torch_cuda"])
    return {"weight": tensors["best.weight"].to(dev), "bias": tensors["best.bias"].to(dev)}


def append_metrics(out: Path, record: dict) -> None:
    with open(out / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"time": round(time.time(), 3), **record}) + "\n")


def truncate_metrics(out: Path, step: int) -> None:
    """On resume: drop lines logged after the checkpoint (the resumed run logs them again)."""
    path = out / "metrics.jsonl"
    if path.exists():
        keep = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
        atomic_write(path, "".join(line + "\n" for line in keep))


def read_metrics(path: str | Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def plot_loss(out: Path) -> None:
    rows = read_metrics(out / "metrics.jsonl")
    train = [(r["step"], r["train_loss"]) for r in rows if r.get("train_loss") is not None]
    series = {"validation": ([r["step"] for r in rows], [r["val_loss"] for r in rows])}
    if train:
        series["train (mean since last eval)"] = tuple(map(list, zip(*train)))
    best = min(rows, key=lambda r: r["val_loss"])
    line_plot(
        out / "loss.png",
        series,
        "step",
        "NLL per masked token (nats)",
        "MARIA head training",
        hlines={f"best val {best['val_loss']:.3f} (ppl {math.exp(best['val_loss']):.1f}) @ {best['step']}": best["val_loss"]},
    )
