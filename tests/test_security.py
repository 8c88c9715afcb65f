"""Security: safetensors only, no remote code unless asked, Ray's dashboard never public."""
import pytest
import torch

from maria.backbones import BackboneError, load_backbones


def test_pickle_weights_are_never_loaded(pairs, tmp_path):
    """A backbone folder holding only a pickled pytorch_model.bin is refused, not unpickled."""
    import shutil

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


def test_extract_config_defaults_are_safe():
    from extract.job import ExtractConfig
    from app.commands import ExportConfig

    assert ExtractConfig(mlm="m", ar="a", corpus="c", out="o").trust_remote_code is False
    assert ExportConfig(mlm="m", ar="a", head="h", out="o").trust_remote_code is False


@pytest.mark.ray
def test_embedded_ray_has_no_public_dashboard(ray_local):
    import ray

    node = ray._private.worker.global_worker.node
    assert not node.address_info.get("webui_url")  # include_dashboard=False: no dashboard listens at all
