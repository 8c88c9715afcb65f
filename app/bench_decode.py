"""`maria bench decode`: infilling tokens/s at mask rate 0.5 over lengths: MARIA (KV-cached), plain
KV-cached AR generation of the same number of tokens, the MLM decoded left to right, and the MLM's
iterative unmasking in k steps (masked-diffusion style); the paper's Figure 3."""
from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import torch
from tqdm import tqdm

from app.bench_setup import PEAK_TFLOPS_BF16, BenchConfig, _timed, model_backbones, params, poe_head, resolve
from maria.baselines import ar_generate, mlm_iterative_unmasking, mlm_left_to_right
from maria.decode import infill
from maria.plots import line_plot


def bench_decode(cfg: BenchConfig) -> dict:
    device, dtype = resolve(cfg.device, cfg.dtype)
    bb = model_backbones(cfg, device, dtype)
    head = poe_head(bb).to(device=device, dtype=dtype)
    g = torch.Generator().manual_seed(cfg.seed)
    V, B = min(bb.vocab_size, int((bb.mlm_to_ar >= 0).sum())), cfg.batch_size
    warm = torch.randint(2, V, (B, 16), generator=g).to(device)
    infill(bb, head, warm, torch.rand(B, 16, generator=g).to(device) < 0.5)
    ar_generate(bb, warm, 4)
    rows = []
    for L in tqdm(cfg.lengths, desc="bench decode", unit="length"):
        ids = torch.randint(2, V, (B, L), generator=g).to(device)
        mask = (torch.rand(B, L, generator=g) < 0.5).to(device)
        n_masked = int(mask.sum())
        t_maria = _timed(lambda: infill(bb, head, ids, mask), device)
        new = n_masked // B
        t_ar = _timed(lambda: ar_generate(bb, ids[:, : L - new], new), device)
        cols = mask.any(0).nonzero().squeeze(1)[: cfg.mlm_ar_columns]
        part = torch.zeros_like(mask)
        part[:, cols] = mask[:, cols]
        t_l2r = _timed(lambda: mlm_left_to_right(bb, ids, part), device)
        t_unmask = _timed(lambda: mlm_iterative_unmasking(bb, ids, mask, cfg.unmask_steps), device)
        row = {"length": L, "masked_tokens": n_masked,
               "maria_tok_s": n_masked / t_maria, "ar_generate_tok_s": B * new / t_ar,
               "mlm_ar_tok_s": int(part.sum()) / t_l2r, "mlm_unmask_tok_s": n_masked / t_unmask,
               "mlm_ar_columns_timed": len(cols)}
        row["maria_over_ar"] = row["maria_tok_s"] / row["ar_generate_tok_s"]
        row["maria_over_mlm_ar"] = row["maria_tok_s"] / row["mlm_ar_tok_s"]
        # model FLOPs per masked token: AR reads every token once, the MLM reads the window once
        flops = (2 * params(bb.ar) * L + 2 * params(bb.mlm) * (L + 2)) * B / n_masked + 2 * head.proj.weight.numel()
        row["maria_tflops"] = flops * row["maria_tok_s"] / 1e12
        if device.startswith("cuda"):
            row["maria_fraction_of_peak"] = row["maria_tflops"] / PEAK_TFLOPS_BF16
        rows.append(row)
    at512 = [r for r in rows if r["length"] == 512]
    result = {"benchmark": "decode", "config": asdict(cfg), "device": device, "dtype": str(dtype),
            "threads": torch.get_num_threads(), "mlm_params": params(bb.mlm), "ar_params": params(bb.ar), "results": rows,
            "targets": {"maria_over_ar_min": min(r["maria_over_ar"] for r in rows), "maria_over_ar_goal": 0.8,
                        "maria_over_mlm_ar_at_512": at512[0]["maria_over_mlm_ar"] if at512 else None, "maria_over_mlm_ar_goal": 10.0}}
    plot_decode(result, Path(cfg.json).with_suffix(".png"))
    return result


def plot_decode(result: dict, png: Path) -> None:
    rows = result["results"]
    L = [r["length"] for r in rows]
    labels = {"maria_tok_s": "MARIA (KV cache)", "ar_generate_tok_s": "AR generation (KV cache)", "mlm_ar_tok_s": "MLM left-to-right",
              "mlm_unmask_tok_s": f"MLM iterative unmasking ({result['config']['unmask_steps']} steps)"}
    preset = result["config"]["preset"] if not result["config"]["mlm"] else "custom"
    line_plot(png, {label: (L, [r[key] for r in rows]) for key, label in labels.items()},
              "sequence length (tokens, 50% masked)", "tokens / s", f"Infilling throughput ({result['device']}, {preset})", logx=True, logy=True)
