"""`maria bench anneal`: generative perplexity under the AR against wall-clock time, for several
annealing step budgets, against plain AR sampling at the same temperature (the paper's Figure 5)."""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch

from maria.anneal import AnnealConfig, anneal, ar_nll, ar_sample
from maria.modeling_maria import MariaModel
from maria.plots import line_plot
from maria_bench.setup import poe_head, random_backbones, resolve


def bench_anneal(cfg) -> dict:
    """Generative perplexity under the AR against wall-clock time, for several step budgets,
    against plain AR sampling at the same temperature (the paper's Figure 5)."""
    device, dtype = resolve(cfg.device, cfg.dtype)
    if cfg.model:
        model = MariaModel.from_pretrained(cfg.model, device=device, dtype=dtype)
    else:
        bb = random_backbones(cfg.preset, device, dtype, cfg.seed)
        model = MariaModel.from_parts(bb, poe_head(bb))
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
        rows.append({"method": "maria_anneal", "steps": steps, "seconds": time.perf_counter() - t0, "gen_ppl": math.exp(ar_nll(model.bb, x).mean().item())})
    _plot_anneal(rows, Path(cfg.json).with_suffix(".png"))
    return {
        "benchmark": "anneal",
        "device": device,
        "length": length,
        "chains": chains,
        "results": rows,
        "targets": {"ar_sampling_gen_ppl": rows[0]["gen_ppl"], "best_anneal_gen_ppl": min(r["gen_ppl"] for r in rows[1:])},
    }


def _plot_anneal(rows: list[dict], png: Path) -> None:
    an = [r for r in rows if r["method"] == "maria_anneal"]
    ar = rows[0]
    line_plot(
        png,
        {"MARIA simulated annealing": ([r["seconds"] for r in an], [r["gen_ppl"] for r in an]), "AR sampling (T=1)": ([ar["seconds"]], [ar["gen_ppl"]])},
        "wall-clock seconds",
        "generative perplexity under the AR",
        "Test-time compute for unconditional generation",
        annotate={"MARIA simulated annealing": [str(r["steps"]) for r in an]},
    )
