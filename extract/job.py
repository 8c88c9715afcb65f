"""`maria extract`: the Ray job from a corpus to a Zarr feature store.

Pipeline (Ray Data, one row = one block of `docs_per_block` consecutive documents):
    plan (driver)   corpus -> blocks not yet committed in the store
    windows (CPU)   tokenize, cut windows, draw K masks per window           map_batches, tasks
    features (GPU)  length-bucketed micro-batches; one AR pass per window,
                    one MLM pass per mask; the aligned-feature function      map_batches, actor pool
    write (CPU)     atomic, idempotent block write into the store            map_batches, tasks
The driver alone writes store metadata (create_store, finalize). Blocks are a pure function of
(corpus, seed, config), so a retried or re-run block writes the same bytes, and a re-run of the
same command skips committed blocks and finishes the rest.
"""
from __future__ import annotations

import contextlib
import errno
import os
import time
from dataclasses import asdict, dataclass, field

import numpy as np

from extract.corpus import MaskingConfig, corpus_fingerprint, load_corpus


@dataclass
class ExtractConfig:
    mlm: str  # masked LM: hub id or local folder
    ar: str  # causal LM: hub id or local folder (its vocabulary is the target)
    corpus: str  # datasets folder, parquet, JSONL or .txt file(s)
    out: str  # feature store: local path or fsspec URL (s3://bucket/store)
    text_column: str = "text"  # column holding the documents
    max_docs: int | None = None  # use only the first N documents
    window_length: int = 128  # tokens per window (windows never mix documents)
    mask_mode: str = "token"  # token | word | span
    mask_rate: float | None = None  # fixed rate; unset = Uniform(min, max) per window
    mask_min_rate: float = 0.0  # lower end of the uniform rate
    mask_max_rate: float = 1.0  # upper end of the uniform rate
    masks_per_window: int = 1  # K masks per window (one AR pass serves all K)
    seed: int = 0  # masks are a pure function of (seed, document, window, k)
    docs_per_block: int = 8  # documents per store block (the unit of work, retry and resume)
    batch_size: int = 16  # windows per backbone forward (length-bucketed)
    device: str = "auto"  # auto (cuda if visible) | cpu | cuda
    dtype: str = "auto"  # backbone dtype: auto (bfloat16 on GPU, float32 on CPU) | float32 | bfloat16 | float16
    feature_dtype: str = "float16"  # stored feature dtype: float16 | bfloat16 (stored as uint16 bits)
    num_actors: int | None = None  # backbone actors (default: one per GPU, else 1)
    actor_cpus: float = 0.5  # CPUs per backbone actor (fractional: on 2 cores whole CPUs can starve the pipeline)
    actor_memory_gb: float | None = None  # RAM Ray reserves per backbone actor (set it on a fleet: about 3x both backbones' weights)
    address: str | None = None  # Ray address: unset = embedded local Ray; "auto" = an existing cluster
    ray_temp_dir: str | None = None  # Ray's temp/log folder for the embedded cluster (keep it short: Ray's socket paths must fit 107 bytes)
    trust_remote_code: bool = False  # allow model code from the hub (off unless asked)
    mlm_revision: str | None = None  # hub revision of the MLM
    ar_revision: str | None = None  # hub revision of the AR
    fault_kill_block: str | None = None  # TEST ONLY: SIGKILL the actor once when it starts this block
    fault_enospc_block: str | None = None  # TEST ONLY: fail this block's write with "no space left on device"
    fault_sleep_s: float = 0.0  # TEST ONLY: sleep this long per block in the backbone stage (to interrupt a job mid-way)

    def __post_init__(self):
        self.masking = MaskingConfig(self.mask_mode, self.mask_rate, self.mask_min_rate, self.mask_max_rate, masks_per_window=self.masks_per_window)
        if self.window_length < 2 or self.docs_per_block < 1 or self.batch_size < 1:
            raise ValueError("window length must be >= 2, docs per block and batch size >= 1")
        if self.feature_dtype not in ("float16", "bfloat16"):
            raise ValueError(f"feature dtype {self.feature_dtype!r} is unknown; use float16 or bfloat16")


