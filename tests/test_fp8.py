"""float8 feature stores (storage/float8.py): the e4m3fn table, the round trip's error bound, plain-zarr reading,
damage, the trainer's decoding (RAM and stream), and a store written in float8 that trains."""

import glob
import os
import subprocess
import sys
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
import torch
import zarr
from store_fixtures import make_store as make_tiny_store
from test_storage import MANIFEST, block, make_store

from maria_storage import SCALES, ShuffledReader, StoreError, as_float32, create_store, load_all, open_store, verify_store
from maria_storage.float8 import TABLE, decode, encode
from maria_train_head.data import read_rows
from maria_train_head.step import decode_features

SNIPPET = Path(__file__).parent / "data" / "read_store_snippet.py"
pytestmark = pytest.mark.timeout(300)


def test_table_is_e4m3fn_as_ml_dtypes_and_torch_read_it():
    codes = np.arange(256, dtype=np.uint8)
    via_ml_dtypes = codes.view(ml_dtypes.float8_e4m3fn).astype(np.float32)
    via_torch = torch.from_numpy(codes).view(torch.float8_e4m3fn).float().numpy()
    np.testing.assert_array_equal(TABLE, via_ml_dtypes)
    np.testing.assert_array_equal(TABLE, via_torch)
    assert np.isnan(TABLE[[0x7F, 0xFF]]).all() and np.isfinite(np.delete(TABLE, [0x7F, 0xFF])).all() and np.nanmax(TABLE) == 448


