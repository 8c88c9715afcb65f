"""A feature store as a PyTorch IterableDataset, for training your own head or probe on the cached features:

    from torch.utils.data import DataLoader
    from maria_train_head.dataset import FeatureDataset
    ds = FeatureDataset("s3://bucket/maria/train", batch_size=4096, seed=0, epochs=2)
    for batch in DataLoader(ds, batch_size=None, num_workers=2, multiprocessing_context="spawn"):
        batch["features"]   # float32 (B, d_mlm + d_ar) = [h_mlm ; h_ar]
        batch["targets"]    # int64 (B,) AR token ids
        batch["mask_rates"] # float32 (B,) the mask rate of each row's window

Batches are the store's seeded shuffle (maria_storage.ShuffledReader): the same (seed, epoch) gives the same
batches, whatever num_workers is (worker w yields batches w, w + n, ... and the DataLoader interleaves them
back in order). Resumable: after consuming k batches, `ds.state_dict(k)` -> later `ds.load_state_dict(state)`
continues at batch k + 1. Each worker opens the store itself (spawn-safe: only the URL is pickled) and
reads the whole stream, yielding its share, so extra workers add decode parallelism, not I/O savings.
"""

from __future__ import annotations

import torch
from torch.utils.data import IterableDataset, get_worker_info

from maria_storage import ShuffledReader


class FeatureDataset(IterableDataset):
    def __init__(self, store: str, batch_size: int, seed: int = 0, epochs: int = 1, buffer_rows: int = 65536, verify: bool = True):
        if epochs < 1:
            raise ValueError(f"epochs must be >= 1, got {epochs}")
        self.store, self.batch_size, self.seed, self.epochs = str(store), batch_size, seed, epochs
        self.buffer_rows, self.verify, self.start = buffer_rows, verify, 0
        self.batches_per_epoch = len(self._reader(prefetch=False))  # metadata only: no block is read here

    def _reader(self, prefetch: bool = True) -> ShuffledReader:
        return ShuffledReader(self.store, self.batch_size, seed=self.seed, buffer_rows=self.buffer_rows, verify=self.verify, prefetch=prefetch)

    def __len__(self) -> int:
        return self.epochs * self.batches_per_epoch - self.start

    def state_dict(self, batches_consumed: int) -> dict:
        """Where a run stands after it consumed `batches_consumed` batches of this dataset's current pass."""
        return {"store": self.store, "seed": self.seed, "batch_size": self.batch_size, "batch": self.start + batches_consumed}

    def load_state_dict(self, state: dict) -> None:
        mine = {"store": self.store, "seed": self.seed, "batch_size": self.batch_size}
        if {k: state.get(k) for k in mine} != mine:
            raise ValueError(f"state is of another stream ({ {k: state.get(k) for k in mine} }); this dataset is {mine}")
        self.start = int(state["batch"])

    def __iter__(self):
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        reader = self._reader()  # opened here, in the worker process
        g, end = self.start, self.epochs * self.batches_per_epoch
        epoch, within = divmod(g, self.batches_per_epoch)
        reader.load_state_dict({"epoch": epoch, "batches_done_in_epoch": within, "seed": self.seed})
        while g < end:
            for batch in reader:  # the rest of one epoch
                if g % workers == worker:
                    yield {k: torch.from_numpy(v) for k, v in batch.items()}
                g += 1
                if g == end:
                    return
