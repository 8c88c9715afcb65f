"""`maria bench extract`: the job's end-to-end tokens/s against the bare backbone forward passes
on the same batches in the same run, the store's write speed against a raw file write of the
same bytes, and bytes on disk per masked token."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from maria.device import cpu_threads
from maria.features import ar_states, mlm_states
from maria_defaults.corpus_wiki import prepare_wiki_corpus
from maria_defaults.defaults import default_cache_dir
from maria_extract.corpus import iter_documents
from maria_extract.job import ExtractConfig, run_extract
from maria_extract.stages import FeatureActor, StageSpec, tokenize_and_mask
from maria_storage import open_store


def _du(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def bench_extract(cfg) -> dict:
    """cfg: maria.bench.BenchConfig; --mlm/--ar folders (default: the demo's cached defaults) and
    --store naming the corpus (default: the demo's wiki train split)."""
    cache = default_cache_dir()
    mlm = cfg.mlm or str(cache / "mlm-smollm2-init")
    ar = cfg.ar or str(cache / "smollm2-135m")
    corpus = cfg.store
    if corpus is None:  # the demo's train split (cached; built from the gensim wheel's sample if missing)
        corpus = str(prepare_wiki_corpus(cache / "wiki")[0])
    for what, p in (("MLM", mlm), ("AR", ar), ("corpus", corpus)):
        if not Path(p).exists():
            raise ValueError(f"bench extract: {what} {p} not found; run `make demo` once to build the defaults, or pass --mlm/--ar/--store")
    work = Path(tempfile.mkdtemp(prefix="maria-bench-extract-"))
    ecfg = ExtractConfig(
        mlm=mlm,
        ar=ar,
        corpus=corpus,
        store=str(work / "store"),
        max_docs=max(4, cfg.steps // 25),
        docs_per_block=2,
        window_length=128,
        ray_temp_dir=str(work / "ray"),
        device=cfg.device,
    )
    # 1. the job, end to end (Ray started inside; the timed part is the streaming pipeline)
    t0 = time.perf_counter()
    summary = run_extract(ecfg)
    t_job = time.perf_counter() - t0
    tokens = summary["new_tokens"]
    # 2. bare forward passes: the same windows, micro-batches and masks, no Ray, no store
    docs = list(iter_documents(corpus, max_docs=ecfg.max_docs))
    spec = StageSpec.of(ecfg)
    actor = FeatureActor(spec)
    torch.set_num_threads(cpu_threads())  # as the actor does
    t_fwd = 0.0
    for s in range(0, len(docs), ecfg.docs_per_block):
        e = min(s + ecfg.docs_per_block, len(docs))
        w = tokenize_and_mask({"block_id": [f"b{s}"], "doc_ids": [np.arange(s, e)], "texts": [docs[s:e]]}, spec)
        # one block per batch, stored as object arrays (ragged across blocks): back to plain dtypes
        ids, lengths, masks = (np.asarray(w[k][0]).astype(t) for k, t in (("ids", np.int64), ("lengths", np.int64), ("masks", bool)))
        order = np.argsort(-lengths, kind="stable")
        for b in range(0, len(order), ecfg.batch_size):
            idx = order[b : b + ecfg.batch_size]
            T = int(lengths[idx].max())
            x, n = torch.from_numpy(ids[idx, :T]), torch.from_numpy(lengths[idx])
            t = time.perf_counter()
            ar_states(actor.bb, x, n)
            for k in range(masks.shape[0]):
                mlm_states(actor.bb, x, torch.from_numpy(masks[k][idx, :T]), n)
            t_fwd += time.perf_counter() - t
    rows = summary["rows"]
    disk_per_row = _du(work / "store" / "blocks") / max(1, rows)
    # 3. store writes against raw writes of the same bytes
    store = open_store(ecfg.store)
    arrays = store.read_block(store.committed_blocks()[0])
    reps = max(1, int(64e6 // max(1, arrays["features"].nbytes)))
    big = {k: np.concatenate([v] * reps) for k, v in arrays.items()}
    nbytes = sum(v.nbytes for v in big.values())
    t = time.perf_counter()
    store.write_block("bench-write", big, overwrite=True)
    t_store = time.perf_counter() - t
    raw = work / "raw.bin"
    t = time.perf_counter()
    with open(raw, "wb") as f:
        for v in big.values():
            f.write(np.ascontiguousarray(v).tobytes())
    t_raw = time.perf_counter() - t
    steady = summary["steady_tokens"] / summary["steady_seconds"] if summary.get("steady_seconds") else None
    return {
        "benchmark": "extract",
        "mlm": mlm,
        "ar": ar,
        "documents": len(docs),
        "window_tokens": tokens,
        "rows": rows,
        "job_seconds_total": t_job,
        "job_tok_s": tokens / t_job,
        "forward_seconds": t_fwd,
        "forward_tok_s": tokens / t_fwd,
        "pipeline_over_forward": t_fwd / t_job,
        "store_write_mb_s": nbytes / t_store / 1e6,
        "raw_write_mb_s": nbytes / t_raw / 1e6,
        "write_over_raw": t_raw / t_store,
        "bytes_on_disk_per_masked_token": disk_per_row,
        "job_steady_tok_s": steady,
        "steady_over_forward": steady / (tokens / t_fwd) if steady else None,
        "targets": {"pipeline_over_forward": t_fwd / t_job, "pipeline_over_forward_goal": 0.85, "write_over_raw": t_raw / t_store, "write_over_raw_goal": 0.8},
    }
