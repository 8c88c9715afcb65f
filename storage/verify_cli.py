"""`maria verify --store URL`: every committed block checked, and the plan: a non-zero exit names what is wrong.

Raises CorruptStoreError (damaged data: CLIs exit with their "corrupt data" code), IncompleteStoreError
(the extraction has not finished: the message names the command that finishes it), or the StoreError that
opening raised (no store there: bad input). Shows a progress bar over the blocks; `--json FILE` writes the
report (problems, missing blocks, the finish command) whatever the verdict, for a scheduler or a script."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

from tqdm import tqdm

from maria_storage import StoreError, open_store, verify_store
from maria_storage.location import is_local, local_path


@dataclass
class VerifyConfig:
    store: str  # feature store: local path or fsspec URL
    check_data: bool = True  # read every array and compare checksums (off = metadata and counts only)
    json: str | None = None  # also write the report here as JSON (whatever the verdict)
    overwrite: bool = False  # replace a --json file written by an earlier `maria verify`


def check_json_target(path: str, store: str, overwrite: bool) -> None:
    """--json must be a new file, or an earlier report with --overwrite; never inside the store it checks."""
    target = os.path.abspath(os.path.expanduser(path))
    if is_local(store) and (target + "/").startswith(local_path(store).rstrip("/") + "/"):
        raise StoreError(f"--json {path} is inside the store {store}; write the report outside it")
    if os.path.isdir(target):
        raise StoreError(f"--json {path} is a folder; pass a file path such as {os.path.join(path, 'verify.json')}")
    if not os.path.exists(target):
        return
    if not overwrite:
        raise StoreError(f"--json {path} already exists; pass --overwrite to replace it, or pick a new file")
    try:
        with open(target, encoding="utf-8") as f:
            text = f.read()
        ours = '"problems"' in text and '"missing_blocks"' in text
    except (OSError, UnicodeDecodeError):
        ours = False
    if not ours:
        raise StoreError(f"--json {path} exists and was not written by `maria verify`; pick a new file (it is left as it is)")


def write_json(path: str, report: dict) -> None:
    target = os.path.abspath(os.path.expanduser(path))
    os.makedirs(os.path.dirname(target), exist_ok=True)
    tmp = f"{os.path.dirname(target)}/.{os.path.basename(target)}.{os.getpid()}.tmp"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(json.dumps(report, indent=1) + "\n")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def run_verify(cfg: VerifyConfig) -> list[str]:
    if cfg.json:
        check_json_target(cfg.json, cfg.store, cfg.overwrite)
    bar = tqdm(desc="verify", unit="block", dynamic_ncols=True)

    def progress(done: int, total: int) -> None:
        bar.total = total
        bar.update(done - bar.n)

    try:
        report = verify_store(cfg.store, check_data=cfg.check_data, progress=progress)
    finally:
        bar.close()
    result = report.as_dict()
    if not report:
        store = open_store(cfg.store)
        result.update(blocks=len(store.committed_blocks()), rows=store.num_rows())
    if cfg.json:
        write_json(cfg.json, result)
    if report:
        for p in report:
            print(f"FAIL {p}")
        raise report.error()
    print(f"OK {cfg.store}: {result['blocks']} blocks, {result['rows']} rows verified")
    return report
