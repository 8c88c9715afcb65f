"""FeatureStore: create/open a MARIA feature store, write blocks exactly once, read them back, track the plan.

Writers (Ray tasks) call `write_block`; only the driver calls `create_store`, `write_plan`, `gc_uncommitted`
and `finalize`, so the root metadata has exactly one writer. See storage/format.py for the layout and
storage/commit.py for how a block is committed.
"""

from __future__ import annotations

import hashlib
import json
import os

import numpy as np
import zarr

from maria_storage import commit, layout
from maria_storage.format import (
    FORMAT_VERSION,
    IDENTITY_KEYS,
    INIT_ARRAYS,
    MANIFEST_KEY,
    CorruptBlockError,
    CorruptStoreError,
    IncompleteStoreError,
    StoreAccessError,
    StoreError,
    StoreMismatchError,
    StoreNotFoundError,
    block_array_dtypes,
    check_block_id,
    init_shapes,
    sha256_of,
    stored_feature_dtype,
)
from maria_storage.location import Location, access_error
from maria_storage.manifest import PLAN_KEY, check_format_version, check_identity, normalize_manifest, read_root, retarget
from maria_storage.zarr_compat import group_metadata

_ZARR_MISSING = (FileNotFoundError, KeyError, zarr.errors.NodeNotFoundError, zarr.errors.GroupNotFoundError, zarr.errors.ArrayNotFoundError)


def decode_problem(e: Exception) -> str | None:
    """The reason when `e` means stored bytes failed to decode (crc32c mismatch, bad zstd frame, wrong chunk
    size), else None. Network and permission errors (OSError) are not data damage and pass through."""
    if isinstance(e, StoreError) or not isinstance(e, (ValueError, RuntimeError)):
        return None
    if isinstance(e, RuntimeError) and "decompress" not in str(e).lower():
        return None
    first = str(e).split(". ")[0][:100]  # crc32c's message goes on with raw checksum bytes
    return f"a chunk fails its checksum or cannot be decoded ({type(e).__name__}: {first})"


class BlockArray:
    """A committed block's zarr array whose reads raise CorruptBlockError when a chunk cannot be decoded."""

    def __init__(self, array: zarr.Array, block_id: str, url: str, name: str):
        self.zarr, self.block_id, self.url, self.name = array, block_id, url, name
        self.shape, self.dtype, self.ndim = array.shape, array.dtype, array.ndim

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, key) -> np.ndarray:
        try:
            return self.zarr[key]
        except Exception as e:
            reason = decode_problem(e)
            if reason is None:
                raise
            raise CorruptBlockError(self.block_id, f"array {self.name}: {reason}", self.url) from e


def create_store(url: str, manifest: dict, init_weights: dict[str, np.ndarray] | None = None, storage_options: dict | None = None) -> "FeatureStore":
    """Create the store (driver only), or reopen it when an extraction with the same identity made it."""
    manifest = normalize_manifest(manifest)
    loc = Location(url, storage_options)
    existing = read_root(loc)
    if existing is not None:
        check_format_version(existing[MANIFEST_KEY], url, writing=True)
        check_identity(existing[MANIFEST_KEY], manifest, url)
        return FeatureStore(loc, existing[MANIFEST_KEY])
    if loc.local and loc.exists() and not os.path.isdir(loc.root):
        raise StoreMismatchError(f"{url} is a file, not a MARIA feature store; use another --store")
    # Only our own layout may be there already (a create that crashed before writing the manifest).
    foreign = sorted(set(loc.listdir()) - {"zarr.json", "init", "blocks", "commits"})
    if foreign or loc.listdir("commits"):
        found = foreign[:3] or ["commit markers without a manifest"]
        raise StoreMismatchError(f"{url} exists and is not a MARIA feature store (found {found}); use another --store or delete it")
    manifest["has_init"] = init_weights is not None
    if init_weights is not None:
        _write_init(loc, _check_init_weights(init_weights, manifest), manifest)
    loc.write_atomic(layout.group_json({"description": "the blocks; see the root's maria_layout.blocks"}), "blocks", "zarr.json")
    # The manifest goes in last: a store is "there" only once everything create_store writes is complete.
    loc.write_atomic(layout.group_json(layout.root_attributes(manifest)), "zarr.json")
    return FeatureStore(loc, manifest)


def _write_init(loc: Location, weights: dict[str, np.ndarray], manifest: dict) -> None:
    """init/ as one group; its attributes hold each array's sha256 (verify checks them)."""
    metas = {name: layout.init_array_metadata(name, a, manifest) for name, a in weights.items()}
    checksums = {name: sha256_of(a) for name, a in weights.items()}
    group = group_metadata({"description": "PoE init: logits = h_mlm @ W1.T + b1 + h_ar @ W2.T + b2, in AR ids", "maria_checksums": checksums}, metas)
    loc.remove_tree("init")  # what a create that crashed half-way left
    commit.write_hierarchy(loc.sub_store("init"), group, weights, metas)


