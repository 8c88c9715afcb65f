"""What the backbones can take, checked before any work: window length against both models'
positions, and a batch's memory against what the machine has (an unbounded infill once grew past
20 GB and the kernel killed other processes)."""

from __future__ import annotations

import psutil
import torch

from maria.backbones import Backbones

MEMORY_SHARE = 0.5  # of the free memory one infill/generate call may plan to use


def _size(config, *names, default=0) -> int:
    return next((int(getattr(config, n)) for n in names if getattr(config, n, None)), default)


def infill_bytes(bb: Backbones, batch: int, length: int) -> int:
    """A generous estimate of one infill call's peak memory: the AR's KV cache, the MLM's attention
    scores and MLP activations (no grad), the states kept per window, and the logits chunk."""
    ar, mlm = bb.ar.config, bb.mlm.config
    item = next(bb.ar.parameters()).element_size()
    heads = _size(ar, "num_attention_heads", "n_head", default=1)
    kv_heads = _size(ar, "num_key_value_heads", default=heads)
    head_dim = _size(ar, "head_dim", default=bb.d_ar // heads)
    kv_cache = 2 * _size(ar, "num_hidden_layers", "n_layer", default=1) * kv_heads * head_dim * item
    mlm_attention = _size(mlm, "num_attention_heads", default=1) * length * 4  # one row of T x T scores per token
    activations = 4 * max(_size(mlm, "intermediate_size", default=4 * bb.d_mlm), _size(ar, "intermediate_size", "n_inner", default=4 * bb.d_ar))
    per_token = kv_cache + mlm_attention + activations + 4 * (bb.d_mlm + bb.d_ar)
    return batch * length * per_token + (1 << 26)


def free_bytes(device: torch.device | str) -> int:
    if str(device).startswith("cuda"):
        return int(torch.cuda.mem_get_info(torch.device(device))[0])
    return int(psutil.virtual_memory().available)


def check_fits(bb: Backbones, batch: int, length: int, what: str = "infill") -> None:
    """Refuse, in one line, a window the models cannot read or a batch the machine cannot hold."""
    limit = bb.max_window()
    if limit is not None and length > limit:
        raise ValueError(f"{what}: {length} tokens is over the models' limit of {limit}; shorten the text (or --length)")
    need, free = infill_bytes(bb, batch, length), free_bytes(bb.device)
    if need > MEMORY_SHARE * free:
        raise ValueError(
            f"{what}: {batch} window(s) of {length} tokens need about {need / 2**30:.1f} GiB, more than half "
            f"of the {free / 2**30:.1f} GiB free; lower --batch-size (or --chains) or shorten the texts"
        )
