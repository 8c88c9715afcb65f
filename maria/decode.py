"""KV-cached infilling (METHOD.md, "Decoding"): one MLM pass, then one cached AR pass.

Ragged batching. Each window advances on its own: one AR step gives every row its own chunk, the
token it just filled plus the run of known tokens after it up to its next masked position, so a
batch takes about max over rows of its masked count steps (walking the union of the masked
columns took about T steps for B independent masks). Chunks are right-padded into one (rows, C)
forward with explicit position ids (a row's own AR positions, which padding must not shift:
RoPE and learned position embeddings both read them) and a 2-D attention mask over every cached
slot, so padded slots never enter attention. The schedule depends on the mask only, so it is
planned up front (`plan`); the loop then runs it without any host round trip per step. Finished
rows leave the cache in bulk and padding slots are squeezed out when they pile up, so attention
and cache copies stay close to plain AR generation's.
The features the head sees are, teacher-forced, exactly the extracted ones (tests prove it).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from transformers import DynamicCache, LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from maria.backbones import Backbones, projection_input
from maria.features import check_mask, mlm_states, valid_positions
from maria.head import FusionHead
from maria.transformers_compat import cache_kwargs, cache_layer_tensors, set_cache_layer_tensors


@dataclass
class Sampling:
    """How a token is drawn from the head's logits."""

    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # keep the k most likely tokens (0 = all)
    top_p: float = 1.0  # keep the smallest set with this much probability (1 = all)
    seed: int | None = None  # seeds the sampler's own generator

    def __post_init__(self):
        finite = math.isfinite(self.temperature) and math.isfinite(self.top_p)  # nan passes every comparison
        if not finite or self.temperature < 0 or self.top_k < 0 or not 0 < self.top_p <= 1:
            raise ValueError(
                f"sampling needs temperature >= 0, top_k >= 0 and 0 < top_p <= 1 (got temperature {self.temperature}, "
                f"top_k {self.top_k}, top_p {self.top_p}); pass values in those ranges"
            )


def sample(logits: torch.Tensor, s: Sampling, generator: torch.Generator | None) -> torch.Tensor:
    """One token per row: argmax at temperature 0, else drawn after transformers' own warpers
    (temperature, then top-k, then top-p: the order generate() applies them)."""
    logits = logits.float()
    if s.temperature == 0:
        return logits.argmax(-1)
    warpers = [TemperatureLogitsWarper(s.temperature)]
    warpers += [TopKLogitsWarper(s.top_k)] if s.top_k else []
    warpers += [TopPLogitsWarper(s.top_p)] if s.top_p < 1 else []
    logits = LogitsProcessorList(warpers)(None, logits)
    probs = logits.softmax(-1)
    return torch.multinomial(probs.cpu(), 1, generator=generator).squeeze(-1).to(logits.device)


def batches_by_masked_count(masked: Sequence[int], batch_size: int, lengths: Sequence[int] | None = None) -> list[list[int]]:
    """Indices of windows in batches of at most `batch_size`, windows with similar masked counts together
    (then similar lengths). A ragged batch takes about as many steps as its most-masked window, so a
    window with 2 masked tokens batched with one of 40 waits 38 steps; sorted, it waits for its peers.
    Results do not depend on the grouping (greedy: batched == alone; tests/test_decode.py)."""
    key = (lambda i: (masked[i], lengths[i], i)) if lengths is not None else (lambda i: (masked[i], i))
    order = sorted(range(len(masked)), key=key)
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


@dataclass
class Step:
    """One AR step of the ragged schedule, over the rows currently in the cache."""

    keep: np.ndarray | None  # before the step: cache rows to keep (finished rows leave in bulk)
    compact: bool  # before the step: squeeze the padding slots out of the cache
    sample: np.ndarray  # cache rows that fill their next masked position with the current state
    start: np.ndarray  # (rows,) AR index (= position id) of each row's chunk
    count: np.ndarray  # (rows,) tokens each row feeds (0: finished)


@dataclass
class Plan:
    rows: np.ndarray  # the window of each cache row at the start (windows with a masked position)
    steps: list[Step]
    event_rows: np.ndarray  # (N,) window of each fill, in the order they happen
    event_pos: np.ndarray  # (N,) its position in the window
    event_offsets: np.ndarray  # (steps + 1,) the fills of step s are events [o[s], o[s+1])