def _check_init_weights(init_weights: dict, m: dict) -> dict[str, np.ndarray]:
    missing = [k for k in INIT_ARRAYS if k not in init_weights]
    if missing:
        raise StoreError(f"init_weights lacks {missing}; pass all of {list(INIT_ARRAYS)}")
    out = {k: np.ascontiguousarray(np.asarray(init_weights[k]), dtype="<i8" if k == "vocab_map" else "<f4") for k in INIT_ARRAYS}
    V = m["vocab_size"]
    for name, shape in init_shapes(m).items():
        if out[name].shape != shape:
            raise StoreError(
                f"init weight {name} has shape {out[name].shape}, the manifest implies {shape} (vocab_size, d_mlm, d_ar); fix the manifest or the weights"
            )
    if out["vocab_map"].ndim != 1 or (out["vocab_map"] >= V).any() or (out["vocab_map"] < -1).any():
        raise StoreError(f"init vocab_map must be 1-D with values in [-1, {V}); got shape {out['vocab_map'].shape}")
    return out


def probe_store(url: str, storage_options: dict | None = None) -> bool:
    """Reach `url` once: True when a MARIA store is there, False when nothing is. An unsupported URL, missing
    credentials, a denied or unreachable server raise StoreAccessError: a job checks its store before it starts."""
    loc = Location(url, storage_options)
    if read_root(loc) is not None:
        return True
    if not loc.local:  # a new store: its bucket must be there (a write would fail only after the job's start-up)
        bucket = loc.root.split("/")[0]
        try:
            there = loc.fs.exists(bucket)
        except Exception as e:  # noqa: BLE001 -- as read_root: every backend has its own error classes
            raise (access_error(e, url, "store") or e) from e
        if not there:
            raise StoreAccessError(f"store {url}: bucket {bucket} does not exist (or these credentials cannot see it); create it or fix the URL")
    return False


def open_store(url: str, storage_options: dict | None = None) -> "FeatureStore":
    loc = Location(url, storage_options)
    root = read_root(loc)
    if root is None:
        raise StoreNotFoundError(f"no MARIA feature store at {url}; check the path or run `maria extract ... --store {url}` to create it")
    check_format_version(root[MANIFEST_KEY], url)
    return FeatureStore(loc, root[MANIFEST_KEY])


