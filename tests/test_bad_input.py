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
    assert "invalid choice 'words' for argument '--mask-mode'" in run_cli(capsys, *extract_args, "--corpus", corpus, "--mask-mode", "words")
    assert "missing required option(s): --corpus" in run_cli(capsys, *extract_args)
    yaml_cfg = tmp_path / "x.yaml"
    yaml_cfg.write_text("windw_length: 12\n")
    assert "unknown field 'windw_length'" in run_cli(capsys, *extract_args, "--corpus", corpus, "--config", yaml_cfg)


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_window_longer_than_the_model(capsys, ray_local, extract_args, tmp_path):
    corpus = write_jsonl(tmp_path / "c.jsonl", [{"text": "hello world " * 20}])
    args = [a if a != 24 else 4096 for a in extract_args]
    assert "exceeds the backbones' limit" in run_cli(capsys, *args, "--corpus", corpus)
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
    assert "--mlm-offset is 1; an MLM predicts x[i] at i" in run_cli(
        capsys, "export", "--mlm", mlm, "--ar", ar, "--head", head, "--out", tmp_path / "o", "--mlm-offset", "1"
    )
    assert "--mlm-offset is -2" in run_cli(capsys, "extract", "--mlm", mlm, "--ar", ar, "--corpus", tmp_path, "--store", tmp_path / "s", "--mlm-offset", "-2")
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


# --- reliability round 3: refused before any work, in one line ----------------------------------------------------


def extract_cli(pairs, corpus, store, *extra):
    mlm, ar = pairs["modernbert-olmo"]
    return ["extract", "--mlm", mlm, "--ar", ar, "--corpus", corpus, "--store", store, "--window-length", 24, *extra]


def test_store_inside_its_own_corpus_is_refused(capsys, pairs, tmp_path):
    """Such a store could never be resumed: the re-run would list its files as corpus files."""
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    write_jsonl(corpus / "a.jsonl", [{"text": "hello world " * 20}])
    for store, source in ((corpus / "store", corpus), (corpus / "sub" / "store", f"{corpus}/*.jsonl"), (corpus, corpus / "a.jsonl")):
        assert "overlaps the corpus" in run_cli(capsys, *extract_cli(pairs, source, store))
    assert sorted(p.name for p in corpus.rglob("*")) == ["a.jsonl"]


def test_unchecked_values_are_refused(capsys, pairs, tmp_path, checkpoint):
    corpus = write_jsonl(tmp_path / "c.jsonl", [{"text": "hello world " * 20}])
    assert "invalid choice 'float8' for argument '--dtype'" in run_cli(capsys, *extract_cli(pairs, corpus, tmp_path / "s", "--dtype", "float8"))
    # a byte that is not UTF-8 on the command line reaches Python as a lone surrogate
    assert "not valid Unicode at position 3" in run_cli(capsys, "infill", "--model", checkpoint, "--text", "caf\udce9 {{2}} x")
    lines = tmp_path / "in.jsonl"
    lines.write_text('{"text": "a \\ud800 {{2}} b"}\n')
    assert "lone surrogate" in run_cli(capsys, "infill", "--model", checkpoint, "--jsonl", lines)


def read_only(path):
    """Make a folder unwritable even for root (chattr +i), or skip."""
    import subprocess

    path.chmod(0o555)
    probe = path / ".probe"
    try:
        probe.touch()
    except OSError:
        return lambda: path.chmod(0o755)
    probe.unlink()
    if subprocess.run(["chattr", "+i", str(path)], capture_output=True).returncode:
        path.chmod(0o755)
        pytest.skip("cannot make a folder read-only here (root without chattr)")
    return lambda: (subprocess.run(["chattr", "-i", str(path)]), path.chmod(0o755))


def test_read_only_store_is_refused_before_ray(capsys, pairs, tmp_path):
    corpus = write_jsonl(tmp_path / "c.jsonl", [{"text": "hello world " * 20}])
    store = tmp_path / "store"
    store.mkdir()
    undo = read_only(store)
    try:
        assert "cannot be written" in run_cli(capsys, *extract_cli(pairs, corpus, store))
    finally:
        undo()
    assert list(store.iterdir()) == []


