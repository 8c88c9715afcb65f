"""`maria bench --what quality`: MARIA's gain over the AR alone as a function of MLM strength, one
curve per MLM pre-training run (e.g. `pretrain-mlm --objective mntp` and `--objective mlm`, same
seed, corpus and steps: the equal-steps comparison is the last common point of their curves).

For each run folder (`--runs`; default `--mlm`, else the demo's MNTP MLM) and each of its
snapshots (out/step-N, `pretrain-mlm --snapshots`) then its final model, on 128-token windows of
two text sets at 15% and 50% token masking, the NLL per masked token of:
  ar    the AR alone (W2 h_ar + b2: left context only)
  mlm   the MLM alone (W1 h_mlm + b1, one shot; h_mlm read where that MLM predicts x[i]: its offset)
  poe   the paper's product-of-experts init [W1/2, W2/2]
  mix   a*l_mlm + b*l_ar, (a, b) fitted (train_head.init.fit_mix_scales, the demo head's `mix` init)
        on the held-out training articles the MLM never saw (its skip_docs: the demo head's articles)
        at rates r ~ U(0, 1): the evaluated windows decide nothing
The text sets: the run's validation articles ("wiki" for the demo's corpus) and another domain the
project was never tuned on ("python-docs": CPython's own reference prose, pydoc_data.topics).
x axis: the MLM's held-out masked-token accuracy at 50% masking (its metrics.json), each point
labelled with its pre-training step. AR states depend only on the text, so one AR pass per text
set serves every run, snapshot and rate.
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
from pathlib import Path
from pydoc_data.topics import topics  # CPython's own documentation text, shipped with every Python

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from maria.backbones import load_backbones
from maria.device import cpu_threads
from maria.features import ar_states, mlm_states
from maria.io import atomic_file
from maria.plots import line_plot
from maria_defaults.defaults import SMOLLM2_DIRNAME, default_cache_dir
from maria_defaults.mlm_data import load_corpora, pack_windows
from maria_defaults.pretrain_mlm import PretrainMLMConfig, demo_mlm_dir
from maria_extract.corpus import iter_documents
from maria_train_head.init import fit_mix_scales

RATES = (0.15, 0.5)
FIT_WINDOWS = 48  # windows of the MLM-unseen training articles that fit (a, b)


def python_docs() -> list[str]:
    """Another domain: the Python reference's topic texts (English technical prose), one document each."""
    return [t for t in topics.values() if len(t) > 2000]


CORPUS_KEYS = ("corpus", "val_corpus", "val_fraction", "skip_docs", "seed")  # what decides a run's text sets


def run_config(run: Path) -> dict:
    """The pretrain_config.json of a run folder (written by `maria pretrain-mlm`; an unfinished run: its first snapshot's)."""
    found = [f / "pretrain_config.json" for f in [run, *mlm_folders(run)] if (f / "pretrain_config.json").is_file()]
    if not found:
        raise ValueError(f"{run} is not a `maria pretrain-mlm` output folder (no pretrain_config.json); pass its --out folders to --runs")
    key = json.loads(found[0].read_text())
    key.pop("stopped_at", None)
    return key


def text_sets(tok, key: dict, n: int, seed: int) -> dict[str, torch.Tensor]:
    """(N, 128) token windows of the evaluated sets (the run's held-out documents, Python's docs) and of the
    fitting set (the first skip_docs training documents: the ones the MLM never saw, the demo head's)."""
    cfg = PretrainMLMConfig(**{k: v for k, v in key.items() if k in PretrainMLMConfig.__dataclass_fields__}, out="-")
    skip = cfg.skip_docs
    if not skip:
        print("warning: the MLM trained on every training article; (a, b) are fitted on text it has seen")
    _, val = load_corpora(cfg)  # the run's own held-out documents
    # the documents it skipped: the first skip_docs of its training corpus, in reading order
    fit_source = load_corpora(dataclasses.replace(cfg, skip_docs=0))[0] if cfg.corpus == "wiki" else list(iter_documents(cfg.corpus))
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, docs, count in (("wiki", val, n), ("python-docs", python_docs(), n), ("fit", fit_source[: max(skip, 1)], FIT_WINDOWS)):
        w = pack_windows(docs, tok, 128, tok.eos_token_id)
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
    h_mlm = torch.cat([mlm_states(bb, windows[s : s + 16], mask[s : s + 16], lengths[s : s + 16]).float() for s in range(0, len(windows), 16)])
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
    h_mlm = torch.cat([mlm_states(bb, windows[s : s + 16], mask[s : s + 16], lengths[s : s + 16]).float() for s in range(0, len(windows), 16)])
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
        out[name] = (w, torch.cat([ar_states(bb, w[s : s + 16], torch.full((len(w[s : s + 16]),), w.shape[1])).float() for s in range(0, len(w), 16)]))
        print(f"AR states of {name}: {len(w)} windows", flush=True)
    with atomic_file(path) as tmp:
        save_file({f"{k}/{n}": t.contiguous() for k, (w, h) in out.items() for n, t in (("windows", w), ("h_ar", h))}, str(tmp))
    return out


