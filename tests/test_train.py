"""Head training and evaluation from tiny feature stores (tiny random backbones, no Ray)."""

import json
import math
import os
import re
import shutil

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from store_fixtures import make_store, make_windows

from maria_storage import open_store
from maria_train_head.data import DataError
from maria_train_head.evaluate import EvalConfig, compare_inits_plot, run_eval
from maria_train_head.train import TrainConfig, run_train

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def bb(pairs):
    from maria.backbones import load_backbones

    return load_backbones(*pairs["modernbert-olmo"])


@pytest.fixture(scope="module")
def stores(bb, pairs, tmp_path_factory):
    """~4k training and ~1.2k validation masked tokens from different windows of the tiny corpus,
    and a store of the other pair (bert-gpt2: equal hidden sizes, other fingerprints)."""
    from maria.backbones import load_backbones

    root = tmp_path_factory.mktemp("stores")
    make_store(root / "train", bb, 320, seed=1, windows_per_block=32)
    make_store(root / "val", bb, 96, seed=2, windows_per_block=32)
    make_store(root / "other", load_backbones(*pairs["bert-gpt2"]), 32, seed=3, windows_per_block=16)
    return {k: str(root / k) for k in ("train", "val", "other")}


def config(stores, out, **kw):
    base = dict(store=stores["train"], val_store=stores["val"], out=str(out), device="cpu", batch_size=128, lr=3e-3, warmup_steps=5, eval_every=20)
    return TrainConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def trained(stores, tmp_path_factory):
    out = tmp_path_factory.mktemp("heads") / "poe"
    return out, run_train(config(stores, out, max_steps=100))


def test_training_lowers_validation_loss_below_poe_init(trained, stores, bb, tmp_path):
    from maria.head import load_head
    from maria.identity import check_same_backbones

    out, summary = trained
    assert summary["init_val_loss"] - summary["best_val_loss"] > 1.0, summary  # ~6.0 -> ~3: the unigram and more
    res = run_eval(EvalConfig(store=stores["val"], head=str(out), device="cpu"))
    assert res["models"]["trained"]["nll"] == pytest.approx(summary["best_val_loss"], abs=1e-5)
    assert res["models"]["trained"]["nll"] < res["models"]["poe_init"]["nll"] - 1.0
    assert summary["init_val_loss"] == pytest.approx(res["models"]["poe_init"]["nll"], abs=1e-5)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 20, 40, 60, 80, 100]
    assert set(rows[-1]) == {"time", "step", "train_loss", "val_loss", "val_ppl", "lr", "rows_per_s"}
    assert (out / "loss.png").stat().st_size > 0
    head, meta = load_head(out)  # the one head format, which export reads; it matches the backbones
    check_same_backbones(bb.describe(), meta, "backbones", "head", "-")
    assert meta["complete"] is True
    assert meta["store"] == stores["train"] and meta["init"] == "poe" and meta["best_step"] == summary["best_step"]
    assert head.proj.weight.shape == (bb.vocab_size, bb.d_mlm + bb.d_ar)


def test_best_head_is_kept_and_never_worse_than_init(stores, tmp_path):
    """A learning rate far too high makes every step worse: the written head is the init."""
    s = run_train(config(stores, tmp_path, max_steps=20, lr=30.0, eval_every=5, early_stopping_patience=2))
    assert s["best_step"] == 0 and s["best_val_loss"] == s["init_val_loss"] and s["stopped_early"] and s["steps"] == 10
    res = run_eval(EvalConfig(store=stores["val"], head=str(tmp_path), device="cpu"))
    assert res["models"]["trained"]["nll"] == pytest.approx(res["models"]["poe_init"]["nll"], abs=1e-5)


