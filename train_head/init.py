"""The `mix` init's two scales, fitted on cached features (the inits themselves: maria/head.py).

"mix" (METHOD.md, lessons): logits = a (W1 h_mlm + b1) + b (W2 h_ar + b2) with (a, b) fitted on
training rows. The NLL of this 2-parameter model is convex in (a, b) (log-sum-exp of functions
linear in (a, b), minus a linear term), so L-BFGS from AR-only (0, 1) reaches its optimum on the
sample in a few iterations: better than any grid, and never worse than PoE or AR-only there.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from maria.head import expert_logits
from maria_train_head.step import decode_features

MIX_LOGIT_BYTES = 2 << 30  # cached expert logits of the fitting sample (both experts, fp32)


def expert_tensors(store) -> dict[str, torch.Tensor]:
    """W1, b1 (MLM, in AR ids), W2, b2 (AR) from the store's init/ arrays: no backbone is loaded."""
    w = store.init_weights()
    return {k: torch.from_numpy(w[k]).float() for k in ("W1", "b1", "W2", "b2")}


@torch.no_grad()
def _expert_logits(features: torch.Tensor, e: dict, d_mlm: int, device: str, chunk: int = 1024):
    l1, l2 = [], []
    w = {k: v.to(device) for k, v in e.items()}
    for s in range(0, len(features), chunk):
        a, b = expert_logits(features[s : s + chunk].to(device).float(), d_mlm, w["W1"], w["b1"], w["W2"], w["b2"])
        l1.append(a), l2.append(b)
    return torch.cat(l1), torch.cat(l2)


def fit_mix_scales(
    store, features: torch.Tensor, targets: torch.Tensor, device: str, seed: int, max_rows: int = 8192, iters: int = 50, scales: torch.Tensor | None = None
) -> tuple[float, float]:
    """(a, b) minimising the mean NLL of a*l_mlm + b*l_ar on up to max_rows training rows (features as
    stored; a float8 store's rows come with their `scales`)."""
    cap = max(256, MIX_LOGIT_BYTES // (8 * store.vocab_size))  # keep both cached logit matrices under 2 GiB
    n = min(len(targets), max_rows, cap)
    idx = torch.randperm(len(targets), generator=torch.Generator().manual_seed(seed))[:n]
    sample = decode_features(features[idx], None if scales is None else scales[idx.to(scales.device)])
    l1, l2 = _expert_logits(sample, expert_tensors(store), store.d_mlm, device)
    t = targets[idx].to(device)
    ab = torch.tensor([0.0, 1.0], device=device, requires_grad=True)  # start from AR-only
    opt = torch.optim.LBFGS([ab], lr=1.0, max_iter=iters, line_search_fn="strong_wolfe", tolerance_grad=1e-9, tolerance_change=1e-12)

    def closure():
        opt.zero_grad()
        total = torch.zeros((), device=device)
        for s in range(0, n, 1024):  # chunked, so the graph never holds more than one chunk of softmax
            loss = F.cross_entropy(ab[0] * l1[s : s + 1024] + ab[1] * l2[s : s + 1024], t[s : s + 1024], reduction="sum") / n
            loss.backward()
            total += loss.detach()
        return total

    opt.step(closure)
    a, b = (float(x) for x in ab.detach().cpu())
    return a, b
