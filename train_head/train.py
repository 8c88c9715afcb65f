"""`maria train`: fit the fusion head on cached features (no backbone is loaded).

AdamW with linear warmup then cosine decay, gradient clipping, an L2 pull toward the initial
weights, fp32 master weights (bf16 autocast on CUDA). Validation at step 0 and every
--eval-every steps; the best head by validation loss is what gets written, so a trained head
never ends worse than its start (METHOD.md: a big head on few tokens overfits from epoch one).
--resume continues exactly: on CPU, interrupted-then-resumed equals uninterrupted bitwise.
"""

from __future__ import annotations

import logging
import math
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import torch
from tqdm import tqdm
from transformers import get_cosine_with_min_lr_schedule_with_warmup

from maria.device import Device, resolve_device
from maria.head import INITS, FusionHead, init_head, save_head
from maria.identity import check_same_backbones, identity_record
from maria.io import check_outside_inputs, guard_output, output_lock
from maria.limits import free_bytes
from maria_storage import open_store
from maria_train_head import checkpoint as ck
from maria_train_head.data import (
    DataError,
    MemoryBatches,
    StreamBatches,
    check_complete,
    eval_batches,
    read_rows,
    rows_bytes,
    skip_fix,
    split_blocks,
    usable_blocks,
)
from maria_train_head.evaluate import mean_nll
from maria_train_head.init import expert_tensors, fit_mix_scales
from maria_train_head.step import make_optimizer, train_step

log = logging.getLogger("maria.train")  # the CLI prints it; a notebook sees it with logging.basicConfig(level=logging.INFO)

RESUME_KEYS = ("val_fraction", "init", "batch_size", "seed", "data_mode_resolved")  # must not change on resume
# (the stores are compared by what they hold, not by how their paths are spelled: TrainState.stores)


@dataclass
class TrainConfig:
    store: str  # training feature store (path or fsspec URL) written by `maria extract`
    out: str  # output folder: head.safetensors, head.json, metrics.jsonl, loss.png, ckpt/
    overwrite: bool = False  # start over in an --out that already holds a head (default: refuse; --resume continues it)
    val_store: str | None = None  # validation store made by the same backbones (default: hold out --val-fraction of --store's blocks)
    val_fraction: float = 0.1  # share of --store's blocks held out for validation when there is no --val-store (chosen by block-id hash)
    init: Literal["poe", "mix", "random", "ar-only"] = (
        "poe"  # poe (the paper's [W1/2, W2/2]) | mix (per-expert scales fitted on the training rows) | random (ablation) | ar-only
    )
    lr: float = 3e-4  # peak AdamW learning rate
    min_lr_ratio: float = 0.1  # the cosine decay ends at lr x this
    weight_decay: float = 0.0  # AdamW decay toward ZERO (undoes a pretrained init; prefer --reg-to-init)
    reg_to_init: float = 1e-3  # L2 pull toward the initial weights: adds reg/2 * ||W - W_init||^2 to the (mean per-token) loss
    batch_size: int = 1024  # masked tokens (feature rows) per step
    max_steps: int | None = None  # optimizer steps (default: --epochs passes over the training rows)
    epochs: float = 1.0  # passes over the training rows when --max-steps is not given
    warmup_steps: int = 50  # linear warmup from 0 to --lr
    grad_clip: float = 1.0  # max global gradient norm of the data loss (0 = off)
    eval_every: int = 100  # validate every N steps (also at step 0 and at the end)
    save_every: int = 500  # checkpoint into out/ckpt every N steps (also at the end)
    early_stopping_patience: int = 5  # stop after N validations without a new best (0 = never)
    seed: int = 0  # data order, random init, and the rows the mix init is fitted on
    resume: bool = False  # continue from out/ckpt exactly where it stopped (starts fresh when there is none)
    device: Device = "auto"  # auto | cpu | cuda
    skip_corrupt: bool = False  # train without blocks that fail their checksum (default: stop and name them)
    data_mode: Literal["auto", "ram", "stream"] = "auto"  # auto (ram when the rows take under a quarter of available memory, else stream) | ram | stream
    mix_rows: int = 8192  # mix init: training rows the two scales are fitted on
    allow_incomplete: bool = False  # train on a store whose extraction has not finished (default: refuse)

    def __post_init__(self):
        if self.init not in INITS:
            raise ValueError(f"unknown --init {self.init!r}; use one of {', '.join(INITS)}")
        if self.data_mode not in ("auto", "ram", "stream"):
            raise ValueError(f"unknown --data-mode {self.data_mode!r}; use auto, ram or stream")
        if not 0 <= self.val_fraction < 1:
            raise ValueError(f"--val-fraction must be in [0, 1), got {self.val_fraction}")
        if self.val_store is None and self.val_fraction == 0:
            raise ValueError("no validation data: pass --val-store or a --val-fraction > 0 (the best head is chosen on validation)")
        for name in ("batch_size", "eval_every", "save_every", "mix_rows"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        for name in ("lr", "epochs"):
            if getattr(self, name) <= 0:
                raise ValueError(f"--{name.replace('_', '-')} must be > 0, got {getattr(self, name)}")
        for name in ("weight_decay", "reg_to_init", "grad_clip", "warmup_steps", "early_stopping_patience", "min_lr_ratio"):
            if getattr(self, name) < 0:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(self, name)}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"--max-steps must be >= 1, got {self.max_steps}")


