"""bfloat16 end to end on the CPU, against the same pipeline in float32 (the tiny modernbert-olmo pair):
embedded Ray extraction with `--dtype bfloat16 --feature-dtype bfloat16` -> train -> eval -> `export --dtype
bfloat16` -> load -> infill -> generate.

The stated tolerances (README "Precision"), each measured on this pair and given several times room:
- features: the bf16 store's rows are the float32 store's rows (same ids, targets, positions, order), their
  features within a relative error (Frobenius norm, per block) of FEATURE_TOL;
- eval: every row of `maria eval` (PoE init, AR only, MLM only), and the trained head scored on the float32
  rows, within NLL_TOL nats per masked token of the float32 features;
- the bf16 checkpoint: its teacher-forced loss within NLL_TOL of the float32 checkpoint's, its logits within
  LOGIT_TOL (relative); greedy infills keep every known token, and the filled tokens agree with float32's on
  at least AGREE_MIN of the positions (near-ties of random weights may flip).
"""

import json

import numpy as np
import pytest
import torch
from extract_fixtures import config, read_all

from maria.head import load_head
from maria.modeling_maria import MariaModel
from maria.text import parse_masked_text
from maria_app.cli import main
from maria_extract.job import run_extract
from maria_storage import as_float32, open_store
from maria_train_head.data import eval_batches, read_rows
from maria_train_head.evaluate import EvalConfig, mean_nll, run_eval
from maria_train_head.train import TrainConfig, run_train

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.timeout(400)]
FEATURE_TOL, NLL_TOL, LOGIT_TOL, AGREE_MIN = 1.5e-2, 1e-3, 1e-2, 0.75  # measured: 0.0042, <= 1.4e-4, 0.0019, 14 of 14
TEXTS = [
    "Paris is the {{2}} of France. Berlin is the {{3}} of Germany.",
    "A cat sat on the {{2}}, and the dog {{}} by the door.",
    "Masked language models read {{4}} sides; autoregressive models read only the {{2}}.",
]


def test_bf16_end_to_end_matches_float32(ray_local, store_a, pairs, corpus, tmp_path, capsys):
    bf16 = tmp_path / "bf16"
    summary = run_extract(config(pairs, corpus, bf16, dtype="bfloat16", feature_dtype="bfloat16"))
    assert summary["rows"] == open_store(str(store_a)).num_rows()
    ref, got = read_all(str(store_a)), read_all(str(bf16))
    assert sorted(ref) == sorted(got)
    worst = 0.0
    for b in ref:
        for name in ("targets", "doc_ids", "window_ids", "positions", "mask_rates"):
            np.testing.assert_array_equal(got[b][name], ref[b][name])
        assert got[b]["features"].dtype == np.uint16  # bfloat16 bits
        if len(ref[b]["targets"]):
            f, r = as_float32(got[b]["features"], {"feature_dtype": "bfloat16"}), ref[b]["features"].astype(np.float32)
            worst = max(worst, float(np.linalg.norm(f - r) / np.linalg.norm(r)))
    assert 0 < worst < FEATURE_TOL

    head = tmp_path / "head"
    trained = run_train(
        TrainConfig(store=str(bf16), val_store=str(bf16), out=str(head), max_steps=12, batch_size=128, lr=3e-3, warmup_steps=2, eval_every=6, device="cpu")
    )
    assert trained["best_val_loss"] < trained["init_val_loss"]
    evals = {
        k: run_eval(EvalConfig(store=str(s), head=str(head) if k == "bf16" else None, device="cpu"))["models"]
        for k, s in (("bf16", bf16), ("float32", store_a))
    }
    for model in ("poe_init", "ar_only", "mlm_only"):
        assert evals["bf16"][model]["nll"] == pytest.approx(evals["float32"][model]["nll"], abs=NLL_TOL)
    # the bf16-trained head on the float32 rows (eval refuses a head of other fingerprints: score it directly)
    fp32_rows = read_rows(open_store(str(store_a)), open_store(str(store_a)).committed_blocks())
    assert mean_nll(load_head(head)[0], eval_batches(fp32_rows, 256, "cpu")) == pytest.approx(evals["bf16"]["trained"]["nll"], abs=NLL_TOL)

    mlm, ar = pairs["modernbert-olmo"]
    ckpt = {}
    for dtype in ("bfloat16", "float32"):
        ckpt[dtype] = tmp_path / f"ckpt-{dtype}"
        assert main(["export", "--mlm", mlm, "--ar", ar, "--head", str(head), "--out", str(ckpt[dtype]), "--dtype", dtype]) == 0
    models = {d: MariaModel.from_pretrained(p) for d, p in ckpt.items()}  # dtype "auto": as stored
    assert models["bfloat16"].proj.weight.dtype == torch.bfloat16 and next(models["bfloat16"].ar.parameters()).dtype == torch.bfloat16
    tok = models["float32"].bb.ar_tokenizer
    ids = torch.tensor([tok(" ".join(TEXTS[2:] * 4), add_special_tokens=False).input_ids[:24]] * 3)
    mask = torch.rand(ids.shape, generator=torch.Generator().manual_seed(0)) < 0.5
    with torch.no_grad():
        out = {d: m(ids, mask) for d, m in models.items()}
    assert float(out["bfloat16"].loss) == pytest.approx(float(out["float32"].loss), abs=NLL_TOL)
    logits = {d: o.logits.float() for d, o in out.items()}
    assert float((logits["bfloat16"] - logits["float32"]).norm() / logits["float32"].norm()) < LOGIT_TOL
    filled = {d: m.infill_text(TEXTS) for d, m in models.items()}
    agree = total = 0
    for text, a, b in zip(TEXTS, filled["bfloat16"], filled["float32"]):
        ids_in, mask_in = parse_masked_text(text, tok, None)
        for r in (a, b):  # every known token kept, every masked one filled
            assert [i for i, m in zip(r["ids"], mask_in) if not m] == [i for i, m in zip(ids_in, mask_in) if not m]
            assert len(r["filled"]) == sum(mask_in)
        agree, total = agree + sum(x == y for x, y in zip(a["filled"], b["filled"])), total + len(a["filled"])
    assert agree >= AGREE_MIN * total, (agree, total)

    capsys.readouterr()
    assert main(["infill", "--model", str(ckpt["bfloat16"]), "--text", TEXTS[0]]) == 0
    assert capsys.readouterr().out.startswith("Paris is the")
    assert (
        main(
            [
                "generate",
                "--model",
                str(ckpt["bfloat16"]),
                "--steps",
                "2",
                "--chains",
                "2",
                "--length",
                "12",
                "--seed",
                "0",
                "--out",
                str(tmp_path / "gen.jsonl"),
            ]
        )
        == 0
    )
    samples = [json.loads(x) for x in (tmp_path / "gen.jsonl").read_text().splitlines()]
    assert len(samples) == 2 and all(np.isfinite(s["ar_ppl"]) for s in samples)
