"""The three stages of the extraction pipeline, each run where Ray places it:

    windows (CPU tasks)    one block's documents -> padded windows and K masks each
    features (actors)      both backbones; one AR pass per window, one MLM pass per mask
    write (CPU tasks)      atomic, idempotent block write into the store

Device and dtype are decided inside the actor (or task), from the GPUs Ray gave it, never on the
driver: under `ray job submit` the driver runs on a CPU head.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass, fields

import numpy as np

from maria.backbones import load_backbones
from maria.device import cpu_threads
from maria.device import resolve_device as resolve_local_device
from maria_extract.corpus import cut_windows
from maria_extract.forward import block_features
from maria_extract.masking import MaskingConfig, sample_mask, word_starts
from maria_storage import open_store


class BlockHooks:
    """What the stages do around each block; a test passes a subclass to inject faults (a killed actor,
    a full disk, a slow block) through `run_extract(cfg, hooks=...)`. The default does nothing extra."""

    def before_block(self, store_url: str, block_id: str) -> None:
        """In the backbone actor, before a block's features are computed."""

    def write_block(self, store, block_id: str, arrays: dict, stats: dict) -> None:
        """In a writer task: write and commit one block."""
        store.write_block(block_id, arrays, stats=stats)


@dataclass(frozen=True)
class StageSpec:
    """What the Ray stages need of an extraction, and nothing more (it is pickled into every task)."""

    mlm: str
    ar: str
    mlm_revision: str | None
    ar_revision: str | None
    trust_remote_code: bool
    mlm_offset: int | None
    dtype: str
    device: str
    window_length: int
    masking: MaskingConfig
    seed: int
    batch_size: int
    store: str
    hooks: BlockHooks

    @classmethod
    def of(cls, cfg, hooks: BlockHooks | None = None) -> "StageSpec":
        """The spec of an ExtractConfig (any object with these fields)."""
        names = [f.name for f in fields(cls) if f.name != "hooks"]
        return cls(**{n: getattr(cfg, n) for n in names}, hooks=hooks or BlockHooks())


