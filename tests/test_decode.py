"""Ragged batched decoding (maria/decode.py): parity with decoding each window alone, with the
extracted features (train/serve parity), with the uncached reference; seeded sampling; the plan."""

import dataclasses

import numpy as np
import pytest
import torch
from transformers import MistralConfig, MistralForCausalLM

from maria.backbones import load_backbones
from maria.decode import Sampling, infill, plan, step_cost_tokens
from maria.features import aligned_features
from maria.head import FusionHead

KINDS = ["modernbert-olmo", "bert-gpt2"]  # OLMo-style AR with RoPE; GPT-2 with learned positions
# where the MLM predicts x[i]: 0 (classic MLM) or -1 (MNTP; the ModernBERT reads [CLS] before x, the BERT, which
# has no leading special token, the AR's start token)
OFFSETS = [0, -1]
T = 72


@pytest.fixture(scope="module")
def backbones(pairs):
    return {(k, o): load_backbones(*pairs[k], mlm_offset=o) for k in KINDS for o in OFFSETS}


def windows(bb, start_token: bool = True):
    """Right-padded windows whose masks differ as much as they can: all masked, only the last token,
    one known run of 40 then a fill, alternating, spans, random, none; lengths 72 down to 9."""
    text = "Paris is the capital of France. Berlin is the capital of Germany. A cat sat on the mat by the door. " * 6
    full = bb.ar_tokenizer(text, add_special_tokens=False).input_ids
    B = 7
    ids = torch.tensor([full[3 * r : 3 * r + T] for r in range(B)])
    lengths = torch.tensor([T, T, 50, 9, 60, T, 30])
    mask = torch.zeros(B, T, dtype=torch.bool)
    mask[0] = True
    mask[1, T - 1] = True
    mask[2, [0, 41, 49]] = True
    mask[3, ::2] = True
    for a, b in ((3, 6), (10, 15), (18, 19), (40, 55)):
        mask[4, a:b] = True
    mask[5] = torch.rand(T, generator=torch.Generator().manual_seed(0)) < 0.5
    if not start_token:  # position 0 must then be known
        mask[:, 0] = False
    return ids, mask, lengths


@pytest.fixture(scope="module")
def alone(backbones):
    """Each window decoded alone with the PoE head (greedy): outputs and features, once per kind."""

    def run(kind):
        if kind not in cache:
            bb = backbones[kind]
            ids, mask, lengths = windows(bb)
            parts = [infill(bb, poe(bb), ids[r : r + 1], mask[r : r + 1], lengths[r : r + 1], return_features=True) for r in range(len(ids))]
            cache[kind] = torch.cat([o for o, _ in parts]), torch.cat([f for _, f in parts])
        return cache[kind]

    cache = {}
    return run


def poe(bb):
    e = bb.expert_weights()
    return FusionHead.from_experts(e["W1"], e["b1"], e["W2"], e["b2"])


def no_start(bb):
    """The same AR read without a start token (an AR with neither BOS nor EOS): position ids start at 0.
    An MNTP MLM without a leading special token then reads nothing before x either (its h_mlm[0] is zero)."""
    prefix = bb.mlm_prefix if bb.mlm_offset == 0 or bb.mlm_tokenizer.cls_token_id is not None else []
    return dataclasses.replace(bb, start_id=None, mlm_prefix=prefix)


def test_plan_takes_max_masked_count_steps():
    rng = np.random.default_rng(0)
    mask = rng.random((32, 256)) < 0.5
    mask[3, 100:] = False  # a row that finishes early and leaves the cache
    counts = mask.sum(1)
    p = plan(mask, offset=1)
    assert len(p.steps) == 1 + counts.max()  # the prefill, then one fill per row per step
    assert len(np.flatnonzero(mask.any(0))) == 256  # the union of columns the old decoder walked
    padded = lambda p: sum(len(s.count) * int(s.count.max(initial=0)) for s in p.steps[1:])  # slots fed, padding included
    for cap, step_cost in ((None, None), (1, None), (2, None), (None, (30.0, 2.0)), (None, (1e9, 0.0)), (3, (10.0, 0.0))):
        q = plan(mask, offset=1, max_chunk=cap, step_cost=step_cost)
        for r in range(32):  # every masked position is filled exactly once, left to right
            assert q.event_pos[q.event_rows == r].tolist() == np.flatnonzero(mask[r]).tolist()
        # each row feeds its start token and its window up to its last masked position, once
        assert sum(int(s.count.sum()) for s in q.steps) == sum(int(np.flatnonzero(m).max()) + 1 for m in mask)
        if cap:
            assert max(int(s.count.max(initial=0)) for s in q.steps[1:]) <= cap
        if step_cost == (30.0, 2.0):  # the cost rule trades a few steps for much less padding
            assert padded(q) < 0.7 * padded(p) and len(q.steps) < 1.3 * len(p.steps)
        if step_cost == (1e9, 0.0):  # steps cost everything: the fewest steps, as uncut
            assert len(q.steps) == len(p.steps)
    assert any(s.keep is not None for s in p.steps)


