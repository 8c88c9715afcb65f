"""Canaries for the four adapters, the only places that reach past another library's public API
(maria/transformers_compat.py, extract/ray_compat.py, storage/zarr_compat.py, extract/datasets_compat.py).
Each test names the call it guards, so an upgrade that removes one fails here, loudly, by name; and a
scan checks no other file reaches into a private module."""

import inspect
import json
import re
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
ADAPTERS = {"maria/transformers_compat.py", "extract/ray_compat.py", "storage/zarr_compat.py", "extract/datasets_compat.py"}
PRIVATE = (
    r"ray\._private",
    r"ray\.data\._internal",
    r"zarr\.core",
    r"transformers\.models\.auto\.modeling_auto",
    r"transformers\.utils\.hub",
    r"\b_data_files\b",
    r"\b_temp_dir\b",
    r"\b_open_input_source\b",
    r"issue_detectors_config",
    r"\.keys, \w+\.values =",
)  # assigning a DynamicCache layer's tensors


def test_no_private_reach_outside_the_adapters():
    rooms = ("maria", "storage", "extract", "train_head", "defaults", "bench", "app")
    for path in sorted(p for room in rooms for p in (ROOT / room).glob("*.py")):
        rel = path.relative_to(ROOT).as_posix()
        if rel in ADAPTERS or rel == "bench/layout.py":  # the layout bench builds the layouts the store rejected
            continue
        text = path.read_text()
        found = [s for s in PRIVATE if re.search(s, text)]
        assert not found, f"{rel} reaches into {found}: go through an adapter"


# ---- transformers ------------------------------------------------------------------------------
def test_transformers_mapping_names_and_cache_argument(pairs):
    from transformers import AutoModelForCausalLM, DynamicCache

    from maria.transformers_compat import cache_kwargs, cache_layer_tensors, causal_lm_model_types, masked_lm_model_types, set_cache_layer_tensors

    assert {"bert", "modernbert"} <= masked_lm_model_types(), "transformers MODEL_FOR_MASKED_LM_MAPPING_NAMES moved"
    assert {"gpt2", "olmo"} <= causal_lm_model_types(), "transformers MODEL_FOR_CAUSAL_LM_MAPPING_NAMES moved"
    ar = AutoModelForCausalLM.from_pretrained(pairs["modernbert-olmo"][1])
    cache = DynamicCache(config=ar.config)
    (name,) = cache_kwargs(ar, cache)
    assert name in inspect.signature(ar.forward).parameters, f"the forward takes neither cache= nor past_key_values= ({name})"
    ar(input_ids=torch.tensor([[1, 2, 3]]), use_cache=True, **cache_kwargs(ar, cache))
    keys, values = cache_layer_tensors(cache.layers[0])
    assert keys.shape[2] == 3, "DynamicCache layer .keys is no longer (batch, heads, slots, dim)"
    set_cache_layer_tensors(cache.layers[0], keys[:, :, :2], values[:, :, :2])
    assert cache.layers[0].keys.shape[2] == 2, "assigning DynamicCache layer .keys/.values no longer sticks"


# ---- ray ---------------------------------------------------------------------------------------
def test_ray_private_calls_exist():
    import ray
    from ray.data.datasource import FileBasedDatasource

    from maria_extract import ray_compat

    assert callable(getattr(FileBasedDatasource, "_open_input_source", None)), "FileBasedDatasource._open_input_source is gone"
    assert "_temp_dir" in inspect.signature(ray.init).parameters or "kwargs" in inspect.signature(ray.init).parameters, "ray.init(_temp_dir=) is gone"
    assert ray_compat.canonical_address("127.0.0.1:6379").endswith(":6379"), "ray._private.services.canonicalize_bootstrap_address"
    assert callable(ray._private.state.state.get_cluster_config), "ray._private.state.state.get_cluster_config is gone"
    ctx = ray.data.DataContext.get_current()
    before = list(ctx.issue_detectors_config.detectors)
    try:
        ray_compat.drop_high_memory_detector(ctx)
        assert not [d for d in ctx.issue_detectors_config.detectors if "HighMemory" in d.__name__]
        assert any("HighMemory" in d.__name__ for d in before), "Ray's HighMemory issue detector was renamed"
    finally:
        ctx.issue_detectors_config.detectors = before
    import logging

    ray_compat.quiet_ray_data_internals()
    assert logging.getLogger(ray_compat.RAY_DATA_INTERNAL_LOGGERS[0]).level == logging.ERROR


# ---- zarr --------------------------------------------------------------------------------------
def test_zarr_metadata_classes_round_trip(tmp_path):
    import zarr

    from maria_storage.zarr_compat import array_metadata_from_json, group_metadata, metadata_json

    a = zarr.create_array(zarr.storage.MemoryStore(), name="x", shape=(4, 2), dtype="float16", chunks=(4, 2))
    meta = array_metadata_from_json(json.loads(metadata_json(a.metadata)))
    assert meta.shape == (4, 2), "zarr.core.metadata.ArrayV3Metadata.from_dict changed"
    doc = json.loads(metadata_json(group_metadata({"k": 1}, {"x": meta})))
    assert doc["node_type"] == "group" and doc["attributes"] == {"k": 1}
    assert "x" in doc["consolidated_metadata"]["metadata"], "zarr.core.group.ConsolidatedMetadata changed"
    (tmp_path / "g").mkdir()
    (tmp_path / "g" / "zarr.json").write_bytes(metadata_json(group_metadata({"k": 1})))
    assert dict(zarr.open_group(str(tmp_path / "g"), mode="r").attrs) == {"k": 1}, "plain zarr no longer reads our group"


# ---- datasets ----------------------------------------------------------------------------------
def test_datasets_save_to_disk_lists_its_shards(tmp_path):
    from datasets import Dataset

    from maria_extract.datasets_compat import STATE_FILE, saved_dataset_shards

    Dataset.from_dict({"text": ["a", "b", "c"]}).save_to_disk(str(tmp_path / "ds"), num_shards=2)
    state = json.loads((tmp_path / "ds" / STATE_FILE).read_text())
    shards = saved_dataset_shards(state)  # the key datasets writes: "_data_files"
    assert len(shards) == 2 and all((tmp_path / "ds" / s).exists() for s in shards)
