"""Unconditional generation by simulated annealing (METHOD.md, a decision of ours).

Start from a sample, then repeat: mask a random subset of positions (a fraction falling with
the schedule), infill it with MARIA, and accept the proposal by the Metropolis rule on an energy
(the mean per-token NLL under the AR) at a falling temperature. Chains run as one batch: the
infilling decoder handles a different mask per window. More steps trade time for quality,
measured as generative perplexity under the AR (`maria bench anneal`).
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from maria.decode import Sampling, infill


@dataclass
class AnnealConfig:
    steps: int = 16  # annealing steps (0 = the initial sample)
    length: int = 64  # tokens per sample
    chains: int = 4  # samples annealed together (one batch)
    t_start: float = 0.05  # Metropolis temperature at the first step (energy = mean NLL per token)
    t_end: float = 0.005  # ... and at the last (geometric in between)
    mask_start: float = 0.5  # fraction of positions re-masked at the first step
    mask_end: float = 0.1  # ... and at the last (linear in between)
    init: str = "ar"  # initial sample: ar (AR sampling) | infill (MARIA on an all-masked window)
    energy: str = "ar"  # ar (NLL under the AR)
    temperature: float = 1.0  # sampling temperature of proposals and of the initial sample
    top_p: float = 1.0  # nucleus mass of proposals
    seed: int = 0  # seeds masks, proposals and acceptance

    def __post_init__(self):
        if self.steps < 0 or self.length < 2 or self.chains < 1:
            raise ValueError("annealing needs steps >= 0, length >= 2 and chains >= 1")
        if not (0 < self.mask_end <= 1 and 0 < self.mask_start <= 1) or self.t_start <= 0 or self.t_end <= 0:
            raise ValueError("mask fractions must be in (0, 1] and temperatures > 0")
        if self.init not in ("ar", "infill") or self.energy != "ar":
            raise ValueError("init must be ar or infill; energy must be ar")


@torch.no_grad()
def ar_nll(bb, ids: torch.Tensor) -> torch.Tensor:
    """Mean per-token NLL of each row under the AR, reading the start token first."""
    start = torch.full_like(ids[:, :1], bb.start_id if bb.start_id is not None else 0)
    x = torch.cat([start, ids], 1) if bb.start_id is not None else ids
    logits = bb.ar(input_ids=x[:, :-1]).logits.float()
    target = x[:, 1:]
    nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), target, reduction="none")
    return nll.mean(1)


@torch.no_grad()
def ar_sample(bb, n: int, length: int, temperature: float, generator: torch.Generator) -> torch.Tensor:
    from transformers import DynamicCache

    cache = DynamicCache(config=bb.ar.config)
    x = torch.full((n, 1), bb.start_id if bb.start_id is not None else 0, dtype=torch.long, device=bb.device)
    out = []
    for _ in range(length):
        logits = bb.ar(input_ids=x, cache=cache, use_cache=True, logits_to_keep=1).logits[:, -1].float()
        probs = (logits / max(temperature, 1e-6)).softmax(-1)
        x = torch.multinomial(probs.cpu(), 1, generator=generator).to(bb.device)
        out.append(x)
    return torch.cat(out, 1)


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
        if bb.start_id is None:
            mask[:, 0] = False
        x = infill(bb, head, ids, mask, sampling=Sampling(temperature=cfg.temperature, seed=cfg.seed))
    energy = ar_nll(bb, x)
    trajectory = [{"step": 0, "energy": energy.tolist(), "accepted": 0}]
    for s in range(1, cfg.steps + 1):
        frac = s / cfg.steps
        t = cfg.t_start * (cfg.t_end / cfg.t_start) ** frac
        n_mask = max(1, round((cfg.mask_start + (cfg.mask_end - cfg.mask_start) * frac) * cfg.length))
        scores = torch.rand(cfg.chains, cfg.length, generator=g)
        if bb.start_id is None:
            scores[:, 0] = -1
        mask = torch.zeros_like(x, dtype=torch.bool)
        mask.scatter_(1, scores.topk(n_mask, dim=1).indices.to(x.device), True)
        proposal = infill(bb, head, x, mask, sampling=Sampling(temperature=cfg.temperature, top_p=cfg.top_p,
                                                                 seed=int(torch.randint(0, 2**31, (1,), generator=g))))
        e_new = ar_nll(bb, proposal)
        u = torch.rand(cfg.chains, generator=g).to(e_new.device)
        accept = (e_new < energy) | (u < torch.exp(-(e_new - energy) / t))
        x = torch.where(accept[:, None], proposal, x)
        energy = torch.where(accept, e_new, energy)
        trajectory.append({"step": s, "energy": energy.tolist(), "accepted": int(accept.sum()), "temperature": t, "masked": n_mask})
        if on_step:
            on_step(s, energy)
    return x, trajectory


@dataclass
class GenerateConfig(AnnealConfig):
    model: str = ""  # a MARIA checkpoint folder (from `maria export`)
    out: str | None = None  # JSONL of samples (default: print them)
    device: str = "cpu"  # cpu or cuda

    def __post_init__(self):
        super().__post_init__()
        if not self.model:
            raise ValueError("missing --model: pass a MARIA checkpoint folder from `maria export`")


def run_generate(cfg: GenerateConfig) -> list[str]:
    from tqdm import tqdm

    from maria.model import MariaModel

    model = MariaModel.from_pretrained(cfg.model, device=cfg.device)
    bar = tqdm(total=cfg.steps, desc="anneal", unit="step")
    x, traj = anneal(model, cfg, on_step=lambda s, e: (bar.update(1), bar.set_postfix(ppl=f"{math.exp(e.mean()):.1f}")))
    bar.close()
    texts = [model.bb.ar_tokenizer.decode(row.tolist()) for row in x.cpu()]
    ppl = [math.exp(e) for e in traj[-1]["energy"]]
    if cfg.out:
        Path(cfg.out).write_text("".join(json.dumps({"text": t, "ar_ppl": p}) + "\n" for t, p in zip(texts, ppl)))
    else:
        for t, p in zip(texts, ppl):
            print(f"[AR ppl {p:.1f}] {t}")
    return texts


def bench_anneal(cfg) -> dict:
    """Generative perplexity under the AR against wall-clock time, for several step budgets,
    against plain AR sampling at the same temperature (the paper's Figure 5)."""
    from maria.bench import random_backbones, resolve_device
    from maria.head import FusionHead
    from maria.model import MariaModel

    device, dtype = resolve_device(cfg.device, cfg.dtype)
    if cfg.model:
        model = MariaModel.from_pretrained(cfg.model, device=device)
    else:
        bb = random_backbones(cfg.preset, device, dtype, cfg.seed)
        e = bb.expert_weights()
        model = MariaModel(bb, FusionHead.from_experts(e["W1"], e["b1"], e["W2"], e["b2"]))
    length, chains = 64, 4
    g = torch.Generator().manual_seed(cfg.seed)
    t0 = time.perf_counter()
    base = ar_sample(model.bb, chains, length, 1.0, g)
    t_ar = time.perf_counter() - t0
    rows = [{"method": "ar_sampling", "steps": 0, "seconds": t_ar, "gen_ppl": math.exp(ar_nll(model.bb, base).mean().item())}]
    for steps in (0, 2, 4, 8, 16, 32):
        a = AnnealConfig(steps=steps, length=length, chains=chains, seed=cfg.seed)
        t0 = time.perf_counter()
        x, traj = anneal(model, a)
        rows.append({"method": "maria_anneal", "steps": steps, "seconds": time.perf_counter() - t0,
                     "gen_ppl": math.exp(ar_nll(model.bb, x).mean().item())})
    _plot_anneal(rows, Path(cfg.json).with_suffix(".png"))
    return {"benchmark": "anneal", "device": device, "length": length, "chains": chains, "results": rows,
            "targets": {"ar_sampling_gen_ppl": rows[0]["gen_ppl"], "best_anneal_gen_ppl": min(r["gen_ppl"] for r in rows[1:])}}


def _plot_anneal(rows: list[dict], png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    an = [r for r in rows if r["method"] == "maria_anneal"]
    ax.plot([r["seconds"] for r in an], [r["gen_ppl"] for r in an], marker="o", label="MARIA simulated annealing")
    for r in an:
        ax.annotate(f"{r['steps']}", (r["seconds"], r["gen_ppl"]), fontsize=7)
    ar = rows[0]
    ax.scatter([ar["seconds"]], [ar["gen_ppl"]], color="red", label="AR sampling (T=1)", zorder=3)
    ax.set(xlabel="wall-clock seconds", ylabel="generative perplexity under the AR", title="Test-time compute for unconditional generation")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)
