""" "Complete" is a checked state, and damage is told apart from unfinished work: the plan, verify's classes,
init checksums, undecodable chunks, block groups repaired from the markers."""

from __future__ import annotations

import glob
import json
import os

import numpy as np
import pytest
import zarr
from test_storage import MANIFEST, block, init_weights, make_store

from maria_storage import (
    CORRUPT,
    INCOMPLETE,
    UNREADABLE,
    CorruptBlockError,
    CorruptStoreError,
    IncompleteStoreError,
    ShuffledReader,
    StoreError,
    StoreMismatchError,
    StoreNotFoundError,
    create_store,
    open_store,
    verify_store,
)

CMD = "maria extract --mlm m --ar a --corpus c.jsonl --store STORE"


def planned(url, sizes=(30, 40, 50), commit=None):
    """A store planned for len(sizes) blocks, with the first `commit` of them written."""
    store = create_store(url, MANIFEST, init_weights(np.random.default_rng(0)))
    ids = [f"b{i:06d}" for i in range(len(sizes))]
    store.write_plan(ids, CMD)
    for i, n in list(enumerate(sizes))[: len(sizes) if commit is None else commit]:
        store.write_block(ids[i], block(n, seed=i))
    return store, ids


def test_plan_is_recorded_idempotent_and_guarded(tmp_path):
    url = str(tmp_path / "s")
    store = create_store(url, MANIFEST, None)
    assert store.planned_blocks() is None and store.missing_blocks() == []
    store.write_plan(["b2", "b1"], CMD)
    before = os.stat(f"{url}/zarr.json").st_mtime_ns
    store.write_plan(["b1", "b2"], CMD)  # identical: nothing written
    assert os.stat(f"{url}/zarr.json").st_mtime_ns == before
    assert open_store(url).planned_blocks() == ["b1", "b2"] and store.missing_blocks() == ["b1", "b2"]
    store.write_plan(["b1", "b2"], CMD + " --batch-size 8")  # a re-run with other run-time flags
    assert store.plan()["command"].endswith("--batch-size 8")
    with pytest.raises(StoreMismatchError, match="planned with 2 other blocks; .*use another --store"):
        store.write_plan(["b1", "b3"], CMD)
    with pytest.raises(StoreError, match="block id"):
        store.write_plan(["../x"], CMD)
    with pytest.raises(StoreError, match="command"):
        store.write_plan(["b1"], "  ")
    assert open_store(url).manifest["format_version"] == 2  # the manifest survives plan writes
    store.write_block("b1", block(5))
    assert store.missing_blocks() == ["b2"]


def test_incomplete_store_is_not_ok_and_names_the_command(tmp_path):
    url = str(tmp_path / "s")
    store, ids = planned(url, commit=1)
    report = verify_store(url)
    cmd = CMD.replace("STORE", url)  # the store as its reader names it, whatever path created it
    assert len(report) == 1 and report.missing_blocks == ids[1:] and report.command == cmd
    (problem,) = report.problems
    assert problem.kind == INCOMPLETE and str(problem) == (f"plan: 2 of 3 planned blocks are missing (first: b000001, b000002); finish the job with `{cmd}`")
    error = report.error()
    assert isinstance(error, IncompleteStoreError) and not isinstance(error, CorruptStoreError)
    assert "\n" not in str(error) and cmd in str(error)
    with pytest.raises(IncompleteStoreError, match=r"2 of 3 planned blocks are missing; finish it with `maria extract"):
        store.require_complete()
    for i, n in ((1, 40), (2, 50)):
        store.write_block(ids[i], block(n, seed=i))
    report = verify_store(url)  # every block there, but the job never finalized
    assert [p.kind for p in report.problems] == [INCOMPLETE] and "not finalized" in report[0]
    store.gc_uncommitted()
    store.finalize()
    assert verify_store(url) == [] and verify_store(url).error() is None
    store.require_complete()


def test_corrupt_beats_incomplete_and_unplanned_blocks_are_corrupt(tmp_path):
    url = str(tmp_path / "s")
    store, ids = planned(url, commit=2)
    store.write_block("x9", block(3))
    flip(chunks(url, store, "b000000", "targets")[0])
    report = verify_store(url)
    assert [(p.where, p.kind) for p in report.problems] == [("block b000000", CORRUPT), ("plan", INCOMPLETE), ("plan", CORRUPT)]
    assert any("not in the plan (first: x9)" in p for p in report)
    assert isinstance(report.error(), CorruptStoreError) and "(and 1 more); delete the damaged" in str(report.error())
    assert f"re-run `{CMD.replace('STORE', url)}`" in str(report.error())


def test_missing_store_is_unreadable_not_corrupt(tmp_path):
    report = verify_store(str(tmp_path / "nowhere"))
    assert [p.kind for p in report.problems] == [UNREADABLE] and isinstance(report.error(), StoreNotFoundError)


