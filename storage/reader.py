"""Reading a feature store for training: a seeded, resumable shuffled batch stream, and load_all for small stores.

How an epoch is shuffled (all of it derived from (seed, epoch), never from timing):
1. Every committed block is cut into chunks of `chunk_rows` rows; the chunk order is permuted.
2. Consecutive chunks of that order are grouped into windows of at least `buffer_rows` rows.
3. Each window is loaded, and its rows permuted with an rng seeded by (seed, epoch, window).
4. The epoch is the concatenation of the permuted windows, cut into batches of `batch_size` rows.
So a batch's content depends only on its position in the stream: resuming at batch k skips whole windows
without reading them and starts mid-window, giving exactly the batches an uninterrupted run would.
"""

from __future__ import annotations

import warnings
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from maria_storage.format import CHUNK_ROWS, SCALES, CorruptBlockError, StoreError, as_float32, block_array_dtypes
from maria_storage.store import FeatureStore, open_store

_READ = ("features", "targets", "mask_rates")  # the arrays a training batch needs (and a float8 store's scales)


class ShuffledReader:
    """Seeded, shuffled mini-batches over committed blocks. Yields {"features": float32 (B, D),
    "targets": int64 (B,), "mask_rates": float32 (B,)}. Holds up to two windows in memory (the current one
    and the next, loaded in a background thread): about 2 * buffer_rows * D * (2, or 1 for float8) bytes."""

    def __init__(
        self,
        store: FeatureStore | str,
        batch_size: int,
        seed: int = 0,
        buffer_rows: int = 65536,
        chunk_rows: int = CHUNK_ROWS,
        blocks: list[str] | None = None,
        drop_last: bool = False,
        skip_corrupt: bool = False,
        verify: bool = True,
        prefetch: bool = True,
    ):
        if batch_size < 1 or buffer_rows < 1 or chunk_rows < 1:
            raise ValueError(f"batch_size, buffer_rows, chunk_rows must be >= 1; got {batch_size}, {buffer_rows}, {chunk_rows}")
        if not isinstance(seed, int) or seed < 0:
            raise ValueError(f"seed must be a non-negative int, got {seed!r}")
        self.store = open_store(store) if isinstance(store, str) else store
        self.batch_size, self.seed, self.buffer_rows = batch_size, seed, buffer_rows
        self.drop_last, self.skip_corrupt, self.verify, self.prefetch = drop_last, skip_corrupt, verify, prefetch
        self.blocks = sorted(set(blocks if blocks is not None else self.store.committed_blocks()))
        self._names = _READ + ((SCALES,) if SCALES in block_array_dtypes(self.store.manifest) else ())
        self._info = {b: self.store.commit_info(b) for b in self.blocks}
        self._chunks = [(b, start, min(start + chunk_rows, info["rows"])) for b, info in self._info.items() for start in range(0, info["rows"], chunk_rows)]
        self.epoch = 0
        self.batches_done_in_epoch = 0
        self.skipped_blocks: set[str] = set()  # found corrupt and skipped (skip_corrupt=True)
        self._verified: set[str] = set()
        self._arrays: dict[str, dict] = {}  # lazily opened zarr arrays per block

    # --- state -----------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "batches_done_in_epoch": self.batches_done_in_epoch, "seed": self.seed, "skipped_blocks": sorted(self.skipped_blocks)}

    def load_state_dict(self, state: dict) -> None:
        self.epoch = int(state["epoch"])
        self.batches_done_in_epoch = int(state["batches_done_in_epoch"])
        self.seed = int(state["seed"])
        # Blocks skipped before the checkpoint must stay skipped, or the stream positions would shift.
        self.skipped_blocks = set(state.get("skipped_blocks", []))

    def num_rows(self) -> int:
        return sum(info["rows"] for b, info in self._info.items() if b not in self.skipped_blocks)

    def __len__(self) -> int:
        rows = self.num_rows()
        return rows // self.batch_size if self.drop_last else -(-rows // self.batch_size)

    # --- the epoch plan ----------------------------------------------------------------------------

    def _windows(self, epoch: int) -> list[list[int]]:
        """Chunk indices per window. Grouped on nominal chunk sizes (corrupt blocks included), so skipping a
        block found corrupt mid-epoch changes no window's membership, only its row count."""
        order = np.random.default_rng([self.seed, epoch]).permutation(len(self._chunks))
        windows, current, rows = [], [], 0
        for ci in order.tolist():
            b, start, stop = self._chunks[ci]
            current.append(ci)
            rows += stop - start
            if rows >= self.buffer_rows:
                windows.append(current)
                current, rows = [], 0
        if current:
            windows.append(current)
        return windows

    def _window_rows(self, window: list[int]) -> int:
        return sum(stop - start for b, start, stop in (self._chunks[ci] for ci in window) if b not in self.skipped_blocks)

    # --- loading ---------------------------------------------------------------------------------

    def _skip_or_raise(self, error: CorruptBlockError) -> None:
        url = self.store.url
        if not self.skip_corrupt:
            raise CorruptBlockError(
                error.block_id, error.reason, url, fix=f"run `maria verify --store {url}`; pass --skip-corrupt to train without it"
            ) from error
        warnings.warn(f"skipping block {error.block_id} of {url}: corrupt ({error.reason})", stacklevel=3)
        self.skipped_blocks.add(error.block_id)

    def _load_window(self, window: list[int]) -> dict[str, np.ndarray]:
        """Rows of a window's chunks (in window order), features in the stored dtype; corrupt blocks dropped."""
        by_block: dict[str, list[tuple[int, int, int]]] = {}
        for pos, ci in enumerate(window):
            b, start, stop = self._chunks[ci]
            if b not in self.skipped_blocks:
                by_block.setdefault(b, []).append((pos, start, stop))
        pieces: dict[int, dict[str, np.ndarray]] = {}
        for b, ranges in by_block.items():
            try:
                pieces.update(self._read_ranges(b, ranges))
            except CorruptBlockError as e:  # nothing of a corrupt block is kept, so the window stays exact
                self._skip_or_raise(e)
        if not pieces:
            return {
                name: np.zeros((0, self.store.feature_dim) if name == "features" else 0, dtype)
                for name, dtype in block_array_dtypes(self.store.manifest).items()
                if name in self._names
            }
        ordered = [pieces[pos] for pos in sorted(pieces)]
        return {name: np.concatenate([p[name] for p in ordered]) for name in self._names}

    def _read_ranges(self, b: str, ranges: list[tuple[int, int, int]]) -> dict[int, dict[str, np.ndarray]]:
        """{window position: rows} of one block's chunks; CorruptBlockError when any of it is damaged."""
        if self.verify and b not in self._verified:
            # Checksums cover whole arrays, so the first touch reads the block in full; keep copies of this
            # window's rows only, so the block itself is freed right away.
            source = self.store.read_block(b, verify=True)
            self._verified.add(b)
        else:
            if b not in self._arrays:
                self._arrays[b] = self.store.block_arrays(b, self._info[b])
            source = self._arrays[b]  # BlockArray: a chunk that fails its crc32c raises CorruptBlockError
        return {pos: {name: np.array(source[name][start:stop]) for name in self._names} for pos, start, stop in ranges}

    # --- iteration -------------------------------------------------------------------------------

    def __iter__(self):
        """One epoch from the current position; the epoch counter advances when it is exhausted."""
        epoch, B = self.epoch, self.batch_size
        windows = self._windows(epoch)
        # Find the window holding the first row not yet consumed.
        skip, w0 = self.batches_done_in_epoch * B, 0
        while w0 < len(windows) and skip >= (rows := self._window_rows(windows[w0])):
            skip -= rows
            w0 += 1
        # Prefetch: the next window loads in a thread while this one is consumed (zarr and numpy release the GIL).
        pool = ThreadPoolExecutor(max_workers=1) if self.prefetch else None

        def load(w):
            return pool.submit(self._load_window, windows[w]) if pool else windows[w]

        pending = load(w0) if w0 < len(windows) else None
        parts, have = [], 0
        try:
            for w in range(w0, len(windows)):
                data = pending.result() if pool else self._load_window(pending)
                pending = load(w + 1) if w + 1 < len(windows) else None
                n = len(data["targets"])
                perm = np.random.default_rng([self.seed, epoch, w]).permutation(n)
                i, skip = skip, 0
                while i < n:
                    take = min(B - have, n - i)
                    parts.append(self._gather(data, perm[i : i + take]))
                    have, i = have + take, i + take
                    if have == B:
                        self.batches_done_in_epoch += 1  # before yielding: state_dict() inside the loop is exact
                        yield self._batch(parts)
                        parts, have = [], 0
            if have and not self.drop_last:
                self.batches_done_in_epoch += 1
                yield self._batch(parts)
        finally:
            if pool:
                pool.shutdown(wait=True, cancel_futures=True)
        self.epoch, self.batches_done_in_epoch = epoch + 1, 0

    def _gather(self, data: dict, idx: np.ndarray) -> dict:
        return {name: data[name][idx] for name in self._names}

    def _batch(self, parts: list[dict]) -> dict[str, np.ndarray]:
        cat = {k: np.concatenate([p[k] for p in parts]) if len(parts) > 1 else parts[0][k] for k in parts[0]}
        return {
            "features": as_float32(cat["features"], self.store.manifest, cat.get(SCALES)),
            "targets": cat["targets"].astype(np.int64),
            "mask_rates": cat["mask_rates"].astype(np.float32, copy=False),
        }


