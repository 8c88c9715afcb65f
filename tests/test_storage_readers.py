"""The store read without this project's code: plain zarr, xarray, tensorstore, the README snippet.
Also: `import maria_storage` pulls in no torch, transformers, ray or maria."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import zarr
from test_storage import D_AR, D_MLM, MANIFEST, block, make_store

from maria_storage import create_store, open_store, verify_store

SNIPPET = Path(__file__).parent / "data" / "read_store_snippet.py"


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished store (plan, all blocks, gc, finalize), as extraction leaves it."""
    url = str(tmp_path_factory.mktemp("readers") / "my_store")
    store, blocks = make_store(url, sizes=(300, 0, 517))
    store.write_plan(sorted(blocks), f"maria extract --out {url}")
    store.gc_uncommitted()
    store.finalize()
    return url, store, blocks


def test_storage_imports_no_torch_ray_or_maria():
    code = (
        "import sys, maria_storage, maria_storage.verify_cli, maria_storage.zarr_compat, maria_bench.layout; "
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers', 'ray', 'maria')); "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    root = str(Path(__file__).parents[1])
    done = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": root})
    assert done.returncode == 0, done.stdout + done.stderr


def test_plain_zarr_walks_every_level(finished):
    url, store, blocks = finished
    root = zarr.open_group(url, mode="r")
    assert root.attrs["maria"]["d_mlm"] == D_MLM and "blocks" in root.attrs["maria_layout"]
    assert root.attrs["maria_plan"]["blocks"] == sorted(blocks)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        members = dict(root.members(max_depth=None))
    # commits/ holds JSON markers, not Zarr nodes: the only thing zarr does not recognise when walking
    assert [str(w.message) for w in caught] == ["Object at commits is not recognized as a component of a Zarr hierarchy."]
    for path in ("init", "blocks", *(f"blocks/{b}" for b in blocks)):
        assert isinstance(members[path], zarr.Group), path
    arrays = {p: a for p, a in members.items() if isinstance(a, zarr.Array)}
    assert len(arrays) == 5 + 6 * len(blocks)
    for path, a in arrays.items():
        assert a.metadata.dimension_names and a.attrs["description"], path
    for b in blocks:
        group = root[f"blocks/{b}"]
        attempt = group.attrs["maria_commit"]["attempt"]
        assert attempt == store.commit_info(b)["attempt"] and [k for k, _ in group.members()] == [attempt]
        data = group[attempt]
        assert data["features"].metadata.dimension_names == ("row", "feature")
        assert data["targets"].metadata.dimension_names == ("row",)
        assert data["features"].attrs["d_mlm"] == D_MLM and data["features"].attrs["h_ar_columns"] == [D_MLM, D_MLM + D_AR]
        assert "AR" in data["targets"].attrs["description"]
        ours = store.read_block(b)
        for name in ours:
            np.testing.assert_array_equal(data[name][...], ours[name])
    codecs = {name: [c["name"] for c in data[name].metadata.to_dict()["codecs"]] for name in ("features", "targets")}
    assert codecs == {"features": ["bytes"], "targets": ["bytes", "zstd", "crc32c"]}  # see storage/layout.py
    assert [c["name"] for c in root["init/W1"].metadata.to_dict()["codecs"]] == ["bytes", "crc32c"]
    assert "-1" in root["init/vocab_map"].attrs["description"]
    np.testing.assert_array_equal(root["init/W1"][...], store.init_weights()["W1"])


def test_uncommitted_attempts_are_never_members(tmp_path, monkeypatch):
    url = str(tmp_path / "s")
    store = create_store(url, MANIFEST, None)
    store.write_block("b1", block(10))
    old = store.commit_info("b1")["attempt"]
    store.write_block("b1", block(20, seed=1), overwrite=True)  # a superseded attempt stays until gc
    monkeypatch.setattr(store, "_write_marker", lambda *a: (_ for _ in ()).throw(RuntimeError("died")))
    with pytest.raises(RuntimeError):
        store.write_block("b2", block(5))  # data written, never committed
    root = zarr.open_group(url, mode="r")
    with pytest.warns(UserWarning, match="b2 is not recognized"):
        assert [k for k, _ in root["blocks"].members()] == ["b1"]
    b1 = root["blocks/b1"]
    assert [k for k, _ in b1.members()] == [store.commit_info("b1")["attempt"]] and old in os.listdir(f"{url}/blocks/b1")
    assert b1[b1.attrs["maria_commit"]["attempt"]]["targets"].shape == (20,)


def test_xarray_opens_a_block_and_init(finished):
    xr = pytest.importorskip("xarray")
    url, store, blocks = finished
    b = "b000002"
    attempt = zarr.open_group(url, mode="r")[f"blocks/{b}"].attrs["maria_commit"]["attempt"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the attempt group's consolidated metadata is there: no fallback warning
        ds = xr.open_zarr(f"{url}/blocks/{b}/{attempt}")
    assert dict(ds.sizes) == {"row": 517, "feature": D_MLM + D_AR}
    assert ds["features"].dims == ("row", "feature") and ds["targets"].dims == ("row",)
    np.testing.assert_array_equal(ds["targets"].values, store.read_block(b)["targets"])
    assert ds["features"].attrs["d_mlm"] == D_MLM
    # from the root: xarray looks for consolidated metadata at the root, which a live store cannot keep
    same = xr.open_dataset(url, engine="zarr", group=f"blocks/{b}/{attempt}", consolidated=False)
    np.testing.assert_array_equal(same["features"].values, store.read_block(b)["features"])
    init = xr.open_zarr(f"{url}/init")
    assert init["W1"].dims == ("ar_token", "mlm_feature") and init["vocab_map"].dims == ("mlm_token",)


def test_tensorstore_reads_features_and_targets(finished):
    ts = pytest.importorskip("tensorstore")
    url, store, blocks = finished
    for b in ("b000000", "b000002"):
        attempt = store.commit_info(b)["attempt"]
        for name in ("features", "targets"):
            spec = {"driver": "zarr3", "kvstore": {"driver": "file", "path": f"{url}/blocks/{b}/{attempt}/{name}"}}
            arr = ts.open(spec, read=True).result()
            np.testing.assert_array_equal(arr.read().result(), store.read_block(b)[name])
    w1 = ts.open({"driver": "zarr3", "kvstore": {"driver": "file", "path": f"{url}/init/W1"}}, read=True).result()
    np.testing.assert_array_equal(w1.read().result(), store.init_weights()["W1"])


def test_readme_snippet_runs_verbatim_without_this_project(finished):
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    assert "```python\n" + SNIPPET.read_text().rstrip() + "\n```" in readme, "the README's snippet drifted from " + str(SNIPPET)
    url, store, blocks = finished
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run(
        [
            sys.executable,
            "-W",
            "error",
            "-c",
            SNIPPET.read_text() + "\nimport sys\nassert not [m for m in sys.modules if m.split('.')[0] in ('storage', 'maria')]",
        ],
        cwd=os.path.dirname(url),
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    assert [line.split()[0] for line in lines] == sorted(blocks)
    assert lines[2].startswith(f"b000002 (517, {D_MLM}) (517, {D_AR}) [{blocks['b000002']['targets'][0]} ")


def test_bfloat16_cannot_pass_for_integers(tmp_path):
    url = str(tmp_path / "my_store")
    store = create_store(url, {**MANIFEST, "feature_dtype": "bfloat16"}, None)
    arrays = block(40)
    store.write_block("b0", arrays)
    features = zarr.open_group(url, mode="r")[f"blocks/b0/{store.commit_info('b0')['attempt']}/features"]
    assert features.dtype == np.uint16 and features.attrs["dtype"] == "bfloat16"
    assert "NOT integers" in features.attrs["encoding"]
    done = subprocess.run(
        [sys.executable, "-c", SNIPPET.read_text()],
        cwd=str(tmp_path),
        capture_output=True,
        text=True,
        env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"},
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    decoded = (features[...].astype(np.uint32) << 16).view(np.float32)
    np.testing.assert_allclose(decoded, arrays["features"], rtol=2**-8)


def test_s3_store_walks_with_plain_zarr(s3_store):
    url, options = s3_store
    root = zarr.open_group(url, mode="r", storage_options=options)
    blocks = sorted(k for k, _ in root["blocks"].groups())
    assert blocks == open_store(url, storage_options=options).committed_blocks()
    b = root[f"blocks/{blocks[0]}"]
    assert b[b.attrs["maria_commit"]["attempt"]]["targets"].shape[0] > 0
    assert verify_store(url, storage_options=options) == []


@pytest.fixture
def s3_store(tmp_path, monkeypatch):
    moto_server = pytest.importorskip("moto.server", reason="moto[server] is not installed")
    boto3 = pytest.importorskip("boto3")
    pytest.importorskip("s3fs", reason="s3fs is not installed")
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        endpoint = f"http://{host}:{port}"
        for key, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}.items():
            monkeypatch.setenv(key, value)
        boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="walk")
        url, options = "s3://walk/store", {"endpoint_url": endpoint}
        store = create_store(url, MANIFEST, None, storage_options=options)
        for i, n in enumerate((50, 20)):
            store.write_block(f"b{i}", block(n, seed=i))
        store.write_plan(["b0", "b1"], f"maria extract --out {url}")
        store.gc_uncommitted()
        store.finalize()
        yield url, options
    finally:
        server.stop()


def test_commit_marker_and_block_group_agree(finished):
    url, store, blocks = finished
    for b in blocks:
        group = json.loads(Path(url, "blocks", b, "zarr.json").read_text())
        assert group["attributes"]["maria_commit"] == store.commit_info(b)
        listed = group["consolidated_metadata"]["metadata"]
        assert {k.split("/")[0] for k in listed} == {store.commit_info(b)["attempt"]} and len(listed) == 7
