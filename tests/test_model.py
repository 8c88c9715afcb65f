"""The model module: parity with the reference Hugging Face models, alignment, decoding, export."""

import json

import pytest
import torch
from transformers import Gemma2Config, Gemma2ForCausalLM

from maria.backbones import BackboneError, check_logit_parity, load_backbones
from maria.checkpoint import CheckpointError
from maria.decode import Sampling, infill
from maria.features import aligned_features, mlm_states
from maria.head import FusionHead, save_head
from maria.identity import IdentityMismatchError
from maria.modeling_maria import MariaModel, export
from maria.text import parse_masked_text

KINDS = ["modernbert-olmo", "bert-gpt2"]


@pytest.fixture(scope="module")
def backbones(pairs):
    return {k: load_backbones(*pairs[k]) for k in KINDS}


@pytest.fixture(scope="module")
def mntp(pairs):
    """The same MLMs read as masked next-token predictors: x[i] predicted at position i - 1."""
    return {k: load_backbones(*pairs[k], mlm_offset=-1) for k in KINDS}


def batch(bb, seed=0, B=3, T=20):
    """Windows of real text, different lengths and different masks (position 0 masked too)."""
    g = torch.Generator().manual_seed(seed)
    text = "Paris is the capital of France. Berlin is the capital of Germany. A cat sat on the mat by the door."
    full = bb.ar_tokenizer(text, add_special_tokens=False).input_ids
    ids = torch.tensor([full[r : r + T] for r in range(B)])
    lengths = torch.tensor([T, T - 4, T - 7])[:B]
    mask = torch.rand(B, T, generator=g) < 0.5
    mask[0, 0] = True
    return ids, mask, lengths


@pytest.mark.parametrize("kind", KINDS)
def test_logit_parity_both_backbones(backbones, kind):
    bb = backbones[kind]
    ids, _, _ = batch(bb)
    assert check_logit_parity(bb.ar, ids, "AR") < 1e-4
    assert check_logit_parity(bb.mlm, bb.ar_to_mlm[ids], "MLM") < 1e-4


def test_logit_softcapping_is_refused():
    cfg = Gemma2Config(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=8,
        final_logit_softcapping=0.1,
    )
    model = Gemma2ForCausalLM(cfg).eval()
    with pytest.raises(BackboneError, match="changes its logits after the output projection"):
        check_logit_parity(model, torch.arange(10)[None], "AR")


@pytest.mark.parametrize("offset", [0, -1])
@pytest.mark.parametrize("kind", KINDS)
def test_features_match_hand_computation(backbones, mntp, kind, offset):
    bb = backbones[kind] if offset == 0 else mntp[kind]
    ids, mask, lengths = batch(bb)
    if offset:  # the MLM reads one token before x: its [CLS], or (no leading special token) the AR's start token
        assert bb.mlm_prefix == ([bb.mlm_tokenizer.cls_token_id] if kind == "modernbert-olmo" else [int(bb.ar_to_mlm[bb.start_id])])
    f = aligned_features(bb, ids, mask, lengths)
    assert f.features.shape[1] == bb.d_mlm + bb.d_ar
    assert torch.equal(f.targets, ids[f.rows, f.positions])
    for r in range(ids.shape[0]):
        n = int(lengths[r])
        x, m = ids[r, :n], mask[r, :n]
        mlm_in = torch.where(m, bb.mlm_mask_id, bb.ar_to_mlm[x])
        mlm_in = torch.tensor(bb.mlm_prefix + mlm_in.tolist() + bb.mlm_suffix)[None]
        if kind == "modernbert-olmo":
            h_mlm = bb.mlm.head(bb.mlm.model(mlm_in).last_hidden_state)
            h_ar = bb.ar.model(torch.tensor([[bb.start_id] + x[:-1].tolist()])).last_hidden_state
        else:
            h_mlm = bb.mlm.cls.predictions.transform(bb.mlm.bert(mlm_in).last_hidden_state)
            h_ar = bb.ar.transformer(torch.tensor([[bb.start_id] + x[:-1].tolist()])).last_hidden_state
        first = len(bb.mlm_prefix) + offset  # where the MLM predicts x[0]
        h_mlm = h_mlm[0, first : first + n]
        want = torch.cat([h_mlm, h_ar[0]], 1)[m]
        got = f.features[f.rows == r]
        assert torch.equal(f.positions[f.rows == r], m.nonzero().squeeze(1))
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_mlm_offset_from_config_and_refused_values(pairs, tmp_path):
    """An MLM folder whose config says prediction_offset -1 loads as MNTP; other values are refused in one line."""
    import shutil

    mlm, ar = pairs["bert-gpt2"]
    folder = tmp_path / "mntp-mlm"
    shutil.copytree(mlm, folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "prediction_offset": -1}))
    bb = load_backbones(str(folder), ar)
    assert bb.mlm_offset == -1 and bb.describe()["mlm_offset"] == -1
    assert load_backbones(str(folder), ar, mlm_offset=0).mlm_offset == 0  # the caller's word wins
    (folder / "config.json").write_text(json.dumps({**config, "prediction_offset": 1}))
    with pytest.raises(BackboneError, match="prediction_offset is 1; an MLM predicts x\\[i\\] at i"):
        load_backbones(str(folder), ar)
    with pytest.raises(BackboneError, match="--mlm-offset is 2"):
        load_backbones(mlm, ar, mlm_offset=2)


