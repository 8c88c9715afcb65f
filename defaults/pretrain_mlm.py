"""Pre-train a small ModernBERT masked LM that shares the AR's tokenizer (the demo's MLM expert).

MARIA needs an MLM and an AR with one vocabulary. For the offline demo there is no such MLM to
download, so we build one: the AR's tokenizer plus a mask token, a small ModernBERT started from
the AR's embeddings and first blocks (defaults/mlm_from_ar.py), trained for a fixed number of
steps. The budget is steps and a seed, never minutes: the same command trains the same model on a
busy or a quiet machine (up to float rounding across thread counts).

Two objectives (`--objective`), both bidirectional with the same masks:
- mntp (masked next-token prediction, as in LLM2Vec): masked token i is predicted at position i - 1,
  where the copied AR blocks already predict it, so the first steps are not spent undoing the AR's
  shift. The MLM reads one token before the window (the AR's start token, where it predicts x[0]);
  its config.json says `prediction_offset: -1`, which MARIA reads (maria/backbones.py).
- mlm (classic): masked token i is predicted at position i (`prediction_offset: 0`).

Tokenizer (decision): the MLM tokenizer is the AR tokenizer with one added special token,
`<|mask|>`; ordinary text gets exactly the AR's ids. Training windows are wrapped exactly as MARIA
wraps them at extraction time (maria/features.py mlm_inputs): the tokenizer's own special tokens
(none for SmolLM2), and for mntp the start token in front.

Measured on 2 CPU cores, same token budget (150k tokens, wiki sample, 50% masking held out, the
mlm objective): AR-initialised 576x4 9.4% at batch 32 vs 14.3% at batch 8; from scratch ~4.8%
(barely above the unigram start). Freezing the tied embeddings costs nothing in accuracy and makes
steps cheaper; training at 50% masking beats 30% slightly (15.0% vs 14.3%). Hence the defaults below.

The loop (pretrain_mlm) is: load data, build the model, then `train_step` on an MLMTrainState
until the step budget, evaluating held-out masked-token accuracy before, at snapshots and after.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import torch
from tqdm.auto import tqdm
from transformers import AutoConfig, AutoModelForCausalLM, ModernBertForMaskedLM

from maria.device import Device, cpu_threads, resolve_device
from maria_defaults.mlm_data import OBJECTIVES, MLMData, load_data, masked_batch
from maria_defaults.mlm_from_ar import build_mlm, init_from_ar, resolve_sizes


def demo_mlm_dir(cache: Path, objective: str) -> Path:
    """Where `maria demo` keeps its pre-trained MLM of one objective (and `maria bench quality` finds it)."""
    return Path(cache) / f"mlm-smollm2-{objective}"


@dataclass
class PretrainMLMConfig:
    """One MLM pre-training run. None sizes are resolved from the AR (see resolve_sizes)."""

    tokenizer_from: str  # AR folder (save_pretrained): its tokenizer, and its weights when init_from_ar
    corpus: str  # any corpus `maria extract` reads (parquet, JSON/JSONL, CSV, .txt = one document per file, datasets folder), or "wiki" (the offline Wikipedia sample)
    out: str  # output folder: model + tokenizer (save_pretrained), metrics.json, pretrain_config.json
    steps: int = 1200  # training steps (the budget: steps, not minutes, so a re-run anywhere trains the same model)
    objective: str = "mntp"  # mntp: masked token i predicted at position i - 1, as the AR's copied blocks predict it (LLM2Vec) | mlm: at i (classic)
    hidden_size: int | None = None  # None: the AR's hidden size when init_from_ar (exact embedding copy), else 256
    num_layers: int = 4  # encoder blocks; with init_from_ar these are AR blocks first_ar_layer .. first_ar_layer + num_layers - 1
    first_ar_layer: int = 0  # with init_from_ar: the first AR block copied
    num_heads: int | None = None  # None: the AR's head count when its blocks are copied, else 4
    intermediate_size: int | None = None  # None: the AR's MLP width when its blocks are copied, else 2 * hidden_size
    seq_len: int = 128  # training window in tokens; windows never mix two documents
    mask_prob: float = 0.5  # fraction masked per training window; 0.5 = MARIA's mean rate (r ~ U(0,1)) and the eval rate
    mask_prob_low: float | None = None  # if set, each window's rate is drawn from U(mask_prob_low, mask_prob): a mix of rates
    batch_size: int = 8  # windows per step; on a CPU budget more small steps beat fewer big ones (measured)
    lr: float = 1e-3  # peak AdamW learning rate for new weights
    ar_lr_scale: float = 0.3  # weights copied from the AR train at lr * this, so they are adapted, not erased
    schedule: Literal["cosine", "constant"] = "cosine"  # cosine (warm-up, then cosine to 10% of peak) | constant (warm-up, then flat: snapshots are comparable)
    warmup_steps: int = 20  # linear warm-up steps
    snapshots: list[int] = field(default_factory=list)  # also save the model (and its held-out accuracy) after these steps, in out/step-N
    skip_docs: int = (
        0  # leave out the first N training documents (the demo's head trains on them: an MLM that memorised them would look stronger there than on new text)
    )
    seed: int = 0  # model init, batch order, masks
    init_from_ar: bool = True  # start from the AR's embeddings (+ blocks, see copy_ar_layers); False: from scratch
    copy_ar_layers: bool = True  # with init_from_ar, also copy AR blocks when shapes allow
    freeze_embeddings: bool = True  # with init_from_ar, keep the copied (tied) embeddings fixed: cheaper steps, AR output space
    val_corpus: str | None = None  # held-out corpus; None: the wiki val split for "wiki", else val_fraction of documents
    val_fraction: float = 0.1  # documents held out when val_corpus is None
    eval_mask_prob: float = 0.5  # masking rate of the held-out accuracy measurement
    eval_windows: int = 256  # held-out windows evaluated (keeps evaluation under a minute on CPU)
    weight_decay: float = 0.01  # AdamW weight decay (not on norms, biases or embeddings)
    device: Device = "cpu"  # cpu | cuda | auto; results are compared across machines on cpu

    def __post_init__(self):
        if not Path(self.tokenizer_from).expanduser().exists():
            raise ValueError(f"tokenizer_from {self.tokenizer_from!r} does not exist; pass the AR folder (e.g. from `convert_gguf_ar`)")
        if self.corpus != "wiki" and not Path(self.corpus).expanduser().exists():
            raise ValueError(f"corpus {self.corpus!r} does not exist; pass a parquet/text file or folder, or 'wiki'")
        if not 0.0 < self.mask_prob < 1.0 or not 0.0 < self.eval_mask_prob < 1.0:
            raise ValueError(f"mask_prob and eval_mask_prob must be in (0, 1), got {self.mask_prob}, {self.eval_mask_prob}")
        if self.mask_prob_low is not None and not 0.0 < self.mask_prob_low <= self.mask_prob:
            raise ValueError(f"mask_prob_low must be in (0, mask_prob], got {self.mask_prob_low}")
        if self.objective not in OBJECTIVES:
            raise ValueError(f"unknown objective {self.objective!r}; use mntp (token i predicted at i - 1) or mlm (at i)")
        if self.schedule not in ("cosine", "constant"):
            raise ValueError(f"unknown schedule {self.schedule!r}; use cosine or constant")
        for name in ("steps", "num_layers", "seq_len", "batch_size", "eval_windows"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.first_ar_layer < 0 or self.skip_docs < 0 or any(not 0 < s <= self.steps for s in self.snapshots):
            raise ValueError("first_ar_layer and skip_docs must be >= 0, and snapshots within 1..steps")
        if self.hidden_size is not None and self.num_heads is not None and self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} must be a multiple of num_heads {self.num_heads}")


@torch.no_grad()
def evaluate(model, data: MLMData, prob: float, seed: int, batch_size: int) -> dict:
    """Masked-token accuracy and loss on the held-out windows at a fixed masking rate (the same masks
    every call, and for either objective: the same tokens are hidden, only where they are predicted differs)."""
    model.eval()
    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(seed + 12345)
    correct = total = 0
    loss_sum = 0.0
    for start in range(0, len(data.val), batch_size):
        inputs, attn, labels = masked_batch(data.val[start : start + batch_size], data, prob, gen)
        out = model(input_ids=inputs.to(device), attention_mask=attn.to(device), labels=labels.to(device))
        target = labels[labels != -100].to(device)  # sparse prediction: logits are only the masked positions, in order
        correct += (out.logits.argmax(-1) == target).sum().item()
        loss_sum += out.loss.item() * target.numel()
        total += target.numel()
    model.train()
    return {"accuracy": correct / max(total, 1), "loss": loss_sum / max(total, 1), "masked_tokens": total}


@dataclass
class MLMTrainState:
    """Everything one training step reads and changes."""

    model: ModernBertForMaskedLM
    opt: torch.optim.Optimizer
    gen: torch.Generator  # batch order and masks, seeded: a re-run draws the same batches
    order: torch.Tensor  # this epoch's window order
    pos: int = 0  # next index into order
    step: int = 0
    tokens: int = 0  # real tokens read so far


def build_model(cfg: PretrainMLMConfig, data: MLMData) -> tuple[ModernBertForMaskedLM, set[str], str]:
    """(model, names of parameters copied from the AR, init description)."""
    ar_config = AutoConfig.from_pretrained(cfg.tokenizer_from)
    sizes = resolve_sizes(cfg, ar_config)
    model = build_mlm(cfg, sizes, data.tokenizer, ar_config)
    counts = torch.bincount(data.train[data.train != data.pad_id], minlength=model.config.vocab_size).float()
    unigram_logp = torch.log((counts + 0.1) / (counts + 0.1).sum())
    copied: set[str] = set()
    if cfg.init_from_ar:
        ar = AutoModelForCausalLM.from_pretrained(cfg.tokenizer_from, dtype=torch.float32)
        copied = init_from_ar(model, ar, data.tokenizer, sizes["copy_layers"], unigram_logp, cfg.first_ar_layer)
        del ar
    else:
        with torch.no_grad():
            model.decoder.bias.copy_(unigram_logp)
    init = (
        "scratch"
        if not cfg.init_from_ar
        else (f"ar-embeddings+blocks{cfg.first_ar_layer}-{cfg.first_ar_layer + cfg.num_layers - 1}" if sizes["copy_layers"] else "ar-embeddings")
    )
    print(
        f"MLM: ModernBERT {sizes['hidden']}x{cfg.num_layers} (heads {sizes['heads']}, mlp {sizes['inter']}), "
        f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, init {init}"
    )
    return model, copied, init


def make_optimizer(cfg: PretrainMLMConfig, model, copied: set[str]) -> torch.optim.Optimizer:
    """Three groups: copied weights learn slower; decay only on matrices that are not embeddings."""
    groups = {"copied": [], "decay": [], "no_decay": []}
    for name, p in model.named_parameters():
        if cfg.init_from_ar and cfg.freeze_embeddings and name == "model.embeddings.tok_embeddings.weight":
            p.requires_grad_(False)
        elif name in copied:
            groups["copied"].append(p)
        elif p.ndim >= 2 and "embeddings" not in name:
            groups["decay"].append(p)
        else:
            groups["no_decay"].append(p)
    param_groups = [
        {"params": groups["copied"], "lr_scale": cfg.ar_lr_scale, "weight_decay": 0.0},
        {"params": groups["decay"], "lr_scale": 1.0, "weight_decay": cfg.weight_decay},
        {"params": groups["no_decay"], "lr_scale": 1.0, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW([g for g in param_groups if g["params"]], lr=cfg.lr, betas=(0.9, 0.98), eps=1e-6)


def lr_at(cfg: PretrainMLMConfig, step: int) -> float:
    """Linear warm-up, then cosine to 10% of the peak at cfg.steps (or flat: snapshots of one run stay comparable)."""
    warm = min(1.0, (step + 1) / cfg.warmup_steps)
    if cfg.schedule == "constant":
        return cfg.lr * warm
    return cfg.lr * warm * (0.1 + 0.45 * (1 + math.cos(math.pi * step / cfg.steps)))


def train_step(state: MLMTrainState, data: MLMData, cfg: PretrainMLMConfig) -> float:
    """One AdamW step on the next batch of windows, freshly masked; returns the loss."""
    if state.pos + cfg.batch_size > len(state.order):  # a new epoch: a new order
        state.order, state.pos = torch.randperm(len(data.train), generator=state.gen), 0
    x = data.train[state.order[state.pos : state.pos + cfg.batch_size]]
    state.pos += cfg.batch_size
    inputs, attn, labels = masked_batch(x, data, cfg.mask_prob, state.gen, cfg.mask_prob_low)
    for g in state.opt.param_groups:
        g["lr"] = lr_at(cfg, state.step) * g["lr_scale"]
    device = next(state.model.parameters()).device
    loss = state.model(input_ids=inputs.to(device), attention_mask=attn.to(device), labels=labels.to(device)).loss
    state.opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_([p for p in state.model.parameters() if p.requires_grad], 1.0)
    state.opt.step()
    state.step += 1
    state.tokens += int((x != data.pad_id).sum())
    return loss.item()


def _config_key(cfg: PretrainMLMConfig) -> dict:
    key = asdict(cfg)
    key.pop("out")
    key.pop("device")  # where it ran does not change what it is
    key.pop("snapshots")  # nor do snapshots (evaluation draws from its own generator): a run with snapshots serves one without
    return key


def save_mlm(model, data: MLMData, folder: Path, key: dict, metrics: dict) -> None:
    """save_pretrained folder + pretrain_config.json; metrics.json is written last: it marks a complete folder."""
    model.config.sparse_prediction = False  # users call it without labels and expect logits at every position
    model.config.prediction_offset = data.offset  # where it predicts x[i]: MARIA reads this (maria/backbones.py)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    data.tokenizer.save_pretrained(folder)
    model.config.sparse_prediction = True
    (folder / "pretrain_config.json").write_text(json.dumps(key, indent=2))
    (folder / "metrics.json").write_text(json.dumps(metrics, indent=2))


def pretrain_mlm(cfg: PretrainMLMConfig) -> dict:
    """Train (or reuse) the MLM described by cfg; save it to cfg.out (snapshots in out/step-N) and return its metrics."""
    out = Path(cfg.out).expanduser()
    key = _config_key(cfg)
    if (out / "metrics.json").exists() and (out / "pretrain_config.json").exists():
        have_snapshots = all((out / f"step-{n}" / "metrics.json").exists() for n in cfg.snapshots if n < cfg.steps)
        if json.loads((out / "pretrain_config.json").read_text()) == key and have_snapshots:
            print(f"reusing the MLM in {out} (same config; delete the folder to retrain)")
            return json.loads((out / "metrics.json").read_text())
    torch.manual_seed(cfg.seed)
    torch.set_num_threads(cpu_threads())
    data = load_data(cfg)
    model, copied, init = build_model(cfg, data)
    model.to(resolve_device(cfg.device)).train()
    state = MLMTrainState(
        model,
        make_optimizer(cfg, model, copied),
        torch.Generator().manual_seed(cfg.seed),
        order=torch.randperm(len(data.train), generator=torch.Generator().manual_seed(cfg.seed)),
    )
    measure = lambda: evaluate(model, data, cfg.eval_mask_prob, cfg.seed, cfg.batch_size)  # noqa: E731
    before = measure()
    print(f"held-out masked-token accuracy at {cfg.eval_mask_prob:.0%} masking before training: {before['accuracy']:.2%}")
    train_s = 0.0  # time in training steps only (not evaluation): what a snapshot cost
    bar = tqdm(total=cfg.steps, desc="pretrain-mlm", unit="step")
    while state.step < cfg.steps:
        t0 = time.perf_counter()
        loss = train_step(state, data, cfg)
        train_s += time.perf_counter() - t0
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.3f}", epoch=f"{state.tokens / data.train_tokens:.2f}")
        if state.step in cfg.snapshots and state.step < cfg.steps:
            snap = {
                **measure(),
                "steps": state.step,
                "epochs": state.tokens / data.train_tokens,
                "objective": cfg.objective,
                "eval_mask_prob": cfg.eval_mask_prob,
                "train_minutes": train_s / 60,
            }
            save_mlm(model, data, out / f"step-{state.step}", {**key, "stopped_at": state.step}, snap)
            bar.write(f"step {state.step}: held-out masked-token accuracy {snap['accuracy']:.2%} (saved {out}/step-{state.step})")
    bar.close()
    after = measure()
    metrics = {
        "accuracy": after["accuracy"],
        "loss": after["loss"],
        "eval_mask_prob": cfg.eval_mask_prob,
        "eval_masked_tokens": after["masked_tokens"],
        "accuracy_before_training": before["accuracy"],
        "steps": state.step,
        "train_tokens_seen": state.tokens,
        "epochs": state.tokens / max(data.train_tokens, 1),
        "train_minutes": train_s / 60,
        "init": init,
        "parameters": sum(p.numel() for p in model.parameters()),
        "objective": cfg.objective,
        "prediction_offset": data.offset,
        "hidden_size": model.config.hidden_size,
        "num_heads": model.config.num_attention_heads,
        "intermediate_size": model.config.intermediate_size,
    }
    print(
        f"held-out masked-token accuracy at {cfg.eval_mask_prob:.0%} masking: {after['accuracy']:.2%} "
        f"(loss {after['loss']:.3f}; {state.step} steps, {train_s / 60:.1f} min, {metrics['epochs']:.2f} epochs, init {init})"
    )
    save_mlm(model.eval().cpu(), data, out, key, metrics)
    return metrics
