"""`maria bench serve`: `maria serve` under load, on loopback only.

It starts the server as a user would (`python -m maria_app.cli serve`, its own embedded Ray), then
sends the same --requests masked texts once one at a time and once from --clients concurrent
clients, and reports masked tokens/s, p50/p99 latency (client side, HTTP included) and errors per
phase; every greedy answer is compared with `maria infill` on the same text alone (computed in this
process while the server loads). Apart, in this process, the same texts decoded offline in batches of
--clients in input order and grouped by masked count (`maria infill --jsonl`'s batching): what the
grouping buys. Each phase is bounded: it stops sending after --time-limit-s (marked truncated).
Every figure is the median of --repeats, with the phases interleaved inside each repeat. The
server's own output goes beside the JSON (<stem>.server.log).
Texts: --texts JSONL ({"text": ...} per line, used as written), else 1-3 spans of 1-5 words masked
in ~40-word passages of the demo's validation articles.
"""

from __future__ import annotations

import itertools
import json
import os
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import asdict
from pathlib import Path

import pyarrow.parquet as pq
import requests
import torch

from maria.decode import batches_by_masked_count
from maria.device import cpu_threads, resolve_device, resolve_dtype
from maria.modeling_maria import MariaModel
from maria.plots import bar_plot
from maria.text import parse_masked_text
from maria_bench.decode import spread
from maria_defaults.corpus_wiki import prepare_wiki_corpus
from maria_defaults.defaults import default_cache_dir

GOAL = 2.5  # concurrent throughput over one-at-a-time


def demo_texts(tok, n: int, seed: int) -> list[str]:
    """n passages of the demo's validation articles with 1-3 spans of 1-5 words written {{N}}."""
    articles = pq.read_table(prepare_wiki_corpus(default_cache_dir() / "wiki")[1]).column("text").to_pylist()
    return masked_passages(tok, articles, n, seed)


def masked_passages(tok, articles: list[str], n: int, seed: int, words_per_text: int = 40) -> list[str]:
    """n passages of `words_per_text` words from `articles`, each with 1-3 spans of 1-5 words written {{N}}
    (N = the span's tokens, its leading space included: maria/text.py's rule)."""
    long_enough = [a.split() for a in articles if len(a.split()) > words_per_text]
    if not long_enough:
        raise ValueError(f"no article has more than {words_per_text} words to mask spans in")
    g, texts = random.Random(seed), []
    for words in itertools.cycle(long_enough):
        start = g.randrange(len(words) - words_per_text)
        words = words[start : start + words_per_text]
        out, at = [], 0
        for s in sorted(g.sample(range(2, words_per_text - 6), g.randint(1, 3))):
            if s < at:
                continue  # overlaps the span before it
            end = s + g.randint(1, 5)
            n_tokens = len(tok(" " + " ".join(words[s:end]), add_special_tokens=False).input_ids)
            out += [" ".join(words[at:s]), f"{{{{{n_tokens}}}}}"]
            at = end
        texts.append(" ".join(out + words[at:]))
        if len(texts) == n:
            return texts
    raise AssertionError("unreachable")


def read_texts(path: str, n: int) -> list[str]:
    texts = [json.loads(line)["text"] for line in Path(path).read_text().splitlines() if line.strip()]
    if not texts:
        raise ValueError(f'--texts {path} holds no texts; write one {{"text": ...}} per line')
    return list(itertools.islice(itertools.cycle(texts), n))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(cfg, port: int, work: Path, log_path: Path) -> subprocess.Popen:
    cmd = [
        sys.executable,
        "-m",
        "maria_app.cli",
        "serve",
        "--model",
        cfg.model,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--max-batch-size",
        str(cfg.clients),
        "--max-ongoing-requests",
        str(2 * cfg.clients),
        "--max-queued-requests",
        str(4 * cfg.clients),
        "--device",
        cfg.device,
        "--dtype",
        cfg.dtype,
        "--threads",
        str(cfg.threads),
        "--ray-temp-dir",
        str(work / "ray"),
    ]
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "wb") as log:
        return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def wait_healthy(proc: subprocess.Popen, url: str, log_path: Path, timeout_s: float = 900) -> None:
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise RuntimeError(f"maria serve exited with {proc.returncode}: {log_path.read_text()[-2000:]}")
        try:
            if requests.get(f"{url}/healthz", timeout=5).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(1)
    raise RuntimeError(f"maria serve was not healthy within {timeout_s:g} s; see {log_path}")


