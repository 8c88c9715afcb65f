"""The checkpoint is a Hugging Face model: Auto classes after `import maria` (no remote code), every
dtype form a transformers user writes, the authors' `infill(input_ids, mask_token_id=...)` call, hub ids from the local cache, the tokenizer at the root, a model card, safetensors
named like the module with standard metadata, --dtype, portable references (the folder moves), and
one line with exit code 3 for a damaged file."""

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors import safe_open

from maria import MariaConfig, MariaModel, export
from maria.checkpoint import CheckpointError, CorruptCheckpointError
from maria.features import aligned_features
from maria.head import load_head, save_head
from maria.io import CorruptDataError
from maria_app.cli import main

ROOT = Path(__file__).resolve().parents[1]
TEXTS = ["Paris is the {{3}} of France.", "A {{2}} sat on the {{}} by the door."]
SHA = "0123456789abcdef0123456789abcdef01234567"
TRAINED = {
    "store": "stores/train",
    "init": "poe",
    "steps": 5,
    "total_steps": 5,
    "best_step": 4,
    "init_val_loss": 3.25,
    "best_val_loss": 2.5,
    "complete": True,
    "window_length": 24,
}


@pytest.fixture(scope="module")
def trained(pairs, tmp_path_factory):
    """A model whose head is not the init, and its head folder with a training record."""
    model = MariaModel.from_backbones(*pairs["modernbert-olmo"])
    with torch.no_grad():
        model.head.proj.bias += torch.randn(model.head.proj.bias.shape, generator=torch.Generator().manual_seed(0)) * 0.1
    head_dir = save_head(tmp_path_factory.mktemp("head") / "head", model.head, {**model.bb.describe(), **TRAINED})
    return model, head_dir


@pytest.fixture(scope="module")
def ckpt(pairs, trained, tmp_path_factory):
    return export(*pairs["modernbert-olmo"], str(trained[1]), str(tmp_path_factory.mktemp("ckpt") / "maria-tiny"))


def test_layout_names_metadata_card_and_tokenizer(ckpt, trained, pairs):
    model = trained[0]
    names = set(model.state_dict())
    files = sorted(ckpt.rglob("*.safetensors"))
    assert {f.relative_to(ckpt).as_posix() for f in files} == {"head.safetensors", "vocab_map.safetensors", "mlm/model.safetensors", "ar/model.safetensors"}
    for f in files:  # keys are the module's state_dict names (a backbone folder's under its prefix)
        rel = f.relative_to(ckpt)
        prefix = "" if len(rel.parts) == 1 else rel.parts[0] + "."
        with safe_open(str(f), "pt") as s:
            assert s.metadata().get("format") == "pt", rel
            assert {prefix + k for k in s.keys()} <= names, rel
    assert {"proj.weight", "proj.bias", "mlm_to_ar"} <= names
    text = (ckpt / "config.json").read_text()
    config = json.loads(text)
    assert config["model_type"] == "maria" and config["architectures"] == ["MariaModel"] and "auto_map" not in config
    assert config["mlm"]["path"] == "mlm" and config["ar"]["path"] == "ar" and config["dtype"] == "float32"
    assert str(Path(pairs["modernbert-olmo"][0]).parent) not in text  # no path of the exporting machine
    assert not [p for p in ckpt.rglob("*") if p.suffix in (".bin", ".pt", ".pth", ".pkl", ".py")]
    head, meta = load_head(ckpt)  # the head inside is in the one head format, with training's record
    assert torch.equal(head.proj.bias, model.head.proj.bias) and meta["best_step"] == 4
    card = (ckpt / "README.md").read_text()
    assert card.startswith("---\n") and "import maria" in card and "AutoModel.from_pretrained" in card
    assert "copied into `mlm/`" in card and "`stores/train`" in card and "| trained (step 4) | 2.5000 | 12.18 |" in card
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(ckpt).get_vocab() == model.bb.ar_tokenizer.get_vocab()