def load_all(
    store: FeatureStore | str, blocks: list[str] | None = None, verify: bool = False, skip_corrupt: bool = False, float32: bool = True
) -> dict[str, np.ndarray]:
    """Every committed block (or `blocks`) concatenated in block-id order: targets int64, features float32
    (or as stored with float32=False: half the RAM), other arrays in their stored dtypes. For stores that fit
    in RAM. A damaged block raises CorruptBlockError, or is skipped with a warning (skip_corrupt=True)."""
    store = open_store(store) if isinstance(store, str) else store
    blocks = sorted(blocks if blocks is not None else store.committed_blocks())
    parts = []
    for b in blocks:
        try:
            parts.append(store.read_block(b, verify=verify))
        except CorruptBlockError as e:
            if not skip_corrupt:
                raise
            warnings.warn(f"skipping corrupt block {b}: {e}", stacklevel=2)
    if not parts:
        raise StoreError(f"no readable rows in {len(blocks)} block(s) of {store.url}; run `maria verify --store {store.url}` and re-extract")
    out = {name: np.concatenate([p[name] for p in parts]) for name in parts[0]}
    if float32:  # else a float8 store's per-row scales stay beside the codes (SCALES), for the caller to decode
        out["features"] = as_float32(out["features"], store.manifest, out.pop(SCALES, None))
    out["targets"] = out["targets"].astype(np.int64)
    return out
