"""What the trainer writes: the head folder, resumable checkpoints, metrics and the loss curve.

    out/head.safetensors   weight (V, D), bias (V,): the BEST head by validation loss
    out/head.json          what it was trained on (backbone identity, store, init, best step/loss)
    out/metrics.jsonl      one line per validation: step, train_loss, val_loss, val_ppl, lr, rows_per_s
    out/loss.png           the loss curves
    out/ckpt/state.safetensors  head, best head, AdamW moments and step, torch RNG states
    out/ckpt/state.json         step, data-reader state, best so far, counters, config
Everything is safetensors or JSON (no pickle). A checkpoint folder is written beside the old one
and swapped in by renames, so a crash at any point leaves one complete checkpoint.
"""
from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from maria.head import FusionHead


def _write_atomic(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    write(tmp)
    os.replace(tmp, path)


def write_head(out: Path, weight: torch.Tensor, bias: torch.Tensor, meta: dict) -> None:
    """head.safetensors first, head.json last: a folder with head.json is complete."""
    tensors = {"weight": weight.detach().float().cpu().contiguous(), "bias": bias.detach().float().cpu().contiguous()}
    _write_atomic(out / "head.safetensors", lambda p: save_file(tensors, str(p)))
    _write_atomic(out / "head.json", lambda p: p.write_text(json.dumps(meta, indent=2)))


def save_checkpoint(out: Path, head: FusionHead, best: dict[str, torch.Tensor], opt: torch.optim.Optimizer, state: dict) -> None:
    tensors = {"head.weight": head.proj.weight, "head.bias": head.proj.bias,
               "best.weight": best["weight"], "best.bias": best["bias"], "rng.torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        tensors["rng.torch_cuda"] = torch.cuda.get_rng_state()
    for i, p in enumerate(head.parameters()):
        for k, v in opt.state.get(p, {}).items():
            tensors[f"adam.{i}.{k}"] = v.reshape(-1) if k == "step" else v
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    final, tmp, old = out / "ckpt", out / "ckpt.partial", out / "ckpt.old"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(tensors, str(tmp / "state.safetensors"))
    (tmp / "state.json").write_text(json.dumps(state, indent=1))
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        final.rename(old)  # a crash right here leaves ckpt.old, which load_checkpoint falls back to
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)


def clear_run(out: Path) -> None:
    for d in ("ckpt", "ckpt.old", "ckpt.partial"):
        shutil.rmtree(out / d, ignore_errors=True)
    for f in ("head.json", "head.safetensors", "metrics.jsonl", "loss.png"):
        (out / f).unlink(missing_ok=True)


def load_checkpoint(out: Path) -> tuple[dict[str, torch.Tensor], dict] | None:
    for d in (out / "ckpt", out / "ckpt.old"):
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
            sd["state"][i] = {"step": tensors[f"adam.{i}.step"].reshape(()), "exp_avg": tensors[f"adam.{i}.exp_avg"],
                              "exp_avg_sq": tensors[f"adam.{i}.exp_avg_sq"]}
    opt.load_state_dict(sd)
    torch.set_rng_state(tensors["rng.torch_cpu"])
    if "rng.torch_cuda" in tensors and dev.type == "cuda":
        torch.cuda.set_rng_state(tensors["rng.torch_cuda"])
    return {"weight": tensors["best.weight"].to(dev), "bias": tensors["best.bias"].to(dev)}


def append_metrics(out: Path, record: dict) -> None:
    with open(out / "metrics.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")


def truncate_metrics(out: Path, step: int) -> None:
    """On resume: drop lines logged after the checkpoint (the resumed run logs them again)."""
    path = out / "metrics.jsonl"
    if path.exists():
        keep = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
        _write_atomic(path, lambda p: p.write_text("".join(line + "\n" for line in keep)))


def read_metrics(path: str | Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def plot_loss(out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(out / "metrics.jsonl")
    fig, ax = plt.subplots(figsize=(6, 4))
    tr = [(r["step"], r["train_loss"]) for r in rows if r.get("train_loss") is not None]
    if tr:
        ax.plot(*zip(*tr), label="train (mean since last eval)")
    ax.plot([r["step"] for r in rows], [r["val_loss"] for r in rows], marker="o", ms=3, label="validation")
    best = min(rows, key=lambda r: r["val_loss"])
    ax.axhline(best["val_loss"], color="gray", ls=":", lw=1, label=f"best val {best['val_loss']:.3f} (ppl {math.exp(best['val_loss']):.1f}) @ {best['step']}")
    ax.set(xlabel="step", ylabel="NLL per masked token (nats)", title="MARIA head training")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "loss.png", dpi=110)
    plt.close(fig)