class FeatureStore:
    def __init__(self, location: Location, manifest: dict):
        self._loc = location
        self.url = location.url
        self.manifest = manifest

    def __repr__(self):
        return f"FeatureStore({self.url!r}, D={self.feature_dim}, dtype={self.manifest.get('feature_dtype')})"

    @property
    def d_mlm(self) -> int:
        return self.manifest["d_mlm"]

    @property
    def d_ar(self) -> int:
        return self.manifest["d_ar"]

    @property
    def vocab_size(self) -> int:
        return self.manifest["vocab_size"]

    @property
    def feature_dim(self) -> int:
        return self.d_mlm + self.d_ar

    @property
    def feature_dtype(self) -> np.dtype:
        return stored_feature_dtype(self.manifest)

    # --- commits ---------------------------------------------------------------------------------

    def committed_blocks(self) -> list[str]:
        return sorted(n[: -len(".json")] for n in self._loc.listdir("commits") if n.endswith(".json") and not n.startswith("."))

    def is_committed(self, block_id: str) -> bool:
        return self._loc.exists("commits", f"{check_block_id(block_id)}.json")

    def commit_info(self, block_id: str) -> dict:
        try:
            data = self._loc.read_bytes("commits", f"{check_block_id(block_id)}.json")
        except FileNotFoundError:
            raise StoreError(f"block {block_id} is not committed in {self.url}; see committed_blocks() or re-run extraction for it") from None
        try:
            info = json.loads(data)
        except ValueError as e:
            raise CorruptBlockError(block_id, f"its commit marker is not valid JSON ({e})", self.url) from e
        problem = commit.marker_problem(info)
        if problem:
            raise CorruptBlockError(block_id, f"its commit marker {problem}", self.url)
        return info

    def fingerprint(self, blocks: list[str] | None = None) -> str:
        """What the store holds, wherever it lives: its manifest's identity, its plan and each committed block's
        rows and checksums (from the markers: no array is read). A relative path, a copy or an upload of the same
        store agree; a store re-extracted from another corpus, seed or backbones, or with other blocks, does not."""
        h = hashlib.sha256()
        h.update(json.dumps({k: self.manifest.get(k) for k in IDENTITY_KEYS}, sort_keys=True).encode())
        h.update(json.dumps(self.planned_blocks()).encode())
        for b in sorted(self.committed_blocks() if blocks is None else blocks):
            info = self.commit_info(b)
            h.update(json.dumps([b, info["rows"], info["checksums"]], sort_keys=True).encode())
        return h.hexdigest()[:32]

    def num_rows(self, blocks: list[str] | None = None) -> int:
        """Rows in `blocks` (default: every committed block), from their commit markers."""
        return sum(self.commit_info(b)["rows"] for b in (self.committed_blocks() if blocks is None else blocks))

    # --- the plan: which blocks make the store complete ----------------------------------------------

    def _root(self) -> dict:
        root = read_root(self._loc)
        if root is None:
            raise StoreNotFoundError(f"the root metadata of {self.url} has gone; re-create the store")
        return root

    def _write_root(self, manifest: dict, plan: dict | None) -> None:
        self._loc.write_atomic(layout.group_json(layout.root_attributes(manifest, plan)), "zarr.json")

    def write_plan(self, block_ids: list[str], command: str) -> None:
        """Record the blocks a complete store holds and the command that finishes the job (driver only; one
        atomic write of the root metadata). Idempotent; a new command replaces the recorded one (a re-run may
        change run-time flags); other blocks are refused."""
        if not isinstance(command, str) or not command.strip():
            raise StoreError("write_plan needs the command that runs the extraction, e.g. 'maria extract ...'")
        blocks = sorted({check_block_id(b) for b in block_ids})
        old, plan = self.plan(), {"blocks": blocks, "command": command}
        if old == plan:
            return
        if old is not None and old["blocks"] != blocks:
            raise StoreMismatchError(
                f"{self.url} was planned with {len(old['blocks'])} other blocks; "
                f"an extraction with the same settings plans the same blocks: use another --store "
                f"or delete that store"
            )
        self._write_root(self._root()[MANIFEST_KEY], plan)

    def plan(self) -> dict | None:
        """{"blocks": [...], "command": str} as recorded by write_plan, or None (no plan: completeness unknown)."""
        plan = self._root().get(PLAN_KEY)
        if plan is None:
            return None
        if not (isinstance(plan, dict) and isinstance(plan.get("blocks"), list) and isinstance(plan.get("command"), str)):
            raise CorruptStoreError(f"{self.url}/zarr.json has a malformed {PLAN_KEY}; re-extract into a new --store")
        return plan

    def finish_command(self) -> str | None:
        """The recorded command that finishes the job, with this store named as its reader named it: a store
        copied or moved elsewhere is finished where it is, not at the path it was created at. None: no plan."""
        plan = self.plan()
        return None if plan is None else retarget(plan["command"], self.url)

    def planned_blocks(self) -> list[str] | None:
        plan = self.plan()
        return None if plan is None else list(plan["blocks"])

    def missing_blocks(self, committed: list[str] | None = None) -> list[str]:
        """Planned blocks not committed yet ([] when no plan is recorded)."""
        planned = self.planned_blocks() or []
        done = set(self.committed_blocks() if committed is None else committed)
        return [b for b in planned if b not in done]

    def require_complete(self) -> None:
        """IncompleteStoreError unless every planned block is committed and the job finalized (for train/eval).
        A store without a plan (hand-made, or format 1) passes: nothing says what it should hold."""
        plan = self.plan()
        if plan is None:
            return
        missing, command = self.missing_blocks(), retarget(plan["command"], self.url)
        if missing:
            raise IncompleteStoreError(
                f"{self.url} is incomplete: {len(missing)} of {len(plan['blocks'])} planned blocks are missing; finish it with `{command}`"
            )
        if "rows" not in self._root()[MANIFEST_KEY]:
            raise IncompleteStoreError(f"{self.url} is incomplete: its extraction never finished (not finalized); finish it with `{command}`")

    # --- writing ---------------------------------------------------------------------------------

    def write_block(self, block_id: str, arrays: dict[str, np.ndarray], stats: dict | None = None, overwrite: bool = False) -> bool:
        """Write and commit one block; False (and nothing written) when it is already committed. Safe to retry
        and to run concurrently: each attempt writes its own group, the marker written last decides."""
        check_block_id(block_id)
        check_format_version(self.manifest, self.url, writing=True)
        if not overwrite and self.is_committed(block_id):
            return False
        data = commit.validate_block(self, arrays)
        marker, block_group = commit.write_attempt(self, block_id, data, commit.jsonable_stats(block_id, stats))
        self._write_marker(block_id, json.dumps(marker, indent=1).encode())
        self._loc.write_atomic(block_group, "blocks", block_id, "zarr.json")  # publish it for plain Zarr readers
        current = self.commit_info(block_id)  # a concurrent attempt's marker may have landed after ours: publish the winner
        if current["attempt"] != marker["attempt"]:  # every group write is followed by this check, so the last one names the final marker
            self._loc.write_atomic(commit.block_group_from_marker(self, current), "blocks", block_id, "zarr.json")
        return True

    def _write_marker(self, block_id: str, data: bytes) -> None:  # separate so tests can simulate a crash here
        self._loc.write_atomic(data, "commits", f"{block_id}.json")

    # --- reading ---------------------------------------------------------------------------------

    def block_arrays(self, block_id: str, info: dict | None = None) -> dict[str, BlockArray]:
        """Lazy arrays of a committed block (row-range reads); CorruptBlockError when one is missing, lacks a chunk
        file (one listing per array), or a read meets a chunk that cannot be decoded."""
        info = info or self.commit_info(block_id)
        store = self._loc.sub_store(f"blocks/{block_id}/{info['attempt']}", read_only=True)
        out = {}
        for name in block_array_dtypes(self.manifest):
            try:
                array = zarr.open_array(store, path=name, mode="r", zarr_format=3)  # 3: no v2 probes
            except _ZARR_MISSING:
                raise CorruptBlockError(block_id, f"array {name} of attempt {info['attempt']} is missing", self.url) from None
            # every chunk of a committed block was written (write_empty_chunks): zarr would read a missing one as zeros
            stored = array.nchunks_initialized if array.size else 0
            if stored < (array.nchunks if array.size else 0):
                raise CorruptBlockError(
                    block_id, f"array {name} has {stored} of its {array.nchunks} chunk files (a missing chunk would read as zeros)", self.url
                )
            out[name] = BlockArray(array, block_id, self.url, name)
        return out

    def read_block(self, block_id: str, verify: bool = False) -> dict[str, np.ndarray]:
        """All arrays of a block; features in the stored dtype (bf16 as uint16 bits, float8 as uint8 codes with
        their per-row `feature_scales`: see as_float32)."""
        info = self.commit_info(block_id)
        data = {name: arr[...] for name, arr in self.block_arrays(block_id, info).items()}
        if verify:
            problem = commit.block_problem(data, info, self)
            if problem:
                raise CorruptBlockError(block_id, problem, self.url)
        return data

    def init_weights(self, verify: bool = False) -> dict[str, np.ndarray]:
        if not self.manifest.get("has_init", True):
            raise StoreError(f"{self.url} was created without init weights; re-create it with them, or train from a random init")
        out = {}
        for name in INIT_ARRAYS:
            try:
                out[name] = zarr.open_array(self._loc.zarr_store, path=f"init/{name}", mode="r", zarr_format=3)[...]
            except _ZARR_MISSING:
                raise CorruptStoreError(f"{self.url} lacks init/{name}; run `maria verify --store {self.url}` and re-extract into a new --store") from None
            except Exception as e:
                if decode_problem(e) is None:
                    raise
                raise CorruptStoreError(f"init/{name} of {self.url} is corrupt: {decode_problem(e)}; re-extract into a new --store") from e
        if verify:
            for name, want in self.init_checksums().items():
                if name in out and sha256_of(out[name]) != want:
                    raise CorruptStoreError(f"init/{name} of {self.url} is corrupt: its checksum does not match; re-extract into a new --store")
        return out

    def init_checksums(self) -> dict[str, str]:
        """sha256 of each init array recorded at create time ({} for format-1 stores, which had none)."""
        attrs = layout.group_attributes(self._loc.read_optional("init", "zarr.json")) or {}
        return dict(attrs.get("maria_checksums") or {})

    # --- maintenance (driver only) -----------------------------------------------------------------

    def gc_uncommitted(self) -> int:
        """Delete attempts no marker names, and point every block group at its committed attempt. Only while
        no writer runs: an in-flight attempt looks uncommitted."""
        markers = {b: self.commit_info(b) for b in self.committed_blocks()}
        if self.manifest.get("format_version") == FORMAT_VERSION:
            commit.repair_block_groups(self, markers)  # before deleting: a stale group may name a loser
        removed = 0
        for block_id in self._loc.listdir("blocks"):
            if block_id == "zarr.json":
                continue
            keep = {"zarr.json", markers[block_id]["attempt"]} if block_id in markers else set()
            for attempt in sorted(set(self._loc.listdir("blocks", block_id)) - keep):
                self._loc.remove_tree("blocks", block_id, attempt)
                removed += attempt != "zarr.json"
            if block_id not in markers:
                self._loc.remove_tree("blocks", block_id)
        return removed

    def finalize(self) -> None:
        """Record the totals in the manifest (driver only, after all blocks are written)."""
        blocks = self.committed_blocks()
        plan = self._root().get(PLAN_KEY)
        self.manifest = dict(self.manifest, rows=self.num_rows(blocks), blocks=len(blocks))
        self._write_root(self.manifest, plan)