def test_round_trip_within_the_stated_bound():
    """Per value: |error| <= max(2^-4 |x|, 2^-10 scale) (3 mantissa bits; subnormals below 2^-6 scale)."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((400, 96)).astype(np.float32) * rng.lognormal(0, 3, (400, 1)).astype(np.float32)
    x[0] = 0  # an all-zero row
    x[1, :5] = [1e-30, -3e-8, 2.0, 1e6, -1e6]  # tiny and huge values in one row
    x[2] = rng.standard_normal(96) * 1e-3  # a row of small values
    x[3, 7] = 500.0  # an outlier channel
    codes, scales = encode(x)
    assert codes.dtype == np.uint8 and scales.dtype == np.float32 and scales[0] == 1.0
    y = decode(codes, scales)
    bound = np.maximum(2.0**-4 * np.abs(x), 2.0**-10 * scales[:, None]) * (1 + 1e-6)
    assert (np.abs(y - x) <= bound).all()
    assert np.abs(y).max(1).tolist() == pytest.approx(np.abs(x).max(1).tolist(), rel=1e-6)  # each row's largest value is exact
    rel = np.linalg.norm(y - x) / np.linalg.norm(x)
    assert rel < 0.04  # measured 0.023 on unit-scale rows: 3 mantissa bits
    torch_decoded = decode_features(torch.from_numpy(codes), torch.from_numpy(scales)).numpy()
    np.testing.assert_array_equal(torch_decoded, y)  # the trainer's decoding is the store's


def test_store_round_trip_bytes_verify_and_reader(tmp_path):
    url = str(tmp_path / "s")
    store, blocks = make_store(url, feature_dtype="float8")
    make_store(str(tmp_path / "h"))
    assert verify_store(url) == []
    for b, arrays in blocks.items():
        got = store.read_block(b, verify=True)
        assert got["features"].dtype == np.uint8 and got[SCALES].shape == (len(arrays["targets"]),)
        f = as_float32(got["features"], store.manifest, got[SCALES])
        x = arrays["features"]
        assert (np.abs(f - x) <= np.maximum(2.0**-4 * np.abs(x), 2.0**-10 * got[SCALES][:, None]) * (1 + 1e-6)).all()
    with pytest.raises(StoreError, match="without scales"):
        as_float32(got["features"], store.manifest)
    # bytes: features take one byte per value, half of float16's
    size = lambda u, name: sum(os.path.getsize(p) for p in glob.glob(f"{u}/blocks/*/*/{name}/c/**", recursive=True) if os.path.isfile(p))
    assert size(url, "features") * 2 == size(str(tmp_path / "h"), "features")
    # the trainer's two data paths decode to the same float32 rows as load_all
    everything = load_all(url)
    assert SCALES not in everything and everything["features"].dtype == np.float32
    by_target = dict(zip(everything["targets"].tolist(), everything["features"]))
    for batch in ShuffledReader(url, batch_size=100, seed=3):
        for t, row in zip(batch["targets"].tolist(), batch["features"]):
            np.testing.assert_array_equal(row, by_target[t])
    rows = read_rows(store, store.committed_blocks())
    assert rows["features"].dtype == torch.uint8 and len(rows["scales"]) == len(rows["targets"])
    np.testing.assert_array_equal(decode_features(rows["features"], rows["scales"]).numpy(), everything["features"])


def test_plain_zarr_reads_float8_with_the_documented_recipe(tmp_path):
    url = str(tmp_path / "my_store")
    store = create_store(url, {**MANIFEST, "feature_dtype": "float8"}, None)
    arrays = block(40)
    store.write_block("b0", arrays)
    data = zarr.open_group(url, mode="r")[f"blocks/b0/{store.commit_info('b0')['attempt']}"]
    features = data["features"]
    assert features.dtype == np.uint8 and features.attrs["dtype"] == "float8_e4m3fn" and features.attrs["scale_array"] == SCALES
    assert "NOT integers" in features.attrs["encoding"] and data[SCALES].attrs["description"]
    recipe = features.attrs["encoding"].split("in numpy: ")[1].split(" (or ")[0]  # the attribute's numpy recipe, run as written
    scope = {"np": np}
    exec(recipe.replace("; ", "\n"), scope)  # noqa: S102 -- the store's own attribute text, checked as a reader would run it
    decoded = scope["E4M3FN"][features[...]] * data[SCALES][...][:, None]
    np.testing.assert_array_equal(decoded.astype(np.float32), as_float32(features[...], store.manifest, data[SCALES][...]))
    done = subprocess.run(
        [sys.executable, "-c", SNIPPET.read_text()],
        cwd=str(tmp_path),
        capture_output=True,
        text=True,
        timeout=120,
        env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"},
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.startswith("b0 (40, 8) (40, 12)")


def test_damage_and_bad_values_are_caught(tmp_path):
    url = str(tmp_path / "s")
    store, _ = make_store(url, sizes=(50, 60), feature_dtype="float8")
    bad = block(10)
    bad["features"][3, 2] = np.inf
    with pytest.raises(StoreError, match="NaN or inf"):
        store.write_block("b9", bad)
    assert not store.is_committed("b9")
    chunk = glob.glob(f"{url}/blocks/b000001/{store.commit_info('b000001')['attempt']}/{SCALES}/c/*")[0]
    data = bytearray(Path(chunk).read_bytes())
    data[len(data) // 2] ^= 0x01
    Path(chunk).write_bytes(bytes(data))
    problems = verify_store(url)
    assert len(problems) == 1 and problems[0].startswith("block b000001:"), problems


def test_float8_store_trains_and_evaluates_close_to_float16(pairs, tmp_path):
    """The same windows stored in float16 and float8: a head trained on each (same seed and config) learns, and
    their validation NLLs agree: within 0.002 nats per masked token for the untrained heads (the same weights), 0.01
    for the trained ones (tiny random backbones; the demo-scale comparison is `maria bench fp8`)."""
    from maria.backbones import load_backbones
    from maria_train_head.evaluate import EvalConfig, run_eval
    from maria_train_head.train import TrainConfig, run_train

    bb = load_backbones(*pairs["modernbert-olmo"])
    res = {}
    for dtype, modes in (("float16", ("ram",)), ("float8", ("ram", "stream"))):
        make_tiny_store(tmp_path / f"{dtype}-train", bb, 128, seed=1, windows_per_block=32, feature_dtype=dtype, plan=True)
        make_tiny_store(tmp_path / f"{dtype}-val", bb, 48, seed=2, windows_per_block=24, feature_dtype=dtype, plan=True)
        for mode in modes:
            res[dtype, mode] = run_train(
                TrainConfig(
                    store=str(tmp_path / f"{dtype}-train"),
                    val_store=str(tmp_path / f"{dtype}-val"),
                    out=str(tmp_path / f"head-{dtype}-{mode}"),
                    init="mix",
                    max_steps=20,
                    batch_size=128,
                    lr=3e-3,
                    warmup_steps=4,
                    eval_every=10,
                    device="cpu",
                    data_mode=mode,
                )
            )
        res[dtype, "eval"] = run_eval(EvalConfig(store=str(tmp_path / f"{dtype}-val"), head=str(tmp_path / f"head-{dtype}-ram"), device="cpu"))
    for dtype in ("float16", "float8"):
        assert res[dtype, "ram"]["best_val_loss"] < res[dtype, "ram"]["init_val_loss"] - 0.05
        assert res[dtype, "eval"]["models"]["trained"]["nll"] == pytest.approx(res[dtype, "ram"]["best_val_loss"], abs=1e-5)
    assert res["float8", "stream"]["best_val_loss"] < res["float8", "stream"]["init_val_loss"] - 0.05
    assert open_store(str(tmp_path / "float8-train")).manifest["feature_dtype"] == "float8"
    assert res["float8", "ram"]["init_scales"] == pytest.approx(res["float16", "ram"]["init_scales"], abs=0.05)
    nll = {dtype: {k: m["nll"] for k, m in res[dtype, "eval"]["models"].items()} for dtype in ("float16", "float8")}
    for model in ("poe_init", "ar_only", "mlm_only"):  # the same weights on both: only the features' rounding differs (measured ~2e-4)
        assert nll["float8"][model] == pytest.approx(nll["float16"][model], abs=0.002)
    assert nll["float8"]["trained"] == pytest.approx(nll["float16"]["trained"], abs=0.01)  # two trainings (measured 0.003)


def test_bench_fp8_reports_both_dtypes(pairs, tmp_path):
    """`maria bench fp8` on two tiny float16 stores: both dtypes trained and scored, bytes and rates, JSON targets, PNG."""
    from maria.backbones import load_backbones
    from maria_bench.run import run_bench
    from maria_bench.setup import BenchConfig

    bb = load_backbones(*pairs["modernbert-olmo"])
    make_tiny_store(tmp_path / "train", bb, 64, seed=1, windows_per_block=16, plan=True)
    make_tiny_store(tmp_path / "val", bb, 16, seed=2, windows_per_block=16, plan=True)
    r = run_bench(
        BenchConfig(
            what="fp8",
            store=str(tmp_path / "train"),
            val_store=str(tmp_path / "val"),
            steps=2,
            repeats=1,
            batch_size=64,
            device="cpu",
            json=str(tmp_path / "fp8.json"),
        )
    )
    f16, f8 = r["dtypes"]["float16"], r["dtypes"]["float8"]
    assert f16["rows"] == f8["rows"] == open_store(str(tmp_path / "train")).num_rows()
    d = bb.d_mlm + bb.d_ar
    assert f16["stored_bytes_per_row"] - f8["stored_bytes_per_row"] == d - 4  # one byte per value instead of two, plus a scale
    assert set(f8["eval_nll"]) == {"trained", "poe_init", "ar_only", "mlm_only"} and f8["write_rows_per_s"] > 0
    assert r["targets"]["trained_nll_float8_minus_float16"] == pytest.approx(f8["eval_nll"]["trained"] - f16["eval_nll"]["trained"])
    assert (tmp_path / "fp8.png").stat().st_size > 0
