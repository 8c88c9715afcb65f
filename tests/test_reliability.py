"""Faults: a killed actor, a killed driver, a full disk, object storage; nothing lost or doubled."""

import errno
import os
import re
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
from extract_fixtures import ARRAYS, block, config, maria_command, read_all
from faults import Faults, fault_command, kill_marker

from maria_extract.job import run_extract

pytestmark = [pytest.mark.ray, pytest.mark.timeout(400)]


def assert_same_store(a, b, **kw):
    first, second = read_all(str(a)), read_all(str(b), **kw)
    assert first.keys() == second.keys()
    for blk in first:
        for name in ARRAYS:
            np.testing.assert_array_equal(first[blk][name], second[blk][name], err_msg=f"{blk}/{name}")


def test_actor_killed_mid_block_job_finishes_identical(store_a, pairs, corpus, tmp_path):
    out = tmp_path / "killed"
    run_extract(config(pairs, corpus, out), hooks=Faults(kill_block=block(0, 3), marker_dir=str(tmp_path)))
    assert Path(kill_marker(str(out), block(0, 3), str(tmp_path))).exists(), "the actor was never killed"
    assert_same_store(store_a, out)


def test_driver_killed_then_rerun_resumes_identical(store_a, pairs, corpus, tmp_path):
    out = tmp_path / "driver"
    mlm, ar = pairs["modernbert-olmo"]
    args = (
        "extract",
        "--mlm",
        mlm,
        "--ar",
        ar,
        "--corpus",
        corpus,
        "--store",
        out,
        "--window-length",
        24,
        "--docs-per-block",
        3,
        "--batch-size",
        4,
        "--masks-per-window",
        2,
        "--ray-temp-dir",
        tempfile.mkdtemp(prefix="ray", dir="/tmp"),
    )  # Ray's socket paths must stay under 107 bytes
    cmd = fault_command(Faults(sleep_s=3), *args)
    log = open(tmp_path / "driver.log", "w")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.Popen(cmd, start_new_session=True, stdout=log, stderr=log, env=env)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None and not list(out.glob("commits/*.json")):
        time.sleep(0.2)
    assert proc.poll() is None, "the driver exited before it could be killed: " + (tmp_path / "driver.log").read_text()[-2000:]
    os.killpg(proc.pid, signal.SIGKILL)  # the driver and everything it started
    proc.wait()
    committed = len(list((out / "commits").glob("*.json")))
    assert 1 <= committed < 5, f"{committed} blocks committed when the driver died"
    rerun = subprocess.run(maria_command(*args), capture_output=True, text=True, timeout=300, env=env)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    # a Ray worker of the dead driver may still finish a commit after the count: never fewer than counted
    seen = int(re.search(r"(\d+) blocks already committed", rerun.stdout).group(1))
    assert committed <= seen < 5, rerun.stdout
    assert_same_store(store_a, out)


def test_full_disk_clear_error_nothing_committed_then_completes(store_a, pairs, corpus, tmp_path):
    out = tmp_path / "full"
    with pytest.raises(OSError) as err:
        run_extract(config(pairs, corpus, out), hooks=Faults(enospc_block=block(0, 6)))
    assert err.value.errno == errno.ENOSPC
    assert not (out / "commits" / f"{block(0, 6)}.json").exists()
    from maria_app.cli import one_line as _friendly

    assert "no space left on device" in _friendly(err.value)
    run_extract(config(pairs, corpus, out))
    assert_same_store(store_a, out)


def test_extract_to_s3_then_resume_and_verify(store_a, pairs, corpus, s3_endpoint):
    import s3fs

    from maria_storage import verify_store

    url = "s3://maria-test/store"
    run_extract(config(pairs, corpus, url))
    assert_same_store(store_a, url)
    fs = s3fs.S3FileSystem(endpoint_url=s3_endpoint)
    fs.rm(f"maria-test/store/commits/{block(0, 9)}.json")  # as if the job had died before this block's commit
    summary = run_extract(config(pairs, corpus, url))
    assert summary["new_rows"] > 0
    assert_same_store(store_a, url)
    assert verify_store(url) == []


