"""The three stages of the extraction pipeline, each run where Ray places it:

    windows (CPU tasks)    one block's documents -> padded windows and K masks each
    features (actors)      both backbones; one AR pass per window, one MLM pass per mask
    write (CPU tasks)      atomic, idempotent block write into the store

Device and dtype are decided inside the actor (or task), from the GPUs Ray gave it, never on the
driver: under `ray job submit` the driver runs on a CPU head.
"""
from __future__ import annotations

import os

import numpy as np

from maria_extract import faults
from maria_extract.corpus import cut_windows
from maria_extract.masking import sample_mask, word_starts
from maria.backbones import load_backbones
from maria.device import cpu_threads, resolve_device as resolve_local_device
from maria.features import aligned_features, ar_states
from maria_storage import open_store


def resolve_device(requested: str) -> str:
    """auto: cuda when Ray gave this worker a GPU (outside Ray: when torch sees one), else cpu. Decided
    in the worker, never on the driver (under `ray job submit` the driver sits on a CPU head)."""
    import ray

    if requested == "auto" and ray.is_initialized():
        requested = "cuda" if ray.get_gpu_ids() else "cpu"
    return resolve_local_device(requested)


def load(cfg, device: str, check_parity: bool = True):
    dtype = cfg.dtype if cfg.dtype != "auto" else ("bfloat16" if device.startswith("cuda") else "float32")
    return load_backbones(cfg.mlm, cfg.ar, dtype=dtype, device=device, trust_remote_code=cfg.trust_remote_code,
                          mlm_revision=cfg.mlm_revision, ar_revision=cfg.ar_revision, check_parity=check_parity,
                          mlm_offset=cfg.mlm_offset)


def check_window_fits(bb, window_length: int) -> None:
    for name, model, extra in (("MLM", bb.mlm, len(bb.mlm_prefix) + len(bb.mlm_suffix)), ("AR", bb.ar, 0)):
        limit = getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", None)
        if limit is not None and window_length + extra > limit:
            raise ValueError(f"window length {window_length} exceeds the {name}'s limit of {limit - extra} tokens; "
                             f"pass --window-length {limit - extra} or less")


def describe_backbones(cfg) -> tuple[dict, dict]:
    """Store manifest fields and PoE initial weights; runs as a Ray task with an actor's resources
    (so a CPU-only head never loads a backbone), and checks the window fits both models."""
    bb = load(cfg, resolve_device(cfg.device))
    check_window_fits(bb, cfg.window_length)
    w = {k: v.float().cpu().numpy() for k, v in bb.expert_weights().items()}
    w["vocab_map"] = bb.mlm_to_ar.cpu().numpy()
    info = {**bb.identity, "d_mlm": bb.d_mlm, "d_ar": bb.d_ar, "vocab_size": bb.vocab_size, "start_token_id": bb.start_id,
            "mlm_offset": bb.mlm_offset}
    return info, w


def objects(values: list) -> np.ndarray:
    """A 1-D object array of arrays (np.array would stack equal shapes into one N-D array)."""
    out = np.empty(len(values), dtype=object)
    for i, v in enumerate(values):
        out[i] = v
    return out


def make_windows(batch: dict, cfg) -> dict:
    """CPU stage: each block's documents -> padded windows and K masks each. A document shorter
    than one window makes no window; a block of such documents goes on as an empty block."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(cfg.ar, revision=cfg.ar_revision, trust_remote_code=cfg.trust_remote_code)
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
        for key, v in (("ids", ids), ("lengths", np.array([len(x) for x in rows], dtype=np.int64)), ("masks", masks),
                       ("rates", rates), ("doc_ids", np.array(docs, dtype=np.int64)), ("window_ids", np.array(wins, dtype=np.int64))):
            out[key].append(v)
    return {"block_id": np.asarray(batch["block_id"]), **{k: objects(v) for k, v in out.items()}}


class FeatureActor:
    """GPU (or CPU) stage: holds both backbones; one block in, its feature rows out."""

    def __init__(self, cfg):
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
            faults.before_block(self.cfg.store, str(block_id))
            f, t, r, p, k = self.block_features(batch["ids"][i], batch["lengths"][i], batch["masks"][i])
            out["features"].append(f)
            out["targets"].append(t.astype(np.int32))
            out["doc_ids"].append(np.asarray(batch["doc_ids"][i], dtype=np.int64)[r])
            out["window_ids"].append(np.asarray(batch["window_ids"][i], dtype=np.int64)[r])
            out["positions"].append(p.astype(np.int32))
            rates = np.asarray(batch["rates"][i], dtype=np.float32).reshape(self.cfg.masking.masks_per_window, -1)
            out["mask_rates"].append(rates[k, r])
            tokens.append(int(np.asarray(batch["lengths"][i]).sum()))
        return {"block_id": np.asarray(batch["block_id"]), "tokens": np.array(tokens, dtype=np.int64),
                **{k: objects(v) for k, v in out.items()}}

    def block_features(self, ids, lengths, masks):
        """Rows (features, targets, window, position, k) sorted by (window, k, position), so the
        block's bytes do not depend on how windows were bucketed into micro-batches."""
        import torch

        K, T = self.cfg.masking.masks_per_window, self.cfg.window_length
        lengths = np.asarray(lengths, dtype=np.int64)
        ids = np.asarray(ids, dtype=np.int64).reshape(len(lengths), T)
        masks = np.asarray(masks, dtype=bool).reshape(K, len(lengths), T)
        order = np.argsort(-lengths, kind="stable")  # length buckets: similar lengths share a batch
        parts = []
        for s in range(0, len(order), self.cfg.batch_size):
            idx = order[s : s + self.cfg.batch_size]
            n_max = int(lengths[idx].max())
            x = torch.from_numpy(ids[idx, :n_max]).to(self.device)
            n = torch.from_numpy(lengths[idx]).to(self.device)
            h_ar = ar_states(self.bb, x, n)
            for k in range(K):
                af = aligned_features(self.bb, x, torch.from_numpy(masks[k][idx, :n_max]).to(self.device), n, h_ar=h_ar)
                rows = idx[af.rows.cpu().numpy()]
                parts.append((af.features.float().cpu().numpy(), af.targets.cpu().numpy(), rows,
                              af.positions.cpu().numpy(), np.full(len(rows), k)))
        if not parts:  # a block whose documents were all too short for a window: an empty block
            return np.zeros((0, self.bb.d_mlm + self.bb.d_ar), np.float32), *(np.zeros(0, np.int64) for _ in range(4))
        f, t, r, p, k = (np.concatenate(c) for c in zip(*parts))
        key = np.lexsort((p, k, r))
        return f[key], t[key], r[key], p[key], k[key]


def write_blocks(batch: dict, url: str) -> dict:
    """Writer stage: each block is written by one task into its own group; idempotent."""
    store = open_store(url)
    written = []
    for i, block_id in enumerate(batch["block_id"]):
        arrays = {k: np.asarray(batch[k][i]) for k in ("features", "targets", "doc_ids", "window_ids", "positions", "mask_rates")}
        arrays["features"] = arrays["features"].reshape(-1, store.feature_dim)
        faults.write_block(store, str(block_id), arrays, stats={"tokens": int(batch["tokens"][i])})
        written.append(len(arrays["targets"]))
    return {"block_id": np.asarray(batch["block_id"]), "rows": np.array(written, dtype=np.int64), "tokens": np.asarray(batch["tokens"])}
