"""`maria serve`: infilling over HTTP, a Ray Serve application.

    POST /infill   {"text": "Paris is the {{2}} of France."} (or a list of texts; optional temperature,
                   top_k, top_p, seed) -> {"input", "output", "filled", "spans"} (a list: {"results": [...]})
    GET  /healthz  200 once the model is loaded (503 while draining), with this replica's counters
    GET  /docs     the OpenAPI page (FastAPI), /openapi.json its schema

Concurrent texts are batched by Ray Serve (`@serve.batch`: a batch closes when it holds
--max-batch-size texts or --batch-wait-ms after its first) and decoded together by the ragged
decoder, one batch at a time per replica; while one batch decodes, the next one fills. Within a
batch, texts are grouped by sampling settings: greedy texts decode together (the decoder's batched
output equals each window alone: tests/test_decode.py; `maria bench serve` counts any difference
from `maria infill`), a seeded text decodes alone (so it equals `maria infill --text ... --seed`),
unseeded sampling shares a batch. A request is checked before it joins a batch, by the same
functions as the CLI (app/commands.py), so a bad one gets a 400 with the CLI's one-line message.
Load is bounded: a replica holds --max-ongoing-requests requests, --max-queued-requests more wait,
and past that Serve answers 503. A client that disconnects leaves its batch (Serve cancels its
call; a batch already decoding just drops its answer). SIGTERM or Ctrl-C drains: every replica
answers new requests 503 (a user_config change, applied in place) and its requests in flight finish
(at most --drain-timeout-s); then the application (on a cluster) or the embedded Ray is stopped.
"""

# no `from __future__ import annotations`: FastAPI reads the endpoints' annotations at run time
import asyncio
import itertools
import json
import logging
import signal
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import ray
import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from ray import serve

from maria.checkpoint import check_files, locate, read_config
from maria.decode import batches_by_masked_count
from maria.device import Device, DType, cpu_threads, resolve_device, resolve_dtype
from maria.io import CorruptDataError
from maria.limits import check_fits
from maria.modeling_maria import MariaModel
from maria_app.cli import one_line, package_version
from maria_app.commands import EXAMPLE, check_text, checked_sampling, infill_records, record_text
from maria_extract.cluster import cluster_shapes, fits, gpus_available, init_ray, resolve_address

log = logging.getLogger("maria.serve")
APP = "maria"  # the Serve application's name on the cluster
FIELDS = ("text", "temperature", "top_k", "top_p", "seed")


@dataclass
class ServeConfig:
    model: str  # a MARIA checkpoint: the folder `maria export` wrote, or its hub id
    host: str = "127.0.0.1"  # address the HTTP server binds (0.0.0.0: every interface; there is no authentication)
    port: int = 8000  # HTTP port
    address: str | None = None  # Ray cluster to serve on (default: $RAY_ADDRESS, else an embedded Ray that lives as long as this command)
    replicas: int = 1  # model replicas (each loads the checkpoint; Serve spreads requests over them)
    replica_cpus: float = 1.0  # CPUs Ray reserves per replica (fractional allowed)
    replica_gpus: float | None = None  # GPUs per replica (default: 1 when the cluster has GPUs, else 0; 0.5 packs two per GPU)
    threads: int = 0  # torch CPU threads per replica (0: $MARIA_TORCH_THREADS, else every core)
    device: Device = "auto"  # auto (cuda when the replica got a GPU) | cpu | cuda
    dtype: DType = "auto"  # auto (bfloat16 on GPU, float32 on CPU) | float32 | bfloat16 | float16
    max_batch_size: int = 16  # texts decoded together in one batch
    batch_wait_ms: float = 5.0  # how long a batch waits for more texts after its first
    max_ongoing_requests: int = 32  # requests a replica holds at once (decoding or waiting for the next batch)
    max_queued_requests: int = 64  # requests waiting for a replica; past this the server answers 503 (overloaded)
    max_texts_per_request: int = 64  # texts one request may send (more: 400)
    max_request_kb: int = 1024  # request bodies larger than this are refused (413)
    request_timeout_s: float | None = None  # end-to-end timeout of a request, queueing included (None: no timeout)
    start_timeout_s: float = 600.0  # how long to wait for the replicas to load the model before giving up
    drain_timeout_s: float = 30.0  # on SIGTERM / Ctrl-C: how long requests in flight may take to finish
    ray_temp_dir: str | None = None  # embedded Ray's temp and log folder (a short path, e.g. /tmp/ray-maria)
    num_cpus: int | None = None  # embedded Ray's CPUs (default: every core)

    def __post_init__(self):
        if not 0 < self.port < 65536:
            raise ValueError(f"--port {self.port} is not a TCP port; pass 1-65535")
        if self.replicas < 1 or self.replica_cpus < 0 or (self.replica_gpus or 0) < 0 or self.threads < 0:
            raise ValueError("maria serve needs --replicas >= 1 and --replica-cpus, --replica-gpus, --threads >= 0")
        if min(self.max_batch_size, self.max_ongoing_requests, self.max_queued_requests, self.max_texts_per_request, self.max_request_kb) < 1:
            raise ValueError(
                "--max-batch-size, --max-ongoing-requests, --max-queued-requests, --max-texts-per-request and "
                "--max-request-kb must be >= 1 (the queue is always bounded)"
            )
        if (
            self.batch_wait_ms < 0
            or (self.request_timeout_s is not None and self.request_timeout_s <= 0)
            or min(self.start_timeout_s, self.drain_timeout_s) <= 0
        ):
            raise ValueError("--batch-wait-ms must be >= 0, --request-timeout-s, --start-timeout-s and --drain-timeout-s > 0")


