"""The transformers adapter: every call into transformers that reaches past its public API, or that is
spelled differently across the versions pyproject.toml admits (5.17 .. 5.x). An upgrade that breaks
one breaks it here, and tests/test_adapters.py names the call that went away.
"""

from __future__ import annotations

import inspect

import transformers
from transformers.models.auto import modeling_auto


def masked_lm_model_types() -> set[str]:
    """Model types AutoModelForMaskedLM can build (no public accessor: the mapping's names)."""
    return set(modeling_auto.MODEL_FOR_MASKED_LM_MAPPING_NAMES)


def causal_lm_model_types() -> set[str]:
    """Model types AutoModelForCausalLM can build."""
    return set(modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


def cache_kwargs(model, cache) -> dict:
    """The KV-cache argument of a forward: `cache=` since transformers 5.24, `past_key_values=` before
    (5.24 still takes the old name until 5.40). Read from the forward's own signature; a wrapper whose
    forward shows neither (PEFT's **kwargs) gets the name of the installed version."""
    params = inspect.signature(model.forward).parameters
    if "cache" in params:
        return {"cache": cache}
    if "past_key_values" in params:
        return {"past_key_values": cache}
    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    return {"cache": cache} if (major, minor) >= (5, 24) else {"past_key_values": cache}


def cache_layer_tensors(layer) -> tuple:
    """(keys, values) of one layer of a DynamicCache: (batch, heads, slots, head_dim)."""
    return layer.keys, layer.values


def set_cache_layer_tensors(layer, keys, values) -> None:
    """Replace one layer's cached keys and values in place (the decoder compacts its slots; DynamicCache
    has no public call that reorders along the slot axis)."""
    layer.keys, layer.values = keys, values