def warmup_cosine(warmup_steps: int, total_steps: int, min_lr_ratio: float):
    """transformers' linear warm-up + cosine to min_lr_ratio of the peak, as a pure function of the step
    (the factor by which the peak lr is scaled): a resumed run recomputes it, no scheduler state to save."""
    anchor = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)  # the schedule needs an optimizer to wrap
    return get_cosine_with_min_lr_schedule_with_warmup(anchor, warmup_steps, total_steps, min_lr_rate=min_lr_ratio).lr_lambdas[0]


def prepare_data(cfg: TrainConfig, device: str, mode: str | None = None):
    """(store, train batches, validation batch factory, train/val block lists, resolved data mode, the stores'
    fingerprints)."""
    store = open_store(cfg.store)
    check_complete(store, cfg.allow_incomplete)
    fix = skip_fix(cfg.store)
    train_blocks = usable_blocks(store, store.committed_blocks(), cfg.skip_corrupt, fix)
    stores = {"store": store.fingerprint(train_blocks), "val_store": None}
    if cfg.val_store:
        vstore = open_store(cfg.val_store)
        check_complete(vstore, cfg.allow_incomplete)
        check_same_backbones(
            store.manifest,
            vstore.manifest,
            f"store {cfg.store}",
            f"val store {cfg.val_store}",
            "extract the validation store with the same --mlm and --ar as the training store",
        )
        val_blocks = usable_blocks(vstore, vstore.committed_blocks(), cfg.skip_corrupt, skip_fix(cfg.val_store))
        stores["val_store"] = vstore.fingerprint(val_blocks)
    else:
        vstore = store
        train_blocks, val_blocks = split_blocks(train_blocks, cfg.val_fraction)
    if not train_blocks:
        raise DataError(f"store {cfg.store} has no committed blocks; run `maria extract` first")
    budget = 0.25 * free_bytes("cpu")  # of host RAM, also for a GPU run: the rows are read into RAM first
    train_bytes, val_bytes = rows_bytes(store, train_blocks), rows_bytes(vstore, val_blocks)
    mode = mode or (cfg.data_mode if cfg.data_mode != "auto" else ("ram" if train_bytes + val_bytes < budget else "stream"))
    gpu_budget = 0.0
    if device.startswith("cuda"):  # keep room for the head, its gradient, AdamW moments, best and init copies
        gpu_budget = 0.5 * torch.cuda.mem_get_info()[0] - 6 * 4 * store.vocab_size * (store.feature_dim + 1)
    if mode == "ram":
        train = MemoryBatches(
            read_rows(store, train_blocks, cfg.skip_corrupt, fix), cfg.batch_size, cfg.seed, device, on_device=train_bytes + val_bytes < gpu_budget
        )
    else:
        train = StreamBatches(store, train_blocks, cfg.batch_size, cfg.seed, device, cfg.skip_corrupt)
    if val_bytes < budget:
        val_rows = read_rows(vstore, val_blocks, cfg.skip_corrupt, skip_fix(vstore.url))
        if val_bytes < gpu_budget - (train_bytes if mode == "ram" else 0):
            val_rows = {k: v.to(device) for k, v in val_rows.items()}
        val = lambda: eval_batches(val_rows, cfg.batch_size, device)  # noqa: E731
    else:  # too big for RAM: read it block by block at each validation
        val = lambda: (
            b
            for blk in val_blocks
            for b in eval_batches(
                read_rows(vstore, [blk], cfg.skip_corrupt, skip_fix(vstore.url)),  # noqa: E731
                cfg.batch_size,
                device,
            )
        )
    return store, train, val, train_blocks, val_blocks, mode, stores


