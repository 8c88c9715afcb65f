"""`maria bench fp8`: float8 feature stores against float16, on the demo's stores (or --store/--val-store).

The float16 training and validation stores are rewritten block by block through FeatureStore.write_block, once
as float16 (the bytes equal the source's: float16 -> float32 -> float16 is exact) and once as float8 (e4m3 codes
with a per-row scale, storage/float8.py), so both dtypes go through the same writer. Then, per dtype:
    bytes per row      on disk (blocks/ only) and as stored (features, scales, the small per-row arrays)
    write rate         write_block from float32 rows: encode, zarr write, sha256 (the extraction's writer stage)
    read rates         the trainer's two data paths: RAM mode's read_rows (stored dtype, checksummed) and one
                       epoch of stream mode's ShuffledReader (decoded to float32); reads come from the page cache
    eval NLL           a head trained on that dtype's training store (`maria train`, same config and seed), scored
                       by `maria eval` on that dtype's validation store; goal: float8 within 0.002 nats of float16
Timed figures are medians of --repeats runs, the dtypes interleaved inside each repeat; training runs once.
"""

from __future__ import annotations

import shutil
import statistics
import tempfile
import time
from pathlib import Path

from maria.plots import bar_panels
from maria_storage import SCALES, ShuffledReader, as_float32, create_store, open_store
from maria_train_head.data import read_rows
from maria_train_head.evaluate import EvalConfig, run_eval
from maria_train_head.train import TrainConfig, run_train

DTYPES = ("float16", "float8")
NLL_GOAL = 0.002  # nats per masked token: float8's eval NLL may exceed float16's by at most this


def demo_stores(workdir: str = "runs/demo") -> tuple[str | None, str | None]:
    """The demo's training and validation stores (`maria demo` names them by its flags): the newest of each."""
    stores = Path(workdir) / "stores"
    newest = lambda pattern: max(stores.glob(pattern), key=lambda p: p.stat().st_mtime, default=None)
    train, val = newest("train-*"), newest("val-*")
    return (str(train) if train else None), (str(val) if val else None)


