"""Test-only fault hooks, set by environment variables (never by a user flag):

    MARIA_FAULT_KILL_BLOCK=<id>    SIGKILL the backbone actor once when it starts this block
    MARIA_FAULT_ENOSPC_BLOCK=<id>  fail this block's write with "no space left on device" after its data
    MARIA_FAULT_SLEEP_S=<s>        sleep this long per block in the backbone stage (to interrupt a job mid-way)
    MARIA_FAULT_DIR=<dir>          where the kill hook records that it fired (default /tmp)

The driver forwards them to the stages as a per-stage runtime_env, so they reach workers on any
cluster, including one started before the variables were set.
"""
from __future__ import annotations

import errno
import hashlib
import os
import signal
import time

KILL, ENOSPC, SLEEP, DIR = "MARIA_FAULT_KILL_BLOCK", "MARIA_FAULT_ENOSPC_BLOCK", "MARIA_FAULT_SLEEP_S", "MARIA_FAULT_DIR"


def fault_env() -> dict[str, str]:
    """The fault variables set in this (driver) process, to forward to the workers."""
    return {k: os.environ[k] for k in (KILL, ENOSPC, SLEEP, DIR) if os.environ.get(k)}


def remote_args() -> dict:
    """Extra Ray options for a stage: the fault variables, when any is set (tests only)."""
    env = fault_env()
    return {"runtime_env": {"env_vars": env}} if env else {}


def kill_marker(out: str, block_id: str) -> str:
    """Where the kill hook records that it fired."""
    tag = hashlib.sha256(out.encode()).hexdigest()[:12]  # hash() is salted per process; this is not
    return os.path.join(os.environ.get(DIR, "/tmp"), f"maria-killed-{tag}-{block_id}")


def before_block(out: str, block_id: str) -> None:
    """Backbone stage, before a block: the kill (once, a marker file records it so the retry on a
    new actor goes through) and the sleep hooks."""
    if os.environ.get(KILL) == block_id:
        marker = kill_marker(out, block_id)
        if not os.path.exists(marker):
            open(marker, "w").close()
            os.kill(os.getpid(), signal.SIGKILL)
    if os.environ.get(SLEEP):
        time.sleep(float(os.environ[SLEEP]))


def write_block(store, block_id: str, arrays: dict, stats: dict) -> None:
    """store.write_block, or, for the ENOSPC block, a disk that fills up after the data but before
    the commit marker."""
    if os.environ.get(ENOSPC) != block_id:
        store.write_block(block_id, arrays, stats=stats)
        return

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", f"{store.url}/commits/{block_id}.json")

    original, store._write_marker = store._write_marker, full_disk
    try:
        store.write_block(block_id, arrays, stats=stats)
    finally:
        store._write_marker = original
