"""Feature store: format round trips, idempotent commits, verification, the shuffled reader, S3 (moto)."""

from __future__ import annotations

import glob
import itertools
import json
import os

import numpy as np
import pytest

from maria_storage import (
    CorruptBlockError,
    ShuffledReader,
    StoreError,
    StoreMismatchError,
    StoreNotFoundError,
    as_float32,
    create_store,
    load_all,
    open_store,
    verify_store,
)

D_MLM, D_AR, V = 8, 12, 5000
MANIFEST = {
    "mlm": "tiny-mlm",
    "ar": "tiny-ar",
    "tokenizer_fingerprint": "abc",
    "d_mlm": D_MLM,
    "d_ar": D_AR,
    "vocab_size": V,
    "masking": {"mode": "tokens", "rate": "uniform"},
    "seed": 0,
    "window_length": 64,
}


def init_weights(rng):
    return {
        "W1": rng.standard_normal((V, D_MLM)),
        "b1": rng.standard_normal(V),
        "W2": rng.standard_normal((V, D_AR)),
        "b2": np.zeros(V),
        "vocab_map": np.arange(V + 4) % V,
    }


def block(n: int, first_row: int = 0, seed: int = 0) -> dict[str, np.ndarray]:
    """A block whose targets are global row ids, so a reader's output can be traced back to rows."""
    rng = np.random.default_rng(seed)
    ids = np.arange(first_row, first_row + n)
    return {
        "features": rng.standard_normal((n, D_MLM + D_AR)).astype(np.float32),
        "targets": ids,
        "doc_ids": ids // 10,
        "window_ids": ids // 5,
        "positions": ids % 64,
        "mask_rates": rng.random(n).astype(np.float32),
    }


def make_store(url, sizes=(300, 0, 517, 64, 1000), **manifest_overrides):
    store = create_store(url, {**MANIFEST, **manifest_overrides}, init_weights(np.random.default_rng(0)))
    blocks, start = {}, 0
    for i, n in enumerate(sizes):
        blocks[f"b{i:06d}"] = block(n, start, seed=i)
        store.write_block(f"b{i:06d}", blocks[f"b{i:06d}"], stats={"tokens": n})
        start += n
    return store, blocks


def test_roundtrip_float16(tmp_path):
    url = str(tmp_path / "fresh" / "nested" / "store")  # parents do not exist yet
    store, blocks = make_store(url)
    again = open_store(url)
    assert again.committed_blocks() == sorted(blocks)
    assert again.feature_dim == D_MLM + D_AR and again.vocab_size == V
    assert again.num_rows() == sum(len(b["targets"]) for b in blocks.values())
    for block_id, arrays in blocks.items():
        got = again.read_block(block_id, verify=True)
        assert got["features"].dtype == np.float16
        np.testing.assert_array_equal(got["features"], arrays["features"].astype(np.float16))
        for name in ("targets", "doc_ids", "window_ids", "positions", "mask_rates"):
            np.testing.assert_array_equal(got[name], arrays[name])
        info = again.commit_info(block_id)
        assert info["rows"] == len(arrays["targets"]) and info["stats"] == {"tokens": len(arrays["targets"])}
    w = again.init_weights()
    ref = init_weights(np.random.default_rng(0))
    assert w["W1"].dtype == np.float32 and w["vocab_map"].dtype == np.int64
    np.testing.assert_allclose(w["W2"], ref["W2"].astype(np.float32))
    np.testing.assert_array_equal(w["b2"], 0)
    again.finalize()
    assert open_store(url).manifest["rows"] == again.num_rows() and open_store(url).manifest["blocks"] == len(blocks)
    assert open_store(url).manifest["format_version"] == 2
    everything = load_all(url)
    assert everything["features"].dtype == np.float32 and len(everything["targets"]) == again.num_rows()
    assert verify_store(url) == []


def test_bfloat16(tmp_path):
    store = create_store(str(tmp_path / "s"), {**MANIFEST, "feature_dtype": "bfloat16"}, None)
    arrays = block(100)
    arrays["features"][0, :4] = [1.0, -2.5, 3.0e38, 1.0 + 2**-9]  # exact, exact, large, rounds to 1.0
    store.write_block("b0", arrays)
    got = store.read_block("b0", verify=True)["features"]
    assert got.dtype == np.uint16
    f32 = as_float32(got, store.manifest)
    assert f32.dtype == np.float32
    assert f32[0, 0] == 1.0 and f32[0, 1] == -2.5 and f32[0, 3] == 1.0 and np.isfinite(f32[0, 2])
    np.testing.assert_allclose(f32, arrays["features"], rtol=2**-8)
    assert verify_store(store.url) == []
    with pytest.raises(StoreError, match="init weights"):
        store.init_weights()