def _device(cfg: ExtractConfig) -> str:
    import torch

    if cfg.device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return cfg.device


def _backbones(cfg: ExtractConfig, device: str, check_parity: bool = True):
    from maria.backbones import load_backbones

    dtype = cfg.dtype if cfg.dtype != "auto" else ("bfloat16" if device.startswith("cuda") else "float32")
    return load_backbones(cfg.mlm, cfg.ar, dtype=dtype, device=device, trust_remote_code=cfg.trust_remote_code,
                          mlm_revision=cfg.mlm_revision, ar_revision=cfg.ar_revision, check_parity=check_parity)


def _check_window_fits(bb, window_length: int) -> None:
    for name, model, extra in (("MLM", bb.mlm, len(bb.mlm_prefix) + len(bb.mlm_suffix)), ("AR", bb.ar, 0)):
        limit = getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", None)
        if limit is not None and window_length + extra > limit:
            raise ValueError(f"window length {window_length} exceeds the {name}'s limit of {limit - extra} tokens; pass --window-length {limit - extra} or less")


def describe_backbones(cfg: ExtractConfig) -> tuple[dict, dict]:
    """Store manifest fields and PoE initial weights: everything training needs from the backbones."""
    bb = _backbones(cfg, _device(cfg))
    _check_window_fits(bb, cfg.window_length)
    w = {k: v.numpy() for k, v in bb.expert_weights().items()}
    w["vocab_map"] = bb.mlm_to_ar.numpy()
    info = {**bb.identity, "d_mlm": bb.d_mlm, "d_ar": bb.d_ar, "vocab_size": bb.vocab_size, "start_token_id": bb.start_id}
    return info, w


def make_windows(batch: dict, cfg: ExtractConfig) -> dict:
    """CPU stage: one block's documents -> padded windows and K masks each."""
    from transformers import AutoTokenizer

    from extract.corpus import cut_windows, sample_mask, word_starts

    tok = AutoTokenizer.from_pretrained(cfg.ar, revision=cfg.ar_revision, trust_remote_code=cfg.trust_remote_code)
    starts = word_starts(tok, len(tok)) if cfg.masking.mode == "word" else None
    first = 0 if (tok.bos_token_id is not None or tok.eos_token_id is not None) else 1
    out = {k: [] for k in ("block_id", "ids", "lengths", "masks", "rates", "doc_ids", "window_ids")}
    for block_id, doc0, texts in zip(batch["block_id"], batch["doc_start"], batch["texts"]):
        rows, docs, wins = [], [], []
        for d, text in enumerate(texts):
            for w, ids in enumerate(cut_windows(tok(str(text), add_special_tokens=False).input_ids, cfg.window_length)):
                rows.append(ids), docs.append(int(doc0) + d), wins.append(w)
        K, T = cfg.masking.masks_per_window, cfg.window_length
        ids = np.zeros((len(rows), T), dtype=np.int64)
        masks = np.zeros((K, len(rows), T), dtype=bool)
        rates = np.zeros((K, len(rows)), dtype=np.float32)
        for r, (x, d, w) in enumerate(zip(rows, docs, wins)):
            ids[r, : len(x)] = x
            for k in range(K):
                m, _ = sample_mask(np.asarray(x), cfg.masking, cfg.seed, d, w, k, starts, first)
                masks[k, r, : len(x)], rates[k, r] = m, m.mean()
        for key, v in (("block_id", block_id), ("ids", ids), ("lengths", np.array([len(x) for x in rows], dtype=np.int64)),
                       ("masks", masks), ("rates", rates), ("doc_ids", np.array(docs, dtype=np.int64)), ("window_ids", np.array(wins, dtype=np.int64))):
            out[key].append(v)
    return {k: np.array(v, dtype=object) if k != "block_id" else np.array(v) for k, v in out.items()}