@pytest.mark.parametrize("dtype,tol,offset", [("float16", 1e-3, 0), ("bfloat16", 2e-2, 0), ("float16", 1e-3, -1)])
def test_poe_init_eval_equals_averaged_backbone_logits(pairs, tmp_path, dtype, tol, offset):
    """run_eval's PoE / AR-only / MLM-only rows equal NLLs of the models' own forward passes
    ((mapped MLM logits + AR logits) / 2) on the same windows, up to the float16 feature cache.
    With offset -1 (an MNTP MLM) the MLM's logits for x[i] are those at its position i - 1."""
    from maria.backbones import load_backbones
    from maria.features import ar_inputs, mlm_inputs, valid_positions

    bb = load_backbones(*pairs["modernbert-olmo"], mlm_offset=offset)
    with torch.no_grad():  # sharpen the random experts so the three rows differ by ~1 nat, not 1e-3
        for m in (bb.mlm, bb.ar):
            m.get_output_embeddings().weight.mul_(20)
    make_store(tmp_path / "s", bb, 24, seed=5, feature_dtype=dtype)
    res = run_eval(EvalConfig(store=str(tmp_path / "s"), device="cpu", json=str(tmp_path / "e.json"), markdown=str(tmp_path / "e.md")))
    ids, mask, lengths, _ = make_windows(bb, 24, seed=5)
    mask = mask & valid_positions(ids, lengths)
    with torch.no_grad():
        x, attn = mlm_inputs(bb, ids, mask, lengths)
        P, T = len(bb.mlm_prefix) + offset, ids.shape[1]  # the MLM predicts x[0] at its position P
        l_mlm = bb.mlm(input_ids=x, attention_mask=attn).logits[:, P : P + T].float()
        mapped = torch.zeros(*ids.shape, bb.vocab_size)  # MLM logits in AR ids; 0 where the MLM lacks a token (as W1)
        ok = bb.mlm_to_ar >= 0
        mapped[..., bb.mlm_to_ar[ok]] = l_mlm[..., ok]
        l_ar = bb.ar(input_ids=ar_inputs(bb, ids), attention_mask=valid_positions(ids, lengths).long()).logits.float()
    for name, logits in (("poe_init", (mapped + l_ar) / 2), ("ar_only", l_ar), ("mlm_only", mapped)):
        assert res["models"][name]["nll"] == pytest.approx(F.cross_entropy(logits[mask], ids[mask]).item(), abs=tol)
    assert res["models"]["poe_init"]["nll"] < min(res["models"]["ar_only"]["nll"], res["models"]["mlm_only"]["nll"]) - 0.5
    assert res["rows"] == int(mask.sum())
    assert json.loads((tmp_path / "e.json").read_text())["models"].keys() == {"poe_init", "ar_only", "mlm_only"}
    if offset:  # the offset travels: store manifest -> head record; a store read at the other offset is refused
        from maria.identity import IdentityMismatchError

        assert open_store(str(tmp_path / "s")).manifest["mlm_offset"] == -1
        run_train(TrainConfig(store=str(tmp_path / "s"), val_store=str(tmp_path / "s"), out=str(tmp_path / "h"), device="cpu", max_steps=1, batch_size=64))
        assert json.loads((tmp_path / "h" / "head.json").read_text())["mlm_offset"] == -1
        make_store(tmp_path / "classic", load_backbones(*pairs["modernbert-olmo"]), 8, seed=6)
        with pytest.raises(IdentityMismatchError, match="mlm_offset: -1 vs 0"):
            run_eval(EvalConfig(store=str(tmp_path / "classic"), head=str(tmp_path / "h"), device="cpu"))


def test_eval_reports_four_rows_per_bucket(trained, stores, tmp_path):
    out, _ = trained
    res = run_eval(EvalConfig(store=stores["val"], head=str(out), device="cpu", json=str(tmp_path / "e.json"), markdown=str(tmp_path / "e.md")))
    assert list(res["models"]) == ["trained", "poe_init", "ar_only", "mlm_only"]
    for row in res["models"].values():
        assert len(row["by_mask_rate"]) == 4 and math.isclose(row["ppl"], math.exp(row["nll"]))
        assert sum(b["rows"] for b in row["by_mask_rate"]) == res["rows"]
    md = (tmp_path / "e.md").read_text()
    assert all(label in md for label in ("| trained head |", "| PoE at init", "| AR only |", "| MLM only |"))
    assert json.loads((tmp_path / "e.json").read_text())["rows"] == res["rows"]