def stop_server(proc: subprocess.Popen) -> int | None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(120)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # its own session: the server and the Ray it started
            proc.wait()
    return proc.returncode


def run_phase(url: str, texts: list[str], masked: list[int], clients: int, time_limit_s: float) -> dict:
    """Each client sends the next unsent text and waits for its answer; none is sent after the limit."""
    todo, lock = iter(range(len(texts))), threading.Lock()
    results: dict[int, tuple] = {}
    start = time.perf_counter()

    def client():
        with requests.Session() as http:
            while time.perf_counter() - start < time_limit_s:
                with lock:
                    i = next(todo, None)
                if i is None:
                    return
                t = time.perf_counter()
                try:
                    r = http.post(f"{url}/infill", json={"text": texts[i]}, timeout=300)
                    results[i] = (r.status_code, time.perf_counter() - t, r.json().get("output") if r.status_code == 200 else r.text[:200])
                except (requests.RequestException, ValueError) as e:
                    results[i] = (type(e).__name__, time.perf_counter() - t, str(e)[:200])

    threads = [threading.Thread(target=client) for _ in range(clients)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    wall = time.perf_counter() - start
    ok = [i for i, (status, *_) in results.items() if status == 200]
    latencies = sorted(results[i][1] * 1000 for i in ok) or [float("nan")]
    return {
        "clients": clients,
        "sent": len(results),
        "ok": len(ok),
        "errors": len(results) - len(ok),
        "truncated": len(results) < len(texts),
        "statuses": dict(Counter(str(s) for s, *_ in results.values())),
        "seconds": wall,
        "masked_tok_s": sum(masked[i] for i in ok) / wall,
        "requests_s": len(ok) / wall,
        "p50_ms": statistics.median(latencies),
        "p99_ms": latencies[min(len(latencies) - 1, round(0.99 * (len(latencies) - 1)))],
        "outputs": {i: results[i][2] for i in ok},
    }


def offline(model: MariaModel, texts: list[str], masked: list[int], lengths: list[int], batch: int) -> dict:
    """Masked tokens/s decoding the texts in-process in batches of `batch`: input order, and grouped by masked count."""
    out = {}
    for name, batches in (
        ("input_order", [list(range(i, min(i + batch, len(texts)))) for i in range(0, len(texts), batch)]),
        ("grouped", batches_by_masked_count(masked, batch, lengths)),
    ):
        t = time.perf_counter()
        for b in batches:
            model.infill_text([texts[i] for i in b], temperature=0)
        out[f"{name}_tok_s"] = sum(masked) / (time.perf_counter() - t)
    return out


def bench_serve(cfg) -> dict:
    if not cfg.model:
        raise ValueError("bench serve needs --model CHECKPOINT, e.g. --model runs/demo/checkpoint (the folder `maria export` wrote)")
    device = resolve_device(cfg.device)
    if device == "cpu":
        torch.set_num_threads(cfg.threads or cpu_threads())
    model = MariaModel.from_pretrained(cfg.model, device=device, dtype=resolve_dtype(cfg.dtype, device))
    tok = model.bb.ar_tokenizer
    texts = read_texts(cfg.texts, cfg.requests) if cfg.texts else demo_texts(tok, cfg.requests, cfg.seed)
    parsed = [parse_masked_text(t, tok, model.bb.max_window()) for t in texts]
    masked, lengths = [sum(m) for _, m in parsed], [len(i) for i, _ in parsed]
    work = Path(tempfile.mkdtemp(prefix="mbs-", dir="/tmp"))  # the server's Ray: its socket paths must stay short
    log_path = Path(cfg.json).with_suffix(".server.log")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    load_before = os.getloadavg()
    proc = start_server(cfg, port, work, log_path)
    try:
        # `maria infill --text T` on each text alone (greedy), while the server loads
        reference = [model.infill_text([t], temperature=0)[0]["text"] for t in texts]
        wait_healthy(proc, url, log_path)
        run_phase(url, texts[: 2 * cfg.clients], masked, cfg.clients, cfg.time_limit_s)  # warm-up, untimed
        runs = []
        for r in range(cfg.repeats):
            run = {
                "repeat": r,
                "one_at_a_time": run_phase(url, texts, masked, 1, cfg.time_limit_s),
                "concurrent": run_phase(url, texts, masked, cfg.clients, cfg.time_limit_s),
            }
            run["offline"] = offline(model, texts, masked, lengths, cfg.clients)
            runs.append(run)
    finally:
        server_rc = stop_server(proc)
        shutil.rmtree(work, ignore_errors=True)
    mismatches = [
        {"input": texts[i], "served": out, "maria_infill": reference[i]}
        for run in runs
        for phase in ("one_at_a_time", "concurrent")
        for i, out in run[phase]["outputs"].items()
        if out != reference[i]
    ]
    for run in runs:
        for phase in ("one_at_a_time", "concurrent"):
            run[phase].pop("outputs")
    phases = {
        p: {k: spread([run[p][k] for run in runs]) for k in ("masked_tok_s", "requests_s", "p50_ms", "p99_ms", "seconds")}
        | {"errors": sum(run[p]["errors"] for run in runs), "truncated": any(run[p]["truncated"] for run in runs)}
        for p in ("one_at_a_time", "concurrent")
    }
    ratio = spread([run["concurrent"]["masked_tok_s"] / run["one_at_a_time"]["masked_tok_s"] for run in runs])
    grouped = spread([run["offline"]["grouped_tok_s"] / run["offline"]["input_order_tok_s"] for run in runs])
    errors = phases["one_at_a_time"]["errors"] + phases["concurrent"]["errors"]
    result = {
        "benchmark": "serve",
        "config": asdict(cfg),
        "device": device,
        "cpus": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
        "requests": len(texts),
        "masked_tokens": sum(masked),
        "masked_per_text": {"min": min(masked), "median": statistics.median(masked), "max": max(masked)},
        "tokens_per_text": {"min": min(lengths), "median": statistics.median(lengths), "max": max(lengths)},
        "server_exit_code": server_rc,
        "server_log": str(log_path),
        "runs": runs,
        **phases,
        "offline_batches": {k: spread([run["offline"][k] for run in runs]) for k in ("input_order_tok_s", "grouped_tok_s")}
        | {"grouped_over_input_order": grouped},
        "mismatches": mismatches[:10],
        "targets": {
            "concurrent_over_one_at_a_time": ratio["median"],
            "goal": GOAL,
            "errors": errors,
            "outputs_differing_from_maria_infill": len(mismatches),
            "server_exit_code": server_rc,
            "goal_met": ratio["median"] >= GOAL and errors == 0 and not mismatches and server_rc == 0,
            "grouped_over_input_order_offline": grouped["median"],
        },
    }
    plot_serve(result, Path(cfg.json).with_suffix(".png"))
    return result


def plot_serve(result: dict, png: Path) -> None:
    c = result["config"]["clients"]
    one, many = result["one_at_a_time"], result["concurrent"]
    values = {
        "1 client": one["masked_tok_s"]["median"],
        f"{c} clients": many["masked_tok_s"]["median"],
        f"offline, batches of {c}": result["offline_batches"]["input_order_tok_s"]["median"],
        "offline, grouped": result["offline_batches"]["grouped_tok_s"]["median"],
    }
    bar_plot(
        png,
        values,
        "masked tokens / s (median)",
        f"maria serve ({result['device']}): {c} clients / 1 = {result['targets']['concurrent_over_one_at_a_time']:.2f}x; "
        f"p99 {one['p99_ms']['median']:.0f} / {many['p99_ms']['median']:.0f} ms",
    )
