"""Batches of cached features for the head: in RAM (shuffled indices per epoch) or streamed.

Both sources give the same kind of batch (features float32 (B, D), targets int64 (B,) on the
training device), are a pure function of (store, blocks, batch size, seed), and resume exactly
from their `state_dict()`. In RAM, features stay in their stored form (float16, bfloat16, or float8
codes with per-row scales) and are decoded to float32 one batch at a time, on the training device.
"""

from __future__ import annotations

import hashlib
import math
import queue
import threading
import warnings

import numpy as np
import torch

from maria_storage import SCALES, CorruptBlockError, IncompleteStoreError, ShuffledReader, load_all
from maria_train_head.step import decode_features


class DataError(ValueError):
    """Feature data the trainer cannot use; the message names the fix."""


def check_complete(store, allow_incomplete: bool) -> None:
    """The store's own rule (FeatureStore.require_complete: every planned block committed and the job
    finalized): an extraction that was killed or hit a full disk leaves a store that looks fine but is short."""
    if allow_incomplete:
        return
    try:
        store.require_complete()
    except IncompleteStoreError as e:
        raise DataError(f"{e}; or pass --allow-incomplete to use it as it is") from None


def split_blocks(blocks: list[str], val_fraction: float) -> tuple[list[str], list[str]]:
    """Hold out whole blocks (whole documents, so no window leaks across the split). The choice
    hashes block ids: it is the same for every seed and barely moves when blocks are added."""
    blocks = sorted(blocks)
    if val_fraction <= 0:
        return blocks, []
    n_val = max(1, round(len(blocks) * val_fraction))
    if n_val >= len(blocks):
        raise DataError(
            f"the store has only {len(blocks)} block(s), too few to hold out {val_fraction:.0%} for validation; "
            "pass --val-store, or extract with a smaller --docs-per-block"
        )
    ranked = sorted(blocks, key=lambda b: hashlib.sha256(b.encode()).hexdigest())
    val = set(ranked[:n_val])
    return [b for b in blocks if b not in val], sorted(val)


def rows_bytes(store, blocks: list[str]) -> int:
    """Bytes the blocks take in RAM as stored (16- or 8-bit features, float8's row scales) plus targets and mask rates."""
    rows = store.num_rows(blocks)
    scale = 4 if store.manifest.get("feature_dtype") == "float8" else 0
    return rows * (store.feature_dtype.itemsize * store.feature_dim + scale + 8 + 4)


def skip_fix(url: str) -> str:
    """The fix a trainer names for a damaged block: find them all, or train without them."""
    return f"run `maria verify --store {url}` to list the damaged blocks, or pass --skip-corrupt to train without them"


def skip_or_raise(e: CorruptBlockError, skip_corrupt: bool, fix: str | None) -> None:
    """A damaged block is corrupt data (exit code 3) unless the caller skips it (--skip-corrupt): then a warning."""
    if not skip_corrupt:
        raise CorruptBlockError(e.block_id, e.reason, e.url, fix=fix) from None
    warnings.warn(f"skipping corrupt block {e.block_id} of {e.url}: {e.reason}", stacklevel=2)


def usable_blocks(store, blocks: list[str], skip_corrupt: bool, fix: str | None = None) -> list[str]:
    """The blocks whose commit markers are sound: a damaged marker (garbled JSON, a missing field) is a damaged
    block like any other, skipped with --skip-corrupt, else corrupt data."""
    good = []
    for b in blocks:
        try:
            store.commit_info(b)
            good.append(b)
        except CorruptBlockError as e:
            skip_or_raise(e, skip_corrupt, fix)
    return good


def read_rows(store, blocks: list[str], skip_corrupt: bool = False, fix: str | None = None) -> dict[str, torch.Tensor]:
    """Every row of the blocks (maria_storage.load_all), features kept in their stored dtype (a half or a quarter of
    the RAM of float32); a float8 store's rows also carry "scales" (see decode_features). A damaged block raises
    CorruptBlockError naming `fix` (default: how to rewrite it), or is skipped with skip_corrupt."""
    try:
        a = load_all(store, blocks, verify=True, skip_corrupt=skip_corrupt, float32=False)
    except CorruptBlockError as e:
        skip_or_raise(e, False, fix)
    f = torch.from_numpy(np.ascontiguousarray(a["features"]))
    rows = {
        "features": f.view(torch.bfloat16) if f.dtype == torch.uint16 else f,  # bf16 is stored as its bits
        "targets": torch.from_numpy(a["targets"]),
        "mask_rates": torch.from_numpy(a["mask_rates"].astype(np.float32)),
    }
    return {**rows, "scales": torch.from_numpy(a[SCALES])} if SCALES in a else rows