@pytest.mark.parametrize("mode", ["ram", "stream"])
def test_resume_is_exact(stores, tmp_path, mode, monkeypatch):
    """12 steps straight vs 5 steps, stop, then a fresh run_train(resume=True): identical bits.
    512-row batches cross an epoch boundary of the ~4k-row store on the way."""
    kw = dict(max_steps=12, batch_size=512, eval_every=4, save_every=5, data_mode=mode)
    run_train(config(stores, tmp_path / "a", **kw))
    first = run_train(config(stores, tmp_path / "b", **kw), stop_after=5)
    assert first["interrupted"] and first["steps"] == 5
    assert json.loads((tmp_path / "b" / "head.json").read_text())["complete"] is False
    run_train(config(stores, tmp_path / "b", resume=True, **kw))
    a, b = (load_file(str(tmp_path / d / "ckpt" / "state.safetensors")) for d in ("a", "b"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])]
    ha, hb = (load_file(str(tmp_path / d / "head.safetensors")) for d in ("a", "b"))
    assert torch.equal(ha["proj.weight"], hb["proj.weight"]) and torch.equal(ha["proj.bias"], hb["proj.bias"])
    assert (tmp_path / "a" / "metrics.jsonl").read_text().count("\n") == (tmp_path / "b" / "metrics.jsonl").read_text().count("\n") == 4


def test_val_store_of_other_backbones_is_refused(stores, tmp_path):
    with pytest.raises(ValueError, match=r"val store .*other backbones than store .*mlm fingerprint.*same --mlm and --ar"):
        run_train(config(stores, tmp_path, val_store=stores["other"], max_steps=2))