def mix_sample(cfg: TrainConfig, store, train, train_blocks) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(features as stored, targets, float8 scales or None) the mix init's scales are fitted on."""
    if isinstance(train, MemoryBatches):
        return train.features, train.targets, train.scales
    rows, n, order = [], 0, torch.randperm(len(train_blocks), generator=torch.Generator().manual_seed(cfg.seed)).tolist()
    for i in order:  # stream mode: whole blocks in a seeded order until there are enough rows
        rows.append(read_rows(store, [train_blocks[i]], cfg.skip_corrupt, skip_fix(cfg.store)))
        n += len(rows[-1]["targets"])
        if n >= cfg.mix_rows:
            break
    scales = torch.cat([r["scales"] for r in rows]) if "scales" in rows[0] else None
    return torch.cat([r["features"] for r in rows]), torch.cat([r["targets"] for r in rows]), scales


@dataclass
class TrainState:
    """Everything a resumed run needs besides tensors; saved as ckpt/state.json."""

    config: dict  # the run's TrainConfig (plus the resolved data mode): what a resume must match
    identity: dict  # the store's backbone identity (maria/identity.py)
    val_blocks: list  # blocks held out for validation (when there is no --val-store)
    stores: dict | None = None  # fingerprints of what the store and val store hold (FeatureStore.fingerprint); None: an older run
    init_scales: list | None = None  # the mix init's fitted (a, b)
    step: int = 0
    data: dict | None = None  # the batch source's position
    best_step: int = 0
    best_val_loss: float | None = None
    init_val_loss: float | None = None
    bad_evals: int = 0  # validations since the last new best (early stopping)
    stopped_early: bool = False
    loss_sum: float = 0.0  # train loss summed since the last validation
    last_eval: int = 0
    seconds: float = 0.0  # training time since the last validation (for rows/s)
    rows: int = 0  # rows seen since the last validation

    @property
    def complete(self) -> bool:
        return self.stopped_early or self.step >= self.config["total_steps"]


def head_meta(cfg: TrainConfig, store, s: TrainState) -> dict:
    m = store.manifest
    return {
        "mlm": m.get("mlm"),
        "ar": m.get("ar"),
        "tokenizer_fingerprint": m.get("tokenizer_fingerprint"),
        "start_token_id": m.get("start_token_id"),
        "mlm_offset": m.get("mlm_offset", 0),
        "store": cfg.store,
        "val_store": cfg.val_store,
        "val_blocks": s.val_blocks if not cfg.val_store else None,
        "init": cfg.init,
        "init_scales": s.init_scales,
        "best_step": s.best_step,
        "best_val_loss": s.best_val_loss,
        "best_val_ppl": math.exp(s.best_val_loss),
        "init_val_loss": s.init_val_loss,
        "steps": s.step,
        "total_steps": s.config["total_steps"],
        "stopped_early": s.stopped_early,
        "complete": s.complete,
        "masking": m.get("masking"),
        "window_length": m.get("window_length"),
        "config": asdict(cfg),
    }


def check_resume(saved: TrainState, now: dict, cfg: TrainConfig, store, out: Path, stores: dict) -> None:
    """A resumed run must read the same data: the same stores (by content, whatever path names them) and settings."""
    check_same_backbones(
        saved.identity,
        store.manifest,
        f"the checkpoint in {out}/ckpt",
        f"store {cfg.store}",
        "pass the --store it was trained on, or a new --out (or --overwrite to start over)",
    )
    # a run saved before stores were fingerprinted is held to the paths it was given, as it was then
    keys = RESUME_KEYS + (("store", "val_store") if saved.stores is None else ())
    for key in ("store", "val_store") if saved.stores is not None else ():
        if saved.stores.get(key) != stores.get(key):
            flag = "--" + key.replace("_", "-")
            given = getattr(cfg, key)
            what = (
                f"{flag} {given} holds other data than the store the checkpoint in {out}/ckpt was trained on "
                f"(another extraction, or blocks added or removed since)"
                if given and saved.stores.get(key)
                else f"the checkpoint in {out}/ckpt was trained {'with' if saved.stores.get(key) else 'without'} a {flag}"
            )
            raise DataError(f"{what}; resume with the {flag} it was trained on, or pass a new --out (or --overwrite to start over)")
    for key in keys:
        if saved.config.get(key) != now.get(key):
            raise DataError(
                f"the checkpoint in {out}/ckpt was made with {key}={saved.config.get(key)!r}, now {now.get(key)!r}; "
                f"resume with the same {key}, or pass a new --out (or --overwrite to start over)"
            )


