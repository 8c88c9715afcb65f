"""The aligned-feature function: the one definition of f_i = [h_mlm[i] ; h_ar[i]].

Extraction (extract/) stores these features; decoding (maria/decode.py) computes the same
h_mlm with `mlm_states` and the same h_ar incrementally with a KV cache (tests prove parity).

Windows come as right-padded AR token ids `ids` (B, T) with `lengths` (B,) and a boolean
`mask` (B, T), True = masked. Positions at or past a row's length are ignored.

Where each backbone predicts x[i]: the AR at the state after x[i-1] (the shift by one, always);
the MLM at its position i + bb.mlm_offset: i for a classic MLM, i - 1 for an MNTP MLM, whose
h_mlm[0] is its state at the token it reads before the window (backbones.mntp_prefix).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from maria.backbones import BackboneError, Backbones, projection_input


@dataclass
class AlignedFeatures:
    features: torch.Tensor  # (N, d_mlm + d_ar), one row per masked position
    targets: torch.Tensor  # (N,) AR token id at that position
    rows: torch.Tensor  # (N,) which window of the batch
    positions: torch.Tensor  # (N,) position inside the window


def valid_positions(ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    return torch.arange(ids.shape[1], device=ids.device)[None, :] < lengths.to(ids.device)[:, None]


def mlm_inputs(bb: Backbones, ids: torch.Tensor, mask: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """MLM input ids and attention mask: masked positions become the MLM's mask token, and each
    window is wrapped in the MLM's own special tokens ([CLS] x [SEP])."""
    B, T = ids.shape
    P, S = len(bb.mlm_prefix), len(bb.mlm_suffix)
    dev = ids.device
    x = bb.ar_to_mlm.to(dev)[ids]
    x = torch.where(mask, torch.full_like(x, bb.mlm_mask_id), x)
    out = torch.full((B, P + T + S), bb.mlm_pad_id, dtype=torch.long, device=dev)
    attn = torch.zeros((B, P + T + S), dtype=torch.long, device=dev)
    valid = valid_positions(ids, lengths)
    out[:, P : P + T] = torch.where(valid, x, torch.full_like(x, bb.mlm_pad_id))
    if P:
        out[:, :P] = torch.tensor(bb.mlm_prefix, device=dev)
    cols = torch.arange(P + T + S, device=dev)[None, :]
    attn[cols < (P + lengths.to(dev) + S)[:, None]] = 1
    for s, tok in enumerate(bb.mlm_suffix):
        out[torch.arange(B, device=dev), P + lengths.to(dev) + s] = tok
    return out, attn


@torch.no_grad()
def mlm_states(bb: Backbones, ids: torch.Tensor, mask: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """h_mlm (B, T, d_mlm): h_mlm[i] is the MLM's feature where it predicts x[i], its position
    i + mlm_offset (its special tokens cut off). With nothing read before the window, an MNTP MLM's
    h_mlm[0] is zero (position 0 is then never masked: check_mask)."""
    x, attn = mlm_inputs(bb, ids, mask & valid_positions(ids, lengths), lengths)
    h = projection_input(bb.mlm, input_ids=x, attention_mask=attn)
    first = len(bb.mlm_prefix) + bb.mlm_offset  # where x[0] is predicted
    if first < 0:
        return torch.cat([torch.zeros_like(h[:, :1]), h[:, : ids.shape[1] - 1]], dim=1)
    return h[:, first : first + ids.shape[1]]


def ar_inputs(bb: Backbones, ids: torch.Tensor) -> torch.Tensor:
    """The AR reads the start token then the clean window, minus its last token (teacher forcing)."""
    if bb.start_id is None:
        return ids[:, :-1]
    start = torch.full((ids.shape[0], 1), bb.start_id, dtype=ids.dtype, device=ids.device)
    return torch.cat([start, ids[:, :-1]], dim=1)


@torch.no_grad()
def ar_states(bb: Backbones, ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """h_ar (B, T, d_ar): h_ar[i] is the AR's state after the start token and x[0..i-1], the
    state whose next-token prediction is x[i] ("shift by one"). It does not depend on the mask,
    so K masks of one window share one AR pass. Without a start token h_ar[0] is zero."""
    x = ar_inputs(bb, ids)
    attn = (torch.arange(x.shape[1], device=ids.device)[None, :] < lengths.to(ids.device)[:, None]).long()
    h = projection_input(bb.ar, input_ids=x, attention_mask=attn, use_cache=False)
    if bb.start_id is None:
        h = torch.cat([torch.zeros_like(h[:, :1]), h], dim=1)
    return h


def check_mask(bb: Backbones, mask: torch.Tensor) -> None:
    if bb.first_maskable and bool(mask[:, 0].any()):
        who = "the AR has neither BOS nor EOS" if bb.start_id is None else "the MNTP MLM reads no token before the window"
        raise BackboneError(f"{who}, so position 0 cannot be masked; leave the first token unmasked")


@torch.no_grad()
def aligned_features(bb: Backbones, ids: torch.Tensor, mask: torch.Tensor, lengths: torch.Tensor, h_ar: torch.Tensor | None = None) -> AlignedFeatures:
    """Features [h_mlm ; h_ar] and targets of every masked position of a batch of windows.

    Pass `h_ar` (from `ar_states`) to reuse one AR pass across several masks of the same windows."""
    mask = mask & valid_positions(ids, lengths)
    check_mask(bb, mask)
    h_mlm = mlm_states(bb, ids, mask, lengths)
    if h_ar is None:
        h_ar = ar_states(bb, ids, lengths)
    rows, positions = mask.nonzero(as_tuple=True)
    features = torch.cat([h_mlm[rows, positions].float(), h_ar[rows, positions].float()], dim=1)
    return AlignedFeatures(features, ids[rows, positions], rows, positions)