class FeatureActor:
    """GPU (or CPU) stage: holds both backbones; one block in, its feature rows out."""

    def __init__(self, cfg: ExtractConfig):
        import torch

        self.cfg, self.device = cfg, _device(cfg)
        if self.device == "cpu":
            from maria.device import cpu_threads

            torch.set_num_threads(cpu_threads())
        self.bb = _backbones(cfg, self.device, check_parity=False)

    def __call__(self, batch: dict) -> dict:
        out = {k: [] for k in ("block_id", "features", "targets", "doc_ids", "window_ids", "positions", "mask_rates", "tokens")}
        for i, block_id in enumerate(batch["block_id"]):
            if self.cfg.fault_kill_block == str(block_id):
                _kill_once(self.cfg.out, str(block_id))
            if self.cfg.fault_sleep_s:
                time.sleep(self.cfg.fault_sleep_s)
            rows = self.block_features(batch["ids"][i], batch["lengths"][i], batch["masks"][i])
            f, t, r, p, k = rows
            out["block_id"].append(block_id)
            out["features"].append(f)
            out["targets"].append(t.astype(np.int32))
            out["doc_ids"].append(batch["doc_ids"][i][r])
            out["window_ids"].append(batch["window_ids"][i][r])
            out["positions"].append(p.astype(np.int32))
            out["mask_rates"].append(batch["rates"][i][k, r].astype(np.float32))
            out["tokens"].append(int(np.asarray(batch["lengths"][i]).sum()))
        return {k: np.array(v, dtype=object) if k not in ("block_id", "tokens") else np.array(v) for k, v in out.items()}

    def block_features(self, ids, lengths, masks):
        """Rows (features, targets, window, position, k) sorted by (window, k, position), so the
        block's bytes do not depend on how windows were bucketed into micro-batches."""
        import torch

        from maria.features import aligned_features, ar_states

        ids, lengths, masks = np.asarray(ids), np.asarray(lengths), np.asarray(masks)
        order = np.argsort(-lengths, kind="stable")  # length buckets: similar lengths share a batch
        parts = []
        for s in range(0, len(order), self.cfg.batch_size):
            idx = order[s : s + self.cfg.batch_size]
            T = int(lengths[idx].max())
            x = torch.from_numpy(ids[idx, :T]).to(self.device)
            n = torch.from_numpy(lengths[idx]).to(self.device)
            h_ar = ar_states(self.bb, x, n)
            for k in range(masks.shape[0]):
                af = aligned_features(self.bb, x, torch.from_numpy(masks[k][idx, :T]).to(self.device), n, h_ar=h_ar)
                rows = idx[af.rows.cpu().numpy()]
                parts.append((af.features.float().cpu().numpy(), af.targets.cpu().numpy(), rows, af.positions.cpu().numpy(), np.full(len(rows), k)))
        if not parts:  # a block whose documents were all too short for a window
            return np.zeros((0, self.bb.d_mlm + self.bb.d_ar), np.float32), *(np.zeros(0, np.int64) for _ in range(4))
        f, t, r, p, k = (np.concatenate(c) for c in zip(*parts))
        key = np.lexsort((p, k, r))
        return f[key], t[key], r[key], p[key], k[key]


def kill_marker(out: str, block_id: str) -> str:
    """Where the test-only kill fault records that it fired (in $MARIA_FAULT_DIR, default /tmp)."""
    import hashlib

    tag = hashlib.sha256(out.encode()).hexdigest()[:12]  # hash() is salted per process; this is not
    return os.path.join(os.environ.get("MARIA_FAULT_DIR", "/tmp"), f"maria-killed-{tag}-{block_id}")


def _kill_once(out: str, block_id: str) -> None:
    """Test-only fault: SIGKILL this actor the first time it reaches `block_id` (a marker file
    records that it happened, so the retry on a new actor goes through)."""
    import signal

    marker = kill_marker(out, block_id)
    if not os.path.exists(marker):
        open(marker, "w").close()
        os.kill(os.getpid(), signal.SIGKILL)