def _du(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def transcode(source: str, out: str, dtype: str) -> dict:
    """Rewrite every committed block of `source` into a new store of feature dtype `dtype`; the write time
    (write_block only, from float32 rows) and the stored bytes."""
    src = open_store(source)
    manifest = {k: v for k, v in src.manifest.items() if k not in ("rows", "blocks", "format_version")}
    store = create_store(out, {**manifest, "feature_dtype": dtype}, src.init_weights() if src.manifest.get("has_init", True) else None)
    seconds, stored = 0.0, 0
    for b in src.committed_blocks():
        arrays = src.read_block(b)
        arrays["features"] = as_float32(arrays["features"], src.manifest, arrays.pop(SCALES, None))
        t = time.perf_counter()
        store.write_block(b, arrays, stats=src.commit_info(b).get("stats"))
        seconds += time.perf_counter() - t
        stored += sum(a.nbytes for a in store.read_block(b).values())
    store.write_plan(store.committed_blocks(), f"maria bench fp8 (rewritten from {source})")
    store.gc_uncommitted()
    store.finalize()
    rows = store.num_rows()
    return {
        "rows": rows,
        "write_seconds": seconds,
        "write_rows_per_s": rows / seconds,
        "write_mb_per_s": stored / seconds / 1e6,
        "stored_bytes_per_row": stored / rows,
        "disk_bytes_per_row": _du(Path(out) / "blocks") / rows,
    }


def read_rates(url: str) -> dict:
    """Rows/s of the trainer's RAM-mode load (stored dtype) and of one stream-mode epoch (decoded float32)."""
    store = open_store(url)
    blocks = store.committed_blocks()
    t = time.perf_counter()
    n = len(read_rows(store, blocks)["targets"])
    ram = n / (time.perf_counter() - t)
    t, m = time.perf_counter(), 0
    for batch in ShuffledReader(store, 4096, seed=0):
        m += len(batch["targets"])
    return {"ram_load_rows_per_s": ram, "stream_epoch_rows_per_s": m / (time.perf_counter() - t)}


def bench_fp8(cfg) -> dict:
    train_src, val_src = (cfg.store, cfg.val_store) if cfg.store else demo_stores()
    for what, p in (("training store (--store)", train_src), ("validation store (--val-store)", val_src)):
        if not p or not Path(p).exists():
            raise ValueError(
                f"bench fp8: the {what} {p or 'of the demo'} was not found; run `make demo` once (it writes runs/demo/stores/), or pass --store and --val-store"
            )
    work = Path(cfg.workdir or tempfile.mkdtemp(prefix="maria-bench-fp8-"))
    try:
        writes, reads = {d: [] for d in DTYPES}, {d: [] for d in DTYPES}
        for _r in range(cfg.repeats):  # dtypes interleaved: both see the same load
            for d in DTYPES:
                for split, src in (("train", train_src), ("val", val_src)):
                    shutil.rmtree(work / f"{d}-{split}", ignore_errors=True)
                    w = transcode(src, str(work / f"{d}-{split}"), d)
                    if split == "train":
                        writes[d].append(w)
                reads[d].append(read_rates(str(work / f"{d}-train")))
        batch = cfg.batch_size if cfg.batch_size > 1 else 512
        per_dtype = {}
        for d in DTYPES:  # the stores of the last repeat; training and eval are deterministic
            head = work / f"{d}-head"
            shutil.rmtree(head, ignore_errors=True)
            train = run_train(
                TrainConfig(
                    store=str(work / f"{d}-train"),
                    out=str(head),
                    val_fraction=0.12,
                    init="mix",
                    max_steps=cfg.steps,
                    batch_size=batch,
                    lr=1e-4,
                    eval_every=max(1, cfg.steps // 3),
                    warmup_steps=min(10, cfg.steps // 5),
                    seed=cfg.seed,
                    device=cfg.device,
                )
            )
            ev = run_eval(EvalConfig(store=str(work / f"{d}-val"), head=str(head), device=cfg.device))
            med = lambda xs, k: statistics.median(x[k] for x in xs)
            per_dtype[d] = {
                "eval_nll": {k: m["nll"] for k, m in ev["models"].items()},
                "val_rows": ev["rows"],
                "train_best_val_loss": train["best_val_loss"],
                "train_init_scales": train["init_scales"],
                "stored_bytes_per_row": writes[d][-1]["stored_bytes_per_row"],
                "disk_bytes_per_row": writes[d][-1]["disk_bytes_per_row"],
                "rows": writes[d][-1]["rows"],
                **{k: med(writes[d], k) for k in ("write_rows_per_s", "write_mb_per_s")},
                **{k: med(reads[d], k) for k in ("ram_load_rows_per_s", "stream_epoch_rows_per_s")},
                "runs": {"write": writes[d], "read": reads[d]},
            }
    finally:
        if cfg.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    h, q = per_dtype["float16"], per_dtype["float8"]
    diff = q["eval_nll"]["trained"] - h["eval_nll"]["trained"]
    result = {
        "benchmark": "fp8",
        "store": train_src,
        "val_store": val_src,
        "steps": cfg.steps,
        "batch_size": batch,
        "repeats": cfg.repeats,
        "dtypes": per_dtype,
        "targets": {
            "trained_nll_float8_minus_float16": diff,
            "goal_nats": NLL_GOAL,
            "goal_met": diff <= NLL_GOAL,
            "disk_bytes_per_row_ratio": q["disk_bytes_per_row"] / h["disk_bytes_per_row"],
            "write_rows_per_s_ratio": q["write_rows_per_s"] / h["write_rows_per_s"],
            "stream_read_rows_per_s_ratio": q["stream_epoch_rows_per_s"] / h["stream_epoch_rows_per_s"],
        },
    }
    panels = {
        "eval NLL, trained head": {d: per_dtype[d]["eval_nll"]["trained"] for d in DTYPES},
        "disk bytes / row": {d: per_dtype[d]["disk_bytes_per_row"] for d in DTYPES},
        "write rows/s": {d: per_dtype[d]["write_rows_per_s"] for d in DTYPES},
        "RAM-mode load rows/s": {d: per_dtype[d]["ram_load_rows_per_s"] for d in DTYPES},
        "stream epoch rows/s": {d: per_dtype[d]["stream_epoch_rows_per_s"] for d in DTYPES},
    }
    bar_panels(Path(cfg.json).with_suffix(".png"), panels, f"float8 vs float16 features (NLL difference {diff:+.4f} nats, goal <= {NLL_GOAL})", fmt="%.4g")
    return result
