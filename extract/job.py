"""`maria extract`: the Ray job from a corpus to a Zarr feature store.

    list (driver)    the corpus's files, sorted: the driver never holds documents
    scan (workers)   rows and a digest of each file, read in parallel: the plan and the fingerprint
    windows (CPU)    tokenize, cut windows, draw K masks per window                 tasks
    features (GPU)   both backbones, length-bucketed micro-batches                  autoscaling actor pool
    write (CPU)      atomic, idempotent block write into the store                  tasks
A block is docs_per_block consecutive rows of one file, a pure function of the corpus, so a
retried, preempted or re-run block writes the same bytes, and a re-run of the same command skips
committed blocks and finishes the rest. The driver alone writes store metadata.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import re
import resource
import shlex
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from typing import Literal

from maria.backbones import MLM_OFFSETS
from maria.device import Device, DType
from maria_extract.cluster import ActorRequest, cluster_shapes, gpus_available, init_ray, quiet_ray_data, resolve_address, wait_for_placement
from maria_extract.corpus import Corpus, CorpusError, corpus_fingerprint, doc_offsets, limit_rows, list_corpus, plan_blocks
from maria_extract.masking import MaskingConfig
from maria_extract.ray_compat import drop_high_memory_detector
from maria_extract.source import read_corpus
from maria_extract.stages import BlockHooks, FeatureActor, StageSpec, describe_backbones, tokenize_and_mask, write_blocks
from maria_storage import StoreError, create_store, probe_store
from maria_storage.location import check_url, is_local, local_path

log = logging.getLogger("maria.extract")  # the CLI prints it; a notebook sees it with logging.basicConfig(level=logging.INFO)

PIPELINE_ATTEMPTS = 3  # a lost node or object fails one pass; the next pass redoes only uncommitted blocks


@dataclass
class ExtractConfig:
    mlm: str  # masked LM: hub id or local folder
    ar: str  # causal LM: hub id or local folder (its vocabulary is the target)
    corpus: str  # parquet, JSON(L), CSV or .txt (one file = one document) files, or a datasets folder: a file, folder, glob or s3:// / gs:// URL
    store: str  # feature store to write: local path or fsspec URL (s3://bucket/store); a re-run resumes it
    text_column: str = "text"  # column holding the documents (parquet, JSON, CSV, datasets)
    split: str | None = None  # split of a saved datasets folder (unset: train, else its first split)
    max_docs: int | None = None  # use only the first N documents (rows in corpus order, empty ones included)
    window_length: int = 128  # tokens per window (windows never mix documents)
    mask_mode: Literal["token", "word", "span"] = "token"  # token | word | span
    mask_rate: float | None = None  # fixed rate; unset = Uniform(min, max) per window
    mask_min_rate: float = 0.0  # lower end of the uniform rate
    mask_max_rate: float = 1.0  # upper end of the uniform rate
    mask_span_mean: float = 3.0  # mean span length in tokens (mask mode span; spans are geometric)
    masks_per_window: int = 1  # K masks per window (one AR pass serves all K)
    seed: int = 0  # masks are a pure function of (seed, document, window, k)
    docs_per_block: int = 8  # documents (rows of one file) per store block: the unit of work, retry and resume
    batch_size: int = 16  # windows per backbone forward (length-bucketed)
    device: Device = "auto"  # auto (cuda on actors given a GPU, else cpu) | cpu | cuda; decided on each actor
    dtype: DType = "auto"  # backbone dtype: auto (bfloat16 on GPU, float32 on CPU) | float32 | bfloat16 | float16
    feature_dtype: Literal["float16", "bfloat16", "float8"] = (
        "float16"  # stored feature dtype: float16 | bfloat16 (stored as uint16 bits) | float8 (e4m3 codes in uint8 with a float32 scale per row: half the bytes)
    )
    actor_gpus: float | None = (
        None  # GPUs per backbone actor (0.5 = two actors share a GPU); unset = 1 if the cluster has or can add GPUs and --device is not cpu, else 0
    )
    actor_cpus: float = 0.5  # CPUs per backbone actor (fractional: on small nodes whole CPUs can starve the pipeline)
    actor_memory_gb: float | None = None  # RAM Ray reserves per backbone actor (set it on a fleet: about 3x both backbones' weights)
    min_actors: int = 1  # fewest backbone actors (the pool starts with one per GPU share present and never shrinks below this)
    max_actors: int | None = None  # most backbone actors; unset = as many as the cluster's GPUs allow, growing as nodes join (1 without GPUs)
    actor_start_timeout_s: float = 600.0  # fail if the cluster places no backbone actor within this time (autoscalers take minutes)
    address: str | None = (
        None  # Ray cluster: unset = $RAY_ADDRESS if set (ray job submit, KubeRay), else an embedded local Ray; "auto" = the cluster running on this machine
    )
    ray_temp_dir: str | None = None  # Ray's temp/log folder for the embedded cluster (short: Ray's socket paths must fit 107 bytes)
    trust_remote_code: bool = False  # allow model code from the hub (off unless asked)
    mlm_revision: str | None = None  # hub revision of the MLM
    ar_revision: str | None = None  # hub revision of the AR
    mlm_offset: int | None = None  # where the MLM predicts x[i]: 0 (classic MLM) or -1 (MNTP: at i - 1); unset: its config's prediction_offset, else 0

    def __post_init__(self):
        self.masking = MaskingConfig(
            self.mask_mode, self.mask_rate, self.mask_min_rate, self.mask_max_rate, span_mean=self.mask_span_mean, masks_per_window=self.masks_per_window
        )
        if self.window_length < 2 or self.docs_per_block < 1 or self.batch_size < 1:
            raise ValueError("window length must be >= 2, docs per block and batch size >= 1")
        if self.feature_dtype not in ("float16", "bfloat16", "float8"):
            raise ValueError(f"feature dtype {self.feature_dtype!r} is unknown; use float16, bfloat16 or float8")
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ValueError(f"--dtype {self.dtype!r} is unknown; use auto, float32, bfloat16 or float16")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"device {self.device!r} is unknown; use auto, cpu or cuda (Ray picks the GPU of each actor)")
        if self.device == "cpu" and self.actor_gpus:
            raise ValueError("--device cpu with --actor-gpus above 0 would hold GPUs it never uses; drop one of them")
        if (self.actor_gpus or 0) < 0 or self.actor_cpus < 0 or (self.actor_memory_gb or 0) < 0:
            raise ValueError("--actor-gpus, --actor-cpus and --actor-memory-gb must be >= 0")
        if self.min_actors < 1 or (self.max_actors is not None and self.max_actors < self.min_actors):
            raise ValueError(f"need 1 <= --min-actors ({self.min_actors}) <= --max-actors ({self.max_actors})")
        if self.actor_start_timeout_s <= 0 or (self.max_docs is not None and self.max_docs < 1):
            raise ValueError("--actor-start-timeout-s and --max-docs must be positive")
        if self.mlm_offset not in (None, *MLM_OFFSETS):
            raise ValueError(f"--mlm-offset is {self.mlm_offset}; an MLM predicts x[i] at i (0, a classic MLM) or at i - 1 (-1, masked next-token prediction)")


def command_line(cfg: ExtractConfig) -> str:
    """The `maria extract` command that recreates cfg (flags that differ from the defaults): what
    the store's plan records as the way to finish the job. Local paths are made absolute, so it works
    from any folder (the store's own path is the one its reader gives: FeatureStore.finish_command)."""
    parts = ["maria", "extract"]
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if f.default is not dataclasses.MISSING and value == f.default:
            continue
        if f.name in ("mlm", "ar", "corpus", "store") and is_local(value) and os.path.exists(os.path.expanduser(value)):
            value = local_path(value)
        flag = "--" + f.name.replace("_", "-")
        if isinstance(value, bool):
            parts.append(flag if value else "--no-" + flag[2:])
        elif value is not None:
            parts += [flag, str(value)]
    return shlex.join(parts)


def actor_request(cfg: ExtractConfig) -> ActorRequest:
    """Resources of one backbone actor; with --device auto, a GPU whenever the cluster has or can add one."""
    if cfg.actor_gpus is not None:
        gpus = cfg.actor_gpus
    elif cfg.device == "auto":
        gpus = 1.0 if gpus_available(*cluster_shapes()) else 0.0
    else:
        gpus = 1.0 if cfg.device == "cuda" else 0.0
    memory = int(cfg.actor_memory_gb * 2**30) if cfg.actor_memory_gb else None
    return ActorRequest(num_cpus=cfg.actor_cpus, num_gpus=gpus, memory=memory)


def run_extract(cfg: ExtractConfig, hooks: BlockHooks | None = None) -> dict:
    """Plan, run the pipeline over the blocks not yet committed, finalize. Re-runnable."""
    import ray

    if "://" not in cfg.store:  # Ray's workers run in other folders: a relative store path must mean the driver's
        cfg = dataclasses.replace(cfg, store=os.path.abspath(os.path.expanduser(cfg.store)))
    corpus = list_corpus(cfg.corpus, cfg.split)  # file names only: a missing corpus fails before Ray starts
    check_store_target(cfg.store, corpus)
    embedded = resolve_address(cfg.address) is None
    started = init_ray(cfg.address, cfg.ray_temp_dir)
    quiet_ray_data()
    try:
        return _run(cfg, corpus, embedded, StageSpec.of(cfg, hooks))
    finally:
        if started:  # idle Ray workers would keep eating a small machine's CPUs after the job
            ray.shutdown()


def check_store_target(url: str, corpus: Corpus) -> None:
    """Before Ray starts, a store the job could never finish: one inside its own corpus folder (a re-run would list
    the store's files as corpus files, so it could never resume), or a corpus inside the store; an unsupported URL;
    a local store this process cannot write (read-only), which even a resume writes into."""
    check_url(url, "store")
    if is_local(url) != (not corpus.remote):  # one local, one remote: they cannot overlap
        if not is_local(url):
            probe_store(url)
        return
    norm = local_path if is_local(url) else (lambda u: u.rstrip("/"))
    store = norm(url)
    source = norm(re.split(r"[*?\[]", corpus.source)[0] or ".")  # a glob's fixed part
    inside = lambda a, b: a == b or a.startswith(b.rstrip("/") + "/")  # noqa: E731
    if inside(store, source) or any(inside(f if corpus.remote else local_path(f), store) for f in corpus.files):
        raise StoreError(
            f"--store {url} overlaps the corpus {corpus.source}: a re-run would list the store's files as corpus files; put the store outside the corpus folder"
        )
    if not is_local(url):
        probe_store(url)  # the first contact, before Ray starts: no credentials, access denied, no server: one line now
        return
    probe = store
    while not os.path.isdir(probe):  # the store, or the nearest folder it will be created in
        if os.path.lexists(probe):
            return  # a file where the store should be: create_store names it
        probe = os.path.dirname(probe)
    try:
        fd, tmp = tempfile.mkstemp(prefix=".maria-probe-", dir=probe)
        os.close(fd)
        os.remove(tmp)
    except OSError as e:
        raise StoreError(
            f"--store {url} cannot be written ({e.strerror}: {probe}); extraction writes into the store "
            f"even to resume it: pass a writable --store (copy a read-only store somewhere writable first)"
        ) from None


def _scan(cfg: ExtractConfig, corpus: Corpus) -> tuple[list[int], str]:
    """Rows per file and the corpus fingerprint, read on the workers. With --max-docs only the
    leading files it needs are read, a wave at a time."""
    rows, digests, wave = [], [], 16
    while len(rows) < len(corpus.files) and (cfg.max_docs is None or sum(rows) < cfg.max_docs):
        ids = list(range(len(rows), len(corpus.files) if cfg.max_docs is None else min(len(corpus.files), len(rows) + wave)))
        for r in sorted(read_corpus(corpus, ids, cfg.text_column, "scan").take_all(), key=lambda r: r["file"]):
            rows.append(int(r["rows"]))
            digests.append((int(r["rows"]), r["digest"], int(r["documents"])))
    used = limit_rows(rows, cfg.max_docs)
    if not any(docs for (_, _, docs), n in zip(digests, used) if n):
        raise CorpusError(f"corpus {cfg.corpus} has no non-empty documents; check the path and --text-column")
    limit = cfg.max_docs if cfg.max_docs is not None and cfg.max_docs < sum(rows) else None
    if limit is not None:  # the fingerprint covers the files the job uses: up to the one holding the last document
        used = used[: max(i for i, n in enumerate(used) if n) + 1]
    return used, corpus_fingerprint([(n, d) for n, d, _ in digests[: len(used)]], limit)


def _run(cfg: ExtractConfig, corpus: Corpus, embedded: bool, spec: StageSpec) -> dict:
    import ray

    request = actor_request(cfg)
    with _user_errors():
        wait_for_placement(request, cfg.actor_start_timeout_s, embedded)
        # backbones load on a worker with an actor's resources while the workers scan the corpus
        described = ray.remote(describe_backbones).options(**request.ray_args()).remote(spec)
        try:
            rows, fingerprint = _scan(cfg, corpus)
        except BaseException:  # a bad corpus: stop loading backbones no one will use (a shared cluster's time)
            ray.cancel(described, force=True)
            raise
        info, init_weights = ray.get(described)
    manifest = {
        **info,
        "feature_dtype": cfg.feature_dtype,
        "masking": asdict(cfg.masking),
        "seed": cfg.seed,
        "corpus_fingerprint": fingerprint,
        "window_length": cfg.window_length,
        "text_column": cfg.text_column,
        "docs_per_block": cfg.docs_per_block,
        "documents": sum(rows),
        "files": sum(1 for n in rows if n),
    }
    store = create_store(cfg.store, manifest, init_weights)
    plan = plan_blocks(rows, cfg.docs_per_block)
    store.write_plan([b for b, *_ in plan], command_line(cfg))  # what "complete" means, and the command that finishes it
    new_rows = new_tokens = 0
    steady = {}
    for attempt in range(1, PIPELINE_ATTEMPTS + 1):
        done = set(store.committed_blocks())  # listed once per pass: on S3 every listing is a request
        todo = [b for b in plan if b[0] not in done]
        if attempt > 1 and not todo:  # the pass before finished them all; its line said so
            break
        log.info(f"maria extract: {sum(rows)} documents in {len(rows)} file(s), {len(done)} blocks already committed, {len(todo)} to do -> {cfg.store}")
        if not todo:
            break
        try:
            with _user_errors():
                r, t, steady = _pipeline(cfg, spec, corpus, rows, todo, request)
            new_rows, new_tokens = new_rows + r, new_tokens + t
        except Exception as e:  # noqa: BLE001 -- user errors came out of _user_errors as themselves
            if _is_user_error(e):
                raise
            if attempt == PIPELINE_ATTEMPTS:
                if _is_cluster_failure(e):
                    first = (str(e).strip().splitlines() or [""])[0][:160]
                    raise TransientClusterError(
                        f"the Ray cluster failed {attempt} passes of the job ({type(e).__name__}: "
                        f"{first}); re-run the same command to resume (committed blocks are kept)"
                    ) from e
                raise
            log.warning(
                f"maria extract: pass {attempt} failed ({type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}); redoing the uncommitted blocks"
            )
    committed = set(store.committed_blocks())
    missing = [b for b, *_ in plan if b not in committed]
    if missing:
        raise TransientClusterError(
            f"{len(missing)} blocks (first: {', '.join(missing[:3])}) were not committed after "
            f"{PIPELINE_ATTEMPTS} passes; re-run the same command to finish them"
        )
    store.gc_uncommitted()
    store.finalize()
    summary = {
        "store": cfg.store,
        "blocks": store.manifest["blocks"],
        "rows": store.manifest["rows"],
        "new_rows": new_rows,
        "new_tokens": new_tokens,
        "actor": request.describe(),
        "driver_peak_rss_mb": _peak_rss_mb(),
        **steady,
    }
    log.info(f"maria extract: done, {summary['rows']} masked-token rows in {summary['blocks']} blocks")
    return summary


def _pipeline(cfg: ExtractConfig, spec: StageSpec, corpus: Corpus, rows: list[int], todo: list, request: ActorRequest):
    import ray

    ctx = ray.data.DataContext.get_current()
    ctx.raise_original_map_exception = True  # our one-line errors, not a wrapper
    ctx.enable_progress_bars = False  # the job's own progress lines; Ray's would log a page per 10 s
    # one MARIA block per Ray block: Ray would otherwise pack a file's blocks into one bundle, which one
    # task tokenizes and one actor computes while the rest of the pool idles
    ctx.target_max_block_size = 1
    if cfg.actor_memory_gb is None:  # no reservation asked for: Ray's high-memory detector would log a page every 30 s
        drop_high_memory_detector(ctx)
    offsets, starts = doc_offsets(rows), {}
    for _, f, s, _ in todo:
        starts.setdefault(f, []).append(s)
    plan = {f: (offsets[f], rows[f], s) for f, s in starts.items()}
    # on GPUs the pool grows with the cluster (unbounded: Ray Data adds an actor per free GPU share); on CPUs one
    # actor already uses every core through torch's threads
    max_actors = cfg.max_actors or (None if request.num_gpus else cfg.min_actors)
    pool = ray.data.ActorPoolStrategy(
        min_size=cfg.min_actors, max_size=max_actors, initial_size=initial_actors(cfg.min_actors, max_actors, request, cluster_shapes()[0])
    )
    helpers = ray.data.TaskPoolStrategy(size=2 * max_actors) if max_actors else None  # CPU stages keep pace, no more
    ds = read_corpus(corpus, sorted(plan), cfg.text_column, "blocks", cfg.docs_per_block, plan)
    ds = ds.map_batches(tokenize_and_mask, fn_kwargs={"cfg": spec}, batch_size=1, num_cpus=0.25, batch_format="numpy", compute=helpers)
    ds = ds.map_batches(FeatureActor, fn_constructor_kwargs={"cfg": spec}, batch_size=1, batch_format="numpy", compute=pool, **request.ray_args())
    ds = ds.map_batches(write_blocks, fn_kwargs={"cfg": spec}, batch_size=1, num_cpus=0.25, batch_format="numpy", compute=helpers)
    return _drain(ds, len(todo))


def initial_actors(min_actors: int, max_actors: int | None, request: ActorRequest, nodes: list[dict]) -> int:
    """Start with one actor per GPU share the cluster has now (the pool then grows as GPUs join),
    so a GPU cluster is busy from the first minute instead of after the autoscaler's ramp-up."""
    if not request.num_gpus:
        return min_actors
    now = int(sum(n.get("GPU", 0) // request.num_gpus for n in nodes))
    return max(min_actors, min(now, max_actors or now))


def _drain(ds, n_blocks: int) -> tuple[int, int, dict]:
    """Consume the pipeline; progress as a bar on a terminal, else as log lines (`ray job logs`)."""
    rows = tokens = done = 0
    t0, t_first, tokens_first, last_line = time.perf_counter(), None, 0, 0.0
    bar = None
    if sys.stderr.isatty():
        from tqdm import tqdm

        bar = tqdm(total=n_blocks, desc="extract", unit="block")
    for row in ds.iter_rows():
        rows, tokens, done = rows + int(row["rows"]), tokens + int(row["tokens"]), done + 1
        now = time.perf_counter()
        if t_first is None:  # steady state: after the first block (actor start-up and model loading excluded)
            t_first, tokens_first = now, tokens
        if bar is not None:
            bar.update(1)
            bar.set_postfix(rows=rows, tok_s=f"{tokens / (now - t0):.0f}")
        elif now - last_line > 10 or done in (1, n_blocks):
            log.info(f"maria extract: {done}/{n_blocks} blocks, {rows} rows, {tokens / (now - t0):.0f} tok/s")
            last_line = now
    if bar is not None:
        bar.close()
    steady = {"steady_seconds": time.perf_counter() - t_first, "steady_tokens": tokens - tokens_first} if n_blocks > 1 else {}
    return rows, tokens, steady


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


class TransientClusterError(RuntimeError):
    """The cluster failed the job (a lost node, actor, worker or object) more often than the job retries it; nothing
    was wrong with the input. The CLI exits 75: re-running the same command resumes."""


# what Ray appends to an error it did not retry ("Failed to read stream iteratively after 1/10 attempts ...")
_RAY_RETRY_NOTE = re.compile(r"\s*Failed to [^\n]* after \d+/\d+ attempts \(total backoff.*", re.S)


def _is_user_error(e: BaseException) -> bool:
    return isinstance(e, (ValueError, OSError)) and not type(e).__module__.startswith("ray")


def _is_cluster_failure(e: BaseException) -> bool:
    """A failure of the cluster, not of our code or input: what a re-run gets past."""
    import ray.exceptions as rex

    kinds = (
        rex.ActorDiedError,
        rex.ActorUnavailableError,
        rex.NodeDiedError,
        rex.WorkerCrashedError,
        rex.ObjectLostError,
        rex.OwnerDiedError,
        rex.RaySystemError,
        rex.ObjectFetchTimedOutError,
        rex.OutOfMemoryError,
        rex.LocalRayletDiedError,
        rex.GetTimeoutError,
    )
    seen, cur = set(), e
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        if isinstance(cur, kinds):
            return True
        cur = getattr(cur, "cause", None) or cur.__cause__ or cur.__context__
    return False


@contextlib.contextmanager
def _user_errors():
    """Ray wraps errors raised in tasks and actors; surface ours (ValueError, OSError) as themselves, without the
    retry note Ray Data appends to their message, so the CLI prints our one line naming the fix instead of a
    remote traceback."""
    try:
        yield
    except Exception as e:  # noqa: BLE001
        seen, cur = set(), e
        while cur is not None and id(cur) not in seen:
            seen.add(id(cur))
            if _is_user_error(cur):
                if cur.args and isinstance(cur.args[0], str):
                    cur.args = (_RAY_RETRY_NOTE.sub("", cur.args[0]),) + cur.args[1:]
                raise cur from None
            cur = getattr(cur, "cause", None) or cur.__cause__ or cur.__context__
        raise
