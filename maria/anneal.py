"""Unconditional generation by simulated annealing (METHOD.md, a decision of ours).

Start from a sample, then repeat: re-mask one contiguous span (a length falling with the
schedule; or scattered positions), infill it with MARIA, and accept the proposal by the
Metropolis rule on an energy (the mean per-token NLL under the AR) at a falling temperature.

Why spans, short ones, and top-p proposals (measured with the demo pair): re-masking 30-50% of a
sample at scattered positions and sampling at T=1 raised its AR NLL by 1.5-2.5 nats per token,
so at Metropolis temperatures of 0.05 no proposal was ever accepted. A short span is a local
edit whose both sides are known, the kind of proposal that can lower the energy. Chains run as one batch: the
infilling decoder handles a different mask per window. More steps trade time for quality,
measured as generative perplexity under the AR (`maria bench anneal`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from maria.baselines import ar_generate
from maria.decode import Sampling, infill


@dataclass
class AnnealConfig:
    steps: int = 16  # annealing steps (0 = the initial sample)
    length: int = 64  # tokens per sample
    chains: int = 4  # samples annealed together (one batch)
    t_start: float = 0.05  # Metropolis temperature at the first step (energy = mean NLL per token)
    t_end: float = 0.005  # ... and at the last (geometric in between)
    mask_start: float = 0.15  # fraction of positions re-masked at the first step
    mask_end: float = 0.03  # ... and at the last (linear in between)
    span: bool = True  # re-mask one contiguous span (a local edit) rather than scattered positions
    init: Literal["ar", "infill"] = "ar"  # initial sample: ar (AR sampling) | infill (MARIA on an all-masked window)
    temperature: float = 1.0  # sampling temperature of proposals and of the initial sample
    top_p: float = 0.9  # nucleus mass of proposals (the tail of a weak MLM's mix is where bad proposals come from)
    seed: int = 0  # seeds masks, proposals and acceptance

    def __post_init__(self):
        if self.steps < 0 or self.length < 2 or self.chains < 1:
            raise ValueError("annealing needs steps >= 0, length >= 2 and chains >= 1")
        if not (0 < self.mask_end <= 1 and 0 < self.mask_start <= 1) or self.t_start <= 0 or self.t_end <= 0:
            raise ValueError("mask fractions must be in (0, 1] and temperatures > 0")
        if self.init not in ("ar", "infill"):
            raise ValueError(f"init must be ar or infill, not {self.init!r}")


@torch.no_grad()
def ar_nll(bb, ids: torch.Tensor) -> torch.Tensor:
    """Mean per-token NLL of each row under the AR, reading the start token first."""
    start = torch.full_like(ids[:, :1], bb.start_id if bb.start_id is not None else 0)
    x = torch.cat([start, ids], 1) if bb.start_id is not None else ids
    logits = bb.ar(input_ids=x[:, :-1]).logits.float()
    target = x[:, 1:]
    nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), target, reduction="none")
    return nll.mean(1)


def ar_sample(bb, n: int, length: int, temperature: float, generator: torch.Generator) -> torch.Tensor:
    """n samples of `length` tokens from the AR alone (the chains' starting points)."""
    empty = torch.zeros((n, 0), dtype=torch.long, device=bb.device)
    return ar_generate(bb, empty, length, Sampling(temperature=temperature), generator)


def remask(cfg: AnnealConfig, n_mask: int, keep_first: bool, g: torch.Generator) -> torch.Tensor:
    """(chains, length) proposal mask: one span of n_mask positions per chain, or n_mask scattered ones."""
    lo = int(keep_first)  # with nothing read before x[0] (no AR start token), position 0 is never masked
    n_mask = min(n_mask, cfg.length - lo)
    if cfg.span:
        start = torch.randint(lo, cfg.length - n_mask + 1, (cfg.chains, 1), generator=g)
        cols = torch.arange(cfg.length)[None, :]
        return (cols >= start) & (cols < start + n_mask)
    scores = torch.rand(cfg.chains, cfg.length, generator=g)
    scores[:, :lo] = -1
    mask = torch.zeros(cfg.chains, cfg.length, dtype=torch.bool)
    return mask.scatter_(1, scores.topk(n_mask, dim=1).indices, True)


@torch.no_grad()
def anneal(model, cfg: AnnealConfig, on_step=None) -> tuple[torch.Tensor, list[dict]]:
    """Returns the final samples (chains, length) and the trajectory (energy per step)."""
    bb, head = model.bb, model.head
    g = torch.Generator().manual_seed(cfg.seed)
    if cfg.init == "ar":
        x = ar_sample(bb, cfg.chains, cfg.length, cfg.temperature, g)
    else:
        ids = torch.zeros(cfg.chains, cfg.length, dtype=torch.long, device=bb.device)
        mask = torch.ones_like(ids, dtype=torch.bool)
        mask[:, : bb.first_maskable] = False  # nothing is read before x[0] (no AR start token): it stays known
        x = infill(bb, head, ids, mask, sampling=Sampling(temperature=cfg.temperature, seed=cfg.seed))
    energy = ar_nll(bb, x)
    trajectory = [{"step": 0, "energy": energy.tolist(), "accepted": 0}]
    for s in range(1, cfg.steps + 1):
        frac = s / cfg.steps
        t = cfg.t_start * (cfg.t_end / cfg.t_start) ** frac
        n_mask = max(1, round((cfg.mask_start + (cfg.mask_end - cfg.mask_start) * frac) * cfg.length))
        mask = remask(cfg, n_mask, bool(bb.first_maskable), g).to(x.device)
        proposal = infill(
            bb, head, x, mask, sampling=Sampling(temperature=cfg.temperature, top_p=cfg.top_p, seed=int(torch.randint(0, 2**31, (1,), generator=g)))
        )
        e_new = ar_nll(bb, proposal)
        u = torch.rand(cfg.chains, generator=g).to(e_new.device)
        accept = (e_new < energy) | (u < torch.exp(-(e_new - energy) / t))
        x = torch.where(accept[:, None], proposal, x)
        energy = torch.where(accept, e_new, energy)
        trajectory.append({"step": s, "energy": energy.tolist(), "accepted": int(accept.sum()), "temperature": t, "masked": n_mask})
        if on_step:
            on_step(s, energy)
    return x, trajectory