def eval_batches(rows: dict[str, torch.Tensor], batch_size: int, device: str):
    """In-order batches of (features float32, targets, mask_rates) on the device."""
    n, scales = len(rows["targets"]), rows.get("scales")
    for s in range(0, n, batch_size):
        f, t, r = (rows[k][s : s + batch_size].to(device, non_blocking=True) for k in ("features", "targets", "mask_rates"))
        yield decode_features(f, None if scales is None else scales[s : s + batch_size].to(device, non_blocking=True)), t, r


class MemoryBatches:
    """The whole split in RAM (or GPU memory); a fresh permutation of the row indices per epoch."""

    def __init__(self, rows: dict[str, torch.Tensor], batch_size: int, seed: int, device: str, on_device: bool):
        where = device if on_device else "cpu"
        self.features, self.targets = rows["features"].to(where), rows["targets"].to(where)
        self.scales = rows["scales"].to(where) if "scales" in rows else None  # float8 stores
        self.n, self.batch_size, self.seed, self.device = len(self.targets), batch_size, seed, device
        self.epoch, self.pos, self._perm = 0, 0, None

    def __len__(self) -> int:  # batches per epoch
        return math.ceil(self.n / self.batch_size)

    def _permutation(self) -> torch.Tensor:
        if self._perm is None or self._perm[0] != self.epoch:
            perm = np.random.default_rng([self.seed, self.epoch]).permutation(self.n)  # same on every device
            self._perm = (self.epoch, torch.from_numpy(perm).to(self.features.device))
        return self._perm[1]

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.pos == len(self):
            self.epoch, self.pos = self.epoch + 1, 0
        idx = self._permutation()[self.pos * self.batch_size : (self.pos + 1) * self.batch_size]
        self.pos += 1
        f, t = self.features[idx], self.targets[idx]
        s = None if self.scales is None else self.scales[idx]
        if f.device.type == "cpu" and self.device.startswith("cuda"):
            f, t, s = f.pin_memory(), t.pin_memory(), None if s is None else s.pin_memory()
        s = None if s is None else s.to(self.device, non_blocking=True)
        return decode_features(f.to(self.device, non_blocking=True), s), t.to(self.device, non_blocking=True)

    def state_dict(self) -> dict:
        return {"mode": "ram", "epoch": self.epoch, "pos": self.pos}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.pos = int(state["epoch"]), int(state["pos"])

    def close(self) -> None:
        pass


class StreamBatches:
    """ShuffledReader in a background thread that keeps a few batches ready (pinned on CUDA).

    Each queued batch carries the reader's state *after* it, so the state of the last batch the
    trainer consumed is exactly where a resumed run must continue, however far the thread ran ahead."""

    def __init__(self, store, blocks: list[str], batch_size: int, seed: int, device: str, skip_corrupt: bool, prefetch: int = 4):
        self.reader = ShuffledReader(store, batch_size, seed=seed, blocks=blocks, skip_corrupt=skip_corrupt)
        self.device, self.prefetch = device, prefetch
        self.state, self._thread, self._queue, self._stop = self.reader.state_dict(), None, None, threading.Event()

    def __len__(self) -> int:
        return len(self.reader)

    def _produce(self) -> None:
        pin = self.device.startswith("cuda")
        try:
            while not self._stop.is_set():
                empty = True
                for batch in self.reader:  # one epoch
                    empty = False
                    f, t = torch.from_numpy(batch["features"]), torch.from_numpy(batch["targets"])
                    if pin:
                        f, t = f.pin_memory(), t.pin_memory()
                    item = (f, t, self.reader.state_dict())
                    while not self._stop.is_set():
                        try:
                            self._queue.put(item, timeout=0.1)
                            break
                        except queue.Full:
                            continue
                    if self._stop.is_set():
                        return
                if empty and len(self.reader) == 0:
                    raise DataError("the training split has no rows; extract more documents")
        except BaseException as e:  # noqa: BLE001 -- hand it to the trainer's thread
            self._queue.put(e)

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._thread is None:
            self._queue = queue.Queue(maxsize=self.prefetch)
            self._thread = threading.Thread(target=self._produce, daemon=True, name="maria-prefetch")
            self._thread.start()
        item = self._queue.get()
        if isinstance(item, BaseException):
            raise item
        f, t, self.state = item
        return f.to(self.device, non_blocking=True).float(), t.to(self.device, non_blocking=True)

    def state_dict(self) -> dict:
        return {"mode": "stream", "reader": self.state}

    def load_state_dict(self, state: dict) -> None:
        if self._thread is not None:
            raise RuntimeError("load_state_dict must come before the first batch")
        self.reader.load_state_dict(state["reader"])
        self.state = state["reader"]

    def close(self) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join(timeout=10)
            self._thread = None