def start_run(cfg: TrainConfig, device: str, out: Path):
    """(store, train batches, validation factory, head, its initial weights, optimizer, best head, state, data mode):
    a fresh run, or a resumed one exactly where it stopped."""
    saved = ck.load_checkpoint(out) if cfg.resume else None
    old = TrainState(**saved[1]) if saved else None
    # an "auto" run resumes in the mode it started in (RAM and stream orders differ), whatever memory is free now
    keep_mode = old.config.get("data_mode_resolved") if old and cfg.data_mode == "auto" else None
    store, train, val, train_blocks, val_blocks, mode, stores = prepare_data(cfg, device, keep_mode)
    now = {**asdict(cfg), "data_mode_resolved": mode, "total_steps": cfg.max_steps or max(1, math.ceil(cfg.epochs * len(train)))}
    if old:
        check_resume(old, now, cfg, store, out, stores)
    state = old or TrainState(config=now, identity=identity_record(store.manifest), val_blocks=val_blocks, stores=stores)
    if not old and cfg.init == "mix":
        features, targets, scales = mix_sample(cfg, store, train, train_blocks)
        state.init_scales = list(fit_mix_scales(store, features, targets, device, cfg.seed, cfg.mix_rows, scales=scales))
        log.info(f"mix init: fitted scales mlm {state.init_scales[0]:.4f}, ar {state.init_scales[1]:.4f}")
    head = init_head(
        cfg.init,
        expert_tensors(store) if cfg.init != "random" else {"W1": torch.empty(0, store.d_mlm), "W2": torch.empty(store.vocab_size, store.d_ar)},
        state.init_scales,
        cfg.seed,
    ).to(device)
    init_params = [p.detach().clone() for p in head.parameters()] if cfg.reg_to_init > 0 else []  # the pull's anchor
    opt = make_optimizer(head, cfg)
    if old:
        best = ck.restore(saved[0], head, opt)
        train.load_state_dict(state.data)
        ck.truncate_metrics(out, state.step)
        log.info(f"resuming {out} at step {state.step} (best val {state.best_val_loss:.4f} @ {state.best_step})")
    else:
        torch.manual_seed(cfg.seed)
        ck.clear_run(out)  # a fresh start: no stale checkpoint a later --resume could pick up
        state.best_val_loss = state.init_val_loss = mean_nll(head, val())
        best = {"weight": head.proj.weight.detach().clone(), "bias": head.proj.bias.detach().clone()}
        ck.append_metrics(
            out, {"step": 0, "train_loss": None, "val_loss": state.best_val_loss, "val_ppl": math.exp(state.best_val_loss), "lr": 0.0, "rows_per_s": None}
        )
    return store, train, val, head, init_params, opt, best, state, mode


def validate(head, val, state: TrainState, best: dict, out: Path, lr: float, patience: int) -> dict:
    """Log a validation; keep the head if it is the best so far; decide early stopping."""
    v = mean_nll(head, val())
    n = state.step - state.last_eval
    ck.append_metrics(
        out,
        {
            "step": state.step,
            "train_loss": state.loss_sum / max(n, 1),
            "val_loss": v,
            "val_ppl": math.exp(v),
            "lr": lr,
            "rows_per_s": state.rows / max(state.seconds, 1e-9),
        },
    )
    if v < state.best_val_loss:
        with torch.no_grad():  # in place: a fresh clone would hold two best heads at once for a moment
            best["weight"].copy_(head.proj.weight), best["bias"].copy_(head.proj.bias)
        state.best_val_loss, state.best_step, state.bad_evals = v, state.step, 0
    else:
        state.bad_evals += 1
        state.stopped_early = 0 < patience <= state.bad_evals
    state.loss_sum, state.last_eval, state.seconds, state.rows = 0.0, state.step, 0.0, 0
    return best


