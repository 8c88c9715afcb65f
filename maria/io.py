"""Atomic, non-clobbering writes: the one definition every writer of the project uses.

A file is written beside its target and moved over it with os.replace (atomic on POSIX), so a
crash leaves either the old file or the new one. A folder is built beside its target and swapped
in by renames. `guard_output` refuses to replace a folder this project did not write: an output
path must never delete a user's data or one of the command's own inputs.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import shutil
import socket
import time
from pathlib import Path

import psutil


class OutputExistsError(ValueError):
    """An output path holds something we must not replace; the message names the fix."""


class OutputLockedError(OutputExistsError):
    """Another run holds the output's lock; the message names it and the fix."""


class CorruptDataError(ValueError):
    """Data on disk is damaged (a truncated or garbled file). The CLI exits with code 3 for it (and
    for the store's CorruptBlockError), not 2: the input was right, its bytes are not."""


def file_sha256(path: str | Path) -> str:
    """sha256 of a file's bytes (what checkpoints record for each weights file, and check when loading)."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def atomic_write(path: str | Path, data: bytes | str) -> Path:
    """Write `data` to `path` atomically (temp file in the same folder, then os.replace)."""
    path = Path(path)
    with atomic_file(path) as tmp:
        tmp.write_bytes(data.encode() if isinstance(data, str) else data)
    return path


@contextlib.contextmanager
def atomic_file(path: str | Path):
    """Yields a temp path beside `path`; on success it replaces `path`, on error it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{os.urandom(4).hex()}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


@contextlib.contextmanager
def atomic_dir(path: str | Path):
    """Yields a fresh temp folder beside `path`; on success it takes `path`'s place (the old one,
    if any, is removed only after the new one is complete), on error it is removed."""
    path = Path(path)
    tmp, old = previous_dir(path, "partial"), previous_dir(path, "old")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        if path.exists():
            path.rename(old)  # a crash between these renames leaves both copies, never none
        tmp.rename(path)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def previous_dir(path: Path, kind: str = "old") -> Path:
    """Where atomic_dir keeps the old copy ("old") or builds the new one ("partial") of `path`."""
    return path.with_name(f".{path.name}.{kind}")


def _inside(a: Path, b: Path) -> bool:
    return a == b or b in a.parents


def check_outside_inputs(out: str | Path, inputs: tuple, what: str = "output") -> Path:
    """`out` may never be, contain or sit inside an input (checked before anything, even a lock, is created)."""
    out = Path(out).expanduser().resolve()
    for given in inputs:
        if given is None or "://" in str(given) or not Path(given).expanduser().exists():
            continue  # hub ids and URLs are not local folders we could clobber
        src = Path(given).expanduser().resolve()
        if _inside(out, src) or _inside(src, out):
            raise OutputExistsError(f"{what} {out} overlaps the input {src}; pick an --out outside every input")
    return out


def guard_output(out: str | Path, marker: str, overwrite: bool, inputs: tuple = (), what: str = "output") -> Path:
    """Check that `out` may be written: it does not exist, is an empty folder, or holds `marker`
    (so we wrote it) and `overwrite` is set. It may never be, contain or sit inside an input."""
    out = check_outside_inputs(out, inputs, what)
    if not out.exists() or (out.is_dir() and not any(out.iterdir())):
        return out  # nothing there to lose
    if not out.is_dir():
        raise OutputExistsError(f"{what} {out} is an existing file; pass an --out path that is a new folder")
    if not (out / marker).exists():
        raise OutputExistsError(f"{what} {out} exists and was not written by maria (no {marker}); pick a new --out folder")
    if not overwrite:
        raise OutputExistsError(f"{what} {out} already exists; pass --overwrite to replace it, or pick a new --out")
    return out