# ---- the HTTP application (FastAPI behind Ray Serve's proxy) -----------------------------------
api = FastAPI(
    title="MARIA infilling",
    version=package_version(),
    description="Fill masked spans written {{N}} (N tokens) with a MARIA checkpoint. Errors are "
    '{"error": "<one line>"}: 400 bad request, 413 too large, 503 overloaded.',
)


class InfillRequest(BaseModel):
    """The body of POST /infill (documentation: the endpoint parses the JSON itself, with the CLI's checks)."""

    text: str | list[str] = Field(description="masked text(s): {{N}} marks N tokens to fill", examples=["Paris is the {{2}} of France."])
    temperature: float = Field(0.0, description="0 = greedy")
    top_k: int = Field(0, description="sample from the k most likely tokens (0 = all)")
    top_p: float = Field(1.0, description="nucleus sampling mass (1 = off)")
    seed: int | None = Field(None, description="sampling seed: the text is then decoded alone, as `maria infill --seed` does")


class InfillResult(BaseModel):
    input: str
    output: str = Field(description="the text with every span filled")
    filled: list[str] = Field(description="each filled token")
    spans: list[str] = Field(description="the text written into each {{N}} span")


class InfillResults(BaseModel):
    results: list[InfillResult]


class ErrorBody(BaseModel):
    error: str


class TooLarge(ValueError):
    pass


@dataclass
class Item:
    """One text waiting for a batch."""

    text: str
    tokens: int
    masked: int
    sampling: dict
    group: tuple  # texts with the same group decode together


_seeded = itertools.count()


def sampling_group(sampling: dict) -> tuple:
    if sampling["temperature"] == 0:
        return ("greedy",)  # top_k, top_p and seed do not change an argmax
    if sampling["seed"] is None:
        return (sampling["temperature"], sampling["top_k"], sampling["top_p"])
    return ("seeded", next(_seeded))  # alone: a seeded text's draws must not depend on its batch-mates


async def read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length", "")
    too_large = TooLarge(f"request body is over {limit // 1024} KiB (--max-request-kb); send fewer or shorter texts per request")
    if declared.isdigit() and int(declared) > limit:
        raise too_large
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise too_large
    return bytes(body)


def error(status: int, e: BaseException) -> JSONResponse:
    return JSONResponse({"error": one_line(e) or f"{type(e).__name__} (a bug: see the replica's log)"}, status_code=status)