def test_folder_moves_and_loads_the_same_model(ckpt, trained, tmp_path):
    copy = shutil.copytree(ckpt, tmp_path / "a" / "ckpt")
    moved = Path(shutil.move(str(copy), str(tmp_path / "b" / "renamed")))
    loaded = MariaModel.from_pretrained(moved)
    model = trained[0]
    for s in (dict(), dict(temperature=0.8, top_k=20, seed=3)):
        assert loaded.infill_text(TEXTS, **s) == model.infill_text(TEXTS, **s)
    ids = torch.tensor([model.bb.ar_tokenizer("Paris is the capital of France.").input_ids])
    mask = torch.zeros_like(ids, dtype=torch.bool)
    mask[0, 2:5] = True
    out = loaded(ids, mask)  # teacher-forced: the infilling NLL training minimises
    f = aligned_features(model.bb, ids, mask, torch.tensor([ids.shape[1]]))
    torch.testing.assert_close(out.loss, torch.nn.functional.cross_entropy(model.head(f.features), f.targets))
    assert out.logits.shape == (3, model.bb.vocab_size)


def test_mntp_checkpoint_records_its_offset_and_loads_it(pairs, tmp_path):
    """An MNTP MLM (offset -1, given by --mlm-offset as at extraction) exports with mlm_offset -1 in config.json
    and the card; the loaded model reads the MLM at that offset (teacher-forced features equal the extracted ones)."""
    mlm, ar = pairs["bert-gpt2"]
    model = MariaModel.from_backbones(mlm, ar, mlm_offset=-1)
    head_dir = save_head(tmp_path / "head", model.head, {**model.bb.describe(), **TRAINED})
    out = export(mlm, ar, str(head_dir), str(tmp_path / "ckpt"), mlm_offset=-1)
    assert json.loads((out / "config.json").read_text())["mlm_offset"] == -1
    assert "position i - 1" in (out / "README.md").read_text()
    loaded = MariaModel.from_pretrained(out)
    assert loaded.bb.mlm_offset == -1 and loaded.head_meta["mlm_offset"] == -1
    ids = torch.tensor([model.bb.ar_tokenizer("Paris is the capital of France.").input_ids])
    mask = torch.zeros_like(ids, dtype=torch.bool)
    mask[0, [0, 2, 3]] = True
    f = aligned_features(model.bb, ids, mask, torch.tensor([ids.shape[1]]))
    torch.testing.assert_close(loaded(ids, mask).loss, torch.nn.functional.cross_entropy(model.head(f.features), f.targets))
    with pytest.raises(ValueError, match="mlm_offset: -1 vs 0"):  # the head's features are not those of the MLM read at 0
        export(mlm, ar, str(head_dir), str(tmp_path / "ckpt0"))


def test_dtype_on_export_and_on_load(pairs, trained, ckpt, tmp_path, capsys):
    bf = export(*pairs["modernbert-olmo"], str(trained[1]), str(tmp_path / "bf16"), dtype="bfloat16")
    assert json.loads((bf / "config.json").read_text())["dtype"] == "bfloat16"
    for f in bf.rglob("*.safetensors"):
        with safe_open(str(f), "pt") as s:
            dtypes = {s.get_slice(k).get_dtype() for k in s.keys()}
        assert dtypes == ({"I64"} if f.name == "vocab_map.safetensors" else {"BF16"}), f
    as_stored = MariaModel.from_pretrained(bf)
    assert {p.dtype for p in as_stored.parameters()} == {torch.bfloat16}
    wide = MariaModel.from_pretrained(bf, dtype="float32")
    assert {p.dtype for p in wide.parameters()} == {torch.float32} and wide.infill_text(TEXTS[:1])
    # a float32 checkpoint read in bfloat16: checked as stored, then cast (the CLI's --dtype is honoured)
    assert main(["infill", "--model", str(ckpt), "--text", TEXTS[0], "--dtype", "bfloat16", "--device", "cpu"]) == 0
    assert "France" in capsys.readouterr().out
    with pytest.raises(ValueError, match="unknown --dtype"):
        export(*pairs["modernbert-olmo"], str(trained[1]), str(tmp_path / "x"), dtype="int8")