def plan(mask: np.ndarray, offset: int, max_chunk: int | None = None, step_cost: tuple[float, float] | None = None) -> Plan:
    """The ragged schedule of a (B, T) boolean mask (already cut to each window's length).

    `offset` = 1 when the AR reads a start token first (window position p is AR index p + 1).
    A chunk is cut at `max_chunk` tokens (None: never). With `step_cost` = (fixed, per row), a
    step's cost beside the tokens it feeds, in tokens' worth (see `step_cost_tokens`), each step also
    picks the width that minimises the estimated cost of the rest of the run, steps x (fixed + rows x
    (per row + width)): a wide step pads every row to the longest run, a narrow one adds steps for
    the rows whose long known runs it cuts. A cut row feeds the rest of its run in the next steps
    before it fills again.
    Cuts change only the schedule, never the result (the tests decode with several)."""
    B, T = mask.shape
    cap = max_chunk or T + offset
    rows = np.flatnonzero(mask.any(1))
    nxt = np.where(mask, np.arange(T), T)  # nxt[r, j] = first masked position >= j (T if none)
    nxt = np.concatenate([np.minimum.accumulate(nxt[:, ::-1], axis=1)[:, ::-1], np.full((B, 1), T)], 1)
    widths = _steps_left_table(mask) if step_cost is not None and len(rows) > 1 else None
    cur = rows
    fed = nxt[cur, 0] + offset  # AR tokens each row has in the cache: the prefill reads the start token and the known prefix
    steps = [Step(None, False, np.zeros(0, np.int64), np.zeros_like(fed), fed.copy())]
    slots = int(fed.max(initial=0))  # cache slots, padding included
    alive = np.ones(len(cur), bool)
    ev_rows, ev_pos, offsets = [], [], [0, 0]
    while alive.any():
        keep = None
        if 4 * int((~alive).sum()) >= len(cur):  # each drop copies the cache once, so drop a quarter at a time
            keep = np.flatnonzero(alive)
            cur, fed, alive = cur[keep], fed[keep], alive[keep]
        p = fed - offset  # the window position each row reads next
        fills = alive & mask[cur, np.minimum(p, T - 1)]
        end = nxt[cur, np.minimum(p + 1, T)]  # the next masked position after p: the chunk stops there
        done = fills & (end == T)  # its last masked position: fill it and stop (the known tail is never read)
        want = np.where(alive & ~done, end - p, 0)
        step_cap = cap
        if widths is not None and want.any():
            step_cap = min(cap, _cheapest_width(widths, cur, want, end, alive, done, step_cost))
        count = np.minimum(want, step_cap)
        most = int(fed.max())
        # squeeze the padding out once it exceeds ~2 sqrt(cache length): a squeeze copies the cache
        # once, padding costs attention and the cache's append copy at every step; this balances the
        # two (squeezing whenever half the slots were padding was slower on the small preset)
        compact = slots - most > max(8, int(2 * np.sqrt(most)))
        steps.append(Step(keep, compact, np.flatnonzero(fills), fed.copy(), count))
        ev_rows.append(cur[fills]), ev_pos.append(p[fills]), offsets.append(offsets[-1] + int(fills.sum()))
        slots = (most if compact else slots) + int(count.max())
        fed = fed + count
        alive &= ~done
    cat = lambda xs: np.concatenate(xs) if xs else np.zeros(0, np.int64)
    return Plan(rows, steps, cat(ev_rows), cat(ev_pos), np.asarray(offsets))


MAX_WIDTH = 32  # widths the cost rule weighs (a wider step is taken uncut)
TABLE_BYTES = 1 << 26  # the rule's lookup table stays under this (fewer widths weighed for huge batches)


@dataclass
class _Widths:
    ws: np.ndarray  # (W,) candidate widths 1..W
    later: np.ndarray  # (W, B, K + 1): steps row r needs for its gaps from its j-th masked position on, at each width
    rank: np.ndarray  # (B, T + 1): masked positions of row r before position t


