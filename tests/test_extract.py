"""The extraction job on embedded Ray (2 CPUs) into a Zarr store, over tiny backbones."""

import json
import shutil
import subprocess

import numpy as np
import pytest
import torch
from extract_fixtures import ARRAYS, config, maria_command, read_all  # fixtures ray_local, corpus, store_a: conftest.py

from maria_extract.corpus import CorpusError, cut_windows, iter_documents
from maria_extract.job import run_extract
from maria_extract.masking import MaskingConfig, sample_mask

pytestmark = [pytest.mark.ray, pytest.mark.timeout(300)]


def test_stored_features_equal_the_aligned_feature_function(store_a, pairs, corpus):
    from maria.backbones import load_backbones
    from maria.features import aligned_features
    from maria_storage import open_store

    store = open_store(str(store_a))
    bb = load_backbones(*pairs["modernbert-olmo"])
    assert store.manifest["mlm"]["fingerprint"] == bb.identity["mlm"]["fingerprint"]
    np.testing.assert_array_equal(store.init_weights()["W2"], bb.expert_weights()["W2"].numpy())
    docs = list(iter_documents(corpus))  # the whitespace row is the last one: row numbers are list indices
    masking = MaskingConfig(masks_per_window=2)
    block = store.read_block("f000000-r0000000003")  # rows 3, 4, 5 of the corpus's one file
    feats, targets = [], []
    for d in (3, 4, 5):
        for w, ids in enumerate(cut_windows(bb.ar_tokenizer(docs[d], add_special_tokens=False).input_ids, 24)):
            for k in range(2):
                m, _ = sample_mask(np.array(ids), masking, 0, d, w, k)
                af = aligned_features(bb, torch.tensor([ids]), torch.tensor(m)[None], torch.tensor([len(ids)]))
                feats.append(af.features.numpy()), targets.append(af.targets.numpy())
    # block rows are sorted by (window, k, position), the order built here
    np.testing.assert_array_equal(block["targets"], np.concatenate(targets))
    np.testing.assert_allclose(block["features"].astype(np.float32), np.concatenate(feats), atol=2e-3, rtol=2e-3)
    assert set(np.unique(block["doc_ids"])) == {3, 4, 5}


def test_mntp_store_records_its_offset_and_stores_shifted_features(store_a, pairs, corpus, tmp_path):
    """--mlm-offset -1: the manifest says so, the rows are the aligned feature function's at that offset
    (the MLM's state at i - 1), and a store made at the other offset is never resumed with it."""
    from maria.backbones import load_backbones
    from maria.features import aligned_features
    from maria_storage import StoreMismatchError, open_store

    out = tmp_path / "mntp"
    run_extract(config(pairs, corpus, out, max_docs=3, mlm_offset=-1))
    store = open_store(str(out))
    assert store.manifest["mlm_offset"] == -1 and open_store(str(store_a)).manifest["mlm_offset"] == 0
    bb = load_backbones(*pairs["modernbert-olmo"], mlm_offset=-1)
    docs = list(iter_documents(corpus))
    feats = []
    for d in (0, 1, 2):
        for w, ids in enumerate(cut_windows(bb.ar_tokenizer(docs[d], add_special_tokens=False).input_ids, 24)):
            for k in range(2):
                m, _ = sample_mask(np.array(ids), MaskingConfig(masks_per_window=2), 0, d, w, k)
                feats.append(aligned_features(bb, torch.tensor([ids]), torch.tensor(m)[None], torch.tensor([len(ids)])).features.numpy())
    got = store.read_block(store.committed_blocks()[0])["features"].astype(np.float32)
    np.testing.assert_allclose(got, np.concatenate(feats), atol=2e-3, rtol=2e-3)
    with pytest.raises(StoreMismatchError, match="mlm_offset is 0 there but -1 now"):
        run_extract(config(pairs, corpus, store_a, mlm_offset=-1))


