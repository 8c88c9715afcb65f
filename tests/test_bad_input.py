"""Bad input through the CLI: a one-line error naming the fix, exit code 2, nothing half-written.
Each case here is a row of the README's bad-input table."""
import json

import pytest

from maria_app.cli import main


def run_cli(capsys, *argv) -> str:
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err.strip()
    assert code == 2, f"exit {code}, stderr: {err}"
    lines = [ln for ln in err.splitlines() if not ln.rstrip().endswith("/s]")]  # progress bars aside
    assert len(lines) == 1 and lines[0].startswith("maria "), err
    return lines[0]


@pytest.fixture
def extract_args(pairs, tmp_path):
    mlm, ar = pairs["modernbert-olmo"]
    return ["extract", "--mlm", mlm, "--ar", ar, "--store", tmp_path / "store", "--window-length", 24]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_corpus_errors(capsys, extract_args, tmp_path):
    assert "no non-empty documents" in run_cli(capsys, *extract_args, "--corpus", write_jsonl(tmp_path / "e.jsonl", [{"text": " \n\t"}, {"text": ""}]))
    assert "does not exist" in run_cli(capsys, *extract_args, "--corpus", tmp_path / "missing.jsonl")
    ok = write_jsonl(tmp_path / "ok.jsonl", [{"body": "hello world", "n": 3}])
    assert "no column 'text'" in run_cli(capsys, *extract_args, "--corpus", ok)
    assert "not text" in run_cli(capsys, *extract_args, "--corpus", ok, "--text-column", "n")
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"caf\xe9 au lait\xff")
    assert "not valid UTF-8" in run_cli(capsys, *extract_args, "--corpus", bad)
    assert not (tmp_path / "store").exists()  # refused before anything was written


def test_config_errors(capsys, extract_args, tmp_path):
    corpus = write_jsonl(tmp_path / "c.jsonl", [{"text": "hello world " * 20}])
    assert "outside [0, 1]" in run_cli(capsys, *extract_args, "--corpus", corpus, "--mask-rate", 1.5)
    assert "masking mode 'words' is unknown" in run_cli(capsys, *extract_args, "--corpus", corpus, "--mask-mode", "words")
    assert "missing required option(s): --corpus" in run_cli(capsys, *extract_args)
    yaml_cfg = tmp_path / "x.yaml"
    yaml_cfg.write_text("windw_length: 12\n")
    assert "unknown field 'windw_length'" in run_cli(capsys, *extract_args, "--corpus", corpus, "--config", yaml_cfg)


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_window_longer_than_the_model(capsys, ray_local, extract_args, tmp_path):
    corpus = write_jsonl(tmp_path / "c.jsonl", [{"text": "hello world " * 20}])
    args = [a if a != 24 else 4096 for a in extract_args]
    assert "exceeds the MLM's limit" in run_cli(capsys, *args, "--corpus", corpus)
    assert not (tmp_path / "store").exists()


def test_backbone_errors(capsys, pairs, tmp_path):
    from tiny import build_pair

    from maria.head import FusionHead, save_head

    mlm, ar = pairs["modernbert-olmo"]
    head = save_head(tmp_path / "head", FusionHead(4, 4, 8), {"complete": True})  # backbones are checked before it is matched
    assert "swap --mlm and --ar" in run_cli(capsys, "export", "--mlm", ar, "--ar", mlm, "--head", head, "--out", tmp_path / "o")
    bad_mlm, bad_ar = build_pair(tmp_path, "modernbert-olmo", mismatched=True)
    assert "tokenizers disagree" in run_cli(capsys, "export", "--mlm", bad_mlm, "--ar", bad_ar, "--head", head, "--out", tmp_path / "o")
    assert "cannot load MLM 'nobody/nothing'" in run_cli(capsys, "export", "--mlm", "nobody/nothing", "--ar", ar, "--head", head, "--out", tmp_path / "o")
    assert "not a head folder" in run_cli(capsys, "export", "--mlm", mlm, "--ar", ar, "--head", tmp_path / "o", "--out", tmp_path / "o2")
    assert "--mlm-offset is 1; an MLM predicts x[i] at i" in run_cli(capsys, "export", "--mlm", mlm, "--ar", ar, "--head", head,
                                                                     "--out", tmp_path / "o", "--mlm-offset", "1")
    assert "--mlm-offset is -2" in run_cli(capsys, "extract", "--mlm", mlm, "--ar", ar, "--corpus", tmp_path, "--store", tmp_path / "s",
                                           "--mlm-offset", "-2")
    assert not (tmp_path / "o").exists() and not (tmp_path / "s").exists()


def test_gpu_asked_for_but_missing(capsys, pairs, tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    from maria.backbones import BackboneError, load_backbones

    with pytest.raises(BackboneError, match="no CUDA GPU is visible; pass --device cpu"):
        load_backbones(*pairs["modernbert-olmo"], device="cuda")
    assert "no CUDA GPU" in run_cli(capsys, "bench", "decode", "--device", "cuda", "--json", tmp_path / "b.json")


@pytest.fixture(scope="module")
def checkpoint(pairs, tmp_path_factory):
    from maria.modeling_maria import MariaModel

    return MariaModel.from_backbones(*pairs["modernbert-olmo"]).save_pretrained(tmp_path_factory.mktemp("ckpt") / "m")


def test_infill_errors(capsys, checkpoint, tmp_path):
    assert "bad mask syntax" in run_cli(capsys, "infill", "--model", checkpoint, "--text", "Paris is the {{two}} of France")
    assert "exactly one of --text" in run_cli(capsys, "infill", "--model", checkpoint)
    assert "not a MARIA checkpoint" in run_cli(capsys, "infill", "--model", tmp_path, "--text", "a {{2}} b")
    lines = tmp_path / "in.jsonl"
    lines.write_text('{"txt": "a {{2}} b"}\n')
    assert 'a "text" field' in run_cli(capsys, "infill", "--model", checkpoint, "--jsonl", lines)


def test_mask_covering_everything_is_generation(capsys, checkpoint, tmp_path):
    """Not an error: with a start token, an all-masked window is plain generation (the MLM sees
    only masks). An AR without BOS/EOS cannot fill position 0 and gets a one-line error instead."""
    assert main(["infill", "--model", str(checkpoint), "--text", "{{6}}"]) == 0
    out = capsys.readouterr().out.strip()
    assert out
