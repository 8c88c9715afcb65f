"""The full MARIA model and `maria export`: what callers import.

MariaModel (maria/hf.py) is a Hugging Face PreTrainedModel; its checkpoint folder is described in
maria/checkpoint.py. `export` checks a trained head against two backbones and writes that folder.
"""
from __future__ import annotations

from pathlib import Path

import torch

from maria.checkpoint import CheckpointError, CorruptCheckpointError, MariaConfig, read_eval
from maria.hf import MariaModel
from maria.io import guard_output

__all__ = ["CheckpointError", "CorruptCheckpointError", "MariaConfig", "MariaModel", "export"]
DTYPES = ("float32", "bfloat16", "float16")


def export(mlm: str, ar: str, head_dir: str, out: str, reference: bool = False, overwrite: bool = False,
           allow_unfinished: bool = False, dtype: str = "float32", eval_json: str | None = None, **load_kw) -> Path:
    """`maria export`: check the head against the backbones, then write one combined folder with
    every weight in `dtype`. The backbones are loaded in float32 whatever `dtype` is: the head's
    record of them is then matched exactly (maria.hf.head_matches), and the cast to `dtype` is the
    same rounding a load in `dtype` does."""
    if dtype not in DTYPES:
        raise ValueError(f"unknown --dtype {dtype!r}; pass one of {', '.join(DTYPES)}")
    guard_output(out, "config.json", overwrite, (mlm, ar, head_dir), what="checkpoint folder")  # before minutes of loading
    eval_results = read_eval(eval_json) if eval_json else None
    load_kw.pop("dtype", None)
    model = MariaModel.from_backbones(mlm, ar, head_dir=head_dir, allow_unfinished=allow_unfinished, dtype=torch.float32, **load_kw)
    model.to(getattr(torch, dtype))
    return model.save_pretrained(out, reference=reference, overwrite=overwrite, inputs=(mlm, ar, head_dir), eval_results=eval_results)