def test_eval_results_go_into_the_card(pairs, trained, tmp_path, capsys):
    result = {
        "store": "stores/val",
        "rows": 1234,
        "models": {
            "trained": {"label": "MARIA (trained head)", "nll": 2.25, "ppl": 9.4877},
            "ar_only": {"label": "AR only (past context)", "nll": 3.5, "ppl": 33.1155},
        },
    }
    (tmp_path / "eval.json").write_text(json.dumps(result))
    mlm, ar = pairs["modernbert-olmo"]
    args = ["export", "--mlm", mlm, "--ar", ar, "--head", str(trained[1]), "--out", str(tmp_path / "ck")]
    assert main(args + ["--eval", str(tmp_path / "eval.json")]) == 0
    card = (tmp_path / "ck" / "README.md").read_text()
    assert "`stores/val` (1234 masked tokens)" in card and "| MARIA (trained head) | 2.2500 | 9.49 |" in card
    from huggingface_hub import ModelCard

    meta = ModelCard(card).data.to_dict()  # the fields the hub indexes
    assert meta["library_name"] == "maria-infill" and meta["pipeline_tag"] == "fill-mask" and meta["license"] == "other"
    (result,) = [r for r in meta["model-index"][0]["results"] if r["metrics"][0]["name"].startswith("MARIA (trained head) perplexity")]
    assert result["metrics"][0]["value"] == pytest.approx(9.4877) and result["dataset"]["name"] == "stores/val"
    assert "pip install maria-infill" in card and "License: the backbones' own terms" in card
    (tmp_path / "bad.json").write_text("[1, 2]")
    assert main(args[:-1] + [str(tmp_path / "ck2"), "--eval", str(tmp_path / "bad.json")]) == 2
    assert "maria eval --json" in capsys.readouterr().err and not (tmp_path / "ck2").exists()


def test_a_head_recorded_from_a_bf16_extraction_exports(pairs, trained, tmp_path):
    """Extraction on a GPU loads the backbones in bfloat16, so the head's record carries bf16
    fingerprints; export loads float32 and must still recognise them."""
    from maria.backbones import load_backbones

    bb16 = load_backbones(*pairs["modernbert-olmo"], dtype=torch.bfloat16, check_parity=False)
    assert bb16.describe()["ar"]["fingerprint"] != trained[0].bb.describe()["ar"]["fingerprint"]
    head_dir = save_head(tmp_path / "h", trained[0].head, {**bb16.describe(), "complete": True})
    assert (export(*pairs["modernbert-olmo"], str(head_dir), str(tmp_path / "out")) / "config.json").exists()


