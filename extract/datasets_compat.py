"""The datasets adapter: a `datasets.save_to_disk` folder lists its arrow shards under the private key
"_data_files" of its state.json, and datasets has no public call that lists them without loading the
dataset (which, for an s3:// folder, downloads it). An upgrade that renames it breaks it here, and
tests/test_adapters.py names what went away.
"""

from __future__ import annotations

STATE_FILE = "state.json"


def saved_dataset_shards(state: dict) -> list[str]:
    """File names (relative to the split folder) of a saved split's arrow shards, in order."""
    return [f["filename"] for f in state["_data_files"]]