def run_folders(cfg) -> list[Path]:
    """The pre-training runs to draw: --runs, else --mlm, else the demo's MLM."""
    runs = [Path(r) for r in cfg.runs] or [Path(cfg.mlm) if cfg.mlm else demo_mlm_dir(default_cache_dir(), "mntp")]
    keys = [run_config(r) for r in runs]
    for r, k in zip(runs[1:], keys[1:]):
        differ = [c for c in CORPUS_KEYS if k.get(c) != keys[0].get(c)]
        if differ:
            raise ValueError(f"runs {runs[0]} and {r} were pre-trained on other texts ({', '.join(differ)} differ); compare runs of one corpus")
    return runs


def bench_quality(cfg) -> dict:
    torch.set_num_threads(cpu_threads())
    cache = default_cache_dir()
    runs = run_folders(cfg)
    ar_dir = cfg.ar or str(cache / SMOLLM2_DIRNAME)
    rows, ar_cache = [], {}
    for run in runs:
        key = run_config(run)
        for folder in mlm_folders(run):
            metrics = json.loads((folder / "metrics.json").read_text())
            bb = load_backbones(str(folder), ar_dir, check_parity=False)
            e = bb.expert_weights()
            if not ar_cache:  # the AR and the texts are the same for every MLM: one AR pass per set
                ar_cache = cached_ar_states(
                    bb,
                    text_sets(bb.ar_tokenizer, key, cfg.windows, cfg.seed),
                    cache / "bench-quality" / f"{bb.identity['ar']['fingerprint'][:12]}-n{cfg.windows}-s{cfg.seed}.safetensors",
                )
            pad = bb.ar_tokenizer.eos_token_id
            w, h = ar_cache["fit"]
            a, b = fit_scales(bb, e, w, h, _masks(w, pad, None, cfg.seed + 7), cfg.seed)
            for name in ("wiki", "python-docs"):
                w, h = ar_cache[name]
                for rate in RATES:
                    nll = score(
                        bb, e, w, h, _masks(w, pad, rate, cfg.seed + int(rate * 100)), {"ar": (0.0, 1.0), "mlm": (1.0, 0.0), "poe": (0.5, 0.5), "mix": (a, b)}
                    )
                    gain = nll["ar"] - nll["mix"]
                    row = {
                        "run": str(run),
                        "objective": key.get("objective", "mlm"),
                        "mlm_offset": bb.mlm_offset,
                        "mlm": str(folder),
                        "mlm_steps": metrics["steps"],
                        "mlm_accuracy": metrics["accuracy"],
                        "mlm_train_minutes": metrics.get("train_minutes"),
                        "set": name,
                        "rate": rate,
                        "tokens": len(gain),
                        "mix_scales": [a, b],
                        **{f"nll_{k}": v.mean().item() for k, v in nll.items()},
                        "gain": gain.mean().item(),
                        "gain_se": gain.std().item() / math.sqrt(len(gain)),
                    }
                    rows.append(row)
                    print(
                        f"{row['objective']:>5} step {row['mlm_steps']:>5} acc {row['mlm_accuracy']:.3f} {name:>11} r={rate}: AR {row['nll_ar']:.4f} "
                        f"mix {row['nll_mix']:.4f} gain {row['gain']:+.4f} ± {row['gain_se']:.4f} (a={a:.3f}, b={b:.3f})",
                        flush=True,
                    )
    _plot(rows, Path(cfg.json).with_suffix(".png"))
    return {
        "benchmark": "quality",
        "windows_per_set": cfg.windows,
        "fit_windows": FIT_WINDOWS,
        "ar": ar_dir,
        "runs": [str(r) for r in runs],
        "results": rows,
        "targets": targets(rows),
    }