def test_bfloat16_matches_torch(tmp_path):
    torch = pytest.importorskip("torch")
    store = create_store(str(tmp_path / "s"), {**MANIFEST, "feature_dtype": "bfloat16"}, None)
    arrays = block(50)
    t = torch.from_numpy(arrays["features"]).to(torch.bfloat16)
    store.write_block("b0", {**arrays, "features": t})  # a bf16 tensor goes in as-is
    got = as_float32(store.read_block("b0")["features"], store.manifest)
    np.testing.assert_array_equal(got, t.float().numpy())


def test_rewrite_is_noop_and_overwrite(tmp_path):
    store, blocks = make_store(str(tmp_path / "s"), sizes=(10,))
    marker = store.commit_info("b000000")
    assert store.write_block("b000000", blocks["b000000"]) is False
    assert store.commit_info("b000000") == marker
    assert store.write_block("b000000", block(20), overwrite=True) is True
    assert store.commit_info("b000000")["attempt"] != marker["attempt"] and store.num_rows() == 20
    assert store.gc_uncommitted() == 1  # the superseded attempt
    assert len(store.read_block("b000000", verify=True)["targets"]) == 20


def test_uncommitted_attempt_is_invisible_then_completed(tmp_path, monkeypatch):
    url = str(tmp_path / "s")
    store = create_store(url, MANIFEST, None)

    def crash(*args):
        raise RuntimeError("worker died before committing")

    monkeypatch.setattr(store, "_write_marker", crash)
    with pytest.raises(RuntimeError):
        store.write_block("b7", block(40))
    assert glob.glob(f"{url}/blocks/b7/*/features/zarr.json")  # the arrays were written...
    assert store.committed_blocks() == [] and open_store(url).num_rows() == 0  # ...but nobody sees them
    with pytest.raises(StoreError, match="not committed"):
        store.read_block("b7")
    assert verify_store(url) == []
    retry = open_store(url)  # the retried task
    assert retry.write_block("b7", block(40)) is True
    assert retry.committed_blocks() == ["b7"]
    assert retry.gc_uncommitted() == 1 and retry.gc_uncommitted() == 0
    assert len(glob.glob(f"{url}/blocks/b7/*/")) == 1 and os.path.isfile(f"{url}/blocks/b7/zarr.json")
    assert len(retry.read_block("b7", verify=True)["targets"]) == 40


def test_concurrent_attempts_of_one_block(tmp_path):
    """Ray may run a retry while the first attempt still writes: both complete, one marker wins."""
    from concurrent.futures import ThreadPoolExecutor

    url = str(tmp_path / "s")
    create_store(url, MANIFEST, None)
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda i: open_store(url).write_block("b1", block(300, seed=1)), range(4)))
    assert any(results)
    store = open_store(url)
    assert store.committed_blocks() == ["b1"] and verify_store(url) == []
    assert store.gc_uncommitted() == sum(results) - 1 and verify_store(url) == []


def test_empty_block(tmp_path):
    store = create_store(str(tmp_path / "s"), MANIFEST, None)
    assert store.write_block("b0", block(0)) is True
    got = store.read_block("b0", verify=True)
    assert got["features"].shape == (0, D_MLM + D_AR) and store.num_rows() == 0
    assert verify_store(store.url) == []


def test_invalid_blocks_refused_before_writing(tmp_path):
    url = str(tmp_path / "s")
    store = create_store(url, MANIFEST, None)
    bad = block(30)
    bad["features"][3, 5] = np.nan
    with pytest.raises(StoreError, match="NaN"):
        store.write_block("b0", bad)
    overflow = block(30)
    overflow["features"][0, 0] = 1e6  # finite in float32, inf in float16
    with pytest.raises(StoreError, match="NaN or inf"):
        store.write_block("b0", overflow)
    with pytest.raises(StoreError, match=r"expected \(N, 20\)"):
        store.write_block("b0", {**block(30), "features": np.zeros((30, 19), np.float32)})
    with pytest.raises(StoreError, match="missing \\['mask_rates'\\]"):
        store.write_block("b0", {k: v for k, v in block(30).items() if k != "mask_rates"})
    with pytest.raises(StoreError, match="expected \\(30,\\)"):
        store.write_block("b0", {**block(30), "targets": np.arange(29)})
    with pytest.raises(StoreError, match="block id"):
        store.write_block("../evil", block(3))
    assert os.listdir(f"{url}/blocks") == ["zarr.json"] and store.committed_blocks() == []


