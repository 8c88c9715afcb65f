"""`maria verify STORE`: every committed block checked; a non-zero exit names what is wrong."""
from __future__ import annotations

from dataclasses import dataclass

from storage import open_store, verify_store


@dataclass
class VerifyConfig:
    store: str  # feature store: local path or fsspec URL
    check_data: bool = True  # read every array and compare checksums (off = metadata and counts only)


def run_verify(cfg: VerifyConfig) -> list[str]:
    problems = verify_store(cfg.store, check_data=cfg.check_data)
    if problems:
        for p in problems:
            print(f"FAIL {p}")
        raise ValueError(f"store {cfg.store} has {len(problems)} problem(s), first: {problems[0]}; re-run `maria extract` with the same config after deleting the named block's commit marker")
    store = open_store(cfg.store)
    print(f"OK {cfg.store}: {len(store.committed_blocks())} blocks, {store.num_rows()} rows verified")
    return problems