@pytest.mark.parametrize("max_chunk", [None, 1, 3, 1000])  # None: the CPU's cost rule cuts; 1000: never cut
@pytest.mark.parametrize("offset", OFFSETS)
@pytest.mark.parametrize("kind", KINDS)
def test_batched_equals_each_window_alone(backbones, alone, kind, offset, max_chunk):
    kind = (kind, offset)
    bb = backbones[kind]
    ids, mask, lengths = windows(bb)
    steps = plan((mask & (torch.arange(T) < lengths[:, None])).numpy(), 1, max_chunk, step_cost_tokens("cpu") if max_chunk is None else None).steps
    if max_chunk in (None, 1000):  # this batch exercises dropping finished rows and squeezing out padding
        assert any(s.compact for s in steps) and any(s.keep is not None for s in steps)
    head = poe(bb)
    out, feats = infill(bb, head, ids, mask, lengths, return_features=True, max_chunk=max_chunk)
    out_alone, feats_alone = alone(kind)
    assert torch.equal(out, out_alone)
    torch.testing.assert_close(feats, feats_alone, atol=1e-5, rtol=1e-5)
    assert torch.equal(out[~mask], ids[~mask])
    assert (out[mask] != ids[mask]).any()


@pytest.mark.parametrize("start_token", [True, False])
@pytest.mark.parametrize("offset", OFFSETS)
@pytest.mark.parametrize("kind", KINDS)
def test_teacher_forced_features_equal_extracted(backbones, kind, offset, start_token):
    bb = backbones[kind, offset] if start_token else no_start(backbones[kind, offset])
    ids, mask, lengths = windows(bb, start_token)
    extracted = aligned_features(bb, ids, mask, lengths)
    head = FusionHead.random(bb.d_mlm, bb.d_ar, bb.vocab_size)
    for max_chunk in (None, 2):
        out, seen = infill(bb, head, ids, mask, lengths, teacher_force=True, return_features=True, max_chunk=max_chunk)
        assert torch.equal(out, ids)
        torch.testing.assert_close(seen, extracted.features, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("offset", OFFSETS)
@pytest.mark.parametrize("kind", KINDS)
def test_cached_equals_uncached(backbones, kind, offset):
    bb = backbones[kind, offset]
    ids, mask, lengths = windows(bb)
    head = poe(bb)
    cached, f1 = infill(bb, head, ids, mask, lengths, return_features=True)
    uncached, f2 = infill(bb, head, ids, mask, lengths, use_cache=False, return_features=True)
    assert torch.equal(cached, uncached)
    torch.testing.assert_close(f1, f2, atol=1e-5, rtol=1e-5)


def test_seeded_sampling_is_reproducible(backbones):
    bb = backbones["bert-gpt2", 0]
    ids, mask, lengths = windows(bb)
    head = poe(bb)
    s = dict(temperature=1.0, top_k=50, top_p=0.95)
    a, b = (infill(bb, head, ids, mask, lengths, sampling=Sampling(**s, seed=7)) for _ in range(2))
    c = infill(bb, head, ids, mask, lengths, sampling=Sampling(**s, seed=8))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(a[~mask], ids[~mask])
    top1 = infill(bb, head, ids, mask, lengths, sampling=Sampling(temperature=1.0, top_k=1, seed=1))
    assert torch.equal(top1, infill(bb, head, ids, mask, lengths))


def test_sliding_window_ar_decodes_each_window_alone(backbones):
    """Padding inside the cache would move a sliding window (it counts slots): such ARs decode
    window by window, and still see the extracted features."""
    bb = backbones["modernbert-olmo", -1]
    torch.manual_seed(0)
    ar = MistralForCausalLM(
        MistralConfig(
            vocab_size=bb.vocab_size,
            hidden_size=bb.d_ar,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            sliding_window=8,
            max_position_embeddings=512,
        )
    ).eval()
    bb = dataclasses.replace(bb, ar=ar)
    ids, mask, lengths = windows(bb)
    head = FusionHead.random(bb.d_mlm, bb.d_ar, bb.vocab_size)
    _, seen = infill(bb, head, ids, mask, lengths, teacher_force=True, return_features=True)
    torch.testing.assert_close(seen, aligned_features(bb, ids, mask, lengths).features, atol=1e-5, rtol=1e-5)
    out = infill(bb, head, ids, mask, lengths)
    assert torch.equal(out, torch.cat([infill(bb, head, ids[r : r + 1], mask[r : r + 1], lengths[r : r + 1]) for r in range(len(ids))]))


def _on_cuda(pairs, kind, dtype):
    bb = load_backbones(*pairs[kind], dtype=dtype, device="cuda")
    return bb, poe(bb).to(device="cuda", dtype=dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("kind", KINDS)
def test_gpu_batched_equals_alone_fp32(pairs, kind):
    bb, head = _on_cuda(pairs, kind, torch.float32)
    ids, mask, lengths = windows(bb)
    out, feats = infill(bb, head, ids, mask, lengths, return_features=True)
    alone = [infill(bb, head, ids[r : r + 1], mask[r : r + 1], lengths[r : r + 1], return_features=True) for r in range(len(ids))]
    assert torch.equal(out, torch.cat([o for o, _ in alone]))
    torch.testing.assert_close(feats, torch.cat([f for _, f in alone]), atol=1e-4, rtol=1e-4)
    ext = aligned_features(bb, ids.cuda(), mask.cuda(), lengths.cuda()).features
    _, seen = infill(bb, head, ids, mask, lengths, teacher_force=True, return_features=True)
    torch.testing.assert_close(seen, ext, atol=1e-4, rtol=1e-4)


@pytest.mark.gpu
@pytest.mark.parametrize("kind", KINDS)
def test_gpu_teacher_forced_features_bf16(pairs, kind):
    """In bf16 the cached and the full forward round differently: the features agree to bf16 precision."""
    bb, head = _on_cuda(pairs, kind, torch.bfloat16)
    ids, mask, lengths = windows(bb)
    ext = aligned_features(bb, ids.cuda(), mask.cuda(), lengths.cuda()).features
    out, seen = infill(bb, head, ids, mask, lengths, teacher_force=True, return_features=True)
    assert torch.equal(out.cpu(), ids)
    assert ((seen - ext).norm() / ext.norm()).item() < 2e-2
    greedy = infill(bb, head, ids, mask, lengths)
    assert torch.equal(greedy.cpu()[~mask], ids[~mask])


def test_bench_decode_reports_medians_and_spread(tmp_path):
    from maria_bench.decode import bench_decode
    from maria_bench.setup import BenchConfig

    cfg = BenchConfig(
        what="decode", preset="tiny", json=str(tmp_path / "d.json"), lengths=[16], batch_sizes=[1, 3], repeats=2, unmask_steps=2, mlm_ar_columns=1, device="cpu"
    )
    r = bench_decode(cfg)
    assert [(x["batch_size"], x["length"]) for x in r["results"]] == [(1, 16), (3, 16)]
    for x in r["results"]:
        for k in ("maria_tok_s", "ar_generate_tok_s", "hf_generate_tok_s", "mlm_left_to_right_tok_s", "maria_over_ar_generate"):
            assert x[k]["runs"] == 2 and x[k]["min"] <= x[k]["median"] <= x[k]["max"]
        assert x["maria_ar_steps"] == 1 + x["max_masked_per_window"] or x["batch_size"] > 1
    assert isinstance(r["targets"]["goal_met"], bool) and (tmp_path / "d.png").is_file()
