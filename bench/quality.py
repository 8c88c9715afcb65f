"""`maria bench --what quality`: MARIA's gain over the AR alone as a function of MLM strength.

For the MLM folder (default: the demo's cached MLM) and each of its pre-training snapshots
(out/step-N, `pretrain-mlm --snapshots`), on 128-token windows of two text sets at 15% and 50%
token masking, the NLL per masked token of:
  ar    the AR alone (W2 h_ar + b2: left context only)
  mlm   the MLM alone (W1 h_mlm + b1, one shot)
  poe   the paper's product-of-experts init [W1/2, W2/2]
  mix   a*l_mlm + b*l_ar, (a, b) fitted (train_head.init.fit_mix_scales, the demo head's `mix` init)
        on the held-out training articles the MLM never saw (its skip_docs: the demo head's articles)
        at rates r ~ U(0, 1): the evaluated windows decide nothing
  mix_on_eval   (a, b) fitted on the evaluated tokens themselves: not a result, the ceiling of two scales
The text sets: the demo's validation articles ("wiki") and another domain the project was never
tuned on ("python-docs": CPython's own reference prose, pydoc_data.topics, shipped with Python).
x axis: the MLM's held-out masked-token accuracy at 50% masking (its metrics.json).
AR states depend only on the text, so one AR pass per text set serves every MLM and rate.
"""
from __future__ import annotations

import json
import math
import types
from pathlib import Path

import pyarrow.parquet as pq
import torch
import torch.nn.functional as F
from pydoc_data.topics import topics  # CPython's own documentation text, shipped with every Python
from safetensors.torch import load_file, save_file

from maria_defaults.defaults import SMOLLM2_DIRNAME, default_cache_dir
from maria_defaults.pretrain_mlm import make_windows
from maria.backbones import load_backbones
from maria.device import cpu_threads
from maria.features import ar_states, mlm_states
from maria.io import atomic_file
from maria.plots import line_plot
from maria_train_head.init import fit_mix_scales

RATES = (0.15, 0.5)
FIT_WINDOWS = 48  # windows of the MLM-unseen training articles that fit (a, b)


def python_docs() -> list[str]:
    """Another domain: the Python reference's topic texts (English technical prose), one document each."""
    return [t for t in topics.values() if len(t) > 2000]


def text_sets(tok, mlm_dir: Path, cache: Path, n: int, seed: int) -> dict[str, torch.Tensor]:
    """(N, 128) token windows of the evaluated sets and of the fitting set."""
    cfg = json.loads((mlm_dir / "pretrain_config.json").read_text())
    skip = cfg.get("skip_docs", 0)
    if not skip:
        print("warning: the MLM trained on every training article; (a, b) are fitted on text it has seen")
    train = pq.read_table(cfg["corpus"]).column("text").to_pylist()
    val = pq.read_table(cfg["val_corpus"] or cache / "wiki" / "wiki-val-v0.1-s0.parquet").column("text").to_pylist()
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, docs, count in (("wiki", val, n), ("python-docs", python_docs(), n), ("fit", train[: max(skip, 1)], FIT_WINDOWS)):
        w = make_windows(docs, tok, 128, tok.eos_token_id)
        out[name] = w[torch.randperm(len(w), generator=g)[:count]]
    return out


def mlm_folders(mlm: Path) -> list[Path]:
    """The snapshots of one pre-training run (step-N) in step order, then the final MLM."""
    snaps = sorted(mlm.glob("step-*/metrics.json"), key=lambda p: int(p.parent.name[5:]))
    return [p.parent for p in snaps] + ([mlm] if (mlm / "metrics.json").exists() else [])  # an unfinished run: its snapshots


def _masks(windows: torch.Tensor, pad_id: int, rate: float | None, seed: int) -> torch.Tensor:
    """Token masks at a fixed rate, or at a rate r ~ U(0, 1) per window (rate None), as extraction draws them."""
    g = torch.Generator().manual_seed(seed)
    r = torch.rand(len(windows), 1, generator=g) if rate is None else torch.full((len(windows), 1), rate)
    mask = (torch.rand(windows.shape, generator=g) < r) & (windows != pad_id)
    mask[:, 0] &= False  # position 0 has a start token before it, but keep one known token per window
    return mask


@torch.no_grad()
def expert_logit_nlls(l1: torch.Tensor, l2: torch.Tensor, t: torch.Tensor, scales: dict[str, tuple[float, float]]) -> dict:
    """Per-token NLL of a*l1 + b*l2 for each named (a, b)."""
    return {k: F.cross_entropy(a * l1 + b * l2, t, reduction="none") for k, (a, b) in scales.items()}


def score(bb, e: dict, windows, h_ar, mask, scales: dict, chunk: int = 512) -> dict[str, torch.Tensor]:
    """Per-masked-token NLLs of each fusion in scales; chunked so no (N, V) logits matrix is ever whole."""
    lengths = torch.full((len(windows),), windows.shape[1])
    h_mlm = torch.cat([mlm_states(bb, windows[s : s + 16], mask[s : s + 16], lengths[s : s + 16]).float()
                       for s in range(0, len(windows), 16)])
    rows, pos = mask.nonzero(as_tuple=True)
    out: dict[str, list] = {k: [] for k in scales}
    for s in range(0, len(rows), chunk):
        r, p = rows[s : s + chunk], pos[s : s + chunk]
        l1 = h_mlm[r, p] @ e["W1"].T + e["b1"]
        l2 = h_ar[r, p] @ e["W2"].T + e["b2"]
        for k, v in expert_logit_nlls(l1, l2, windows[r, p], scales).items():
            out[k].append(v)
    return {k: torch.cat(v) for k, v in out.items()}


