"""The fusion head: one linear layer over [h_mlm ; h_ar] with the AR's vocabulary as output.

This is the only trained part of MARIA, defined once here with its initialisations and its file
format, and used by training (train_head/), evaluation, export and decoding (maria/decode.py).

A head folder (what `maria train` writes and `maria export` reads):
    head.safetensors   proj.weight (V, d_mlm + d_ar), proj.bias (V,): the module's state_dict names
    head.json          sizes, backbone identity, how it was trained, and `complete` (the run finished)
head.json is written last, so a folder with it is whole. Only safetensors is loaded: no pickle.
A MARIA checkpoint's root is also a head folder (maria/checkpoint.py): load_head reads its head.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from maria.io import CorruptDataError, atomic_file, atomic_write, file_sha256

INITS = ("poe", "mix", "ar-only", "random")


class HeadError(ValueError):
    """A head folder that cannot be used; the message names the fix."""


class CorruptHeadError(HeadError, CorruptDataError):
    """A head folder whose files are damaged (truncated, garbled): corrupt data, exit code 3."""


class FusionHead(nn.Module):
    """logits = W3 [h_mlm ; h_ar] + b3, with W3 of shape (vocab_size, d_mlm + d_ar)."""

    def __init__(self, d_mlm: int, d_ar: int, vocab_size: int, random_init: bool = True):
        super().__init__()
        self.d_mlm, self.d_ar, self.vocab_size = d_mlm, d_ar, vocab_size
        # skip_init when the weights are about to be overwritten: no wasted work, and the global torch
        # RNG is not consumed (an exact resume depends on it)
        self.proj = nn.Linear(d_mlm + d_ar, vocab_size) if random_init else nn.utils.skip_init(nn.Linear, d_mlm + d_ar, vocab_size)

    @classmethod
    def around(cls, proj: nn.Linear, d_mlm: int) -> "FusionHead":
        """A head over an existing Linear (shared, not copied): the HF model (maria/modeling_maria.py) owns the
        Linear as its own `proj`, so its state_dict names equal head.safetensors' keys."""
        head = cls.__new__(cls)
        nn.Module.__init__(head)
        head.d_mlm, head.d_ar, head.vocab_size = d_mlm, proj.in_features - d_mlm, proj.out_features
        head.proj = proj
        return head

    @classmethod
    def from_weights(cls, weight: torch.Tensor, bias: torch.Tensor, d_mlm: int) -> "FusionHead":
        head = cls(d_mlm, weight.shape[1] - d_mlm, weight.shape[0], random_init=False)
        with torch.no_grad():
            head.proj.weight.copy_(weight), head.proj.bias.copy_(bias)
        return head

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
    def sharing(cls, weight: torch.Tensor, bias: torch.Tensor, d_mlm: int) -> "FusionHead":
        """A head over existing tensors, not a copy (e.g. to save the trainer's best weights: a copy of a
        50k-vocabulary head is hundreds of MB)."""
        proj = nn.utils.skip_init(nn.Linear, weight.shape[1], weight.shape[0], device="meta")
        proj.weight, proj.bias = nn.Parameter(weight, requires_grad=False), nn.Parameter(bias, requires_grad=False)
        return cls.around(proj, d_mlm)

    @classmethod
    def from_experts(cls, w1, b1, w2, b2, mlm_scale: float = 0.5, ar_scale: float = 0.5) -> "FusionHead":
        """W3 = [a*W1, b*W2], b3 = a*b1 + b*b2. a = b = 1/2 is the paper's product-of-experts init:
        softmax(W3 f + b3) is then proportional to sqrt(p_mlm * p_ar). Other (a, b) give the
        mixing-scale init (for a weak MLM, e.g. a small a and b near 1 starts from the AR alone).
        W1/b1 must already be mapped into AR ids (rows the MLM lacks are zero)."""
        w1, b1, w2, b2 = (torch.as_tensor(t, dtype=torch.float32) for t in (w1, b1, w2, b2))
        if w1.shape[0] != w2.shape[0]:
            raise ValueError(f"expert vocabularies differ: W1 has {w1.shape[0]} rows, W2 {w2.shape[0]}; map W1 into AR ids first")
        return cls.from_weights(torch.cat([mlm_scale * w1, ar_scale * w2], dim=1), mlm_scale * b1 + ar_scale * b2, w1.shape[1])

    @classmethod
    def random(cls, d_mlm: int, d_ar: int, vocab_size: int, seed: int = 0) -> "FusionHead":
        """The ablation: PyTorch's default Linear init, seeded without touching the global RNG."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return cls(d_mlm, d_ar, vocab_size)


def init_head(init: str, experts: dict, scales: tuple[float, float] | None = None, seed: int = 0) -> FusionHead:
    """The initial head by name. `experts`: W1, b1 (MLM, in AR ids), W2, b2 (AR).
    poe = the paper's [W1/2, W2/2]; mix = fitted per-expert scales (see train_head/init.py);
    ar-only = [0, W2] (the AR alone); random = the ablation."""
    if init not in INITS:
        raise ValueError(f"unknown head init {init!r}; use one of {', '.join(INITS)}")
    if init == "random":
        return FusionHead.random(experts["W1"].shape[1], experts["W2"].shape[1], experts["W2"].shape[0], seed=seed)
    if init == "mix" and scales is None:
        raise ValueError("the mix init needs its two fitted scales (train_head.init.fit_mix_scales)")
    a, b = {"poe": (0.5, 0.5), "ar-only": (0.0, 1.0)}.get(init, scales)
    return FusionHead.from_experts(experts["W1"], experts["b1"], experts["W2"], experts["b2"], mlm_scale=a, ar_scale=b)


def expert_logits(features: torch.Tensor, d_mlm: int, w1, b1, w2, b2) -> tuple[torch.Tensor, torch.Tensor]:
    """The two baselines from the same features: MLM-only (W1 h_mlm + b1) and AR-only (W2 h_ar + b2)."""
    f = features.float()
    return f[:, :d_mlm] @ w1.T + b1, f[:, d_mlm:] @ w2.T + b2


def save_head(folder: str | Path, head: FusionHead, meta: dict, dtype: torch.dtype = torch.float32) -> Path:
    """Write a head folder: weights first (in `dtype`: training keeps float32, an export may ask for
    less), head.json (with the sizes) last."""
    folder = Path(folder)
    tensors = {k: v.detach().to(dtype).cpu().contiguous() for k, v in head.state_dict().items()}
    with atomic_file(folder / "head.safetensors") as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt"})
        digest = file_sha256(tmp)  # load_head checks it: a flipped byte in a weight is found, not just truncation
    sizes = {"d_mlm": head.d_mlm, "d_ar": head.d_ar, "vocab_size": head.vocab_size}
    atomic_write(folder / "head.json", json.dumps({**meta, **sizes, "sha256": digest}, indent=2))
    return folder


def load_head(folder: str | Path) -> tuple[FusionHead, dict]:
    """A head folder -> (FusionHead, its metadata). Refuses anything incomplete or damaged."""
    d = Path(folder)
    if not (d / "head.safetensors").is_file() or not (d / "head.json").is_file():
        raise HeadError(f"{d} is not a head folder (needs head.safetensors and head.json); pass the --out of `maria train`")
    try:
        meta = json.loads((d / "head.json").read_text())
        if isinstance(meta, dict) and meta.get("sha256") not in (None, file_sha256(d / "head.safetensors")):
            raise CorruptHeadError(f"head {d} is damaged (head.safetensors does not match the sha256 in head.json); re-run `maria train`")
        tensors = load_file(str(d / "head.safetensors"))
        head = FusionHead(int(meta["d_mlm"]), int(meta["d_ar"]), int(meta["vocab_size"]), random_init=False)
        head.load_state_dict(tensors)
    except CorruptHeadError:
        raise
    except (ValueError, KeyError, TypeError, RuntimeError, SafetensorError, OSError) as e:
        raise CorruptHeadError(f"head {d} is damaged ({type(e).__name__}: {str(e).splitlines()[0][:120]}); re-run `maria train`") from None
    return head, meta