def test_resume_from_another_store_is_refused(trained, stores, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(trained[0], out)
    with pytest.raises(ValueError, match=r"store .*other was made by other backbones than the checkpoint .*mlm fingerprint"):
        run_train(config(stores, out, store=stores["other"], val_store=None, resume=True, max_steps=2))
    with pytest.raises(DataError, match=r"batch_size=128, now 64"):
        run_train(config(stores, out, resume=True, batch_size=64, max_steps=200))


def test_eval_refuses_head_of_other_backbones(trained, stores):
    with pytest.raises(ValueError, match=r"head .* other backbones than store .*other"):
        run_eval(EvalConfig(store=stores["other"], head=str(trained[0]), device="cpu"))


def test_random_and_mix_inits(trained, stores, tmp_path):
    rnd = run_train(config(stores, tmp_path / "random", init="random", max_steps=60))
    assert math.isfinite(rnd["best_val_loss"]) and rnd["best_val_loss"] < rnd["init_val_loss"] - 1.0
    base = run_eval(EvalConfig(store=stores["val"], device="cpu"))["models"]
    mix = run_train(config(stores, tmp_path / "mix", init="mix", max_steps=1, mix_rows=2048))
    a, b = mix["init_scales"]
    assert mix["init_val_loss"] <= min(base["poe_init"]["nll"], base["ar_only"]["nll"]) + 1e-3, (a, b, base)
    assert json.loads((tmp_path / "mix" / "head.json").read_text())["init_scales"] == [a, b]
    compare_inits_plot({"PoE init": str(trained[0] / "metrics.jsonl"), "random init": str(tmp_path / "random" / "metrics.jsonl")}, str(tmp_path / "fig2.png"))
    assert (tmp_path / "fig2.png").stat().st_size > 0


def test_block_split_without_val_store(stores, tmp_path):
    s = run_train(config(stores, tmp_path, val_store=None, val_fraction=0.3, max_steps=3))
    meta = json.loads((tmp_path / "head.json").read_text())
    assert len(meta["val_blocks"]) == 3 and math.isfinite(s["best_val_loss"])  # 30% of 10 blocks
    from maria_storage import open_store

    with pytest.raises(DataError, match="too few to hold out"):
        run_train(config(stores, tmp_path / "x", store=stores["other"], val_store=None, val_fraction=0.9, max_steps=1))
    assert len(open_store(stores["other"]).committed_blocks()) == 2


def test_config_errors_name_the_fix(stores, tmp_path):
    with pytest.raises(ValueError, match="use one of poe, mix, ar-only, random"):
        config(stores, tmp_path, init="product")
    with pytest.raises(ValueError, match="--val-store or a --val-fraction"):
        config(stores, tmp_path, val_store=None, val_fraction=0.0)
    with pytest.raises(ValueError, match="increasing edges"):
        EvalConfig(store=stores["val"], buckets=[0.5, 0.25])


def test_bench_train_reports_bounds(stores):
    from maria_bench.train import bench_train

    r = bench_train(stores["train"], batch_size=256, steps=4, device="cpu")
    for k in ("train_rows_per_s", "read_rows_per_s", "step_rows_per_s"):
        assert r[k] > 0
    assert r["train_over_bound"] == pytest.approx(r["train_rows_per_s"] / min(r["read_rows_per_s"], r["step_rows_per_s"]))


@pytest.mark.parametrize("missing,why", [(0, "never finished"), (2, "planned blocks are missing")])
def test_an_unfinished_store_is_refused_by_train_and_eval(bb, stores, tmp_path, missing, why):
    """One rule (the store's require_complete) for both verbs: all blocks there but never finalized is refused too."""
    store = make_store(tmp_path / "s", bb, 64, seed=3, plan=True, missing=missing, finalize=False)
    with pytest.raises(DataError, match=why):
        run_train(config(stores, tmp_path / "h", store=store.url, max_steps=2))
    assert not (tmp_path / "h").exists()
    with pytest.raises(DataError, match=why):
        run_eval(EvalConfig(store=store.url, device="cpu"))
    run_eval(EvalConfig(store=store.url, device="cpu", allow_incomplete=True))


def test_feature_dataset_is_seeded_resumable_and_the_same_across_workers(stores):
    from torch.utils.data import DataLoader

    from maria_train_head.dataset import FeatureDataset

    ds = FeatureDataset(stores["train"], batch_size=256, seed=4, epochs=2)
    alone = list(DataLoader(ds, batch_size=None))
    assert len(alone) == len(ds) == 2 * ds.batches_per_epoch
    assert alone[0]["features"].dtype == torch.float32 and alone[0]["targets"].dtype == torch.int64
    rows = torch.cat([b["targets"] for b in alone[: ds.batches_per_epoch]])
    assert len(rows) == ds._reader().num_rows()  # one epoch is every row once
    assert not torch.equal(alone[0]["targets"], alone[ds.batches_per_epoch]["targets"])  # epochs reshuffle
    workers = list(DataLoader(ds, batch_size=None, num_workers=2, multiprocessing_context="spawn"))
    assert len(workers) == len(alone) and all(torch.equal(a["features"], b["features"]) for a, b in zip(alone, workers))
    state = ds.state_dict(5)
    later = FeatureDataset(stores["train"], batch_size=256, seed=4, epochs=2)
    later.load_state_dict(state)
    tail = list(DataLoader(later, batch_size=None))
    assert len(tail) == len(alone) - 5 and all(torch.equal(a["targets"], b["targets"]) for a, b in zip(alone[5:], tail))
    with pytest.raises(ValueError, match="another stream"):
        FeatureDataset(stores["train"], batch_size=256, seed=5).load_state_dict(state)


# --- reliability: identity, not spelling; one run per --out; damage is exit 3 -------------------------------------


def test_resume_trusts_the_store_not_its_path(stores, tmp_path, monkeypatch):
    """The same store by another spelling (a relative path, a copy) resumes; another store put at the same path
    is refused (it used to be accepted: the run finished on it, complete)."""
    store, out = tmp_path / "s", tmp_path / "h"
    shutil.copytree(stores["train"], store)
    run_train(config(stores, out, store=str(store), max_steps=2))
    monkeypatch.chdir(tmp_path)
    run_train(config(stores, out, store="s", resume=True, max_steps=2))  # a relative path to the same store
    shutil.rmtree(store)
    shutil.copytree(stores["val"], store)  # other data, same backbones, same path
    with pytest.raises(DataError, match=r"--store s holds other data than the store the checkpoint .* was trained on"):
        run_train(config(stores, out, store="s", resume=True, max_steps=2))
    with pytest.raises(DataError, match=r"trained with a --val-store"):
        run_train(config(stores, out, store=stores["train"], val_store=None, resume=True, max_steps=2))


def train_argv(stores, out, *extra):
    return ["train", "--store", stores["train"], "--val-store", stores["val"], "--out", str(out), "--device", "cpu", "--batch-size", "128", *map(str, extra)]


def test_a_locked_output_is_refused_and_a_stale_lock_taken_over(stores, tmp_path, capsys):
    import socket
    import subprocess
    import sys

    from maria.io import lock_path, output_lock
    from maria_app.cli import main

    out = tmp_path / "h"
    with output_lock(out, "head folder"):  # a live run holds it
        assert main(train_argv(stores, out, "--max-steps", 1)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"is in use by another run (pid {os.getpid()} on host {socket.gethostname()}" in err[0], err
    assert not out.exists() and not lock_path(out).exists()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    lock_path(out).write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname(), "pid_started": 1.0, "time": 1.0}))
    assert main(train_argv(stores, out, "--max-steps", 1)) == 0  # a crashed run's lock: taken over
    assert not lock_path(out).exists()
    lock_path(out).write_text(json.dumps({"pid": 1, "host": "another-host", "time": 1.0}))
    assert main(train_argv(stores, out, "--max-steps", 2, "--resume")) == 2  # this host cannot tell: a person decides
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "host another-host" in err and f"delete {lock_path(out)}" in err


