"""The zarr adapter: the metadata classes this store builds by hand live in `zarr.core`, which zarr does
not promise to keep. Group metadata with consolidated members is how one atomic write of zarr.json
publishes a whole block; zarr's public API would write member by member. An upgrade that moves one of
these breaks it here, and tests/test_adapters.py names the call that went away.
"""

from __future__ import annotations

from zarr.core.buffer import default_buffer_prototype
from zarr.core.group import ConsolidatedMetadata, GroupMetadata
from zarr.core.metadata import ArrayV3Metadata


def group_metadata(attributes: dict, members: dict | None = None) -> GroupMetadata:
    """A group's metadata; `members` ({relative path: array or group metadata}) are consolidated into it."""
    return GroupMetadata(attributes=attributes, consolidated_metadata=None if members is None else ConsolidatedMetadata(metadata=dict(members)))


def metadata_json(meta) -> bytes:
    """The zarr.json bytes of a group's or an array's metadata."""
    return meta.to_buffer_dict(default_buffer_prototype())["zarr.json"].to_bytes()


def array_metadata_from_json(doc: dict) -> ArrayV3Metadata:
    """An array's metadata from its parsed zarr.json."""
    return ArrayV3Metadata.from_dict(doc)
