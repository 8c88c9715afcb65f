"""The fusion head: one linear layer over [h_mlm ; h_ar] with the AR's vocabulary as output.

This is the only trained part of MARIA. It is defined once here and used by training
(train_head/), evaluation, and decoding (maria/decode.py).
"""
from __future__ import annotations

import torch
from torch import nn


class FusionHead(nn.Module):
    """logits = W3 [h_mlm ; h_ar] + b3, with W3 of shape (vocab_size, d_mlm + d_ar)."""

    def __init__(self, d_mlm: int, d_ar: int, vocab_size: int):
        super().__init__()
        self.d_mlm, self.d_ar, self.vocab_size = d_mlm, d_ar, vocab_size
        self.proj = nn.Linear(d_mlm + d_ar, vocab_size)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.proj(features.to(self.proj.weight.dtype))

    def split(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(W3 over h_mlm, W3 over h_ar, b3) as views (BLAS reads the column slices in place, no copy):
        forward(cat(m, a)) == m @ Wm.T + b3 + a @ Wa.T.
        Decoding uses it to compute the MLM half of every masked column's logits in one GEMM up front,
        so each AR step pays only for a (V x d_ar) product, as plain AR generation does."""
        w = self.proj.weight
        return w[:, : self.d_mlm], w[:, self.d_mlm :], self.proj.bias

    @classmethod
    def from_experts(cls, w1, b1, w2, b2, mlm_scale: float = 0.5, ar_scale: float = 0.5) -> "FusionHead":
        """W3 = [a*W1, b*W2], b3 = a*b1 + b*b2. a = b = 1/2 is the paper's product-of-experts init:
        softmax(W3 f + b3) is then proportional to sqrt(p_mlm * p_ar). Other (a, b) give the
        mixing-scale init (for a weak MLM, e.g. a small a and b near 1 starts from the AR alone).
        W1/b1 must already be mapped into AR ids (rows the MLM lacks are zero)."""
        w1, b1, w2, b2 = (torch.as_tensor(t, dtype=torch.float32) for t in (w1, b1, w2, b2))
        if w1.shape[0] != w2.shape[0]:
            raise ValueError(f"expert vocabularies differ: W1 has {w1.shape[0]} rows, W2 {w2.shape[0]}; map W1 into AR ids first")
        head = cls(w1.shape[1], w2.shape[1], w2.shape[0])
        with torch.no_grad():
            head.proj.weight.copy_(torch.cat([mlm_scale * w1, ar_scale * w2], dim=1))
            head.proj.bias.copy_(mlm_scale * b1 + ar_scale * b2)
        return head

    @classmethod
    def random(cls, d_mlm: int, d_ar: int, vocab_size: int, seed: int = 0) -> "FusionHead":
        """The ablation: PyTorch's default Linear init, seeded."""
        gen_state = torch.random.get_rng_state()
        torch.manual_seed(seed)
        try:
            return cls(d_mlm, d_ar, vocab_size)
        finally:
            torch.random.set_rng_state(gen_state)


def expert_logits(features: torch.Tensor, d_mlm: int, w1, b1, w2, b2) -> tuple[torch.Tensor, torch.Tensor]:
    """The two baselines from the same features: MLM-only (W1 h_mlm + b1) and AR-only (W2 h_ar + b2)."""
    f = features.float()
    return f[:, :d_mlm] @ w1.T + b1, f[:, d_mlm:] @ w2.T + b2
