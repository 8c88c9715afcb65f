"""`maria verify --store URL`: every committed block checked, and the plan: a non-zero exit names what is wrong.

Raises CorruptStoreError (damaged data: CLIs exit with their "corrupt data" code), IncompleteStoreError
(the extraction has not finished: the message names the command that finishes it), or the StoreError that
opening raised (no store there: bad input)."""
from __future__ import annotations

from dataclasses import dataclass

from maria_storage import open_store, verify_store


@dataclass
class VerifyConfig:
    store: str  # feature store: local path or fsspec URL
    check_data: bool = True  # read every array and compare checksums (off = metadata and counts only)


def run_verify(cfg: VerifyConfig) -> list[str]:
    report = verify_store(cfg.store, check_data=cfg.check_data)
    if report:
        for p in report:
            print(f"FAIL {p}")
        raise report.error()
    store = open_store(cfg.store)
    print(f"OK {cfg.store}: {len(store.committed_blocks())} blocks, {store.num_rows()} rows verified")
    return report