def chunks(url, store, block_id, name):
    attempt = store.commit_info(block_id)["attempt"]
    return sorted(p for p in glob.glob(f"{url}/blocks/{block_id}/{attempt}/{name}/c/**", recursive=True) if os.path.isfile(p))


def flip(path, at=None):
    data = bytearray(open(path, "rb").read())
    data[len(data) // 2 if at is None else at] ^= 0xFF
    open(path, "wb").write(bytes(data))


def test_undecodable_zstd_chunk_is_a_corrupt_block_everywhere(tmp_path):
    url = str(tmp_path / "s")
    store, blocks = make_store(url)
    flip(chunks(url, store, "b000002", "targets")[0], at=6)  # inside the zstd frame: zstd or crc32c fails
    with pytest.raises(CorruptBlockError, match=r"b000002 .* corrupt: array targets: a chunk fails its checksum"):
        store.read_block("b000002")
    with pytest.raises(CorruptBlockError, match="maria verify --store"):
        store.block_arrays("b000002")["targets"][10:20]
    for verify in (True, False):
        with pytest.raises(CorruptBlockError, match="b000002.*--skip-corrupt"):
            list(ShuffledReader(url, batch_size=64, chunk_rows=64, buffer_rows=256, verify=verify))
        reader = ShuffledReader(url, batch_size=64, chunk_rows=64, buffer_rows=256, verify=verify, skip_corrupt=True)
        with pytest.warns(UserWarning, match="b000002"):
            got = np.concatenate([b["targets"] for b in reader])
        good = np.concatenate([b["targets"] for k, b in blocks.items() if k != "b000002"])
        np.testing.assert_array_equal(np.sort(got), np.sort(good))  # nothing of the bad block, nothing lost
    report = verify_store(url)
    (problem,) = report.problems
    assert problem.kind == CORRUPT and problem.where == "block b000002"
    assert str(report.error()) == (
        f"{url}: {problem}; delete the damaged blocks' commits/<block_id>.json in the store and re-run the extraction (same command) to rewrite them"
    )


def test_format1_zstd_chunk_without_crc_is_still_a_corrupt_block(tmp_path):
    from maria_storage import layout

    url = str(tmp_path / "s")
    layout.CHECKSUM_CHUNKS = False  # how format 1 wrote: zstd alone
    try:
        store, _ = make_store(url, sizes=(100,))
    finally:
        layout.CHECKSUM_CHUNKS = True
    flip(chunks(url, store, "b000000", "doc_ids")[0], at=6)
    with pytest.raises(CorruptBlockError, match="Zstd|checksum"):
        store.read_block("b000000")


def test_init_is_checksummed(tmp_path):
    url = str(tmp_path / "s")
    store, _ = make_store(url, sizes=(10,))
    sums = zarr.open_group(url, mode="r")["init"].attrs["maria_checksums"]
    assert sorted(sums) == ["W1", "W2", "b1", "b2", "vocab_map"]
    assert store.init_weights(verify=True)["b1"].shape == (5000,)
    # rewritten through zarr (valid chunks and crc32c), different numbers: only the checksum can tell
    w2 = zarr.open_array(f"{url}/init/W2", mode="r+")
    w2[0, 0] = w2[0, 0] + 1
    (problem,) = verify_store(url).problems
    assert problem.kind == CORRUPT and str(problem) == "init: checksum of W2 does not match (data damaged)"
    with pytest.raises(CorruptStoreError, match="init/W2 .* checksum"):
        store.init_weights(verify=True)
    flip(sorted(p for p in glob.glob(f"{url}/init/b1/c/**", recursive=True) if os.path.isfile(p))[0])
    with pytest.raises(CorruptStoreError, match="init/b1 .* fails its checksum"):
        store.init_weights()
    assert any(p.startswith("init: b1: a chunk fails its checksum") for p in verify_store(url))


def test_block_groups_repaired_from_markers(tmp_path):
    url = str(tmp_path / "s")
    store, ids = planned(url)
    os.remove(f"{url}/blocks/b000001/zarr.json")  # crash between the commit and its publication
    stale = open(f"{url}/blocks/b000002/zarr.json", "rb").read()
    store.write_block("b000002", block(50, seed=2), overwrite=True)
    open(f"{url}/blocks/b000002/zarr.json", "wb").write(stale)  # a racing attempt published last
    store.finalize()
    report = verify_store(url)
    assert [p.kind for p in report.problems] == [INCOMPLETE]
    assert "2 committed blocks have no Zarr group naming their committed attempt (first: b000001, b000002)" in report[0]
    assert CMD.replace("STORE", url) in report[0]
    store.gc_uncommitted()
    assert verify_store(url) == []
    root = zarr.open_group(url, mode="r")
    for b in ids:
        assert root[f"blocks/{b}"].attrs["maria_commit"] == store.commit_info(b)
    assert len([d for d in os.listdir(f"{url}/blocks/b000002") if d != "zarr.json"]) == 1


def test_format1_store_is_read_but_not_resumed(tmp_path):
    url = str(tmp_path / "s")
    make_store(url, sizes=(20,))
    meta = json.load(open(f"{url}/zarr.json"))
    meta["attributes"]["maria"]["format_version"] = 1
    json.dump(meta, open(f"{url}/zarr.json", "w"))
    os.remove(f"{url}/blocks/b000000/zarr.json")  # format 1 had no block groups
    assert len(open_store(url).read_block("b000000", verify=True)["targets"]) == 20
    assert verify_store(url) == []
    with pytest.raises(StoreError, match="format_version 1; this code writes version 2; extract into a new --store"):
        create_store(url, MANIFEST, None)
    with pytest.raises(StoreError, match="format_version 1"):
        open_store(url).write_block("b1", block(3))


def test_fixture_stores_can_be_complete_or_incomplete(pairs, tmp_path):
    from store_fixtures import FINISH_COMMAND
    from store_fixtures import make_store as make_fixture_store

    from maria.backbones import load_backbones

    bb = load_backbones(*pairs["modernbert-olmo"])
    done = make_fixture_store(tmp_path / "done", bb, 32, seed=0, plan=True)
    assert verify_store(done.url) == [] and done.planned_blocks() == ["b000000", "b000001"]
    part = make_fixture_store(tmp_path / "part", bb, 16, seed=0, plan=True, missing=2)
    report = verify_store(part.url)
    assert report.missing_blocks == ["b000001", "b000002"]
    assert report.command == FINISH_COMMAND.format(path=tmp_path / "part")
    with pytest.raises(IncompleteStoreError, match="2 of 3 planned blocks are missing"):
        part.require_complete()


def test_malformed_plan_is_corrupt_not_a_traceback(tmp_path):
    url = str(tmp_path / "s")
    store, _ = planned(url, commit=0)
    meta = json.load(open(f"{url}/zarr.json"))
    meta["attributes"]["maria_plan"] = {"blocks": "b000000"}
    json.dump(meta, open(f"{url}/zarr.json", "w"))
    with pytest.raises(CorruptStoreError, match="malformed maria_plan; re-extract into a new --store"):
        store.require_complete()
    assert [(p.where, p.kind) for p in verify_store(url).problems] == [("plan", CORRUPT)]


def test_a_missing_chunk_is_corrupt_on_every_read_path(tmp_path):
    """A deleted chunk file used to read as zeros through a lazy read (verify=False)."""
    url = str(tmp_path / "s")
    store, blocks = make_store(url, sizes=(300, 4600))
    os.remove(chunks(url, store, "b000001", "features")[-1])  # rows 4096..4599 of the block
    with pytest.raises(CorruptBlockError, match=r"b000001 .* corrupt: array features has 1 of its 2 chunk files"):
        store.block_arrays("b000001")["features"][4500:4600]
    for verify in (True, False):
        with pytest.raises(CorruptBlockError, match="b000001"):
            list(ShuffledReader(url, batch_size=512, verify=verify))
    assert verify_store(url, check_data=False)[0].startswith("block b000001: array features has 1 of its 2 chunk files")


def test_a_copied_store_is_told_its_own_path(tmp_path, monkeypatch):
    """The finish command names the store as its reader named it, not the path it was created at."""
    import shutil

    store, ids = planned(str(tmp_path / "original"), commit=1)
    store.write_plan(ids, CMD.replace("STORE", str(tmp_path / "original")))
    shutil.copytree(tmp_path / "original", tmp_path / "copy")
    monkeypatch.chdir(tmp_path)
    report = verify_store("copy")
    assert report.command == "maria extract --mlm m --ar a --corpus c.jsonl --store copy" and "original" not in str(report.error())
    with pytest.raises(IncompleteStoreError, match="finish it with `maria extract .* --store copy`"):
        open_store("copy").require_complete()
    with pytest.raises(StoreNotFoundError, match=r"run `maria extract \.\.\. --store nowhere` to create it"):
        open_store("nowhere")  # extract takes --store (the hints used to say --out)


def test_verify_writes_json_and_shows_progress(tmp_path, capsys):
    from maria_app.cli import main

    url = str(tmp_path / "s")
    store, ids = planned(url, commit=1)
    report_file = tmp_path / "verify.json"
    assert main(["verify", "--store", url, "--json", str(report_file)]) == 2  # incomplete: the report is written anyway
    report = json.loads(report_file.read_text())
    assert report["ok"] is False and report["missing_blocks"] == ids[1:] and report["command"].endswith(f"--store {url}")
    assert [p["kind"] for p in report["problems"]] == [INCOMPLETE]
    assert "verify: 100%" in capsys.readouterr().err  # a progress bar over the blocks
    assert main(["verify", "--store", url, "--json", str(report_file)]) == 2  # an existing report needs --overwrite
    assert "already exists; pass --overwrite" in capsys.readouterr().err
    assert main(["verify", "--store", url, "--json", f"{url}/report.json", "--overwrite"]) == 2
    assert "inside the store" in capsys.readouterr().err and not os.path.exists(f"{url}/report.json")