def test_mntp_without_any_token_before_the_window(mntp):
    """The rule for an MNTP MLM that reads nothing before x[0] (no leading special token, no AR start
    token): h_mlm[0] is zero and position 0 is never masked, as for an AR without a start token."""
    import dataclasses

    bb = dataclasses.replace(mntp["bert-gpt2"], start_id=None, mlm_prefix=[])
    assert bb.first_maskable == 1
    ids, mask, lengths = batch(bb)
    with pytest.raises(BackboneError, match="MNTP MLM reads no token before the window"):
        aligned_features(dataclasses.replace(bb, start_id=mntp["bert-gpt2"].start_id), ids, mask, lengths)
    h = mlm_states(bb, ids, mask, lengths)
    assert torch.equal(h[:, 0], torch.zeros_like(h[:, 0]))
    full = mlm_states(dataclasses.replace(bb, mlm_offset=0), ids, mask, lengths)  # the same MLM pass, unshifted
    torch.testing.assert_close(h[:, 1:], full[:, :-1])


def test_head_of_other_offset_is_refused(mntp, backbones, tmp_path):
    """Features of one MLM read at another offset are other features: a head trained on them is refused."""
    bb = backbones["bert-gpt2"]
    head_dir = tmp_path / "head"
    save_head(head_dir, FusionHead.random(bb.d_mlm, bb.d_ar, bb.vocab_size), {**bb.describe(), "complete": True})
    with pytest.raises(IdentityMismatchError, match="mlm_offset: 0 vs -1"):
        MariaModel.from_backbones(
            mntp["bert-gpt2"].mlm, mntp["bert-gpt2"].ar, head_dir=str(head_dir), mlm_offset=-1, mlm_tokenizer=bb.mlm_tokenizer, ar_tokenizer=bb.ar_tokenizer
        )