def test_two_runs_identical_and_resume_after_partial(store_a, pairs, corpus, tmp_path):
    first = read_all(str(store_a))
    b = tmp_path / "b"
    run_extract(config(pairs, corpus, b))
    second = read_all(str(b))
    assert first.keys() == second.keys()
    for blk in first:
        for name in ARRAYS:
            np.testing.assert_array_equal(first[blk][name], second[blk][name])
    # resume: one block never started, one half-written (its data present, no commit marker)
    c = tmp_path / "c"
    shutil.copytree(b, c)
    (c / "commits" / "f000000-r0000000006.json").unlink()
    for attempt in (c / "blocks" / "f000000-r0000000009").iterdir():  # its attempt folders and its group's zarr.json
        shutil.rmtree(attempt) if attempt.is_dir() else attempt.unlink()
    (c / "commits" / "f000000-r0000000009.json").unlink()
    summary = run_extract(config(pairs, corpus, c))
    assert summary["blocks"] == 5
    resumed = read_all(str(c))
    for blk in first:
        for name in ARRAYS:
            np.testing.assert_array_equal(first[blk][name], resumed[blk][name])
    owner = {}  # every window exactly once: in one block only
    for blk, v in resumed.items():
        for dw in {(int(d), int(w)) for d, w in zip(v["doc_ids"], v["window_ids"])}:
            assert owner.setdefault(dw, blk) == blk


def test_verify_cli_good_and_corrupt(store_a, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(store_a, bad)
    ok = subprocess.run(maria_command("verify", "--store", bad), capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    chunk = sorted(p for p in (bad / "blocks" / "f000000-r0000000006").rglob("*") if p.is_file() and "features" in p.parts and p.name != "zarr.json")[0]
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0xFF
    chunk.write_bytes(bytes(data))
    res = subprocess.run(maria_command("verify", "--store", bad), capture_output=True, text=True)
    assert res.returncode != 0 and "f000000-r0000000006" in res.stdout + res.stderr


def test_clear_errors(ray_local, store_a, pairs, corpus, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text(json.dumps({"text": "  "}) + "\n")
    with pytest.raises(CorpusError, match="no non-empty documents"):
        run_extract(config(pairs, str(empty), tmp_path / "s1"))
    with pytest.raises(CorpusError, match="no column 'body'"):
        run_extract(config(pairs, corpus, tmp_path / "s2", text_column="body"))
    with pytest.raises(CorpusError, match="not text"):
        run_extract(config(pairs, corpus, tmp_path / "s3", text_column="n"))
    from maria_storage import StoreMismatchError

    with pytest.raises(StoreMismatchError):
        run_extract(config(pairs, corpus, store_a, kind="bert-gpt2"))
    with pytest.raises(StoreMismatchError, match="docs_per_block is 3 there but 2 now"):  # else blocks would overlap
        run_extract(config(pairs, corpus, store_a, docs_per_block=2))
    with pytest.raises(ValueError, match="outside \\[0, 1\\]"):
        config(pairs, corpus, tmp_path / "s4", mask_rate=1.5)


def test_masking_modes_are_deterministic():
    ids = np.arange(40) % 7
    starts = np.zeros(7, dtype=bool)
    starts[0] = True  # a word starts at every token id 0
    for mode in ("token", "word", "span"):
        cfg = MaskingConfig(mode=mode, rate=0.5)
        a, _ = sample_mask(ids, cfg, 0, 3, 1, 0, starts)
        b, _ = sample_mask(ids, cfg, 0, 3, 1, 0, starts)
        c, _ = sample_mask(ids, cfg, 1, 3, 1, 0, starts)
        assert np.array_equal(a, b) and not np.array_equal(a, c)
        if mode == "word":  # all tokens of a word share their fate
            words = np.cumsum(starts[ids]) - 1
            assert all(len(set(a[words == w])) == 1 for w in np.unique(words))
        if mode == "span":
            assert a.sum() == 20


def test_span_mean_is_a_flag_and_reaches_the_masks():
    from extract_fixtures import config_from_args

    base = ["--mlm", "m", "--ar", "a", "--corpus", "c", "--store", "s", "--mask-mode", "span"]
    assert config_from_args(base).masking.span_mean == 3.0
    assert config_from_args(base + ["--mask-span-mean", "6"]).masking.span_mean == 6.0