def save(out: Path, cfg: TrainConfig, store, train, head, opt, best: dict, state: TrainState) -> None:
    state.data = train.state_dict()
    ck.save_checkpoint(out, head, best, opt, asdict(state))
    save_head(out, FusionHead.sharing(best["weight"], best["bias"], head.d_mlm), head_meta(cfg, store, state))
    ck.plot_loss(out)


def run_train(cfg: TrainConfig, stop_after: int | None = None) -> dict:
    """`maria train`; its summary. `stop_after` ends the call after that many steps as an interruption
    would (checkpoint written, head marked unfinished): how tests interrupt a run."""
    device, out = resolve_device(cfg.device), Path(cfg.out)
    check_outside_inputs(out, (cfg.store, cfg.val_store), what="head folder")
    with output_lock(out, "head folder"):  # one run per --out: a second is refused, never interleaved
        if not cfg.resume:  # under the lock: what another run is writing is not "a folder maria did not write"
            guard_output(out, "head.json", cfg.overwrite, (cfg.store, cfg.val_store), what="head folder")
        fresh = not out.exists() or not any(out.iterdir())
        out.mkdir(parents=True, exist_ok=True)
        try:
            return train_loop(cfg, device, out, stop_after)
        except BaseException:
            if fresh and not (out / "ckpt").exists():  # failed before its first checkpoint: leave nothing behind
                shutil.rmtree(out, ignore_errors=True)
            raise


def train_loop(cfg: TrainConfig, device: str, out: Path, stop_after: int | None = None) -> dict:
    store, train, val, head, init_params, opt, best, s, mode = start_run(cfg, device, out)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.startswith("cuda"))
    total, stop_after = s.config["total_steps"], -1 if stop_after is None else stop_after
    schedule = warmup_cosine(cfg.warmup_steps, total, cfg.min_lr_ratio)
    bar = tqdm(total=total, initial=s.step, desc=f"train ({mode}, {device})", unit="step", dynamic_ncols=True)
    loss_acc = torch.zeros((), device=device)  # summed on the device: one sync per validation, not per step
    try:
        while s.step < total and not s.stopped_early and s.step != stop_after:
            t0, lr = time.perf_counter(), cfg.lr * schedule(s.step)
            for g in opt.param_groups:
                g["lr"] = lr
            f, t = train.next()
            loss = train_step(head, opt, f, t, init_params, cfg, autocast)
            s.step, s.rows = s.step + 1, s.rows + len(t)
            loss_acc += loss.detach()
            bar.update(1)
            evaluate_now = s.step % cfg.eval_every == 0 or s.step == total
            save_now = evaluate_now or s.step % cfg.save_every == 0 or s.step == stop_after
            if save_now:  # fold the device sum in (a checkpoint carries the partial mean across a resume)
                s.loss_sum, loss_acc = s.loss_sum + float(loss_acc), torch.zeros((), device=device)
            s.seconds += time.perf_counter() - t0
            if evaluate_now:
                best = validate(head, val, s, best, out, lr, cfg.early_stopping_patience)
                bar.set_postfix(val=f"{s.best_val_loss:.3f}")
            if s.step % cfg.save_every == 0 or s.step == total or s.stopped_early or s.step == stop_after:
                save(out, cfg, store, train, head, opt, best, s)
    finally:
        bar.close()
        train.close()
    if not (out / "head.json").exists() or not (out / "ckpt").exists():
        save(out, cfg, store, train, head, opt, best, s)  # nothing trained in this call (e.g. a finished run resumed)
    summary = {
        "out": str(out),
        "steps": s.step,
        "total_steps": total,
        "data_mode": mode,
        "device": device,
        "init": cfg.init,
        "init_scales": s.init_scales,
        "init_val_loss": s.init_val_loss,
        "best_step": s.best_step,
        "best_val_loss": s.best_val_loss,
        "best_val_ppl": math.exp(s.best_val_loss),
        "stopped_early": s.stopped_early,
        "interrupted": not s.complete,
    }
    log.info(f"best val loss {s.best_val_loss:.4f} (ppl {math.exp(s.best_val_loss):.2f}) at step {s.best_step}; init {s.init_val_loss:.4f}; head in {out}")
    return summary
