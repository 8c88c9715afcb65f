"""Where torch work runs: the one definition of device, dtype and CPU-thread resolution."""

from __future__ import annotations

import os
from typing import Literal

import torch

# The flag types of every verb, so a typo (`--device gpu`) fails when the command line is parsed.
Device = Literal["auto", "cpu", "cuda"]  # auto: cuda when a GPU is visible (on a Ray actor: when Ray gave it one)
DType = Literal["auto", "float32", "bfloat16", "float16"]  # auto: bfloat16 on a GPU, float32 on a CPU


def resolve_device(device: str = "auto") -> str:
    """auto -> cuda when a GPU is visible, else cpu; an explicit cuda without a GPU is refused."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device != "cpu" and not (device == "cuda" or device.startswith("cuda:")):
        raise ValueError(f"unknown device {device!r}; pass --device auto, cpu or cuda")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {device} was asked for but no CUDA GPU is visible; pass --device cpu")
    return device


def resolve_dtype(dtype: str, device: str) -> torch.dtype:
    """auto -> bfloat16 on a GPU, float32 on a CPU (CPU bf16 matmuls are slow and inexact)."""
    if dtype == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    if dtype not in ("float32", "bfloat16", "float16"):
        raise ValueError(f"unknown dtype {dtype!r}; pass --dtype auto, float32, bfloat16 or float16")
    return getattr(torch, dtype)


def cpu_threads() -> int:
    """Torch CPU threads: $MARIA_TORCH_THREADS, else every core (on a shared CPU, fewer threads than
    cores avoids torch's spin-wait collapse on small matrices)."""
    return max(1, int(os.environ.get("MARIA_TORCH_THREADS") or os.cpu_count() or 1))