def fit_scales(bb, e: dict, windows, h_ar, mask, seed: int) -> tuple[float, float]:
    """(a, b) of the `mix` init, fitted by the trainer's own function on these windows' masked tokens."""
    lengths = torch.full((len(windows),), windows.shape[1])
    h_mlm = torch.cat([mlm_states(bb, windows[s : s + 16], mask[s : s + 16], lengths[s : s + 16]).float()
                       for s in range(0, len(windows), 16)])
    rows, pos = mask.nonzero(as_tuple=True)
    features = torch.cat([h_mlm[rows, pos], h_ar[rows, pos]], 1)
    # fit_mix_scales reads the expert weights and sizes from a store; hand it these backbones' instead
    store = types.SimpleNamespace(vocab_size=bb.vocab_size, d_mlm=bb.d_mlm, init_weights=lambda: {k: v.numpy() for k, v in e.items()})
    return fit_mix_scales(store, features, windows[rows, pos], "cpu", seed)


def cached_ar_states(bb, sets: dict[str, torch.Tensor], path: Path) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """name -> (windows, h_ar): computed once per AR, window count and seed, then read from path."""
    if path.exists():
        saved = load_file(str(path))
        if all(torch.equal(saved[f"{k}/windows"], w) for k, w in sets.items() if f"{k}/windows" in saved):
            return {k: (w, saved[f"{k}/h_ar"]) for k, w in sets.items()}
    out = {}
    for name, w in sets.items():
        out[name] = (w, torch.cat([ar_states(bb, w[s : s + 16], torch.full((len(w[s : s + 16]),), w.shape[1])).float()
                                   for s in range(0, len(w), 16)]))
        print(f"AR states of {name}: {len(w)} windows", flush=True)
    with atomic_file(path) as tmp:
        save_file({f"{k}/{n}": t.contiguous() for k, (w, h) in out.items() for n, t in (("windows", w), ("h_ar", h))}, str(tmp))
    return out


def bench_quality(cfg) -> dict:
    torch.set_num_threads(cpu_threads())
    cache = default_cache_dir()
    mlm_dir = Path(cfg.mlm or cache / "mlm-smollm2-init")
    ar_dir = cfg.ar or str(cache / SMOLLM2_DIRNAME)
    rows, ar_cache = [], {}
    for folder in mlm_folders(mlm_dir):
        metrics = json.loads((folder / "metrics.json").read_text())
        bb = load_backbones(str(folder), ar_dir, check_parity=False)
        e = bb.expert_weights()
        if not ar_cache:  # the AR and the texts are the same for every MLM: one AR pass per set
            ar_cache = cached_ar_states(bb, text_sets(bb.ar_tokenizer, folder, cache, cfg.windows, cfg.seed),
                                        cache / "bench-quality" / f"{bb.identity['ar']['fingerprint'][:12]}-n{cfg.windows}-s{cfg.seed}.safetensors")
        pad = bb.ar_tokenizer.eos_token_id
        w, h = ar_cache["fit"]
        a, b = fit_scales(bb, e, w, h, _masks(w, pad, None, cfg.seed + 7), cfg.seed)
        for name in ("wiki", "python-docs"):
            w, h = ar_cache[name]
            for rate in RATES:
                nll = score(bb, e, w, h, _masks(w, pad, rate, cfg.seed + int(rate * 100)),
                            {"ar": (0.0, 1.0), "mlm": (1.0, 0.0), "poe": (0.5, 0.5), "mix": (a, b)})
                gain = nll["ar"] - nll["mix"]
                row = {"mlm": str(folder), "mlm_steps": metrics["steps"], "mlm_accuracy": metrics["accuracy"],
                       "set": name, "rate": rate, "tokens": len(gain), "mix_scales": [a, b],
                       **{f"nll_{k}": v.mean().item() for k, v in nll.items()},
                       "gain": gain.mean().item(), "gain_se": gain.std().item() / math.sqrt(len(gain))}
                rows.append(row)
                print(f"{folder.name:>24} acc {row['mlm_accuracy']:.3f} {name:>11} r={rate}: AR {row['nll_ar']:.4f} "
                      f"mix {row['nll_mix']:.4f} gain {row['gain']:+.4f} ± {row['gain_se']:.4f} (a={a:.3f}, b={b:.3f})", flush=True)
    _plot(rows, Path(cfg.json).with_suffix(".png"))
    last = {f"{r['set']}@{r['rate']}": round(r["gain"], 4) for r in rows if r["mlm"] == rows[-1]["mlm"]}
    return {"benchmark": "quality", "windows_per_set": cfg.windows, "fit_windows": FIT_WINDOWS, "results": rows,
            "targets": {"mlm": rows[-1]["mlm"], "mlm_accuracy": rows[-1]["mlm_accuracy"], "gain_nats": last,
                        "bar_wiki_gain": 0.1, "bar_other_domain_gain": 0.0}}


def _plot(rows: list[dict], png: Path) -> None:
    series = {}
    for name in ("wiki", "python-docs"):
        for rate in RATES:
            pts = [r for r in rows if r["set"] == name and r["rate"] == rate]
            series[f"{name}, {rate:.0%} masked"] = ([r["mlm_accuracy"] for r in pts], [r["gain"] for r in pts])
    line_plot(png, series, "MLM held-out masked-token accuracy (50% masking)", "AR-only NLL - MARIA (mix) NLL, nats/token",
              "MARIA's gain over the AR alone vs MLM strength", hlines={"goal on wiki (0.1 nats)": 0.1, "no gain": 0.0})