def write_blocks(batch: dict, url: str, fault_enospc_block: str | None = None) -> dict:
    """Writer stage: each block is written by one task into its own group; idempotent."""
    from storage import open_store

    store = open_store(url)
    written = []
    for i, block_id in enumerate(batch["block_id"]):
        arrays = {k: np.asarray(batch[k][i]) for k in ("features", "targets", "doc_ids", "window_ids", "positions", "mask_rates")}
        if arrays["features"].ndim != 2:
            arrays["features"] = arrays["features"].reshape(0, store.feature_dim)
        if fault_enospc_block == str(block_id):  # test-only: a full disk mid-write
            _write_partial_then_fail(store, str(block_id), arrays)
        store.write_block(str(block_id), arrays, stats={"tokens": int(batch["tokens"][i])})
        written.append(len(arrays["targets"]))
    return {"block_id": batch["block_id"], "rows": np.array(written), "tokens": batch["tokens"]}


def _write_partial_then_fail(store, block_id: str, arrays: dict) -> None:
    """Simulate a disk that fills up after the data but before the commit marker."""
    original = store._write_marker

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", f"{store.url}/commits/{block_id}.json")

    store._write_marker = full_disk
    try:
        store.write_block(block_id, arrays)
    finally:
        store._write_marker = original


def init_ray(address: str | None, temp_dir: str | None, num_cpus: int | None = None) -> bool:
    """Embedded local Ray (dashboard off, localhost only, logs in temp_dir) or an existing cluster.
    True when this call started or connected Ray (the caller then shuts it down)."""
    import ray

    if ray.is_initialized():
        return False
    if address:
        ray.init(address=address, log_to_driver=False)
        return True
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import logging

    logging.getLogger("ray.data").setLevel(logging.WARNING)  # our tqdm bar shows progress; Ray's text log floods CI
    ray.init(address="local", num_cpus=num_cpus or max(2, os.cpu_count() or 2), include_dashboard=False, dashboard_host="127.0.0.1",
             _temp_dir=os.path.abspath(temp_dir) if temp_dir else None, log_to_driver=False, configure_logging=False)
    return True


def plan_blocks(n_docs: int, docs_per_block: int) -> list[tuple[str, int, int]]:
    return [(f"b{i // docs_per_block:06d}", i, min(i + docs_per_block, n_docs)) for i in range(0, n_docs, docs_per_block)]


def run_extract(cfg: ExtractConfig) -> dict:
    """Plan, run the pipeline over the blocks not yet committed, finalize. Re-runnable."""
    import ray

    docs = load_corpus(cfg.corpus, cfg.text_column, cfg.max_docs)
    started = init_ray(cfg.address, cfg.ray_temp_dir)
    try:
        return _run(cfg, docs)
    finally:
        if started:  # idle Ray workers would keep eating a small machine's CPUs after the job
            ray.shutdown()


