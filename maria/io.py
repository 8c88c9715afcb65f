"""Atomic, non-clobbering writes: the one definition every writer of the project uses.

A file is written beside its target and moved over it with os.replace (atomic on POSIX), so a
crash leaves either the old file or the new one. A folder is built beside its target and swapped
in by renames. `guard_output` refuses to replace a folder this project did not write: an output
path must never delete a user's data or one of the command's own inputs.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path


class OutputExistsError(ValueError):
    """An output path holds something we must not replace; the message names the fix."""


class CorruptDataError(ValueError):
    """Data on disk is damaged (a truncated or garbled file). The CLI exits with code 3 for it (and
    for the store's CorruptBlockError), not 2: the input was right, its bytes are not."""


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


def guard_output(out: str | Path, marker: str, overwrite: bool, inputs: tuple = (), what: str = "output") -> Path:
    """Check that `out` may be written: it does not exist, is an empty folder, or holds `marker`
    (so we wrote it) and `overwrite` is set. It may never be, contain or sit inside an input."""
    out = Path(out).expanduser().resolve()
    for given in inputs:
        if given is None or "://" in str(given) or not Path(given).expanduser().exists():
            continue  # hub ids and URLs are not local folders we could clobber
        src = Path(given).expanduser().resolve()
        if _inside(out, src) or _inside(src, out):
            raise OutputExistsError(f"{what} {out} overlaps the input {src}; pick an --out outside every input")
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
