"""Tiny feature stores built from tiny backbones, without Ray: for trainer/evaluator tests.

`make_windows` is deterministic in (backbones, n_windows, seed, window_length), so a test can
rebuild exactly the windows and masks a store was made from and check it against the models.
"""

from __future__ import annotations

import numpy as np
import torch
from tiny import CORPUS

FINISH_COMMAND = "maria extract --corpus tiny.jsonl --store {path}"  # recorded by make_store(plan=True)


def make_windows(bb, n_windows: int, seed: int, window_length: int = 24):
    """(ids (N, T) int64, mask (N, T) bool, lengths (N,), rates (N,)): random slices of the tiny
    corpus, every 4th one shorter than T (right-padded), masks at rates ~ U(0.05, 1)."""
    stream = bb.ar_tokenizer(" ".join(CORPUS), add_special_tokens=False).input_ids
    rng = np.random.default_rng(seed)
    T = window_length
    ids = np.zeros((n_windows, T), np.int64)
    mask = np.zeros((n_windows, T), bool)
    lengths = np.full(n_windows, T, np.int64)
    rates = np.zeros(n_windows, np.float32)
    for i in range(n_windows):
        L = T if i % 4 else int(rng.integers(T // 2, T))
        s = int(rng.integers(0, len(stream) - L))
        ids[i, :L] = stream[s : s + L]
        m = rng.random(L) < rng.uniform(0.05, 1.0)
        m[rng.integers(0, L)] = True  # at least one masked token per window
        mask[i, :L], lengths[i], rates[i] = m, L, m.mean()
    return torch.from_numpy(ids), torch.from_numpy(mask), torch.from_numpy(lengths), torch.from_numpy(rates)


def manifest_of(bb, window_length: int = 24, feature_dtype: str = "float16") -> dict:
    return {
        **bb.identity,
        "d_mlm": bb.d_mlm,
        "d_ar": bb.d_ar,
        "vocab_size": bb.vocab_size,
        "start_token_id": bb.start_id,
        "mlm_offset": bb.mlm_offset,
        "feature_dtype": feature_dtype,
        "masking": {"mode": "token", "rate": "uniform"},
        "seed": 0,
        "corpus_fingerprint": "test",
        "window_length": window_length,
    }


def make_store(
    path,
    bb,
    n_windows: int,
    seed: int,
    window_length: int = 24,
    windows_per_block: int = 16,
    feature_dtype: str = "float16",
    plan: bool = False,
    missing: int = 0,
    finalize: bool = True,
):
    """Write a store of the aligned features of `make_windows(bb, n_windows, seed)`; one block per
    `windows_per_block` windows. Returns the opened FeatureStore. plan=True records a plan as extraction does
    (FINISH_COMMAND) and finalizes (unless finalize=False: every block there, the job never finished);
    `missing` more planned blocks are never written (an incomplete store)."""
    from maria.features import aligned_features
    from maria_storage import create_store

    weights = {k: v.numpy() for k, v in bb.expert_weights().items()}
    weights["vocab_map"] = bb.mlm_to_ar.numpy()
    store = create_store(str(path), manifest_of(bb, window_length, feature_dtype), weights)
    ids, mask, lengths, rates = make_windows(bb, n_windows, seed, window_length)
    for j, s in enumerate(range(0, n_windows, windows_per_block)):
        sl = slice(s, s + windows_per_block)
        af = aligned_features(bb, ids[sl], mask[sl], lengths[sl])
        rows = af.rows.numpy() + s
        store.write_block(
            f"b{j:06d}",
            {
                "features": af.features.numpy(),
                "targets": af.targets.numpy().astype(np.int32),
                "doc_ids": rows.astype(np.int64),
                "window_ids": np.zeros(len(rows), np.int64),
                "positions": af.positions.numpy().astype(np.int32),
                "mask_rates": rates.numpy()[rows],
            },
        )
    if plan:
        written = store.committed_blocks()
        store.write_plan(written + [f"b{len(written) + i:06d}" for i in range(missing)], FINISH_COMMAND.format(path=path))
        if not missing and finalize:
            store.gc_uncommitted()
            store.finalize()
    return store