@pytest.mark.parametrize("kind", KINDS)
def test_poe_init_is_mean_of_expert_logits(backbones, kind):
    bb = backbones[kind]
    ids, mask, lengths = batch(bb)
    e = bb.expert_weights()
    head = FusionHead.from_experts(e["W1"], e["b1"], e["W2"], e["b2"])
    f = aligned_features(bb, ids, mask, lengths)
    logits = head(f.features)
    # reference logits from the models' own forward passes, for window 0 (full length)
    x_mlm = torch.where(mask[0], bb.mlm_mask_id, bb.ar_to_mlm[ids[0]])
    mlm_in = torch.tensor(bb.mlm_prefix + x_mlm.tolist() + bb.mlm_suffix)[None]
    P = len(bb.mlm_prefix)
    mlm_logits = bb.mlm(input_ids=mlm_in).logits[0, P:]
    ar_logits = bb.ar(input_ids=torch.cat([torch.tensor([[bb.start_id]]), ids[:1, :-1]], 1)).logits[0]
    valid = (bb.mlm_to_ar >= 0).nonzero().squeeze(1)
    for k in (f.rows == 0).nonzero().squeeze(1).tolist():
        p = int(f.positions[k])
        mapped = torch.zeros(bb.vocab_size)
        mapped[bb.mlm_to_ar[valid]] = mlm_logits[p, valid]
        torch.testing.assert_close(logits[k], (mapped + ar_logits[p]) / 2, atol=1e-4, rtol=1e-4)
    # decoding computes the same logits in two halves (the MLM half up front): same numbers
    w_mlm, w_ar, b = head.split()
    halves = f.features[:, : bb.d_mlm] @ w_mlm.T + b + f.features[:, bb.d_mlm :] @ w_ar.T
    torch.testing.assert_close(halves, logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_teacher_forced_decoding_sees_extracted_features(backbones, kind):
    bb = backbones[kind]
    ids, mask, lengths = batch(bb, seed=1)
    head = FusionHead.random(bb.d_mlm, bb.d_ar, bb.vocab_size)
    extracted = aligned_features(bb, ids, mask, lengths)
    out, seen = infill(bb, head, ids, mask, lengths, teacher_force=True, return_features=True)
    assert torch.equal(out, ids)
    torch.testing.assert_close(seen, extracted.features, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_cached_equals_uncached_and_known_tokens_kept(backbones, kind):
    bb = backbones[kind]
    ids, mask, lengths = batch(bb, seed=2)
    e = bb.expert_weights()
    head = FusionHead.from_experts(e["W1"], e["b1"], e["W2"], e["b2"])
    cached, f1 = infill(bb, head, ids, mask, lengths, return_features=True)
    uncached, f2 = infill(bb, head, ids, mask, lengths, use_cache=False, return_features=True)
    assert torch.equal(cached, uncached)
    torch.testing.assert_close(f1, f2, atol=1e-5, rtol=1e-5)
    keep = ~mask
    assert torch.equal(cached[keep], ids[keep])
    assert (cached[mask] != ids[mask]).any()  # random backbones do not guess the text


def test_sampling_is_seeded_and_topk1_is_greedy(backbones):
    bb = backbones["modernbert-olmo"]
    ids, mask, lengths = batch(bb, seed=3)
    head = FusionHead.random(bb.d_mlm, bb.d_ar, bb.vocab_size)
    greedy = infill(bb, head, ids, mask, lengths)
    s = dict(temperature=1.0, top_p=0.9, seed=7)
    a = infill(bb, head, ids, mask, lengths, sampling=Sampling(**s))
    b = infill(bb, head, ids, mask, lengths, sampling=Sampling(**s))
    c = infill(bb, head, ids, mask, lengths, sampling=Sampling(temperature=1.0, seed=8))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(infill(bb, head, ids, mask, lengths, sampling=Sampling(temperature=1.0, top_k=1, seed=1)), greedy)


def test_masked_text_syntax(backbones):
    tok = backbones["modernbert-olmo"].ar_tokenizer
    ids, mask = parse_masked_text("Paris is the {{2}} of France{{}}", tok)
    assert sum(mask) == 3 and len(ids) == len(mask)
    with pytest.raises(ValueError, match="bad mask syntax"):
        parse_masked_text("Paris is the {{two}} of France", tok)


@pytest.mark.parametrize("kind", KINDS)
def test_export_load_infill_identical(pairs, tmp_path, kind):
    model = MariaModel.from_backbones(*pairs[kind], init="poe")
    model.head.proj.bias.data += torch.randn_like(model.head.proj.bias) * 0.1  # a head that is not the init
    head_dir = save_head(tmp_path / "head", model.head, {**model.bb.describe(), "complete": True})
    out = export(*pairs[kind], str(head_dir), str(tmp_path / "ckpt"))
    assert not list(tmp_path.glob(".ckpt*"))  # built beside, swapped in, nothing left over
    assert not list(out.rglob("*.bin")) and not list(out.rglob("*.pt"))
    loaded = MariaModel.from_pretrained(out)
    texts = ["Paris is the {{3}} of France.", "A {{2}} sat on the {{}} by the door."]
    for s in (dict(), dict(temperature=0.8, top_k=20, seed=3)):
        assert model.infill_text(texts, **s) == loaded.infill_text(texts, **s)
    # --reference names hub backbones only (tests/test_checkpoint.py); local folders are copied all the same
    ref = MariaModel.from_pretrained(export(*pairs[kind], str(head_dir), str(tmp_path / "ref"), reference=True))
    assert ref.infill_text(texts) == model.infill_text(texts)
    assert json.loads((tmp_path / "ref" / "config.json").read_text())["mlm"]["path"] == "mlm"
    (out / "head.safetensors").unlink()
    with pytest.raises(CheckpointError, match="missing head.safetensors"):
        MariaModel.from_pretrained(out)


def test_clear_errors(pairs, tmp_path):
    from tiny import build_pair

    bad_mlm, ar = build_pair(tmp_path, "modernbert-olmo", mismatched=True)
    with pytest.raises(BackboneError, match="tokenizers disagree at token 0"):
        load_backbones(bad_mlm, ar)
    mlm, ar = pairs["modernbert-olmo"]
    with pytest.raises(BackboneError, match="does not exist"):
        load_backbones(str(tmp_path / "nope"), ar)
    with pytest.raises(BackboneError, match="cannot load MLM 'no-such-org/no-such-model'"):
        load_backbones("no-such-org/no-such-model", ar)
    with pytest.raises(BackboneError, match="swap --mlm and --ar"):
        load_backbones(ar, mlm)
    other_mlm, other_ar = pairs["bert-gpt2"]
    model = MariaModel.from_backbones(other_mlm, other_ar)
    head_dir = save_head(tmp_path / "head", model.head, {**model.bb.describe(), "complete": True})
    with pytest.raises(IdentityMismatchError, match="made by other backbones"):
        export(mlm, ar, str(head_dir), str(tmp_path / "ckpt"))
    assert not (tmp_path / "ckpt").exists()


def test_one_window_limit_for_extraction_and_decoding(backbones):
    """The longest window extraction accepts is the longest the decoder and the text interface accept."""
    from maria.limits import check_fits
    from maria_extract.stages import check_window_fits

    for bb in backbones.values():
        limit = bb.max_window()
        check_window_fits(bb, limit)
        check_fits(bb, 1, limit)
        with pytest.raises(ValueError, match=f"limit of {limit}"):
            check_window_fits(bb, limit + 1)
        with pytest.raises(ValueError, match=f"limit of {limit}"):
            check_fits(bb, 1, limit + 1)
