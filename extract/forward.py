"""The backbone actor's compute: one block's windows and K masks -> its feature rows, in a fixed order.

No Ray and no store here (torch, numpy and the model core only), so the device check (bench/device_check.py)
times exactly this code path on a GPU image that has neither.
"""

from __future__ import annotations

import numpy as np
import torch

from maria.backbones import Backbones
from maria.features import aligned_features, ar_states


def block_features(bb: Backbones, ids, lengths, masks, batch_size: int, device: str):
    """(features float32 (N, D), targets, window, position, k) of every masked position of a block's windows
    `ids` (W, T) with `lengths` (W,) and `masks` (K, W, T), sorted by (window, k, position), so the block's bytes
    do not depend on how windows were bucketed into micro-batches. Windows of similar length share a forward
    (`batch_size` windows each); one AR pass serves all K masks of a window."""
    ids, lengths, masks = np.asarray(ids, dtype=np.int64), np.asarray(lengths, dtype=np.int64), np.asarray(masks, dtype=bool)
    order = np.argsort(-lengths, kind="stable")  # length buckets: similar lengths share a batch
    parts = []
    with torch.no_grad():
        for s in range(0, len(order), batch_size):
            idx = order[s : s + batch_size]
            n_max = int(lengths[idx].max())
            x = torch.from_numpy(ids[idx, :n_max]).to(device)
            n = torch.from_numpy(lengths[idx]).to(device)
            h_ar = ar_states(bb, x, n)
            for k in range(len(masks)):
                af = aligned_features(bb, x, torch.from_numpy(masks[k][idx, :n_max]).to(device), n, h_ar=h_ar)
                rows = idx[af.rows.cpu().numpy()]
                parts.append((af.features.float().cpu().numpy(), af.targets.cpu().numpy(), rows, af.positions.cpu().numpy(), np.full(len(rows), k)))
    if not parts:  # a block whose documents were all too short for a window: an empty block
        return np.zeros((0, bb.d_mlm + bb.d_ar), np.float32), *(np.zeros(0, np.int64) for _ in range(4))
    f, t, r, p, k = (np.concatenate(c) for c in zip(*parts))
    key = np.lexsort((p, k, r))
    return f[key], t[key], r[key], p[key], k[key]
