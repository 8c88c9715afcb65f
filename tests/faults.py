"""Faults the extraction tests inject through `run_extract(cfg, hooks=Faults(...))` (or, for a job in
another process, `fault_command`): a killed actor, a full disk, a slow block. Test code only; the job
itself just calls its BlockHooks."""

import dataclasses
import errno
import hashlib
import json
import os
import signal
import sys
import time
from pathlib import Path

import ray.cloudpickle

from maria_extract.stages import BlockHooks

ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # Ray's workers cannot import tests/


@dataclasses.dataclass
class Faults(BlockHooks):
    kill_block: str | None = None  # SIGKILL the backbone actor once when it starts this block
    enospc_block: str | None = None  # this block's commit marker meets a full disk (its data is written)
    sleep_s: float = 0.0  # per block in the backbone stage (to interrupt a job mid-way)
    marker_dir: str = "/tmp"  # where the kill records that it fired, so the retry goes through

    def before_block(self, store_url: str, block_id: str) -> None:
        if self.kill_block == block_id:
            marker = kill_marker(store_url, block_id, self.marker_dir)
            if not os.path.exists(marker):
                open(marker, "w").close()
                os.kill(os.getpid(), signal.SIGKILL)
        if self.sleep_s:
            time.sleep(self.sleep_s)

    def write_block(self, store, block_id: str, arrays: dict, stats: dict) -> None:
        if self.enospc_block != block_id:
            return store.write_block(block_id, arrays, stats=stats)

        def full_disk(*args, **kwargs):
            raise OSError(errno.ENOSPC, "No space left on device", f"{store.url}/commits/{block_id}.json")

        store._write_marker = full_disk  # this store object is the task's own: nothing to restore
        store.write_block(block_id, arrays, stats=stats)


def kill_marker(store_url: str, block_id: str, marker_dir: str = "/tmp") -> str:
    tag = hashlib.sha256(store_url.encode()).hexdigest()[:12]
    return os.path.join(marker_dir, f"maria-killed-{tag}-{block_id}")


def fault_command(faults: Faults, *args) -> list[str]:
    """`maria <args>` in a subprocess with these faults injected (tests/run_with_faults.py)."""
    script = Path(__file__).with_name("run_with_faults.py")
    return [sys.executable, str(script), json.dumps(dataclasses.asdict(faults)), *map(str, args)]
