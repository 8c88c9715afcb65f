"""Decoders MARIA is compared against (throughput and quality), on the same backbones.

- plain KV-cached AR generation (the speed MARIA should keep),
- the MLM decoded left to right (re-running the MLM after each filled token),
- masked-diffusion-style iterative unmasking by the MLM in k steps (most confident first).
All return AR token ids; MLM predictions use W1 mapped into AR ids (tokens the MLM lacks never win).
"""

from __future__ import annotations

import torch
from transformers import DynamicCache

from maria.backbones import Backbones
from maria.decode import Sampling, sample
from maria.features import mlm_states, valid_positions
from maria.transformers_compat import cache_kwargs


@torch.no_grad()
def ar_generate(
    bb: Backbones, prompt: torch.Tensor, new_tokens: int, sampling: Sampling = Sampling(), generator: torch.Generator | None = None
) -> torch.Tensor:
    """KV-cached generation of `new_tokens` after `prompt` (B, n), one token per step: greedy by default,
    else as `sampling` says. The one AR sampling loop (annealing starts from it, benchmarks time it).
    After the start token (an AR with neither BOS nor EOS starts an empty prompt from token 0)."""
    cache = DynamicCache(config=bb.ar.config)
    x = prompt
    if bb.start_id is not None or prompt.shape[1] == 0:
        start = bb.start_id if bb.start_id is not None else 0
        x = torch.cat([torch.full((len(prompt), 1), start, dtype=prompt.dtype, device=prompt.device), prompt], 1)
    out = []
    for _ in range(new_tokens):
        logits = bb.ar(input_ids=x, use_cache=True, logits_to_keep=1, **cache_kwargs(bb.ar, cache)).logits[:, -1]
        x = sample(logits, sampling, generator)[:, None].to(prompt.device)
        out.append(x)
    return torch.cat([prompt] + out, 1)


def _mlm_logits(bb: Backbones, ids, mask, lengths, w1: torch.Tensor, b1: torch.Tensor) -> torch.Tensor:
    h = mlm_states(bb, ids, mask, lengths).float()
    return h @ w1.T.to(h.device) + b1.to(h.device)


def _mapped_w1(bb: Backbones) -> tuple[torch.Tensor, torch.Tensor]:
    e = bb.expert_weights()
    missing = torch.ones(bb.vocab_size, dtype=torch.bool)
    missing[bb.mlm_to_ar[bb.mlm_to_ar >= 0]] = False
    return e["W1"], e["b1"].masked_fill(missing, float("-inf"))


@torch.no_grad()
def mlm_left_to_right(bb: Backbones, ids: torch.Tensor, mask: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
    """Fill masked columns in order, one MLM pass per column (no cache is possible)."""
    lengths = torch.full((ids.shape[0],), ids.shape[1]) if lengths is None else lengths
    mask = (mask & valid_positions(ids, lengths)).clone()
    out, (w1, b1) = ids.clone(), _mapped_w1(bb)
    for col in mask.any(0).nonzero().squeeze(1).tolist():
        # only column `col` is read, so the MLM's states at other columns are wasted work by design
        logits = _mlm_logits(bb, out, mask, lengths, w1, b1)[:, col]
        rows = mask[:, col]
        out[rows, col] = logits.argmax(-1)[rows].to(out.dtype)
        mask[:, col] = False
    return out


@torch.no_grad()
def mlm_iterative_unmasking(bb: Backbones, ids: torch.Tensor, mask: torch.Tensor, steps: int, lengths: torch.Tensor | None = None) -> torch.Tensor:
    """Masked-diffusion-style decoding: `steps` MLM passes, each committing the most confident
    remaining masked positions (an equal share per step)."""
    lengths = torch.full((ids.shape[0],), ids.shape[1]) if lengths is None else lengths
    mask = (mask & valid_positions(ids, lengths)).clone()
    out, (w1, b1) = ids.clone(), _mapped_w1(bb)
    for step in range(steps):
        if not mask.any():
            break
        logits = _mlm_logits(bb, out, mask, lengths, w1, b1)
        conf, pred = logits.log_softmax(-1).max(-1)
        conf = conf.masked_fill(~mask, float("-inf"))
        for r in range(ids.shape[0]):
            left = int(mask[r].sum())
            k = -(-left // (steps - step))  # ceil: the last step commits everything left
            if k:
                cols = conf[r].topk(k).indices
                out[r, cols] = pred[r, cols].to(out.dtype)
                mask[r, cols] = False
    return out


@torch.no_grad()
def hf_generate(bb: Backbones, prompt: torch.Tensor, new_tokens: int) -> torch.Tensor:
    """The same greedy generation through Hugging Face `generate()` (exactly `new_tokens`: EOS is
    suppressed until then), the reference a user would reach for first."""
    x = prompt
    if bb.start_id is not None:
        x = torch.cat([torch.full_like(prompt[:, :1], bb.start_id), prompt], 1)
    pad = bb.ar.config.pad_token_id if bb.ar.config.pad_token_id is not None else 0
    out = bb.ar.generate(
        input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=pad
    )
    return out[:, x.shape[1] - prompt.shape[1] :]
