"""`maria bench decode`: infilling tokens/s over batch sizes and window lengths (the paper's Figure 3).

Per (batch size, length): B windows of random tokens, each with its own random mask (--mask-rate).
Timed: MARIA (ragged KV-cached infilling); plain KV-cached AR generation and Hugging Face
`generate()` (greedy, `max_new_tokens`) of the same number of new tokens per window after a prompt
of the rest; the MLM decoded left to right (one full MLM pass per filled column; --mlm-ar-columns
of them are timed, the rate is per filled token) and the MLM's iterative unmasking in k steps.
On a shared machine a single timing means little: every figure is the median of --repeats runs,
with min/max beside it, the methods are interleaved inside each repeat so they see the same load,
and MARIA/AR is the median of the per-repeat ratios. The load average is recorded. Each run is
timed twice: wall clock (`*_tok_s`, the goal's measure) and this process's CPU time
(`*_cpu_tok_s`), which other processes' load moves much less (least with --threads 1: no time spent
waiting on a descheduled second thread).
"""

from __future__ import annotations

import os
import statistics
import time
from dataclasses import asdict
from pathlib import Path

import torch
from tqdm import tqdm

from maria.baselines import ar_generate, hf_generate, mlm_iterative_unmasking, mlm_left_to_right
from maria.decode import infill, plan, step_cost_tokens
from maria.device import cpu_threads
from maria.plots import line_plot
from maria_bench.setup import BenchConfig, _timed, model_backbones, params, peak_tflops, poe_head, resolve

GOAL = 0.8  # MARIA / plain AR generation, at every batch size and length


def spread(values: list[float]) -> dict:
    """Median and spread of repeated measurements (the JSON's one shape for a figure)."""
    q = statistics.quantiles(values, n=4, method="inclusive") if len(values) > 1 else [values[0]] * 3
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "q1": q[0], "q3": q[2], "runs": len(values)}


def _cell(bb, head, cfg: BenchConfig, B: int, L: int, g: torch.Generator, device: str, peak: float | None) -> dict:
    V = min(bb.vocab_size, int((bb.mlm_to_ar >= 0).sum()))
    ids = torch.randint(2, V, (B, L), generator=g).to(device)
    mask = (torch.rand(B, L, generator=g) < cfg.mask_rate).to(device)
    mask[mask.sum(1) == 0, L - 1] = True  # every window fills at least one token
    n_masked = int(mask.sum())
    new = max(1, round(n_masked / B))  # AR generation: the same number of tokens, in B rows of `new`
    prompt = ids[:, : L - new]
    cols = mask.any(0).nonzero().squeeze(1)[: cfg.mlm_ar_columns]
    part = torch.zeros_like(mask)
    part[:, cols] = mask[:, cols]
    chunk = cfg.max_chunk or None
    methods = {  # name: (run, tokens it produces)
        "maria": (lambda: infill(bb, head, ids, mask, max_chunk=chunk), n_masked),
        "ar_generate": (lambda: ar_generate(bb, prompt, new), B * new),
        "hf_generate": (lambda: hf_generate(bb, prompt, new), B * new),
        "mlm_left_to_right": (lambda: mlm_left_to_right(bb, ids, part), int(part.sum())),
    }
    if cfg.unmask_steps:
        methods["mlm_unmask"] = (lambda: mlm_iterative_unmasking(bb, ids, mask, cfg.unmask_steps), n_masked)
    rates, cpu_rates = {k: [] for k in methods}, {k: [] for k in methods}
    for _ in range(cfg.repeats):
        for k, (fn, tokens) in methods.items():
            c0 = time.process_time()
            rates[k].append(tokens / _timed(fn, device))
            cpu_rates[k].append(tokens / max(time.process_time() - c0, 1e-9))
    row = {
        "batch_size": B,
        "length": L,
        "masked_tokens": n_masked,
        "new_tokens_per_window": new,
        "mlm_ar_columns_timed": len(cols),
        **{f"{k}_tok_s": spread(v) for k, v in rates.items()},
        **{f"{k}_cpu_tok_s": spread(v) for k, v in cpu_rates.items()},
    }
    for ref in ("ar_generate", "hf_generate", "mlm_left_to_right"):
        row[f"maria_over_{ref}"] = spread([m / r for m, r in zip(rates["maria"], rates[ref])])
        row[f"maria_over_{ref}_cpu"] = spread([m / r for m, r in zip(cpu_rates["maria"], cpu_rates[ref])])
    host_mask, offset = mask.cpu().numpy(), int(bb.start_id is not None)
    pl = plan(host_mask, offset, chunk, step_cost_tokens(device) if chunk is None else None)
    row["maria_ar_steps"] = len(pl.steps)  # prefill + steps; the union of masked columns was:
    # where a step costs the same whatever its width (a GPU: no cuts), MARIA/AR is about AR's steps over
    # MARIA's uncut ones: a batch waits for its most-masked window, AR generation makes the mean count
    row["ar_steps_over_maria_steps_uncut"] = (new + 1) / len(plan(host_mask, offset).steps)
    fed = sum(int(st.count.sum()) for st in pl.steps[1:])
    row["maria_tokens_per_row_step"] = fed / max(1, sum(len(st.count) for st in pl.steps[1:]))  # AR generation: 1
    row["maria_padding"] = sum(len(st.count) * int(st.count.max(initial=0)) for st in pl.steps[1:]) / max(1, fed)
    row["masked_columns"] = int(mask.any(0).sum())
    row["max_masked_per_window"] = int(mask.sum(1).max())
    # model FLOPs per masked token: the AR reads every token once, the MLM reads the window once
    flops = (2 * params(bb.ar) * L + 2 * params(bb.mlm) * (L + 2)) * B / n_masked + 2 * head.proj.weight.numel()
    row["maria_tflops"] = flops * row["maria_tok_s"]["median"] / 1e12
    if peak:
        row["maria_fraction_of_peak"] = row["maria_tflops"] / peak
    return row