def test_create_store_identity(tmp_path):
    url = str(tmp_path / "s")
    store, _ = make_store(url, sizes=(10,))
    resumed = create_store(url, dict(MANIFEST), None)  # same identity: resume
    assert resumed.committed_blocks() == ["b000000"]
    with pytest.raises(StoreMismatchError, match=r"seed is 0 there but 1 now; use another --store or delete"):
        create_store(url, {**MANIFEST, "seed": 1}, None)
    with pytest.raises(StoreMismatchError, match="corpus_fingerprint"):
        create_store(url, {**MANIFEST, "corpus_fingerprint": "x"}, None)
    other = tmp_path / "not_a_store"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(StoreMismatchError, match="not a MARIA feature store"):
        create_store(str(other), MANIFEST, None)
    with pytest.raises(StoreNotFoundError):
        open_store(str(tmp_path / "nowhere"))
    with pytest.raises(StoreError, match="d_mlm"):
        create_store(str(tmp_path / "t"), {**MANIFEST, "d_mlm": None}, None)


def flip_a_byte(url: str, block_id: str) -> str:
    info = json.load(open(f"{url}/commits/{block_id}.json"))
    chunk = sorted(glob.glob(f"{url}/blocks/{block_id}/{info['attempt']}/features/c/**/*", recursive=True))
    chunk = [c for c in chunk if os.path.isfile(c)][0]
    data = bytearray(open(chunk, "rb").read())
    data[len(data) // 2] ^= 0x01
    open(chunk, "wb").write(bytes(data))
    return chunk


def test_verify_finds_a_flipped_byte(tmp_path):
    url = str(tmp_path / "s")
    store, blocks = make_store(url)
    assert verify_store(url) == []
    flip_a_byte(url, "b000002")
    problems = verify_store(url)
    assert len(problems) == 1 and problems[0].startswith("block b000002:") and "checksum of features" in problems[0]
    assert verify_store(url, check_data=False) == []  # metadata alone cannot see it
    with pytest.raises(CorruptBlockError, match="b000002"):
        store.read_block("b000002", verify=True)
    with pytest.raises(CorruptBlockError, match=r"b000002.*maria verify.*--skip-corrupt"):
        list(ShuffledReader(url, batch_size=64, chunk_rows=64, buffer_rows=256))
    reader = ShuffledReader(url, batch_size=64, chunk_rows=64, buffer_rows=256, skip_corrupt=True)
    with pytest.warns(UserWarning, match="b000002"):
        targets = np.concatenate([b["targets"] for b in reader])
    good = np.concatenate([b["targets"] for k, b in blocks.items() if k != "b000002"])
    np.testing.assert_array_equal(np.sort(targets), np.sort(good))
    assert reader.state_dict()["skipped_blocks"] == ["b000002"]
    os.remove(f"{url}/blocks/b000003/{store.commit_info('b000003')['attempt']}/targets/zarr.json")
    assert any(p.startswith("block b000003:") and "targets" in p for p in verify_store(url))


def batches(reader, limit=None):
    """All batches of the current epoch, or exactly the next `limit` (a training step's view)."""
    return list(reader) if limit is None else list(itertools.islice(reader, limit))


@pytest.fixture(scope="module")
def reader_store(tmp_path_factory):
    url = str(tmp_path_factory.mktemp("reader") / "s")
    store, blocks = make_store(url)
    return url, blocks


def test_reader_covers_every_row_once_and_matches_features(reader_store):
    url, blocks = reader_store
    rows = {int(t): f for b in blocks.values() for t, f in zip(b["targets"], b["features"].astype(np.float16))}
    reader = ShuffledReader(url, batch_size=50, chunk_rows=64, buffer_rows=256, seed=3)
    for epoch in range(2):
        got = batches(reader)
        assert len(got) == len(reader) == -(-len(rows) // 50) and reader.epoch == epoch + 1
        assert all(len(b["targets"]) == 50 for b in got[:-1])
        targets = np.concatenate([b["targets"] for b in got])
        assert sorted(targets.tolist()) == sorted(rows)
        b = got[1]
        assert b["features"].dtype == np.float32 and b["targets"].dtype == np.int64 and b["mask_rates"].dtype == np.float32
        np.testing.assert_array_equal(b["features"], np.stack([rows[int(t)] for t in b["targets"]]).astype(np.float32))
    assert not np.array_equal(targets[:50], np.arange(50))  # shuffled
    dropped = ShuffledReader(url, batch_size=50, chunk_rows=64, buffer_rows=256, drop_last=True)
    assert len(batches(dropped)) == len(dropped) == len(rows) // 50


def test_reader_is_deterministic(reader_store):
    url, _ = reader_store
    kw = dict(batch_size=37, chunk_rows=64, buffer_rows=200)
    a = [b["targets"] for b in batches(ShuffledReader(url, seed=5, **kw))]
    b = [b["targets"] for b in batches(ShuffledReader(url, seed=5, prefetch=False, **kw))]
    c = [b["targets"] for b in batches(ShuffledReader(url, seed=6, **kw))]
    assert all(np.array_equal(x, y) for x, y in zip(a, b)) and len(a) == len(b)
    assert not all(np.array_equal(x, y) for x, y in zip(a, c))


@pytest.mark.parametrize("k", [0, 1, 7, 23, 50])
def test_reader_resume_is_exact(reader_store, k):
    url, _ = reader_store
    kw = dict(batch_size=41, chunk_rows=64, buffer_rows=300, seed=11)
    full = ShuffledReader(url, **kw)
    epochs = [batches(full), batches(full)]
    stream = [b for e in epochs for b in e]
    first = ShuffledReader(url, **kw)
    head = batches(first, limit=min(k, len(epochs[0])))
    state = json.loads(json.dumps(first.state_dict()))
    assert state["batches_done_in_epoch"] == len(head) and state["seed"] == 11
    resumed = ShuffledReader(url, batch_size=41, chunk_rows=64, buffer_rows=300, seed=999)
    resumed.load_state_dict(state)
    rest = batches(resumed) + batches(resumed)
    assert len(head) + len(rest) == len(stream)
    for x, y in zip(head + rest, stream):
        for name in ("features", "targets", "mask_rates"):
            np.testing.assert_array_equal(x[name], y[name])


def test_s3_store_with_moto(tmp_path, monkeypatch):
    moto_server = pytest.importorskip("moto.server", reason="moto[server] is not installed")
    boto3 = pytest.importorskip("boto3")
    pytest.importorskip("s3fs", reason="s3fs is not installed")
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        endpoint = f"http://{host}:{port}"
        for key, value in {
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
            "MARIA_S3_ENDPOINT_URL": endpoint,
        }.items():
            monkeypatch.setenv(key, value)
        boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="feats")
        url = "s3://feats/run1/store"
        store, blocks = make_store(url, sizes=(120, 0, 70))
        assert store.write_block("b000000", blocks["b000000"]) is False
        explicit = open_store(url, storage_options={"endpoint_url": endpoint})
        assert explicit.committed_blocks() == sorted(blocks) and explicit.num_rows() == 190
        np.testing.assert_array_equal(explicit.read_block("b000002", verify=True)["targets"], blocks["b000002"]["targets"])
        np.testing.assert_allclose(explicit.init_weights()["W1"], init_weights(np.random.default_rng(0))["W1"], rtol=1e-6)

        def crash(*args):
            raise RuntimeError("died")

        monkeypatch.setattr(explicit, "_write_marker", crash)
        with pytest.raises(RuntimeError):
            explicit.write_block("b000009", block(10))
        assert open_store(url).committed_blocks() == sorted(blocks)
        assert open_store(url).gc_uncommitted() == 1
        assert verify_store(url) == []
        targets = np.concatenate([b["targets"] for b in ShuffledReader(url, batch_size=32, chunk_rows=50)])
        assert sorted(targets.tolist()) == list(range(190))
        assert create_store(url, MANIFEST, None).num_rows() == 190
        with pytest.raises(StoreMismatchError, match="ar is"):
            create_store(url, {**MANIFEST, "ar": "other"}, None)
        store.finalize()
        assert open_store(url).manifest["rows"] == 190
    finally:
        server.stop()
