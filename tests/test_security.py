"""Security: safetensors only, no remote code unless asked, Ray's dashboard never public."""

import shutil

import pytest
import torch

from maria.backbones import BackboneError, load_backbones


def test_pickle_weights_are_never_loaded(pairs, tmp_path):
    """A backbone folder holding only a pickled pytorch_model.bin is refused, not unpickled."""
    from safetensors.torch import load_file

    mlm, ar = pairs["modernbert-olmo"]
    pickled = tmp_path / "ar"
    shutil.copytree(ar, pickled)
    state = load_file(str(pickled / "model.safetensors"))
    (pickled / "model.safetensors").unlink()
    torch.save(state, pickled / "pytorch_model.bin")
    with pytest.raises(BackboneError, match="cannot load AR"):
        load_backbones(mlm, str(pickled))


def test_trust_remote_code_is_off_unless_asked(pairs, monkeypatch):
    import transformers

    seen = []
    for cls in (transformers.AutoModelForMaskedLM, transformers.AutoModelForCausalLM, transformers.AutoTokenizer, transformers.AutoConfig):
        original = cls.from_pretrained.__func__

        def spy(klass, *args, _orig=original, **kw):
            seen.append(kw.get("trust_remote_code"))
            return _orig(klass, *args, **kw)

        monkeypatch.setattr(cls, "from_pretrained", classmethod(spy))
    load_backbones(*pairs["modernbert-olmo"])
    assert seen and all(v is False for v in seen)
    seen.clear()
    load_backbones(*pairs["modernbert-olmo"], trust_remote_code=True)
    assert seen and all(v is True for v in seen)


def test_loading_a_checkpoint_never_unpickles_nor_runs_remote_code(pairs, tmp_path, monkeypatch):
    """Every weight comes from safetensors (torch.load is never called), every backbone load asks for
    safetensors only and no remote code, and a pickle standing in for a backbone's weights is refused."""
    import json

    import transformers

    from maria.checkpoint import CorruptCheckpointError
    from maria.modeling_maria import MariaModel

    ckpt = MariaModel.from_backbones(*pairs["modernbert-olmo"]).save_pretrained(tmp_path / "ckpt")
    assert "auto_map" not in json.loads((ckpt / "config.json").read_text())
    pickled = tmp_path / "pickled"
    shutil.copytree(ckpt, pickled)
    torch.save({"x": torch.zeros(1)}, pickled / "ar" / "pytorch_model.bin")
    (pickled / "ar" / "model.safetensors").unlink()

    def refuse(*args, **kw):
        raise AssertionError("torch.load was called while loading a checkpoint")

    seen = []
    for cls in (transformers.AutoModelForMaskedLM, transformers.AutoModelForCausalLM):
        original = cls.from_pretrained.__func__

        def spy(klass, *args, _orig=original, **kw):
            seen.append((kw.get("use_safetensors"), kw.get("trust_remote_code")))
            return _orig(klass, *args, **kw)

        monkeypatch.setattr(cls, "from_pretrained", classmethod(spy))
    monkeypatch.setattr(torch, "load", refuse)
    MariaModel.from_pretrained(ckpt)
    assert seen == [(True, False), (True, False)]
    with pytest.raises(CorruptCheckpointError, match="missing ar/model.safetensors"):
        MariaModel.from_pretrained(pickled)


def test_extract_config_defaults_are_safe():
    from maria_app.commands import ExportConfig
    from maria_extract.job import ExtractConfig

    assert ExtractConfig(mlm="m", ar="a", corpus="c", store="o").trust_remote_code is False
    assert ExportConfig(mlm="m", ar="a", head="h", out="o").trust_remote_code is False


@pytest.mark.ray
def test_embedded_ray_has_no_public_dashboard(ray_local):
    import ray

    node = ray._private.worker.global_worker.node
    assert not node.address_info.get("webui_url")  # include_dashboard=False: no dashboard listens at all