def _steps_left_table(mask: np.ndarray) -> _Widths:
    """For each row and candidate width: the steps its remaining gaps (masked position to masked
    position) take when fed at that width, as suffix sums, so a step's estimate is one lookup."""
    B, T = mask.shape
    pos = [np.flatnonzero(m) for m in mask]
    K = max(len(q) for q in pos)
    gaps = np.zeros((B, K), np.int64)
    for r, q in enumerate(pos):
        gaps[r, : max(len(q) - 1, 0)] = np.diff(q)
    ws = np.arange(1, max(2, min(MAX_WIDTH, int(gaps.max()), TABLE_BYTES // (4 * B * (K + 1)))) + 1)
    per_gap = (-(-gaps[None] // ws[:, None, None])).astype(np.int32)  # ceil(gap / w)
    later = np.concatenate([np.cumsum(per_gap[:, :, ::-1], axis=2, dtype=np.int32)[:, :, ::-1], np.zeros((len(ws), B, 1), np.int32)], 2)
    rank = np.concatenate([np.zeros((B, 1), np.int64), np.cumsum(mask, 1)], 1)
    return _Widths(ws, later, rank)


def _cheapest_width(t: _Widths, cur, want, end, alive, done, step_cost: tuple[float, float]) -> int:
    """The width whose estimated cost of the rest of the run is least: the steps the slowest row
    still needs at that width (its current run, its later gaps, its last fill) times a step's cost."""
    j = t.rank[cur, np.minimum(end, t.rank.shape[1] - 1)]  # index of the next masked position among the row's own
    need = -(-want[:, None] // t.ws[None]) + t.later[:, cur, j].T + 1
    need[~alive] = 0
    need[done] = 1
    w_eff = np.minimum(t.ws, want.max())
    cost = need.max(0) * (step_cost[0] + len(cur) * (step_cost[1] + w_eff))
    w = int(t.ws[int(np.argmin(cost))])
    return w if w < t.ws[-1] else int(want.max())


def _compact(cache: DynamicCache, attn: torch.Tensor) -> torch.Tensor:
    """Move each row's valid slots to the front, in order, and cut the cache to the longest row.
    Attention does not care where a slot sits (positions were applied when it was written); only
    the causal rule does, and it still holds: every new token comes after all of them."""
    n = int(attn.sum(1).max())
    order = torch.sort((~attn).to(torch.uint8), dim=1, stable=True).indices[:, :n]  # valid slots first, in order
    for layer in cache.layers:
        keys, values = cache_layer_tensors(layer)
        idx = order[:, None, :, None].expand(-1, keys.shape[1], -1, keys.shape[-1])
        set_cache_layer_tensors(layer, keys.gather(2, idx), values.gather(2, idx))
    return torch.arange(n, device=attn.device)[None, :] < attn.sum(1, keepdim=True)


def _has_sliding_window(bb: Backbones) -> bool:
    """A sliding window counts cache slots, not positions: padding inside the cache would move it."""
    return any(DynamicCache(config=bb.ar.config).is_sliding)


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
    max_chunk: int | None = None,
):
    """Fill the masked positions of right-padded windows `ids` (B, T) in AR token ids.

    Known tokens appear unchanged in the output. With `teacher_force` the true tokens are fed
    instead of the samples (for the train/serve parity test); `return_features` also returns the
    (N, d_mlm + d_ar) features the head saw, in row-major (window, position) order.
    With use_cache=False each window is decoded alone and the AR re-reads the whole prefix at every
    masked position (the slow reference the ragged cached path is tested against).
    `max_chunk` cuts the tokens a row feeds per step (None: automatic, see `step_cost_tokens`)."""
    dev = bb.device
    ids, mask = ids.to(dev), mask.to(dev)
    B, T = ids.shape
    lengths = torch.full((B,), T, device=dev) if lengths is None else lengths.to(dev)
    mask = mask & valid_positions(ids, lengths)
    check_mask(bb, mask)
    seen = torch.zeros(B, T, bb.d_mlm + bb.d_ar, device=dev) if return_features else None
    has_masks = mask.any(1).cpu()
    if not has_masks.any():
        return (ids.clone(), seen[mask]) if return_features else ids.clone()
    if use_cache and int(has_masks.sum()) > 1 and _has_sliding_window(bb):  # no padding when each window decodes alone
        parts = [infill(bb, head, ids[r : r + 1], mask[r : r + 1], lengths[r : r + 1], sampling, True, teacher_force, True, max_chunk) for r in range(B)]
        out = torch.cat([o for o, _ in parts])
        return (out, torch.cat([f for _, f in parts])) if return_features else out
    o = int(bb.start_id is not None)
    ar_ids = torch.cat([torch.full_like(ids[:, :1], bb.start_id), ids], 1) if o else ids.clone()  # what the AR reads; fills land here
    h_mlm = mlm_states(bb, ids, mask, lengths)
    generator = torch.Generator().manual_seed(sampling.seed) if sampling.seed is not None else None
    run = _ragged if use_cache else _uncached
    run(bb, head, ar_ids, mask, h_mlm, o, sampling, generator, teacher_force, seen, max_chunk)
    out = ar_ids[:, o:]
    return (out, seen[mask]) if return_features else out


def _upload(pl: Plan, dev) -> list[dict]:
    """Every step's index arrays in one host-to-device copy, so the loop never waits on the host."""
    arrays = [pl.rows, pl.event_rows, pl.event_pos]
    for st in pl.steps:
        arrays += [st.keep if st.keep is not None else np.zeros(0, np.int64), st.sample, st.start, st.count]
    flat = torch.from_numpy(np.concatenate([np.asarray(a, np.int64).ravel() for a in arrays])).to(dev)
    views, at = [], 0
    for a in arrays:
        views.append(flat[at : at + len(a)])
        at += len(a)
    steps = [dict(zip(("keep", "sample", "start", "count"), views[k : k + 4])) for k in range(3, len(views), 4)]
    return [dict(rows=views[0], event_rows=views[1], event_pos=views[2])] + steps


def _ragged(bb, head, ar_ids, mask, h_mlm, o, sampling, generator, teacher_force, seen, max_chunk) -> None:
    dev = ar_ids.device
    pl = plan(mask.cpu().numpy(), o, max_chunk, step_cost_tokens(dev) if max_chunk is None else None)
    first, *on_dev = _upload(pl, dev)
    ev_rows, ev_pos = first["event_rows"], first["event_pos"]
    w_mlm, w_ar, bias = head.split()
    budget = max(1, (1 << 24) // head.vocab_size)  # fills whose MLM half of the logits is computed at once (<= 64 MB fp32)
    blk, blk_lo, blk_hi = None, 0, 0
    cache = DynamicCache(config=bb.ar.config)
    cur = first["rows"]  # window of each cache row
    attn = torch.zeros(len(pl.rows), 0, dtype=torch.bool, device=dev)  # which cache slots hold a token (not padding)
    h = None  # (rows, d_ar): each row's AR state after its last fed token
    padded = len(pl.rows) > 1  # one row is never padded: no mask to build at each step (causal attention as is)
    for s, (st, d) in enumerate(zip(pl.steps, on_dev)):
        if st.keep is not None:
            cache.batch_select_indices(d["keep"])
            cur, attn, h = cur[d["keep"]], attn[d["keep"]], h[d["keep"]]
        if st.compact:
            attn = _compact(cache, attn)
        lo, hi = int(pl.event_offsets[s]), int(pl.event_offsets[s + 1])
        if hi > lo:
            r, p, h_fill = ev_rows[lo:hi], ev_pos[lo:hi], h[d["sample"]]
            if seen is not None:  # the features the head sees for these fills
                seen[r, p] = torch.cat([h_mlm[r, p].float(), h_fill.float()], dim=-1)
            if not teacher_force:
                if hi > blk_hi:  # the MLM half of the logits for many fills in one GEMM, not one GEMV per step
                    blk_lo, blk_hi = lo, min(len(ev_rows), max(hi, lo + budget))
                    blk = F.linear(h_mlm[ev_rows[blk_lo:blk_hi], ev_pos[blk_lo:blk_hi]].float().to(w_mlm.dtype), w_mlm, bias)
                logits = blk[lo - blk_lo : hi - blk_lo] + F.linear(h_fill.float().to(w_ar.dtype), w_ar)  # == head(features), split
                ar_ids[r, p + o] = sample(logits, sampling, generator).to(ar_ids.dtype)
        n = int(st.count.max(initial=0))
        if n == 0:
            continue
        j = torch.arange(n, device=dev)[None, :]
        last = (d["count"] - 1).clamp(min=0)
        index = d["start"][:, None] + torch.minimum(j, last[:, None])  # AR index = position id; padding repeats the row's last token
        attn = torch.cat([attn, j < d["count"][:, None]], 1)
        hidden = projection_input(
            bb.ar,
            input_ids=ar_ids[cur[:, None], index],
            attention_mask=attn if padded else None,
            position_ids=index,
            use_cache=True,
            **cache_kwargs(bb.ar, cache),
        )
        h = hidden[torch.arange(len(last), device=dev), last]


def _uncached(bb, head, ar_ids, mask, h_mlm, o, sampling, generator, teacher_force, seen, max_chunk) -> None:
    """The reference: window by window, position by position, the full prefix each time, the unsplit head."""
    for r, p in mask.nonzero().tolist():
        h = projection_input(bb.ar, input_ids=ar_ids[r : r + 1, : p + o], use_cache=False)[0, -1]
        f = torch.cat([h_mlm[r, p].float(), h.float()])
        if seen is not None:
            seen[r, p] = f
        if not teacher_force:
            ar_ids[r, p + o] = sample(head(f[None]), sampling, generator)[0].to(ar_ids.dtype)


def step_cost_tokens(device: torch.device | str) -> tuple[float, float] | None:
    """A step's cost beside the tokens it feeds, (fixed, per row) in tokens' worth, for the width
    rule of `plan` (None: never cut). On a GPU a step costs about the same for 1 or 100 tokens a
    row: the fewest steps win. On a CPU (small preset, cache of 100, 2 cores) a step of R rows x w
    tokens took 7.8/9.9/13.9 ms (R = 1; w = 1, 2, 8), 13.2/19.0/27.4 (R = 8), 28.6/34.3/80.8 (R = 32):
    about 0.24 ms a token fed plus 7 ms + 0.45 ms a row, i.e. 30 + 2 R tokens' worth."""
    return None if str(device).startswith("cuda") else CPU_STEP_COST


CPU_STEP_COST = (30.0, 2.0)