def guard_output_file(out: str | Path | None, overwrite: bool, is_ours, inputs: tuple = (), flag: str = "--out") -> None:
    """The file twin of guard_output: a new path is fine; an existing file needs --overwrite and must
    look like one of ours (`is_ours(text)`); a folder or an input is never replaced."""
    if out is None:
        return
    p = Path(out).expanduser()
    for given in inputs:
        if given and "://" not in str(given) and Path(given).expanduser().resolve() == p.resolve():
            raise OutputExistsError(f"{flag} {out} is also an input; pick another {flag}")
    if p.is_dir():
        raise OutputExistsError(f"{flag} {out} is a folder; pass a file path such as {p / 'out.json'}")
    if not p.exists():
        return
    if not overwrite:
        raise OutputExistsError(f"{flag} {out} already exists; pass --overwrite to replace it, or pick a new file")
    try:
        ours = is_ours(p.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError):
        ours = False
    if not ours:
        raise OutputExistsError(f"{flag} {out} exists and was not written by maria; pick a new file (it is left as it is)")


def jsonl_with_keys(*keys: str):
    """An is_ours test for JSONL outputs: every line an object with these keys."""

    def check(text: str) -> bool:
        rows = [json.loads(line) for line in text.splitlines() if line.strip()]
        return all(isinstance(r, dict) and all(k in r for k in keys) for r in rows)

    return check


# ---- one writer per output ----------------------------------------------------------------------


def lock_path(out: str | Path) -> Path:
    """Where the lock of an output folder lives: beside it, so the folder itself stays the run's alone."""
    out = Path(out).expanduser().resolve()
    if not out.name:
        raise OutputExistsError(f"output {out} is the file system's root; pass a new folder as --out")
    return out.with_name(f".{out.name}.lock")


def _started(pid: int) -> float | None:
    """When process `pid` started (None when there is none): a pid alone can be reused by another process."""
    try:
        return psutil.Process(pid).create_time()
    except (psutil.NoSuchProcess, psutil.AccessDenied, ValueError):
        return None


def _holder_alive(holder: dict) -> bool | None:
    """Is the run a lock file names still running? None when this host cannot tell (it ran on another host)."""
    if holder.get("host") != socket.gethostname():
        return None
    try:
        started, recorded = _started(int(holder.get("pid"))), holder.get("pid_started")
    except (TypeError, ValueError):
        return False  # a lock file without a pid: nothing holds it
    return started is not None and (not isinstance(recorded, (int, float)) or abs(started - recorded) < 1.0)


def _describe(holder: dict) -> str:
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder["time"])) if "time" in holder else "an unknown time"
    return f"pid {holder.get('pid', '?')} on host {holder.get('host', '?')} since {when}"


@contextlib.contextmanager
def output_lock(out: str | Path, what: str = "output"):
    """Hold `out` exclusively for one run. The lock file `.<name>.lock` beside it records the holder (pid, host,
    start time) under an flock, which the kernel releases however the holder dies. A second run is refused in one
    line naming the holder; a lock file left by a dead process of this host is taken over. One naming a process
    of another host is refused even when its flock is free (a filesystem whose locks do not reach across hosts
    cannot show it is gone): the message says which file to delete once that run is over."""
    path = lock_path(out)
    for _ in range(10):  # another run may delete the file between our open and our flock: retry on a fresh one
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            if e.errno == errno.ENOSPC:
                raise
            raise OutputExistsError(f"{what} {Path(out)}: cannot create its lock {path} ({e.strerror}); pass an --out in a folder you can write") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            raise OutputLockedError(f"{what} {Path(out)} is in use by another run ({_describe(holder)}); wait for it to finish or pick another --out") from None
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    else:
        raise OutputLockedError(f"{what} {Path(out)}: its lock {path} keeps changing; is another run starting there?")
    held = False
    try:
        holder = _read_holder(fd)
        if holder and holder.get("pid") != os.getpid() and _holder_alive(holder) is not False:
            raise OutputLockedError(
                f"{what} {Path(out)} is locked by {_describe(holder)}, which this host cannot see finish; once that run is over, delete {path} and re-run"
            )
        me = {"pid": os.getpid(), "host": socket.gethostname(), "pid_started": _started(os.getpid()), "time": time.time()}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(me).encode(), 0)
        held = True
        yield path
    finally:
        if held:  # removed while we still hold the flock: a run that opened the old file sees it change and retries
            path.unlink(missing_ok=True)
        os.close(fd)


def _read_holder(fd: int) -> dict:
    try:
        data = json.loads(os.pread(fd, 4096, 0) or b"{}")
    except ValueError:
        return {}
    return data if isinstance(data, dict) else {}
