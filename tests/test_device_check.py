"""The prepared device check (bench/device_check.sh, bench/device_check.py) rehearsed on the CPU: from a plain
checkout on PYTHONPATH, with zarr, Ray and datasets made unimportable (the lent image has none of them), the tiny
preset end to end, its JSON in the documented shape and its PNG; so the script a GPU session runs cannot rot."""

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from maria_bench.device_check import STEP, DeviceCheckConfig, parse
from maria_train_head.train import TrainConfig

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.timeout(600)


def test_dry_run_from_a_plain_checkout_without_ray_zarr_or_datasets(tmp_path):
    stubs = tmp_path / "stubs"
    for name in ("zarr", "ray", "datasets"):
        (stubs / name).mkdir(parents=True)
        (stubs / name / "__init__.py").write_text(f"raise ImportError('{name} is not on the device image')\n")
    env = {**os.environ, "PYTHON": sys.executable, "PYTHONPATH": str(stubs), "OUT": str(tmp_path / "out")}
    done = subprocess.run(["bash", str(ROOT / "bench" / "device_check.sh"), "--dry-run"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=540)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    r = json.loads((tmp_path / "out" / "device_check.json").read_text())
    assert (tmp_path / "out" / "device_check.png").stat().st_size > 0
    assert r["config"]["preset"] == "tiny" and r["env"]["device"] == "cpu" and r["dtype"] == "bfloat16"
    assert r["tests"]["returncode"] == 0 and "skipped" in r["tests"]["summary"]  # the GPU tests, skipped on a CPU
    assert r["targets"]["errors"] == []
    x = r["extract"]
    assert x["rows"] > 0 and x["window_tok_s"] > 0 and x["gflop_per_token"] > 0 and x["fraction_of_peak"] is None
    assert [c["batch_size"] for c in r["decode"]["results"]] == [1, 3]
    assert set(r["decode"]["maria_over_ar"]) == {"1", "3"} and isinstance(r["decode"]["goal_met"], bool)
    assert {k for k, v in r["train"].items() if isinstance(v, dict)} == {"bare step", "float16", "bfloat16", "float8"}
    assert all(v["rows_per_s_median"] > 0 for v in r["train"].values() if isinstance(v, dict))
    again = subprocess.run(
        [sys.executable, "-m", "maria_bench.device_check", "--plot", str(tmp_path / "out" / "device_check.json")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert again.returncode == 0, again.stderr[-2000:]


def test_step_defaults_are_the_trainers_and_flags_parse():
    defaults = TrainConfig(store="-", out="-")
    assert STEP == {k: getattr(defaults, k) for k in STEP}
    cfg, plot = parse(["--preset", "small", "--batch-sizes", "1", "8", "--tests", "--window-length", "128"])
    assert plot is None and cfg.preset == "small" and cfg.batch_sizes == [1, 8] and cfg.tests and cfg.window_length == 128
    assert dataclasses.replace(cfg, preset="paper", batch_sizes=[1, 8, 32, 64], tests=False, window_length=512) == DeviceCheckConfig()