@pytest.fixture
def no_s3_credentials(monkeypatch, s3_endpoint):
    """A reachable S3 server, but no credentials anywhere botocore looks."""
    for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()  # fsspec reuses a filesystem made with the session's credentials
    yield
    s3fs.S3FileSystem.clear_instance_cache()


def test_urls_are_one_line_naming_the_fix(capsys, pairs, tmp_path, no_s3_credentials):
    import importlib.util

    corpus = write_jsonl(tmp_path / "c.jsonl", [{"text": "hello world " * 20}])
    no_creds = "no credentials (Unable to locate credentials); set AWS_ACCESS_KEY_ID"
    assert no_creds in run_cli(capsys, "verify", "--store", "s3://maria-test/nothing")
    assert no_creds in run_cli(capsys, "train", "--store", "s3://maria-test/nothing", "--out", tmp_path / "h")
    assert no_creds in run_cli(capsys, "eval", "--store", "s3://maria-test/nothing")
    assert no_creds in run_cli(capsys, *extract_cli(pairs, corpus, "s3://maria-test/new"))
    assert no_creds in run_cli(capsys, *extract_cli(pairs, "s3://maria-test/corpus/", tmp_path / "s"))
    for url in ("ftp://127.0.0.1:9/x", "http://127.0.0.1:9/x", "hf://datasets/x/y"):
        assert f"{url.split(':')[0]}:// is not supported; use a local path or an s3://" in run_cli(capsys, "verify", "--store", url)
        assert "is not supported" in run_cli(capsys, *extract_cli(pairs, url, tmp_path / "s"))
    if importlib.util.find_spec("gcsfs") is None:
        assert "gs:// needs the gcsfs package, which is not installed; pip install 'maria-infill[gcs]'" in run_cli(capsys, "eval", "--store", "gs://bucket/x")
    assert not (tmp_path / "s").exists() and not (tmp_path / "h").exists()


def test_strict_csv_names_the_line(tmp_path):
    from maria_extract.corpus import CorpusError, iter_documents

    ok = tmp_path / "ok.csv"
    ok.write_text('text,n\n"a document, with a comma\nand a line break",1\n"a ""quoted"" word",2\n\nplain,3\n')
    assert list(iter_documents(str(ok))) == ["a document, with a comma\nand a line break", 'a "quoted" word', "plain"]
    for body, line in (
        ('text,n\n"open quote,1\nnext row,2\n', 2),  # used to be one document of two rows
        ('text,n\nfine,1\n"closed" then text,2\n', 3),
        ("text,n\nfine,1\nshort\n", 3),
    ):
        bad = tmp_path / "bad.csv"
        bad.write_text(body)
        with pytest.raises(CorpusError, match=f"bad.csv line {line}: "):
            list(iter_documents(str(bad)))


def test_damaged_compression_is_one_line(tmp_path):
    import gzip

    from maria_extract.corpus import CorpusError, iter_documents

    good = b'{"text": "hello world"}\n' * 50
    for name, data in (("plain.jsonl.gz", good), ("cut.jsonl.gz", gzip.compress(good)[:-20]), ("plain.jsonl.zst", good)):
        (tmp_path / name).write_bytes(data)
        with pytest.raises(CorpusError, match=f"cannot decompress .*{name} as .{name.rsplit('.', 1)[1]} .*complete"):
            list(iter_documents(str(tmp_path / name)))
    (tmp_path / "ok.jsonl.gz").write_bytes(gzip.compress(good))
    assert len(list(iter_documents(str(tmp_path / "ok.jsonl.gz")))) == 50


def test_yaml_type_errors_name_the_file_and_field(capsys, tmp_path):
    store = tmp_path / "s"
    for body, problem in (
        ("lr: [1, 2]\n", "field 'lr' takes one value, not a list"),
        ("batch_size: many\n", "field 'batch_size' must be a whole number"),
        ("resume: 3\n", "field 'resume' must be true or false"),
        ("init: yes\n", "field 'init' must be one of poe, mix, random, ar-only, not True"),
        ("val_store: [a, b]\n", "field 'val_store' takes one value, not a list"),
    ):
        cfg = tmp_path / "c.yaml"
        cfg.write_text(body)
        assert f"--config {cfg}: {problem}" in run_cli(capsys, "train", "--store", store, "--out", tmp_path / "h", "--config", cfg)
