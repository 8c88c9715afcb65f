"""`maria bench --what quality` over two tiny pre-training runs (mntp and mlm, same seed and corpus):
one curve per run over its snapshots, the equal-steps comparison, JSON + PNG."""

import json

import pytest
from test_defaults import _tiny_ar

from maria_app.cli import main
from maria_defaults.pretrain_mlm import PretrainMLMConfig, pretrain_mlm

pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two 4-step runs with snapshots at 2, the first 4 documents left out (the head's, where (a, b) are fitted)."""
    from tiny import CORPUS

    root = tmp_path_factory.mktemp("quality")
    ar_dir, _ = _tiny_ar(root, "llama")
    train, val = root / "train.jsonl", root / "val.jsonl"
    train.write_text("".join(json.dumps({"text": " ".join(CORPUS[i : i + 3])}) + "\n" for i in range(12)))
    val.write_text("".join(json.dumps({"text": " ".join(CORPUS[i : i + 4])}) + "\n" for i in range(12, 16)))
    out = {}
    for objective in ("mntp", "mlm"):
        out[objective] = root / objective
        pretrain_mlm(
            PretrainMLMConfig(
                tokenizer_from=str(ar_dir),
                corpus=str(train),
                val_corpus=str(val),
                out=str(out[objective]),
                hidden_size=32,
                num_layers=2,
                seq_len=32,
                batch_size=4,
                steps=4,
                snapshots=[2],
                skip_docs=4,
                eval_windows=8,
                objective=objective,
            )
        )
    return ar_dir, out, root


def test_quality_curves_per_objective(runs, tmp_path, monkeypatch):
    ar_dir, out, _ = runs
    monkeypatch.setenv("MARIA_CACHE", str(tmp_path / "cache"))  # the AR-state cache lands here
    js = tmp_path / "q.json"
    assert main(["bench", "quality", "--runs", str(out["mntp"]), str(out["mlm"]), "--ar", str(ar_dir), "--windows", "4", "--json", str(js)]) == 0
    result = json.loads(js.read_text())
    rows = result["results"]
    assert len(rows) == 2 * 2 * 2 * 2  # runs x points (snapshot 2, final 4) x text sets x rates
    assert {(r["objective"], r["mlm_offset"]) for r in rows} == {("mntp", -1), ("mlm", 0)}
    assert sorted({r["mlm_steps"] for r in rows}) == [2, 4]
    for r in rows:
        assert r["gain"] == pytest.approx(r["nll_ar"] - r["nll_mix"]) and r["tokens"] > 0
    t = result["targets"]
    assert set(t["equal_steps"]) == {"2", "4"} and set(t["last"]) == {str(out["mntp"]), str(out["mlm"])}
    assert t["better_at_equal_steps"]["steps"] == 4 and t["better_at_equal_steps"]["objective"] in ("mntp", "mlm")
    assert js.with_suffix(".png").stat().st_size > 0
    # the MNTP snapshots are read at their offset: its MLM-only NLL differs from the same weights read at 0
    assert {r["nll_mlm"] for r in rows if r["objective"] == "mntp"} != {r["nll_mlm"] for r in rows if r["objective"] == "mlm"}


def test_quality_refuses_runs_of_other_corpora_and_non_runs(runs, tmp_path, monkeypatch, capsys):
    ar_dir, out, root = runs
    monkeypatch.setenv("MARIA_CACHE", str(tmp_path / "cache"))
    assert main(["bench", "quality", "--runs", str(root), "--ar", str(ar_dir), "--json", str(tmp_path / "x.json")]) == 2
    assert "is not a `maria pretrain-mlm` output folder" in capsys.readouterr().err
    other = tmp_path / "other"
    other.mkdir()
    key = json.loads((out["mlm"] / "pretrain_config.json").read_text())
    (other / "pretrain_config.json").write_text(json.dumps({**key, "skip_docs": 0}))
    assert main(["bench", "quality", "--runs", str(out["mlm"]), str(other), "--ar", str(ar_dir), "--json", str(tmp_path / "y.json")]) == 2
    assert "were pre-trained on other texts (skip_docs differ)" in capsys.readouterr().err
