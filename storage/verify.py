"""verify_store: everything wrong with a feature store, each problem classed as corrupt, incomplete or
unreadable, so a CLI can map them to different exit codes. Backs `maria verify --store URL`."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import zarr

from maria_storage.commit import block_problem, published_attempt
from maria_storage.format import FORMAT_VERSION, INIT_ARRAYS, CorruptStoreError, IncompleteStoreError, StoreError, init_shapes, sha256_of
from maria_storage.store import _ZARR_MISSING, FeatureStore, decode_problem, open_store

CORRUPT, INCOMPLETE, UNREADABLE = "corrupt", "incomplete", "unreadable"


@dataclass(frozen=True)
class Problem:
    kind: str  # CORRUPT: damaged data/metadata; INCOMPLETE: the job has not finished; UNREADABLE: no store / bad input
    where: str  # "block b000123", "init", "manifest", "plan", "store"
    message: str
    error: StoreError | None = None  # UNREADABLE only: the error open_store raised

    def __str__(self) -> str:
        return f"{self.where}: {self.message}" if self.where != "store" else self.message


class VerifyReport(list):
    """The problems as one-line strings (a list: `verify_store(url) == []` means sound), plus `.problems`
    (Problem objects), `.corrupt` / `.incomplete`, `.missing_blocks`, `.command` (what finishes the job),
    and `error()`: the exception a caller should raise, the corrupt kind first."""

    def __init__(self, problems: list[Problem], url: str = "", missing_blocks: list[str] | None = None, command: str | None = None):
        super().__init__(str(p) for p in problems)
        self.problems, self.url = problems, url
        self.missing_blocks = list(missing_blocks or [])
        self.command = command

    @property
    def corrupt(self) -> list[Problem]:
        return [p for p in self.problems if p.kind == CORRUPT]

    @property
    def incomplete(self) -> list[Problem]:
        return [p for p in self.problems if p.kind == INCOMPLETE]

    def error(self) -> StoreError | None:
        """CorruptStoreError if anything is damaged, else IncompleteStoreError, else the open error; None if sound.
        One line: the first problem, how many more, and the fix."""
        if self.corrupt:
            return CorruptStoreError(f"{self.url}: {self._first(self.corrupt)}; {self._corrupt_fix()}")
        if self.incomplete:  # its message already names the command that finishes the job
            return IncompleteStoreError(f"{self.url} is incomplete: {self._first(self.incomplete)}")
        unreadable = [p for p in self.problems if p.kind == UNREADABLE]
        return (unreadable[0].error or StoreError(str(unreadable[0]))) if unreadable else None

    def as_dict(self) -> dict:
        """The report as JSON-ready data (`maria verify --json`)."""
        return {
            "store": self.url,
            "ok": not self.problems,
            "problems": [{"kind": p.kind, "where": p.where, "message": p.message} for p in self.problems],
            "missing_blocks": self.missing_blocks,
            "command": self.command,
        }

    @staticmethod
    def _first(problems: list[Problem]) -> str:
        return f"{problems[0]}" + (f" (and {len(problems) - 1} more)" if len(problems) > 1 else "")

    def _corrupt_fix(self) -> str:
        if all(p.where.startswith("block ") or p.where == "plan" for p in self.corrupt):
            rerun = f"`{self.command}`" if self.command else "the extraction (same command)"
            return f"delete the damaged blocks' commits/<block_id>.json in the store and re-run {rerun} to rewrite them"
        return "re-extract into a new --store (the store's shared metadata or init weights are damaged)"


def _check_init(store: FeatureStore, check_data: bool) -> list[str]:
    if not store.manifest.get("has_init", True):
        return []
    expected, problems = init_shapes(store.manifest), []
    checksums = store.init_checksums()
    if not checksums and store.manifest.get("format_version") == FORMAT_VERSION:
        problems.append("its group metadata records no checksums (init/zarr.json damaged)")
    for name in INIT_ARRAYS:
        try:
            arr = zarr.open_array(store._loc.zarr_store, path=f"init/{name}", mode="r", zarr_format=3)
        except _ZARR_MISSING:
            problems.append(f"array {name} is missing")
            continue
        if name == "vocab_map":
            if arr.ndim != 1 or arr.dtype != np.int64:
                problems.append(f"vocab_map has shape {arr.shape} dtype {arr.dtype}, expected 1-D int64")
                continue
        elif arr.shape != expected[name]:
            problems.append(f"{name} has shape {arr.shape}, the manifest implies {expected[name]}")
            continue
        if check_data and name in checksums:
            try:
                if sha256_of(arr[...]) != checksums[name]:
                    problems.append(f"checksum of {name} does not match (data damaged)")
            except Exception as e:
                if decode_problem(e) is None:
                    raise
                problems.append(f"{name}: {decode_problem(e)}")
    return problems


def _check_block(store: FeatureStore, block_id: str, check_data: bool) -> str | None:
    try:
        info = store.commit_info(block_id)
        for key in ("attempt", "rows", "checksums"):
            if key not in info:
                return f"commit marker lacks {key!r}"
        arrays = store.block_arrays(block_id, info)
    except StoreError as e:  # CorruptBlockError carries the bare reason
        return getattr(e, "reason", str(e))
    for name, arr in arrays.items():  # metadata-only checks first: cheap, and they explain the data checks
        if arr.shape[0] != info["rows"]:
            return f"array {name} has {arr.shape[0]} rows, the commit marker says {info['rows']}"
    f = arrays["features"]
    if f.ndim != 2 or f.shape[1] != store.feature_dim:
        return f"features have shape {f.shape}, expected (N, {store.feature_dim}) = (N, d_mlm + d_ar)"
    if not check_data:
        return None
    try:
        data = {name: arr[...] for name, arr in arrays.items()}
    except StoreError as e:
        return getattr(e, "reason", str(e))
    return block_problem(data, info, store)


def _completeness(store: FeatureStore, blocks: list[str]) -> tuple[list[Problem], list[str], str | None]:
    """Incomplete: planned blocks missing, never finalized, or block groups not yet published. Corrupt:
    committed blocks outside the plan."""
    plan = store.plan()
    if plan is None:
        return [], [], None  # hand-made or format-1 store: nothing says what "complete" is
    command = store.finish_command()
    missing = store.missing_blocks(blocks)
    problems = []
    if missing:
        problems.append(
            Problem(
                INCOMPLETE,
                "plan",
                f"{len(missing)} of {len(plan['blocks'])} planned blocks are missing (first: {', '.join(missing[:3])}); finish the job with `{command}`",
            )
        )
    elif "rows" not in store.manifest:
        problems.append(
            Problem(INCOMPLETE, "plan", f"every planned block is committed but the extraction never finished (not finalized); finish the job with `{command}`")
        )
    extra = sorted(set(blocks) - set(plan["blocks"]))
    if extra:
        problems.append(
            Problem(
                CORRUPT,
                "plan",
                f"{len(extra)} committed blocks are not in the plan (first: "
                f"{', '.join(extra[:3])}); delete their commits/<id>.json or re-extract into a new --store",
            )
        )
    return problems, missing, command


def verify_store(url: str, check_data: bool = True, storage_options: dict | None = None, progress: Callable[[int, int], None] | None = None) -> VerifyReport:
    """Every problem, each naming what it concerns ("block b000123: ..."); empty when the store is sound and
    complete. check_data=False skips reading the arrays (no checksums, no NaN scan): metadata and counts only.
    progress(done, total) is called after each block."""
    try:
        store = open_store(url, storage_options)
    except StoreError as e:
        return VerifyReport([Problem(CORRUPT if isinstance(e, CorruptStoreError) else UNREADABLE, "store", str(e), e)], url)
    m = store.manifest  # open_store has already refused other format versions
    missing = [k for k in ("d_mlm", "d_ar", "vocab_size") if not isinstance(m.get(k), int)]
    if missing:
        return VerifyReport([Problem(CORRUPT, "manifest", f"lacks {missing}")], url)
    problems = [Problem(CORRUPT, "init", p) for p in _check_init(store, check_data)]
    blocks = store.committed_blocks()
    for i, block_id in enumerate(blocks):
        problem = _check_block(store, block_id, check_data)
        if problem:
            problems.append(Problem(CORRUPT, f"block {block_id}", problem))
        if progress:
            progress(i + 1, len(blocks))
    try:
        plan_problems, missing_blocks, command = _completeness(store, blocks)
    except CorruptStoreError as e:  # a malformed plan
        plan_problems, missing_blocks, command = [Problem(CORRUPT, "plan", str(e))], [], None
    problems += plan_problems
    if m.get("format_version") == FORMAT_VERSION:
        problems += _unpublished(store, blocks, command)
    if "rows" in m and not problems:
        rows = store.num_rows(blocks)
        if m["rows"] != rows:
            problems.append(Problem(CORRUPT, "manifest", f"rows is {m['rows']} but the committed blocks hold {rows} (blocks committed after finalize?)"))
    return VerifyReport(problems, url, missing_blocks, command)


def _unpublished(store: FeatureStore, blocks: list[str], command: str | None) -> list[Problem]:
    """Committed blocks whose Zarr group does not (yet) name the committed attempt: plain Zarr readers would
    miss them or read another attempt. Re-running the extraction rewrites the groups (gc_uncommitted)."""
    stale = [b for b in blocks if published_attempt(store, b) != _attempt(store, b)]
    if not stale:
        return []
    fix = f"`{command}`" if command else "FeatureStore.gc_uncommitted() (the extraction runs it at its end)"
    return [
        Problem(
            INCOMPLETE,
            "blocks",
            f"{len(stale)} committed blocks have no Zarr group naming their committed attempt (first: {', '.join(stale[:3])}); rewrite them with {fix}",
        )
    ]


def _attempt(store: FeatureStore, block_id: str) -> str | None:
    try:
        return store.commit_info(block_id).get("attempt")
    except StoreError:
        return None  # reported by _check_block