def test_two_runs_into_one_out_one_wins(stores, tmp_path):
    """Started together, two `maria train` into one --out: one trains, the other is refused in one line (it used
    to run too, interleaving metrics.jsonl, or die with a traceback)."""
    import subprocess
    import sys

    out = tmp_path / "h"
    cmd = [sys.executable, "-m", "maria_app.cli", *train_argv(stores, out, "--max-steps", 40, "--eval-every", 1)]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [(p.wait(timeout=600), p.stderr.read()) for p in procs]
    assert sorted(code for code, _ in results) == [0, 2], results
    loser = [ln for ln in next(err for code, err in results if code == 2).splitlines() if not ln.rstrip().endswith("/s]")]
    assert len(loser) == 1 and re.search(r"maria train: error: head folder .* (is in use by another run|already exists)", loser[0])
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(41))  # one run's lines, in order


def damage(store_dir, how: str) -> str:
    """Damage the first block of a copied store: a flipped features byte, or a garbled / emptied commit marker."""
    from maria_storage import open_store

    store = open_store(str(store_dir))
    block = store.committed_blocks()[0]
    if how == "chunk":
        chunk = sorted(p for p in (store_dir / "blocks" / block).rglob("*") if p.is_file() and "features" in p.parts and p.name != "zarr.json")[0]
        data = bytearray(chunk.read_bytes())
        data[len(data) // 2] ^= 0x10
        chunk.write_bytes(bytes(data))
    else:
        (store_dir / "commits" / f"{block}.json").write_text("{" if how == "garbled marker" else "{}")
    return block


@pytest.mark.parametrize("how", ["chunk", "garbled marker", "empty marker"])
def test_a_damaged_block_is_exit_3_in_train_and_eval_and_skippable(stores, tmp_path, capsys, how):
    from maria_app.cli import main

    bad = tmp_path / "bad"
    shutil.copytree(stores["train"], bad)
    block = damage(bad, how)
    for argv in (
        ["eval", "--store", str(bad), "--device", "cpu"],
        ["train", "--store", str(bad), "--val-store", stores["val"], "--out", str(tmp_path / "h"), "--device", "cpu", "--max-steps", "1", "--data-mode", "ram"],
    ):
        assert main(argv) == 3, capsys.readouterr().err
        err = [ln for ln in capsys.readouterr().err.strip().splitlines() if not ln.rstrip().endswith("/s]")]
        assert len(err) == 1 and f"block {block} of {bad} is corrupt" in err[0] and "Traceback" not in err[0], err
        assert ("--skip-corrupt" in err[0]) == (argv[0] == "train")  # eval has no such flag: it names the rewrite instead
    assert (
        main(
            ["train", "--store", str(bad), "--val-store", stores["val"], "--out", str(tmp_path / "h"), "--device", "cpu", "--max-steps", "1", "--skip-corrupt"]
        )
        == 0
    )


def test_sigterm_stops_training_like_ctrl_c_and_names_resume(stores, tmp_path):
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "h"
    argv = train_argv(stores, out, "--max-steps", 100000, "--eval-every", 1, "--save-every", 1)
    proc = subprocess.Popen([sys.executable, "-m", "maria_app.cli", *argv], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and not (out / "ckpt").exists():
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 130
    lines = [ln for ln in proc.stderr.read().splitlines() if ln.strip() and not ln.rstrip().endswith("/s]")]
    assert lines[-1] == "maria train: interrupted; re-run the same command with --resume to continue from its last checkpoint"
    from maria.io import lock_path

    assert not lock_path(out).exists() and (out / "ckpt" / "state.json").exists()  # the lock released, the checkpoint kept
