"""A batch of stored features decoded, and one optimizer step of the head: what the trainer runs, and what
benchmarks and the device check time.

Imports no store (no zarr) so it runs where only torch is installed. `cfg` is anything with the
TrainConfig fields a step reads: lr, weight_decay (AdamW), grad_clip, reg_to_init (the pull toward init).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def decode_features(features: torch.Tensor, scales: torch.Tensor | None = None) -> torch.Tensor:
    """Stored features -> float32, on whatever device they sit: float16 / bfloat16 cast; float8 codes (uint8)
    times their row's scale (storage/float8.py: the same e4m3fn values as its numpy table)."""
    if scales is None:
        return features.float()
    return features.view(torch.float8_e4m3fn).float() * scales.float()[:, None]


def make_optimizer(head, cfg) -> torch.optim.Optimizer:
    """AdamW, fused: one kernel per step and no head-sized temporaries (the foreach version allocates
    several, which at a 50k-vocabulary head's size were most of the trainer's peak memory)."""
    return torch.optim.AdamW(head.parameters(), lr=cfg.lr, betas=(0.9, 0.95), weight_decay=cfg.weight_decay, fused=True)


def train_step(head, opt, f: torch.Tensor, t: torch.Tensor, init_params: list, cfg, autocast) -> torch.Tensor:
    """One optimizer step of the head (the trainer's and the benchmarks'); returns the loss, unsynced."""
    with autocast:
        logits = head(f)
    loss = F.cross_entropy(logits.float(), t)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if cfg.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(head.parameters(), cfg.grad_clip)
    for p, p0 in zip(head.parameters(), init_params):  # after clipping: the prior never shrinks with a data spike
        p.grad.add_(p.detach(), alpha=cfg.reg_to_init).sub_(p0, alpha=cfg.reg_to_init)  # in place: no head-sized temporary
    opt.step()
    return loss
