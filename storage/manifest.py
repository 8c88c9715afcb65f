"""The root metadata: the manifest (what extraction made the store, and whether another may resume it) and
the plan, both in the root group's attributes, which only the driver writes (atomically, as a whole)."""

from __future__ import annotations

import json
import shlex

from maria_storage import layout
from maria_storage.format import (
    FORMAT_VERSION,
    IDENTITY_DEFAULTS,
    IDENTITY_KEYS,
    MANIFEST_KEY,
    READABLE_FORMATS,
    CorruptStoreError,
    StoreError,
    StoreMismatchError,
    stored_feature_dtype,
)
from maria_storage.location import Location, access_error

PLAN_KEY = "maria_plan"


def normalize_manifest(manifest: dict) -> dict:
    """JSON round trip (tuples -> lists, so stored and fresh manifests compare equal) plus required fields."""
    if not isinstance(manifest, dict):
        raise StoreError(f"manifest must be a dict, got {type(manifest).__name__}")
    try:
        m = json.loads(json.dumps(manifest))
    except (TypeError, ValueError) as e:
        raise StoreError(f"manifest is not JSON-serialisable ({e}); pass plain str/int/float/list/dict values") from e
    for key in ("d_mlm", "d_ar", "vocab_size"):
        if not isinstance(m.get(key), int) or m[key] <= 0:
            raise StoreError(f"manifest needs a positive int {key!r}, got {m.get(key)!r}")
    m.setdefault("feature_dtype", "float16")
    stored_feature_dtype(m)  # validates the name
    m["format_version"] = FORMAT_VERSION
    return m


def read_root(loc: Location) -> dict | None:
    """The root group's attributes, or None when there is no MARIA store here. The first contact with a store:
    an unreachable or forbidden URL is one line (StoreAccessError), not the backend's traceback."""
    try:
        raw = loc.read_optional("zarr.json")
    except Exception as e:  # noqa: BLE001 -- credentials, network and permission errors come in every library's classes
        error = access_error(e, loc.url, "store")
        if error is None:
            raise
        raise error from None
    try:
        attrs = layout.group_attributes(raw)
    except ValueError as e:
        raise CorruptStoreError(f"{loc.url}/zarr.json is not valid JSON ({e}); the store's root metadata is damaged") from e
    return attrs if attrs is not None and isinstance(attrs.get(MANIFEST_KEY), dict) else None


def check_identity(stored: dict, new: dict, url: str) -> None:
    for key in IDENTITY_KEYS:
        default = IDENTITY_DEFAULTS.get(key)
        if (key in stored or key in new) and stored.get(key, default) != new.get(key, default):
            raise StoreMismatchError(
                f"{url} holds features of another extraction: {key} is {stored.get(key)!r} there but {new.get(key)!r} "
                f"now; use another --store or delete that store"
            )


def check_format_version(manifest: dict, url: str, writing: bool = False) -> None:
    version = manifest.get("format_version")
    if version not in READABLE_FORMATS or (writing and version != FORMAT_VERSION):
        raise StoreError(
            f"{url} has store format_version {version!r}; this code {'writes' if writing else 'reads'} "
            f"version {FORMAT_VERSION if writing else READABLE_FORMATS}; extract into a new --store "
            f"(or use the MARIA version that made it)"
        )


def retarget(command: str, url: str) -> str:
    """A recorded `maria extract` command naming the store `url` (its --store, or the --out of older commands)."""
    try:
        parts = shlex.split(command)
    except ValueError:
        return command
    if parts[:2] != ["maria", "extract"]:
        return command
    out = parts[:2]
    rest = iter(parts[2:])
    for part in rest:
        if part in ("--store", "--out"):
            next(rest, None)
            out += ["--store", url]
        elif part.startswith(("--store=", "--out=")):
            out += ["--store", url]
        else:
            out.append(part)
    return shlex.join(out)
