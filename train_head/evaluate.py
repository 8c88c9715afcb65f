"""`maria eval`: per-masked-token NLL and perplexity on a feature store, for four models:

    trained    the trained head (if --head is given; it must match the store's backbones)
    poe_init   the paper's product-of-experts init, no training: [W1/2, W2/2]
    ar_only    W2 h_ar + b2: the AR alone (past context only)
    mlm_only   W1 h_mlm + b1: one-shot MLM guesses (a pseudo-likelihood)

overall and per mask-rate bucket, as a Markdown table (printed, and written with --markdown)
and JSON. All in fp32, so numbers do not depend on the device.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from tqdm import tqdm

from maria.device import Device, resolve_device
from maria.head import FusionHead, expert_logits, init_head, load_head
from maria.identity import check_same_backbones
from maria.io import atomic_write, guard_output_file
from maria.plots import line_plot
from maria_storage import open_store
from maria_train_head.checkpoint import read_metrics
from maria_train_head.data import DataError, check_complete, eval_batches, read_rows
from maria_train_head.init import expert_tensors

log = logging.getLogger("maria.eval")  # the CLI prints it; a notebook sees it with logging.basicConfig(level=logging.INFO)

TABLE_TITLE = "Per-masked-token perplexity"
LABELS = {"trained": "trained head", "poe_init": "PoE at init (no training)", "ar_only": "AR only", "mlm_only": "MLM only"}


@dataclass
class EvalConfig:
    store: str  # feature store to evaluate on (usually the validation store)
    head: str | None = None  # trained head folder (the --out of `maria train`); omit for the three baselines only
    json: str | None = None  # write the results as JSON here
    markdown: str | None = None  # write the Markdown table here
    overwrite: bool = False  # replace --json/--markdown files written by an earlier `maria eval`
    batch_size: int = 1024  # rows per forward
    device: Device = "auto"  # auto | cpu | cuda
    allow_incomplete: bool = False  # evaluate a store whose extraction has not finished (default: refuse)
    buckets: list[float] = field(default_factory=lambda: [0.0, 0.25, 0.5, 0.75, 1.0])  # mask-rate bucket edges

    def __post_init__(self):
        if self.batch_size < 1:
            raise ValueError(f"--batch-size must be >= 1, got {self.batch_size}")
        b = [float(x) for x in self.buckets]
        if len(b) < 2 or any(x >= y for x, y in zip(b, b[1:])):
            raise ValueError(f"--buckets must be at least two increasing edges, e.g. 0 0.25 0.5 0.75 1; got {self.buckets}")
        self.buckets = b


def row_nll(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.float(), targets, reduction="none")


@torch.no_grad()
def mean_nll(head: FusionHead, batches) -> float:
    """Mean NLL per masked token of a head over (features, targets, ...) batches, in fp32."""
    total, n = 0.0, 0
    for f, t, *_ in batches:
        total += float(row_nll(head(f.float()), t).double().sum())
        n += len(t)
    if n == 0:
        raise DataError("the validation split has no rows; extract more documents or pass --val-store")
    return total / n


def run_eval(cfg: EvalConfig) -> dict:
    guard_output_file(cfg.json, cfg.overwrite, lambda t: '"models"' in t and '"rows"' in t, flag="--json")
    guard_output_file(cfg.markdown, cfg.overwrite, lambda t: t.startswith(TABLE_TITLE), flag="--markdown")
    device = resolve_device(cfg.device)
    store = open_store(cfg.store)
    check_complete(store, cfg.allow_incomplete)
    experts = expert_tensors(store)
    e = {k: v.to(device) for k, v in experts.items()}
    heads = {"poe_init": init_head("poe", experts).to(device)}
    if cfg.head:
        trained, meta = load_head(cfg.head)
        check_same_backbones(
            store.manifest, meta, f"store {cfg.store}", f"head {cfg.head}", "evaluate it on a store extracted with its backbones, or train a head on this store"
        )
        heads = {"trained": trained.to(device), **heads}
    nll = {k: [] for k in (*heads, "ar_only", "mlm_only")}
    rates = []
    with torch.no_grad():
        for block in tqdm(store.committed_blocks(), desc="eval", unit="block"):  # block by block: bounded memory
            for f, t, r in eval_batches(read_rows(store, [block]), cfg.batch_size, device):
                f = f.float()
                for k, h in heads.items():
                    nll[k].append(row_nll(h(f), t).cpu())
                l_mlm, l_ar = expert_logits(f, store.d_mlm, e["W1"], e["b1"], e["W2"], e["b2"])
                nll["mlm_only"].append(row_nll(l_mlm, t).cpu()), nll["ar_only"].append(row_nll(l_ar, t).cpu())
                rates.append(r.cpu())
    if not rates:
        raise DataError(f"store {cfg.store} has no committed rows; run `maria extract` first")
    rates = torch.cat(rates)
    edges = cfg.buckets
    result = {"store": cfg.store, "head": cfg.head, "rows": len(rates), "buckets": edges, "models": {}}
    for k, parts in nll.items():
        x = torch.cat(parts).double()
        row = {"label": LABELS[k], "nll": float(x.mean()), "ppl": math.exp(float(x.mean())), "by_mask_rate": []}
        for i, (lo, hi) in enumerate(zip(edges, edges[1:])):
            sel = (rates >= lo) & ((rates <= hi) if i == len(edges) - 2 else (rates < hi))  # last bucket includes its top edge
            m = float(x[sel].mean()) if sel.any() else None
            row["by_mask_rate"].append({"lo": lo, "hi": hi, "rows": int(sel.sum()), "nll": m, "ppl": None if m is None else math.exp(m)})
        result["models"][k] = row
    table = markdown_table(result)
    log.info(table)
    if cfg.json:
        atomic_write(cfg.json, json.dumps(result, indent=2))
    if cfg.markdown:
        atomic_write(cfg.markdown, table + "\n")
    return result


def markdown_table(result: dict) -> str:
    buckets = result["models"]["poe_init"]["by_mask_rate"]
    head = ["model", "NLL", "ppl"] + [f"ppl @ rate {b['lo']:g}-{b['hi']:g} (n={b['rows']})" for b in buckets]
    lines = [f"{TABLE_TITLE} on {result['store']} ({result['rows']} masked tokens)", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in result["models"].values():
        cells = [row["label"], f"{row['nll']:.4f}", f"{row['ppl']:.2f}"]
        cells += ["-" if b["ppl"] is None else f"{b['ppl']:.2f}" for b in row["by_mask_rate"]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def compare_inits_plot(metrics_files: dict[str, str], out_png: str) -> None:
    """Validation loss against step for several runs (e.g. PoE vs random init: the paper's Figure 2)."""
    series = {}
    for label, path in metrics_files.items():
        rows = read_metrics(path)
        series[label] = ([r["step"] for r in rows], [r["val_loss"] for r in rows])
    line_plot(out_png, series, "step", "validation NLL per masked token (nats)", "Head initialisation: validation loss", logy=True)