@functools.lru_cache(maxsize=4)
def ar_tokenizer(ar: str, revision: str | None, trust_remote_code: bool):
    """The AR's tokenizer, loaded once per worker process (a Ray worker runs many blocks)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(ar, revision=revision, trust_remote_code=trust_remote_code)


def resolve_device(requested: str) -> str:
    """auto: cuda when Ray gave this worker a GPU (outside Ray: when torch sees one), else cpu. Decided
    in the worker, never on the driver (under `ray job submit` the driver sits on a CPU head)."""
    import ray

    if requested == "auto" and ray.is_initialized():
        requested = "cuda" if ray.get_gpu_ids() else "cpu"
    return resolve_local_device(requested)


def load(cfg: StageSpec, device: str, check_parity: bool = True):
    dtype = cfg.dtype if cfg.dtype != "auto" else ("bfloat16" if device.startswith("cuda") else "float32")
    return load_backbones(
        cfg.mlm,
        cfg.ar,
        dtype=dtype,
        device=device,
        trust_remote_code=cfg.trust_remote_code,
        mlm_revision=cfg.mlm_revision,
        ar_revision=cfg.ar_revision,
        check_parity=check_parity,
        mlm_offset=cfg.mlm_offset,
    )


def check_window_fits(bb, window_length: int) -> None:
    """The window must fit both models as decoding will read it (Backbones.max_window: one definition)."""
    limit = bb.max_window()
    if limit is not None and window_length > limit:
        raise ValueError(f"window length {window_length} exceeds the backbones' limit of {limit} tokens; pass --window-length {limit} or less")


def describe_backbones(cfg: StageSpec) -> tuple[dict, dict]:
    """Store manifest fields and PoE initial weights; runs as a Ray task with an actor's resources
    (so a CPU-only head never loads a backbone), and checks the window fits both models."""
    bb = load(cfg, resolve_device(cfg.device))
    check_window_fits(bb, cfg.window_length)
    w = {k: v.float().cpu().numpy() for k, v in bb.expert_weights().items()}
    w["vocab_map"] = bb.mlm_to_ar.cpu().numpy()
    info = {**bb.identity, "d_mlm": bb.d_mlm, "d_ar": bb.d_ar, "vocab_size": bb.vocab_size, "start_token_id": bb.start_id, "mlm_offset": bb.mlm_offset}
    return info, w


def objects(values: list) -> np.ndarray:
    """A 1-D object array of arrays (np.array would stack equal shapes into one N-D array)."""
    out = np.empty(len(values), dtype=object)
    for i, v in enumerate(values):
        out[i] = v
    return out


def tokenize_and_mask(batch: dict, cfg: StageSpec) -> dict:
    """CPU stage: each block's documents -> padded windows and K masks each. A document shorter
    than one window makes no window; a block of such documents goes on as an empty block."""
    tok = ar_tokenizer(cfg.ar, cfg.ar_revision, cfg.trust_remote_code)
    starts = word_starts(tok, len(tok)) if cfg.masking.mode == "word" else None
    first = 0 if (tok.bos_token_id is not None or tok.eos_token_id is not None) else 1
    K, T = cfg.masking.masks_per_window, cfg.window_length
    out = {k: [] for k in ("ids", "lengths", "masks", "rates", "doc_ids", "window_ids")}
    for doc_ids, texts in zip(batch["doc_ids"], batch["texts"]):
        rows, docs, wins = [], [], []
        for d, text in zip(doc_ids, texts):
            for w, ids in enumerate(cut_windows(tok(str(text), add_special_tokens=False).input_ids, T) if text else []):
                rows.append(ids), docs.append(int(d)), wins.append(w)
        ids = np.zeros((len(rows), T), dtype=np.int64)
        masks = np.zeros((K, len(rows), T), dtype=bool)
        rates = np.zeros((K, len(rows)), dtype=np.float32)
        for r, (x, d, w) in enumerate(zip(rows, docs, wins)):
            ids[r, : len(x)] = x
            for k in range(K):
                m, _ = sample_mask(np.asarray(x), cfg.masking, cfg.seed, d, w, k, starts, first)
                masks[k, r, : len(x)], rates[k, r] = m, m.mean()
        for key, v in (
            ("ids", ids),
            ("lengths", np.array([len(x) for x in rows], dtype=np.int64)),
            ("masks", masks),
            ("rates", rates),
            ("doc_ids", np.array(docs, dtype=np.int64)),
            ("window_ids", np.array(wins, dtype=np.int64)),
        ):
            out[key].append(v)
    return {"block_id": np.asarray(batch["block_id"]), **{k: objects(v) for k, v in out.items()}}


class FeatureActor:
    """GPU (or CPU) stage: holds both backbones; one block in, its feature rows out."""

    def __init__(self, cfg: StageSpec):
        import torch

        self.cfg, self.device = cfg, resolve_device(cfg.device)
        if self.device == "cpu":
            torch.set_num_threads(cpu_threads())
        self.bb = load(cfg, self.device, check_parity=False)
        print(f"maria extract: backbone actor on {self.device} (pid {os.getpid()})", flush=True)

    def __call__(self, batch: dict) -> dict:
        out = {k: [] for k in ("features", "targets", "doc_ids", "window_ids", "positions", "mask_rates")}
        tokens = []
        for i, block_id in enumerate(batch["block_id"]):
            self.cfg.hooks.before_block(self.cfg.store, str(block_id))
            f, t, r, p, k = self.block_features(batch["ids"][i], batch["lengths"][i], batch["masks"][i])
            out["features"].append(f)
            out["targets"].append(t.astype(np.int32))
            out["doc_ids"].append(np.asarray(batch["doc_ids"][i], dtype=np.int64)[r])
            out["window_ids"].append(np.asarray(batch["window_ids"][i], dtype=np.int64)[r])
            out["positions"].append(p.astype(np.int32))
            rates = np.asarray(batch["rates"][i], dtype=np.float32).reshape(self.cfg.masking.masks_per_window, -1)
            out["mask_rates"].append(rates[k, r])
            tokens.append(int(np.asarray(batch["lengths"][i]).sum()))
        return {"block_id": np.asarray(batch["block_id"]), "tokens": np.array(tokens, dtype=np.int64), **{k: objects(v) for k, v in out.items()}}

    def block_features(self, ids, lengths, masks):
        """Rows (features, targets, window, position, k) sorted by (window, k, position): extract/forward.py."""
        K, T = self.cfg.masking.masks_per_window, self.cfg.window_length
        lengths = np.asarray(lengths, dtype=np.int64)
        masks = np.asarray(masks, dtype=bool).reshape(K, len(lengths), T)
        return block_features(self.bb, np.asarray(ids).reshape(len(lengths), T), lengths, masks, self.cfg.batch_size, self.device)


def write_blocks(batch: dict, cfg: StageSpec) -> dict:
    """Writer stage: each block is written by one task into its own group; idempotent."""
    store = open_store(cfg.store)
    written = []
    for i, block_id in enumerate(batch["block_id"]):
        arrays = {k: np.asarray(batch[k][i]) for k in ("features", "targets", "doc_ids", "window_ids", "positions", "mask_rates")}
        arrays["features"] = arrays["features"].reshape(-1, store.feature_dim)
        cfg.hooks.write_block(store, str(block_id), arrays, stats={"tokens": int(batch["tokens"][i])})
        written.append(len(arrays["targets"]))
    return {"block_id": np.asarray(batch["block_id"]), "rows": np.array(written, dtype=np.int64), "tokens": np.asarray(batch["tokens"])}