@pytest.mark.parametrize(
    "name,damage",
    [
        ("head.safetensors", "truncate"),
        ("vocab_map.safetensors", "truncate"),
        ("mlm/model.safetensors", "truncate"),
        ("ar/model.safetensors", "garble"),
        ("config.json", "garble"),
        ("head.json", "garble"),
        ("head.json", "delete"),
        ("mlm/tokenizer.json", "truncate"),
        ("ar/model.safetensors", "flip"),
        ("mlm/model.safetensors", "flip"),
        ("head.safetensors", "flip"),
        ("vocab_map.safetensors", "flip"),
        ("checksums.json", "garble"),
    ],
)
def test_damaged_checkpoint_is_one_line_and_exit_3(ckpt, tmp_path, capsys, name, damage):
    bad = shutil.copytree(ckpt, tmp_path / "bad")
    f = bad / name
    if damage == "truncate":
        os.truncate(f, f.stat().st_size // 2)
    elif damage == "garble":
        f.write_bytes(b"{garbage" + bytes(range(256)))
    elif damage == "flip":  # one bit of one weight: the header still parses (only the sha256 finds it)
        data = bytearray(f.read_bytes())
        data[-3] ^= 0x01
        f.write_bytes(bytes(data))
    else:
        f.unlink()
    with pytest.raises(CorruptCheckpointError) as e:
        MariaModel.from_pretrained(bad)
    msg = str(e.value)
    assert isinstance(e.value, CorruptDataError) and "maria export" in msg and "\n" not in msg
    assert name in msg
    assert main(["infill", "--model", str(bad), "--text", TEXTS[0]]) == 3
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("maria infill: error: "), err


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_damaged_head_folder_is_exit_3_before_any_loading(pairs, trained, tmp_path, capsys, damage):
    head = shutil.copytree(trained[1], tmp_path / "head")
    if damage == "truncate":
        os.truncate(head / "head.safetensors", 100)
    else:  # one bit of the bias: head.json's sha256 finds it
        data = bytearray((head / "head.safetensors").read_bytes())
        data[-2] ^= 0x01
        (head / "head.safetensors").write_bytes(bytes(data))
    assert main(["export", "--mlm", pairs["modernbert-olmo"][0], "--ar", pairs["modernbert-olmo"][1], "--head", str(head), "--out", str(tmp_path / "out")]) == 3
    err = [ln for ln in capsys.readouterr().err.strip().splitlines() if not ln.rstrip().endswith("/s]")]  # progress bars aside
    assert len(err) == 1 and "is damaged" in err[0] and not (tmp_path / "out").exists()


def test_bad_checkpoint_paths_are_usage_errors(ckpt, tmp_path, capsys):
    with pytest.raises(CheckpointError, match="unknown dtype"):
        MariaModel.from_pretrained(ckpt, dtype="int8")
    for model in ("nobody/nothing", str(tmp_path / "missing"), str(tmp_path)):
        assert main(["infill", "--model", model, "--text", TEXTS[0]]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and ("cache" in err[0] or "does not exist" in err[0] or "not a MARIA checkpoint" in err[0]), err
    with pytest.raises(CheckpointError, match="not a config alone"):
        from transformers import AutoModel

        AutoModel.from_config(MariaConfig())


def test_push_to_hub_uploads_the_checkpoint_with_its_card(trained, monkeypatch):
    """No network: HfApi is replaced by a recorder."""
    import maria.modeling_maria

    calls = {}

    class FakeApi:
        def __init__(self, token=None):
            calls["token"] = token

        def create_repo(self, repo_id, private=None, exist_ok=False):
            return SimpleNamespace(repo_id=f"someone/{repo_id}")

        def upload_folder(self, repo_id, folder_path, **kw):
            root = Path(folder_path)
            calls.update(repo=repo_id, files={p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}, card=(root / "README.md").read_text())
            return "https://example/commit"

    monkeypatch.setattr(maria.modeling_maria, "HfApi", FakeApi)
    assert trained[0].push_to_hub("tiny", token="t") == "https://example/commit"
    assert calls["repo"] == "someone/tiny" and calls["token"] == "t"
    assert {"config.json", "head.safetensors", "tokenizer.json", "ar/model.safetensors"} <= calls["files"]
    assert "# tiny: a MARIA infilling model" in calls["card"]


def _cache(root: Path, repo: str, src: Path) -> None:
    """A hub snapshot as huggingface_hub lays it out in its cache (refs/main -> snapshots/<commit>)."""
    d = root / f"models--{repo.replace('/', '--')}"
    shutil.copytree(src, d / "snapshots" / SHA)
    (d / "refs").mkdir()
    (d / "refs" / "main").write_text(SHA)


def _run(body: str, cache: Path) -> dict:
    """`body` in a fresh interpreter (an import order is only tested in one), with the hub cache at `cache`."""
    env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    script = PRELUDE.format(texts=TEXTS) + textwrap.dedent(body)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


PRELUDE = """
import json, shutil, sys, warnings
import torch
torch.set_num_threads(1)
def infills(model):
    return [r["text"] for r in model.infill_text({texts!r})]
"""


def test_auto_classes_in_both_import_orders_and_from_the_hub_cache(pairs, trained, ckpt, tmp_path):
    cache = tmp_path / "hub"
    mlm, ar = pairs["modernbert-olmo"]
    _cache(cache, "maria-test/tiny-ar", Path(ar))
    _cache(cache, "maria-test/tiny-maria", ckpt)
    want = [r["text"] for r in trained[0].infill_text(TEXTS)]
    # Export references the hub AR (id + commit) and copies the local MLM; the folder then moves.
    a = _run(
        f"""
        from maria import MariaModel, export, __version__
        assert __version__ and MariaModel.__module__ == "maria.modeling_maria"
        from transformers import AutoConfig, AutoModel, AutoTokenizer
        out = export({mlm!r}, "maria-test/tiny-ar", {str(trained[1])!r}, {str(tmp_path / "ref")!r}, reference=True)
        moved = shutil.move(str(out), {str(tmp_path / "moved")!r})
        config = AutoConfig.from_pretrained(moved)
        model = AutoModel.from_pretrained(moved)
        hub = AutoModel.from_pretrained("maria-test/tiny-maria")
        tok = AutoTokenizer.from_pretrained("maria-test/tiny-maria")
        print(json.dumps(dict(config=type(config).__name__, cls=type(model).__module__ + "." + type(model).__name__,
                              ar=config.ar, mlm=config.mlm, ref=infills(model), hub=infills(hub), tok=len(tok))))
    """,
        cache,
    )
    assert a["config"] == "MariaConfig" and a["cls"] == "maria.modeling_maria.MariaModel"
    assert a["ar"]["id"] == "maria-test/tiny-ar" and a["ar"]["revision"] == SHA and "path" not in a["ar"]
    assert a["mlm"]["path"] == "mlm" and a["mlm"]["id"] is None
    assert a["ref"] == want and a["hub"] == want and a["tok"] == len(trained[0].bb.ar_tokenizer)
    assert not (tmp_path / "moved" / "ar").exists() and (tmp_path / "moved" / "mlm" / "model.safetensors").exists()
    # transformers first: the tokenizer needs no maria; the model type is unknown until `import maria`
    b = _run(
        """
        from transformers import AutoConfig, AutoModel, AutoTokenizer
        n = len(AutoTokenizer.from_pretrained("maria-test/tiny-maria"))
        try:
            AutoConfig.from_pretrained("maria-test/tiny-maria")
            unknown = False
        except ValueError:
            unknown = True
        import maria
        model = AutoModel.from_pretrained("maria-test/tiny-maria")
        print(json.dumps(dict(n=n, unknown=unknown, cls=type(model).__name__, hub=infills(model))))
    """,
        cache,
    )
    assert b["unknown"] and b["cls"] == "MariaModel" and b["hub"] == want and b["n"] == len(trained[0].bb.ar_tokenizer)


@pytest.mark.parametrize("form", [dict(dtype=torch.bfloat16), dict(dtype="bfloat16"), dict(torch_dtype=torch.bfloat16)])
def test_auto_model_loads_a_float32_checkpoint_in_every_dtype_form(ckpt, form):
    from transformers import AutoModel

    model = AutoModel.from_pretrained(ckpt, **form)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert model.infill_text(TEXTS[:1], temperature=0)[0]["text"].endswith("of France.")


def test_a_bfloat16_checkpoint_loads_wide_and_real_damage_is_still_reported(pairs, trained, tmp_path):
    from safetensors.torch import load_file, save_file
    from transformers import AutoModel

    bf = export(*pairs["modernbert-olmo"], str(trained[1]), str(tmp_path / "bf16"), dtype="bfloat16")
    wide = AutoModel.from_pretrained(bf, dtype=torch.float32)
    assert {p.dtype for p in wide.parameters()} == {torch.float32}
    f = bf / "ar" / "model.safetensors"  # a weight changed, file still well formed: only the fingerprint shows it
    weights = load_file(str(f))
    name = sorted(weights)[0]
    weights[name] = weights[name] + 1
    save_file(weights, str(f), metadata={"format": "pt"})
    for form in (dict(), dict(dtype=torch.float32), dict(dtype="bfloat16")):
        with pytest.raises(CorruptCheckpointError):
            AutoModel.from_pretrained(bf, **form)


def test_masked_lm_auto_class_and_mask_token_id_call(ckpt, trained):
    """The call shape of the authors' released checkpoints: AutoModelForMaskedLM, then
    model.infill(input_ids, mask_token_id=...) with the masked places holding that id."""
    from transformers import AutoModelForMaskedLM

    model = AutoModelForMaskedLM.from_pretrained(ckpt)
    tok = model.bb.ar_tokenizer
    ids = torch.tensor([tok("Paris is the capital of France.", add_special_tokens=False).input_ids])
    mask = torch.zeros_like(ids, dtype=torch.bool)
    mask[0, 2:4] = True
    by_flags = model.infill(ids, mask, temperature=0)
    mask_id = model.config.vocab_size + 7  # any id; here one outside the vocabulary, as a [MASK] often is
    by_id = model.infill(ids.masked_fill(mask, mask_id), mask_token_id=mask_id, temperature=0)
    assert torch.equal(by_id, by_flags) and torch.equal(by_id[~mask], ids[~mask])
    with pytest.raises(ValueError, match="exactly one"):
        model.infill(ids)


def test_a_head_attaches_to_backbones_already_in_python(pairs, trained):
    """Models a user loaded (here plainly; quantized or PEFT-wrapped ones go the same way): no path needed."""
    from transformers import AutoModelForCausalLM, AutoModelForMaskedLM, AutoTokenizer

    mlm_path, ar_path = pairs["modernbert-olmo"]
    mlm, ar = AutoModelForMaskedLM.from_pretrained(mlm_path), AutoModelForCausalLM.from_pretrained(ar_path)
    model = MariaModel.from_backbones(mlm, ar, head_dir=str(trained[1]), mlm_tokenizer=AutoTokenizer.from_pretrained(mlm_path))
    assert model.mlm is mlm and model.ar is ar  # attached, not copied
    assert torch.equal(model.proj.bias, trained[0].proj.bias)
    assert [r["text"] for r in model.infill_text(TEXTS, temperature=0)] == [r["text"] for r in trained[0].infill_text(TEXTS, temperature=0)]


def test_card_license_comes_from_both_backbones(tmp_path):
    from maria.card import card_license
    from maria.checkpoint import backbone_license

    assert card_license({"mlm": "apache-2.0", "ar": "apache-2.0"})[0] == "apache-2.0"
    value, line = card_license({"mlm": "apache-2.0", "ar": "llama3"})
    assert value == "other" and "`apache-2.0`" in line and "`llama3`" in line
    (tmp_path / "README.md").write_text("---\nlicense: mit\n---\n# a backbone\n")
    assert backbone_license(str(tmp_path)) == "mit" and backbone_license(str(tmp_path / "none")) is None


def test_bench_checksum_reports_the_cost_of_checking(ckpt, tmp_path, capsys):
    """`maria bench checksum` runs (a smoke run: its timings mean nothing on a shared machine) and writes JSON + PNG."""
    out = tmp_path / "checksum.json"
    assert main(["bench", "checksum", "--model", str(ckpt), "--repeats", "1", "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    assert r["files"] == len(list(ckpt.rglob("*.safetensors"))) and r["bytes"] > 0 and r["targets"]["baseline"] == "from_pretrained"
    assert r["sha256_MB_per_s"] > 0 and len(r["from_pretrained_seconds"]) == 1 and out.with_suffix(".png").stat().st_size > 0