def targets(rows: list[dict]) -> dict:
    """Each run's last point against the goals (>= 0.1 nats on the validation articles, never below the AR
    on the other domain), and the runs side by side at every step they all reached (equal steps, same seed)."""
    runs = list(dict.fromkeys(r["run"] for r in rows))
    last = {}
    for run in runs:
        mine = [r for r in rows if r["run"] == run]
        final = max(r["mlm_steps"] for r in mine)
        pts = {f"{r['set']}@{r['rate']}": r for r in mine if r["mlm_steps"] == final}
        last[run] = {
            "objective": mine[0]["objective"],
            "steps": final,
            "mlm_accuracy": mine[-1]["mlm_accuracy"],
            "gain_nats": {k: round(r["gain"], 4) for k, r in pts.items()},
            "goal_wiki_0.1_nats": all(r["gain"] >= 0.1 for k, r in pts.items() if k.startswith("wiki")),
            "goal_other_domain_not_worse": all(r["gain"] + 2 * r["gain_se"] >= 0 for k, r in pts.items() if k.startswith("python")),
        }
    common = sorted(set.intersection(*({r["mlm_steps"] for r in rows if r["run"] == run} for run in runs)))
    equal_steps = {
        str(step): {
            run: {
                "accuracy": next(r["mlm_accuracy"] for r in rows if r["run"] == run and r["mlm_steps"] == step),
                **{f"gain {r['set']}@{r['rate']}": round(r["gain"], 4) for r in rows if r["run"] == run and r["mlm_steps"] == step},
            }
            for run in runs
        }
        for step in common
    }
    out = {"last": last, "equal_steps": equal_steps, "bar_wiki_gain": 0.1, "bar_other_domain_gain": 0.0}
    if len(runs) > 1 and common:  # the better run at the last common step: the larger gain on the validation articles at 50%
        at = [r for r in rows if r["mlm_steps"] == common[-1] and r["set"] == "wiki" and r["rate"] == 0.5]
        best = max(at, key=lambda r: r["gain"])
        out["better_at_equal_steps"] = {"steps": common[-1], "run": best["run"], "objective": best["objective"]}
    return out


def _plot(rows: list[dict], png: Path) -> None:
    series, styles, notes = {}, {}, {}
    colours = ["tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple"]
    dashes = {("wiki", 0.5): "-", ("wiki", 0.15): "--", ("python-docs", 0.5): ":", ("python-docs", 0.15): "-."}
    for i, run in enumerate(dict.fromkeys(r["run"] for r in rows)):
        mine = [r for r in rows if r["run"] == run]
        name = mine[0]["objective"] if Path(run).name == mine[0]["objective"] else f"{mine[0]['objective']} ({Path(run).name})"
        for (text, rate), dash in dashes.items():
            pts = [r for r in mine if r["set"] == text and r["rate"] == rate]
            label = f"{name}: {text}, {rate:.0%} masked"
            series[label] = ([r["mlm_accuracy"] for r in pts], [r["gain"] for r in pts])
            styles[label] = {"color": colours[i % len(colours)], "ls": dash}
            if (text, rate) == ("wiki", 0.5):
                notes[label] = [str(r["mlm_steps"]) for r in pts]
    line_plot(
        png,
        series,
        "MLM held-out masked-token accuracy at 50% masking (labels: steps)",
        "AR-only NLL - MARIA (mix) NLL, nats/token",
        "MARIA's gain over the AR alone vs MLM strength",
        hlines={"goal on wiki (0.1 nats)": 0.1, "no gain": 0.0},
        annotate=notes,
        styles=styles,
    )