class Infiller:
    """What a replica does to requests, without Ray or HTTP: check them, decode a batch of their texts."""

    def __init__(self, model: MariaModel, max_batch_size: int, max_texts_per_request: int):
        self.model, self.max_batch, self.max_texts = model, max_batch_size, max_texts_per_request
        self.stats = {"batches": 0, "texts": 0, "largest_batch": 0}

    def parse(self, body: bytes) -> tuple[list[Item], bool]:
        """The request's texts, each checked as `maria infill --text` checks it (same messages)."""
        try:
            obj = json.loads(body)
        except ValueError as e:
            raise ValueError(f"request body is not valid JSON ({e}); send e.g. {EXAMPLE}") from None
        texts = record_text(obj, "request body", many=True)
        unknown = sorted(set(obj) - set(FIELDS))
        if unknown:
            raise ValueError(f"request body: unknown field {unknown[0]!r}; the fields are {', '.join(FIELDS)}")
        many = isinstance(texts, list)
        texts = texts if many else [texts]
        if len(texts) > self.max_texts:
            raise ValueError(f"request body: {len(texts)} texts, more than --max-texts-per-request {self.max_texts}; split them over several requests")
        sampling = checked_sampling(obj.get("temperature", 0.0), obj.get("top_k", 0), obj.get("top_p", 1.0), obj.get("seed"), where="request body")
        sizes = [check_text(self.model, t) for t in texts]
        check_fits(self.model.bb, min(len(texts), self.max_batch), max(n for n, _ in sizes))
        return [Item(t, n, k, sampling, sampling_group(sampling)) for t, (n, k) in zip(texts, sizes)], many

    def decode_batch(self, items: list[Item]) -> list[dict]:
        """One record per item, in order; texts of one sampling group decode together, by masked count."""
        groups: dict[tuple, list[int]] = {}
        for i, item in enumerate(items):
            groups.setdefault(item.group, []).append(i)
        out: list[dict | None] = [None] * len(items)
        for idx in groups.values():
            for b in batches_by_masked_count([items[i].masked for i in idx], self.max_batch, [items[i].tokens for i in idx]):
                for rows in self.fitting([idx[j] for j in b], items):
                    for i, record in zip(rows, infill_records(self.model, [items[i].text for i in rows], items[rows[0]].sampling)):
                        out[i] = record
        self.stats["batches"] += 1
        self.stats["texts"] += len(items)
        self.stats["largest_batch"] = max(self.stats["largest_batch"], len(items))
        return out

    def fitting(self, rows: list[int], items: list[Item]) -> list[list[int]]:
        """Each request was checked alone; texts of many requests together may need more memory than
        there is now: halve such a batch until each part fits (one text always does: it was checked)."""
        try:
            check_fits(self.model.bb, len(rows), max(items[i].tokens for i in rows))
            return [rows]
        except ValueError:
            if len(rows) == 1:
                return [rows]
            return self.fitting(rows[: len(rows) // 2], items) + self.fitting(rows[len(rows) // 2 :], items)


@serve.deployment(name="MariaInfill")
@serve.ingress(api)
class InfillServer:
    """One replica: the model, and the batch queue in front of it."""

    def __init__(
        self, model: str, device: str, dtype: str, threads: int, max_batch_size: int, batch_wait_ms: float, max_texts_per_request: int, max_request_kb: int
    ):
        device = resolve_device(device)
        if device == "cpu":
            torch.set_num_threads(threads or cpu_threads())  # Ray sets one thread per reserved CPU; decoding wants the cores
        loaded = MariaModel.from_pretrained(model, device=device, dtype=resolve_dtype(dtype, device))
        self.infiller, self.name, self.max_bytes = Infiller(loaded, max_batch_size, max_texts_per_request), model, max_request_kb * 1024
        self.decode.set_max_batch_size(max_batch_size)
        self.decode.set_batch_wait_timeout_s(batch_wait_ms / 1000)
        self.draining, self.in_flight = False, 0

    async def reconfigure(self, config: dict) -> None:
        """Serve's user_config: {"draining": true} on SIGTERM; returns once this replica's requests are done."""
        self.draining = bool(config.get("draining"))
        end = time.monotonic() + float(config.get("drain_timeout_s", 30))
        while self.draining and self.in_flight and time.monotonic() < end:
            await asyncio.sleep(0.1)

    @api.get("/healthz", summary="200 once the model is loaded (503 while shutting down)")
    async def healthz(self):
        body = {
            "status": "draining" if self.draining else "ok",
            "model": self.name,
            "device": str(self.infiller.model.bb.device),
            "in_flight": self.in_flight,
            **self.infiller.stats,
        }
        return JSONResponse(body, status_code=503 if self.draining else 200)

    @api.post(
        "/infill",
        summary="fill the {{N}} spans of one text or a list of texts",
        openapi_extra={"requestBody": {"required": True, "content": {"application/json": {"schema": InfillRequest.model_json_schema()}}}},
        responses={
            200: {"model": InfillResult | InfillResults, "description": 'one result, or {"results": [...]} for a list'},
            400: {"model": ErrorBody, "description": "bad request: the CLI's one-line message"},
            413: {"model": ErrorBody, "description": "body over --max-request-kb"},
            503: {"description": "overloaded (the bounded queue is full) or shutting down; retry later"},
        },
    )
    async def infill(self, request: Request):
        if self.draining:
            return error(503, ValueError("the server is shutting down; send the request again to a running server"))
        self.in_flight += 1  # a drain waits for these
        try:
            try:
                items, many = self.infiller.parse(await read_body(request, self.max_bytes))
            except TooLarge as e:
                return error(413, e)
            except ValueError as e:
                return error(400, e)
            try:
                records = await asyncio.gather(*(self.decode(item) for item in items))
            except Exception as e:  # a checked request that fails to decode is a bug (or out of memory): 500
                logging.getLogger("ray.serve").exception("infill failed")
                return error(500, e)
            return {"results": records} if many else records[0]
        finally:
            self.in_flight -= 1

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.005)  # set from the config in __init__
    async def decode(self, items: list[Item]) -> list[dict]:
        return await asyncio.to_thread(self.infiller.decode_batch, items)  # the event loop keeps accepting (and refusing) requests


# ---- `maria serve`: start Ray and Serve, deploy, wait for a signal ---------------------------
def checked_model(model: str) -> str:
    """Check the checkpoint before Ray starts (a bad --model costs seconds, not a replica's start-up);
    a local folder is passed on as an absolute path."""
    d = locate(model)
    check_files(d, read_config(d))
    return str(d.resolve()) if Path(model).expanduser().exists() else model


def check_port_free(host: str, port: int) -> None:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            raise ValueError(f"cannot listen on {host}:{port} ({e.strerror}); pass another --port or --host") from None


def replica_gpus(cfg: ServeConfig) -> float:
    nodes, groups = cluster_shapes()
    gpus = cfg.replica_gpus if cfg.replica_gpus is not None else float(gpus_available(nodes, groups) and cfg.device != "cpu")
    if cfg.device.startswith("cuda") and not gpus:
        raise ValueError(f"--device {cfg.device} needs a GPU per replica, and the cluster has none (or --replica-gpus 0); pass --device cpu")
    want = {"CPU": cfg.replica_cpus, "GPU": gpus}
    if not any(fits(want, n) for n in nodes + (groups or [])) and (groups is not None or not resolve_address(cfg.address)):
        raise ValueError(
            f"a replica asks for {gpus:g} GPU and {cfg.replica_cpus:g} CPU and no node of the cluster has that "
            f"({len(nodes)} node(s)); pass smaller --replica-cpus / --replica-gpus"
        )
    return gpus


def replica_failure(message: str) -> Exception:
    """Serve reports a replica that failed to start with its traceback: keep the error's own line."""
    lines = [ln.strip() for ln in message.splitlines() if "Error: " in ln or "Exception: " in ln]
    last = lines[-1] if lines else (message.strip().splitlines() or ["no message"])[-1]
    kind, _, text = last.partition(": ")
    cls = CorruptDataError if kind.rsplit(".", 1)[-1].startswith("Corrupt") else ValueError
    return cls(f"the model replica could not start: {text or kind}")


def app_status() -> tuple[str, str]:
    app = serve.status().applications.get(APP)
    return str(getattr(app, "status", "")).rsplit(".", 1)[-1], getattr(app, "message", "")


def wait_running(timeout_s: float, stop: threading.Event) -> bool:
    """True once the application runs; False if a signal came first; one line if it failed or timed out."""
    start = time.monotonic()
    while not stop.wait(0.5):
        status, message = app_status()
        if status == "RUNNING":
            return True
        if status in ("DEPLOY_FAILED", "UNHEALTHY"):
            raise replica_failure(message)
        if time.monotonic() - start > timeout_s:
            raise ValueError(
                f"the model replicas did not start within {timeout_s:g} s (the cluster may lack the CPUs/GPUs they ask "
                f"for, or loading is slow); raise --start-timeout-s or lower --replicas / --replica-cpus / --replica-gpus"
            )
    return False


def target(cfg: ServeConfig, model: str, gpus: float, draining: bool) -> serve.RunTarget:
    """The application; `draining` travels as Serve's user_config, so changing it reconfigures the
    running replicas in place (no restart)."""
    app = InfillServer.options(
        num_replicas=cfg.replicas,
        max_ongoing_requests=cfg.max_ongoing_requests,
        max_queued_requests=cfg.max_queued_requests,
        graceful_shutdown_timeout_s=cfg.drain_timeout_s,
        graceful_shutdown_wait_loop_s=0.5,
        user_config={"draining": draining, "drain_timeout_s": cfg.drain_timeout_s},
        ray_actor_options={"num_cpus": cfg.replica_cpus, "num_gpus": gpus},
    )
    app = app.bind(model, cfg.device, cfg.dtype, cfg.threads, cfg.max_batch_size, cfg.batch_wait_ms, cfg.max_texts_per_request, cfg.max_request_kb)
    return serve.RunTarget(app, name=APP, route_prefix="/")


def drain(cfg: ServeConfig, model: str, gpus: float) -> None:
    """Every replica answers new requests 503 and returns from its reconfigure once its requests in
    flight are done (at most --drain-timeout-s): the application is RUNNING again when all are."""
    t0 = time.monotonic()
    serve.run_many([target(cfg, model, gpus, draining=True)], wait_for_applications_running=False)
    while time.monotonic() - t0 < cfg.drain_timeout_s + 30:
        time.sleep(0.25)
        if app_status()[0] != "DEPLOYING":
            break
    log.info(f"maria serve: drained in {time.monotonic() - t0:.1f} s")


def run_serve(cfg: ServeConfig) -> None:
    model = checked_model(cfg.model)
    cluster = resolve_address(cfg.address)
    if not cluster:
        check_port_free(cfg.host, cfg.port)
    started = init_ray(cfg.address, cfg.ray_temp_dir, cfg.num_cpus)
    logging.getLogger("ray.serve").setLevel(logging.WARNING)  # our lines say what Serve's INFO lines would
    stop, signals = threading.Event(), []
    previous = {s: signal.signal(s, lambda num, _: (signals.append(num), stop.set())) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        gpus = replica_gpus(cfg)
        serve.start(http_options={"host": cfg.host, "port": cfg.port, "request_timeout_s": cfg.request_timeout_s})
        serve.run_many([target(cfg, model, gpus, draining=False)], wait_for_applications_running=False)
        log.info(f"maria serve: loading {cfg.model} in {cfg.replicas} replica(s) ({gpus:g} GPU, {cfg.replica_cpus:g} CPU each)")
        if wait_running(cfg.start_timeout_s, stop):
            url = f"http://{cfg.host}:{cfg.port}"
            log.info(f"maria serve: ready on {url}: POST /infill {EXAMPLE}, GET /healthz, docs at {url}/docs; Ctrl-C or SIGTERM stops it")
            while not stop.wait(1.0):
                pass
            log.info("maria serve: stopping: new requests get 503, requests in flight finish")
            drain(cfg, model, gpus)
    finally:
        if cluster:
            serve.delete(APP)  # other applications on the cluster keep running
        if started:
            ray.shutdown()  # an embedded Ray takes Serve's proxy, controller and replicas with it
        for s, handler in previous.items():
            signal.signal(s, handler)
    if signals and signals[-1] == signal.SIGINT:
        raise KeyboardInterrupt  # the CLI's exit code 130
    log.info("maria serve: stopped")
