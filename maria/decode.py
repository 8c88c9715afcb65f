"""KV-cached infilling (METHOD.md, "Decoding"): one MLM pass, then one cached AR pass.

For a batch of windows with different masks, the decoder walks the columns where *any* window
is masked. At such a column each masked window samples from the fusion head on
[h_mlm[i] ; h_ar_last]; windows where it is known keep their token. The filled token plus the
run of columns that are known in every window go into the AR as one chunked forward.
The features the head sees are, teacher-forced, exactly the extracted ones (tests prove it).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import DynamicCache

from maria.backbones import Backbones, projection_input
from maria.features import ar_states, check_mask, mlm_states, valid_positions
from maria.head import FusionHead


@dataclass
class Sampling:
    """How a token is drawn from the head's logits."""

    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # keep the k most likely tokens (0 = all)
    top_p: float = 1.0  # keep the smallest set with this much probability (1 = all)
    seed: int | None = None  # seeds the sampler's own generator

    def __post_init__(self):
        if self.temperature < 0 or self.top_k < 0 or not 0 < self.top_p <= 1:
            raise ValueError("sampling needs temperature >= 0, top_k >= 0 and 0 < top_p <= 1")


def sample(logits: torch.Tensor, s: Sampling, generator: torch.Generator | None) -> torch.Tensor:
    logits = logits.float()
    if s.temperature == 0:
        return logits.argmax(-1)
    logits = logits / s.temperature
    if s.top_k:
        kth = logits.topk(min(s.top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if s.top_p < 1:
        sorted_logits, order = logits.sort(-1, descending=True)
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs > s.top_p  # keep tokens until the mass before them reaches p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    probs = logits.softmax(-1)
    return torch.multinomial(probs.cpu(), 1, generator=generator).squeeze(-1).to(logits.device)


def _ar_last_state(bb: Backbones, ids: torch.Tensor, cache: DynamicCache | None) -> torch.Tensor:
    """Feed `ids` (B, n) to the AR (continuing `cache` if given) and return its last state (B, d_ar)."""
    kw = dict(cache=cache, use_cache=True) if cache is not None else dict(use_cache=False)
    return projection_input(bb.ar, input_ids=ids, logits_to_keep=1, **kw)[:, -1]


@torch.no_grad()
def infill(
    bb: Backbones,
    head: FusionHead,
    ids: torch.Tensor,
    mask: torch.Tensor,
    lengths: torch.Tensor | None = None,
    sampling: Sampling = Sampling(),
    use_cache: bool = True,
    teacher_force: bool = False,
    return_features: bool = False,
):
    """Fill the masked positions of right-padded windows `ids` (B, T) in AR token ids.

    Known tokens appear unchanged in the output. With `teacher_force` the true tokens are fed
    instead of the samples (for the train/serve parity test); `return_features` also returns the
    (N, d_mlm + d_ar) features the head saw, in row-major (window, position) order.
    With use_cache=False the AR re-reads the whole prefix at every masked column (the slow
    reference the cached path is tested against)."""
    dev = bb.device
    ids, mask = ids.to(dev), mask.to(dev)
    B, T = ids.shape
    lengths = torch.full((B,), T, device=dev) if lengths is None else lengths.to(dev)
    mask = mask & valid_positions(ids, lengths)
    check_mask(bb, mask)
    out = ids.clone()
    columns = mask.any(0).nonzero().squeeze(1).tolist()
    seen = torch.zeros(B, T, bb.d_mlm + bb.d_ar, device=dev) if return_features else None
    if not columns:
        return (out, seen[mask]) if return_features else out
    h_mlm = mlm_states(bb, ids, mask, lengths)
    generator = torch.Generator().manual_seed(sampling.seed) if sampling.seed is not None else None
    start = torch.full((B, 1), bb.start_id if bb.start_id is not None else 0, dtype=ids.dtype, device=dev)
    with_start = (lambda x: torch.cat([start, x], 1)) if bb.start_id is not None else (lambda x: x)
    cache = DynamicCache(config=bb.ar.config) if use_cache else None
    fed = 0  # window tokens already in the cache
    h_ar = _ar_last_state(bb, start, cache) if bb.start_id is not None else None
    w_mlm, w_ar, bias = head.split()
    chunk = max(1, (1 << 24) // (B * head.vocab_size))  # columns whose MLM logits are precomputed at once (<= 64 MB fp32)
    for i, col in enumerate(columns):
        if i % chunk == 0 and not teacher_force:  # the MLM half of the logits for the next `chunk` columns: one GEMM, not one GEMV per step
            mlm_logits = F.linear(h_mlm[:, columns[i : i + chunk]].float().to(w_mlm.dtype), w_mlm, bias)
        if cache is None:
            h_ar = _ar_last_state(bb, with_start(out[:, :col]), None)
        elif col > fed:  # the filled token and the run of known tokens after it, in one chunk
            h_ar = _ar_last_state(bb, out[:, fed:col], cache)
            fed = col
        if seen is not None:  # the features the head sees at this column
            seen[:, col] = torch.cat([h_mlm[:, col].float(), h_ar.float()], dim=-1)
        if not teacher_force:
            logits = mlm_logits[:, i % chunk] + F.linear(h_ar.float().to(w_ar.dtype), w_ar)  # == head(features), split
            token = sample(logits, sampling, generator)
            out[:, col] = torch.where(mask[:, col], token.to(out.dtype), out[:, col])
    return (out, seen[mask]) if return_features else out