def _run(cfg: ExtractConfig, docs: list[str]) -> dict:
    import ray

    from storage import create_store

    device = _device(cfg)
    gpus = 1 if device.startswith("cuda") else 0
    # backbone identity and PoE weights come from a Ray task, so a CPU-only head node never loads them
    with _user_errors():
        info, init_weights = ray.get(ray.remote(describe_backbones).options(num_gpus=gpus, num_cpus=cfg.actor_cpus).remote(cfg))
    manifest = {**info, "feature_dtype": cfg.feature_dtype, "masking": asdict(cfg.masking), "seed": cfg.seed,
                "corpus_fingerprint": corpus_fingerprint(docs), "window_length": cfg.window_length,
                "text_column": cfg.text_column, "docs_per_block": cfg.docs_per_block, "documents": len(docs)}
    store = create_store(cfg.out, manifest, init_weights)
    done = set(store.committed_blocks())
    todo = [b for b in plan_blocks(len(docs), cfg.docs_per_block) if b[0] not in done]
    print(f"maria extract: {len(docs)} documents, {len(done)} blocks already committed, {len(todo)} to do -> {cfg.out}")
    rows = tokens = 0
    steady = {}
    if todo:
        ctx = ray.data.DataContext.get_current()
        ctx.raise_original_map_exception = True  # our one-line errors, not a wrapper
        ctx.enable_progress_bars = False  # the job's own bar (blocks, rows, tok/s) below; Ray's would log a page per 10 s
        if cfg.actor_memory_gb is None:  # no reservation asked for: Ray's high-memory detector would log a page every 30 s
            ctx.issue_detectors_config.detectors = [d for d in ctx.issue_detectors_config.detectors if "HighMemory" not in d.__name__]
        n_actors = cfg.num_actors or (max(1, int(ray.cluster_resources().get("GPU", 0))) if gpus else 1)
        items = [{"block_id": b, "doc_start": s, "texts": docs[s:e]} for b, s, e in todo]
        ds = ray.data.from_items(items, override_num_blocks=len(items))
        ds = ds.map_batches(make_windows, fn_kwargs={"cfg": cfg}, batch_size=1, num_cpus=0.25, batch_format="numpy",
                            compute=ray.data.TaskPoolStrategy(size=2))  # bounded, so the backbone actors always get CPU
        ds = ds.map_batches(FeatureActor, fn_constructor_kwargs={"cfg": cfg}, batch_size=1, batch_format="numpy",
                            compute=ray.data.ActorPoolStrategy(size=n_actors), num_gpus=gpus, num_cpus=cfg.actor_cpus,
                            **({"memory": int(cfg.actor_memory_gb * 2**30)} if cfg.actor_memory_gb else {}))
        ds = ds.map_batches(write_blocks, fn_kwargs={"url": cfg.out, "fault_enospc_block": cfg.fault_enospc_block}, batch_size=1, num_cpus=0.25, batch_format="numpy",
                            compute=ray.data.TaskPoolStrategy(size=2))
        with _user_errors():
            rows, tokens, steady = _drain(ds, len(todo))
    committed = set(store.committed_blocks())  # listed once: on S3 every listing is a request
    missing = [b for b, _, _ in plan_blocks(len(docs), cfg.docs_per_block) if b not in committed]
    if missing:
        raise RuntimeError(f"blocks {missing[:5]} were not committed; re-run the same command to finish them")
    store.gc_uncommitted()
    store.finalize()
    summary = {"store": cfg.out, "blocks": store.manifest["blocks"], "rows": store.manifest["rows"], "new_rows": rows, "new_tokens": tokens, **steady}
    print(f"maria extract: done, {summary['rows']} masked-token rows in {summary['blocks']} blocks")
    return summary


def _drain(ds, n_blocks: int) -> tuple[int, int, dict]:
    """Consume the pipeline with a progress bar; (rows, tokens, steady-state timing)."""
    from tqdm import tqdm

    rows = tokens = 0
    t0, t_first, tokens_first = time.perf_counter(), None, 0
    bar = tqdm(total=n_blocks, desc="extract", unit="block")
    for row in ds.iter_rows():
        rows += int(row["rows"])
        tokens += int(row["tokens"])
        if t_first is None:  # steady state: after the first block (actor start-up and model loading excluded)
            t_first, tokens_first = time.perf_counter(), tokens
        bar.update(1)
        bar.set_postfix(rows=rows, tok_s=f"{tokens / (time.perf_counter() - t0):.0f}")
    bar.close()
    steady = {"steady_seconds": time.perf_counter() - t_first, "steady_tokens": tokens - tokens_first} if n_blocks > 1 else {}
    return rows, tokens, steady


@contextlib.contextmanager
def _user_errors():
    """Ray wraps errors raised in tasks and actors; surface ours (ValueError, OSError) as themselves
    so the CLI prints one line naming the fix instead of a remote traceback."""
    try:
        yield
    except Exception as e:  # noqa: BLE001
        seen, cur = set(), e
        while cur is not None and id(cur) not in seen:
            seen.add(id(cur))
            if isinstance(cur, (ValueError, OSError)) and not type(cur).__module__.startswith("ray"):
                raise cur from None
            cur = getattr(cur, "cause", None) or cur.__cause__ or cur.__context__
        raise