def decode_rows(bb, head, cfg: BenchConfig, device: str) -> list[dict]:
    """One row per (batch size, length) of cfg: the timed methods' medians and spreads (bench_decode's
    `results`; the device check calls it on backbones it already holds)."""
    g = torch.Generator().manual_seed(cfg.seed)
    peak, rows = peak_tflops(device), []
    for B in cfg.batch_sizes:
        warm = torch.randint(2, 100, (B, 16), generator=g).to(device)
        infill(bb, head, warm, torch.rand(B, 16, generator=g).to(device) < 0.5)
        ar_generate(bb, warm, 4), hf_generate(bb, warm, 4)
        for L in tqdm(cfg.lengths, desc=f"bench decode, batch {B}", unit="length"):
            rows.append(_cell(bb, head, cfg, B, L, g, device, peak))
    return rows


def bench_decode(cfg: BenchConfig) -> dict:
    device, dtype = resolve(cfg.device, cfg.dtype)
    if device == "cpu":
        torch.set_num_threads(cfg.threads or cpu_threads())
    bb = model_backbones(cfg, device, dtype)
    head = poe_head(bb).to(device=device, dtype=dtype)
    load_before = os.getloadavg()
    rows = decode_rows(bb, head, cfg, device)
    worst = min(rows, key=lambda r: r["maria_over_ar_generate"]["median"])
    result = {
        "benchmark": "decode",
        "config": asdict(cfg),
        "device": device,
        "dtype": str(dtype),
        "threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
        "mlm_params": params(bb.mlm),
        "ar_params": params(bb.ar),
        "results": rows,
        "targets": {
            "maria_over_ar_goal": GOAL,
            "maria_over_ar_min": worst["maria_over_ar_generate"]["median"],
            "worst_cell": {"batch_size": worst["batch_size"], "length": worst["length"]},
            "goal_met": all(r["maria_over_ar_generate"]["median"] >= GOAL for r in rows),
            "maria_over_ar_cpu_min": min(r["maria_over_ar_generate_cpu"]["median"] for r in rows),
            "goal_met_cpu_time": all(r["maria_over_ar_generate_cpu"]["median"] >= GOAL for r in rows),
            "maria_over_ar": {f"B{r['batch_size']}-L{r['length']}": round(r["maria_over_ar_generate"]["median"], 3) for r in rows},
            "maria_over_mlm_left_to_right": {f"B{r['batch_size']}-L{r['length']}": round(r["maria_over_mlm_left_to_right"]["median"], 2) for r in rows},
        },
    }
    plot_decode(result, Path(cfg.json).with_suffix(".png"))
    return result


def plot_decode(result: dict, png: Path) -> None:
    rows = result["results"]
    labels = {
        "maria_tok_s": ("MARIA", "tab:red"),
        "ar_generate_tok_s": ("AR gen", "tab:blue"),
        "hf_generate_tok_s": ("HF generate()", "tab:cyan"),
        "mlm_left_to_right_tok_s": ("MLM L2R", "tab:gray"),
    }
    series, notes, styles = {}, {}, {}
    for B, dash in zip(sorted({r["batch_size"] for r in rows}), ["-", "--", ":", "-."] * 8):
        rs = [r for r in rows if r["batch_size"] == B]
        for key, (label, colour) in labels.items():
            series[f"{label}, batch {B}"] = ([r["length"] for r in rs], [r[key]["median"] for r in rs])
            styles[f"{label}, batch {B}"] = {"color": colour, "ls": dash}
        notes[f"MARIA, batch {B}"] = [f"{r['maria_over_ar_generate']['median']:.2f}x" for r in rs]
    preset = result["config"]["preset"] if not result["config"]["mlm"] else "custom"
    line_plot(
        png,
        series,
        f"window length (tokens, {result['config']['mask_rate']:.0%} masked)",
        "tokens / s (median)",
        f"Infilling throughput ({result['device']}, {preset}); labels: MARIA / AR gen",
        logx=True,
        logy=True,
        annotate=notes,
        styles=styles,
    )