def test_flipped_byte_verify_names_block_training_refuses_unless_skipped(store_a, tmp_path):
    import shutil

    from maria_storage import verify_store
    from maria_train_head.train import TrainConfig, run_train

    bad = tmp_path / "bad"
    shutil.copytree(store_a, bad)
    chunk = sorted(p for p in (bad / "blocks" / block(0, 3)).rglob("*") if p.is_file() and "features" in p.parts and p.name != "zarr.json")[0]
    data = bytearray(chunk.read_bytes())
    data[len(data) // 3] ^= 0x01
    chunk.write_bytes(bytes(data))
    problems = verify_store(str(bad))
    assert problems and all(block(0, 3) in p for p in problems)
    cfg = dict(store=str(bad), out=str(tmp_path / "head"), val_store=str(store_a), max_steps=3, batch_size=64, eval_every=100, device="cpu")
    for mode in ("stream", "ram"):
        with pytest.raises(ValueError, match=f"{block(0, 3)}.*skip-corrupt"):
            run_train(TrainConfig(**cfg, data_mode=mode))
    result = run_train(TrainConfig(**cfg, data_mode="ram", skip_corrupt=True))
    assert (tmp_path / "head" / "head.safetensors").exists(), result


def extract_command(pairs, corpus, out) -> list[str]:
    """`maria extract` of the tiny pair over `corpus` into `out`, as a subprocess command (a fresh short Ray temp dir)."""
    mlm, ar = pairs["modernbert-olmo"]
    return maria_command(
        "extract",
        "--mlm",
        mlm,
        "--ar",
        ar,
        "--corpus",
        corpus,
        "--store",
        out,
        "--window-length",
        24,
        "--docs-per-block",
        1,
        "--ray-temp-dir",
        tempfile.mkdtemp(prefix="ray", dir="/tmp"),
    )


def start_extract(pairs, corpus, out, log_path):
    """`maria extract` as a command (its Ray driver supervised in a child), in its own process group."""
    mlm, ar = pairs["modernbert-olmo"]
    cmd = extract_command(pairs, corpus, out)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    log = open(log_path, "w")
    return subprocess.Popen(cmd, start_new_session=True, stdout=log, stderr=subprocess.PIPE, text=True, env=env)


def wait_for(log_path, text: str, proc, seconds: float = 240) -> None:
    deadline = time.time() + seconds
    while time.time() < deadline and proc.poll() is None and text not in Path(log_path).read_text():
        time.sleep(0.2)
    assert proc.poll() is None, "exited early: " + Path(log_path).read_text()[-2000:] + proc.stderr.read()[-2000:]


def last_line(stderr: str) -> str:
    return [ln for ln in stderr.splitlines() if ln.strip()][-1]


@pytest.mark.timeout(900)
def test_sigterm_is_an_interruption_and_a_lost_raylet_one_line(store_a, pairs, corpus, tmp_path):
    """SIGTERM (a scheduler stopping the job) ends like Ctrl-C: exit 130 and the re-run line (it used to exit 15 with
    Ray's stack dump). A raylet killed under the driver ends in one maria line naming the re-run, exit 75 (it used to
    be exit 1 and 40 lines of Ray); the re-run then finishes the store exactly."""
    import psutil

    proc = start_extract(pairs, corpus, tmp_path / "term", tmp_path / "term.log")
    wait_for(tmp_path / "term.log", "to do", proc)
    proc.send_signal(signal.SIGTERM)  # the supervising `maria` process only, as `kill` would
    assert proc.wait(timeout=120) == 130
    err = proc.stderr.read()
    assert last_line(err) == "maria extract: interrupted; re-run the same command to continue where it stopped", err[-2000:]
    assert "Traceback" not in err

    out = tmp_path / "raylet"
    proc = start_extract(pairs, corpus, out, tmp_path / "raylet.log")
    wait_for(tmp_path / "raylet.log", "to do", proc)
    (raylet,) = [p for p in psutil.Process(proc.pid).children(recursive=True) if p.name() == "raylet"]
    raylet.kill()
    assert proc.wait(timeout=120) == 75
    err = proc.stderr.read()
    assert last_line(err).startswith("maria extract: error: the job's Ray driver ended abruptly") and last_line(err).endswith(
        "re-run the same command to resume (committed blocks are kept)"
    ), err[-2000:]
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # what the dead driver left behind (its GCS and workers)
    except ProcessLookupError:
        pass
    mlm, ar = pairs["modernbert-olmo"]
    rerun = subprocess.run(
        extract_command(pairs, corpus, out), capture_output=True, text=True, timeout=300, env={k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    )
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    from maria_storage import verify_store

    assert verify_store(str(out)) == []
