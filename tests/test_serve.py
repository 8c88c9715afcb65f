"""`maria serve` as a user runs it: a subprocess with its own embedded Ray (fractional CPUs), on
loopback, spoken to with a real HTTP client. Health, infilling (equal to `maria infill`), concurrent
requests batched and answered to the right caller, a 400 with the CLI's own line for bad requests,
503 under a flood (the queue is bounded), a client that hangs up does not stall the server, and
SIGTERM drains and stops it. Plus `maria bench serve` on the tiny checkpoint (a smoke run: it starts
its own server; timings from this shared machine mean nothing, errors and outputs do)."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests
import torch

from maria import MariaModel, export
from maria.head import save_head
from maria_app.cli import main
from maria_bench.serve import wait_healthy

pytestmark = pytest.mark.timeout(900)
TEXTS = [
    "Paris is the {{2}} of France.",
    "A {{2}} sat on the {{}} by the door.",
    "The quick brown {{3}} over the lazy dog.",
    "Masked language models read {{4}} sides; autoregressive models read only the {{2}}.",
    "It was {{8}}, and 3.14159 is pi!",
]


@pytest.fixture(scope="module")
def ckpt(pairs, tmp_path_factory):
    """A checkpoint exported from a head that is not the init (as `maria export` writes it)."""
    model = MariaModel.from_backbones(*pairs["modernbert-olmo"])
    with torch.no_grad():
        model.head.proj.bias += torch.randn(model.head.proj.bias.shape, generator=torch.Generator().manual_seed(0)) * 0.1
    head = save_head(tmp_path_factory.mktemp("head") / "head", model.head, {**model.bb.describe(), "complete": True})
    return str(export(*pairs["modernbert-olmo"], str(head), str(tmp_path_factory.mktemp("ckpt") / "maria-tiny")))


@pytest.fixture(scope="module")
def model(ckpt):
    return MariaModel.from_pretrained(ckpt)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`maria serve` in its own session (its Ray's processes with it), stopped by SIGTERM."""

    def __init__(self, ckpt: str, *flags: str):
        self.work = tempfile.mkdtemp(prefix="mst-", dir="/tmp")  # Ray's socket paths under it must stay short
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = open(os.path.join(self.work, "serve.log"), "wb")
        cmd = [
            sys.executable,
            "-m",
            "maria_app.cli",
            "serve",
            "--model",
            ckpt,
            "--port",
            str(self.port),
            "--replica-cpus",
            "0.5",
            "--num-cpus",
            "2",
            "--threads",
            "1",
            "--ray-temp-dir",
            os.path.join(self.work, "ray"),
            *flags,
        ]
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            wait_healthy(self.proc, self.url, Path(self.work) / "serve.log", timeout_s=600)
        except RuntimeError as e:
            self.close()
            pytest.fail(f"{e}\n{self.output()}")

    def output(self) -> str:
        with open(os.path.join(self.work, "serve.log"), "rb") as f:
            return f.read().decode(errors="replace")[-4000:]

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(120)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)  # the session this test started, and nothing else
                self.proc.wait()
        self.log.close()
        shutil.rmtree(self.work, ignore_errors=True)


@pytest.fixture(scope="module")
def server(ckpt):
    """Small bounds so a flood overflows: 4 requests in the replica, 4 more queued."""
    s = Server(ckpt, "--max-batch-size", "8", "--max-ongoing-requests", "4", "--max-queued-requests", "4", "--max-request-kb", "16")
    yield s
    s.close()


def post(url: str, body, **kw) -> requests.Response:
    data = body if isinstance(body, (str, bytes)) else json.dumps(body)
    return requests.post(f"{url}/infill", data=data, timeout=kw.pop("timeout", 120), **kw)


def test_health_infill_and_docs(server, ckpt, model, capsys):
    health = requests.get(f"{server.url}/healthz", timeout=10)
    assert health.status_code == 200 and health.json()["status"] == "ok"
    r = post(server.url, {"text": TEXTS[1]})
    assert r.status_code == 200, r.text
    answer = r.json()
    assert main(["infill", "--model", ckpt, "--text", TEXTS[1]]) == 0  # the CLI on the same text
    assert answer["output"] == capsys.readouterr().out.rstrip("\n") == model.infill_text([TEXTS[1]])[0]["text"]
    assert answer["input"] == TEXTS[1] and len(answer["spans"]) == 2 and "".join(answer["spans"]) == "".join(answer["filled"])
    many = post(server.url, {"text": TEXTS[:3], "temperature": 0.9, "top_k": 50, "seed": 7}).json()["results"]
    assert [m["input"] for m in many] == TEXTS[:3]  # a seeded text decodes alone: equal to `maria infill --seed` on it
    assert [m["output"] for m in many] == [model.infill_text([t], temperature=0.9, top_k=50, seed=7)[0]["text"] for t in TEXTS[:3]]
    schema = requests.get(f"{server.url}/openapi.json", timeout=10).json()
    assert {"/infill", "/healthz"} <= set(schema["paths"]) and "text" in json.dumps(schema["paths"]["/infill"])
    assert requests.get(f"{server.url}/docs", timeout=10).status_code == 200


def test_concurrent_requests_are_batched_and_answered_to_their_caller(server, model):
    reference = {t: model.infill_text([t])[0]["text"] for t in TEXTS}
    for _ in range(5):  # a batch forms within milliseconds while the previous one decodes
        with ThreadPoolExecutor(4) as pool:
            answers = list(pool.map(lambda t: post(server.url, {"text": t}), TEXTS[:4] * 2))
        assert [a.status_code for a in answers] == [200] * 8, [a.text for a in answers]
        assert [a.json()["output"] for a in answers] == [reference[t] for t in TEXTS[:4] * 2]
        if requests.get(f"{server.url}/healthz", timeout=10).json()["largest_batch"] > 1:
            break
    assert requests.get(f"{server.url}/healthz", timeout=10).json()["largest_batch"] > 1


def cli_error(capsys, ckpt: str, *flags: str) -> str:
    assert main(["infill", "--model", ckpt, *flags]) == 2
    return capsys.readouterr().err.strip().split("maria infill: error: ", 1)[1]


@pytest.mark.parametrize(
    "text,flags",
    [
        ("Paris is the capital of France.", []),
        ("Paris is the {{two}} of France.", []),
        ("{{999999}}", []),
        ("word " * 3000 + "{{1}}", []),
        (TEXTS[0], ["--temperature", "-1"]),
        (TEXTS[0], ["--top-p", "0"]),
    ],
)
def test_bad_requests_get_400_with_the_cli_line(server, ckpt, capsys, text, flags):
    body = {"text": text, **({flags[0][2:].replace("-", "_"): float(flags[1])} if flags else {})}
    r = post(server.url, body)
    assert r.status_code == 400, r.text
    assert r.json()["error"] == cli_error(capsys, ckpt, "--text", text, *flags)


def test_malformed_requests_get_one_line_4xx(server):
    cases = {
        "{not json": "not valid JSON",
        "[1, 2]": '"text" field',
        '{"txt": "a {{2}}"}': '"text" field',
        '{"text": 3}': '"text" field',
        '{"text": []}': '"text" field',
        '{"text": "a {{2}}", "top_k": "x"}': '"top_k" must be an integer',
        '{"text": "a {{2}}", "temperature": NaN}': "sampling needs",
        '{"text": "a {{2}}", "temprature": 1}': "unknown field 'temprature'",
        json.dumps({"text": ["a {{1}}"] * 65}): "--max-texts-per-request",
    }
    for body, words in cases.items():
        r = post(server.url, body)
        assert r.status_code == 400 and words in r.json()["error"] and "\n" not in r.json()["error"], (body, r.text)
    big = post(server.url, {"text": "a {{1}} " + "x" * 20000})
    assert big.status_code == 413 and "--max-request-kb" in big.json()["error"]


def test_a_flood_is_refused_with_503_and_the_server_recovers(server):
    start = threading.Barrier(40)

    def one(_):
        start.wait()
        try:
            return post(server.url, {"text": "{{60}}"}).status_code
        except requests.RequestException as e:
            return type(e).__name__

    with ThreadPoolExecutor(40) as pool:
        codes = list(pool.map(one, range(40)))
    assert set(codes) <= {200, 503}, codes  # never a 5xx other than "overloaded", never a dropped connection
    assert codes.count(503) > 0 and codes.count(200) >= 4, codes
    assert post(server.url, {"text": TEXTS[0]}).status_code == 200


def test_clients_that_hang_up_do_not_stall_the_server(server, model):
    body = json.dumps({"text": ["{{60}}"] * 4}).encode()
    for _ in range(6):  # send a whole request, then close without reading the answer
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:
            s.sendall(b"POST /infill HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n" + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
    end, codes = time.monotonic() + 60, []
    while time.monotonic() < end:  # 503 ("busy") is a fair answer while they are cancelled; a hang is not
        r = post(server.url, {"text": TEXTS[0]}, timeout=60)
        codes.append(r.status_code)
        if r.status_code != 503:
            break
        time.sleep(0.5)
    assert codes[-1] == 200 and set(codes) <= {200, 503}, codes
    assert r.json()["output"] == model.infill_text([TEXTS[0]])[0]["text"]
    while requests.get(f"{server.url}/healthz", timeout=10).json()["in_flight"] and time.monotonic() < end:
        time.sleep(0.2)
    assert requests.get(f"{server.url}/healthz", timeout=10).json()["in_flight"] == 0  # nothing left hanging


def test_bad_model_and_busy_port_fail_in_one_line_before_ray_starts(ckpt, capsys, tmp_path):
    assert main(["serve", "--model", str(tmp_path)]) == 2
    assert "not a MARIA checkpoint" in capsys.readouterr().err
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        assert main(["serve", "--model", ckpt, "--port", str(busy.getsockname()[1])]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("maria serve: error: cannot listen on 127.0.0.1:") and "--port" in err and len(err.splitlines()) == 1
    assert main(["serve", "--model", ckpt, "--max-queued-requests", "0"]) == 2
    assert "always bounded" in capsys.readouterr().err


def test_sigterm_drains_requests_in_flight_and_stops(server):
    """Last: it stops the module's server. A request in flight is answered; one sent while the server
    drains is refused with 503 (or finds the port closed)."""
    answers = {}

    def send(name, body):
        try:
            answers[name] = post(server.url, body, timeout=120).status_code
        except requests.ConnectionError:
            answers[name] = "closed"

    inflight = threading.Thread(target=send, args=("inflight", {"text": ["{{60}}"] * 8}))
    inflight.start()
    end = time.monotonic() + 30
    while requests.get(f"{server.url}/healthz", timeout=10).json()["in_flight"] < 1 and time.monotonic() < end:
        time.sleep(0.05)  # until the replica holds it
    server.proc.send_signal(signal.SIGTERM)
    time.sleep(1)
    send("late", {"text": TEXTS[0]})
    assert server.proc.wait(180) == 0, server.output()
    inflight.join(120)
    assert answers["inflight"] == 200 and answers["late"] in (503, "closed"), answers
    out = server.output()
    assert "new requests get 503" in out and "drained in" in out and "stopped" in out and "Traceback" not in out, out
    with pytest.raises(requests.ConnectionError):
        requests.get(f"{server.url}/healthz", timeout=5)


def test_bench_serve_smoke(ckpt, model, tmp_path):
    """`maria bench serve` end to end on the tiny checkpoint: no errors, every answer equal to `maria infill`."""
    texts = tmp_path / "texts.jsonl"
    texts.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    out = tmp_path / "serve.json"
    assert (
        main(
            [
                "bench",
                "serve",
                "--model",
                ckpt,
                "--texts",
                str(texts),
                "--requests",
                "8",
                "--clients",
                "4",
                "--repeats",
                "1",
                "--threads",
                "1",
                "--json",
                str(out),
            ]
        )
        == 0
    )
    result = json.loads(out.read_text())
    assert result["targets"]["errors"] == 0 and result["targets"]["outputs_differing_from_maria_infill"] == 0
    assert result["targets"]["server_exit_code"] == 0
    assert result["concurrent"]["masked_tok_s"]["median"] > 0 and out.with_suffix(".png").stat().st_size > 0


def test_a_batch_groups_texts_by_sampling_and_halves_until_it_fits(ckpt, monkeypatch):
    """The replica's batch logic in-process (no Ray): greedy texts decode together, a seeded text alone,
    unseeded sampling with equal settings together; a batch over the memory check is halved."""
    from maria_app import serve as app_serve

    replica = app_serve.Infiller(MariaModel.from_pretrained(ckpt), 8, 64)
    calls = []
    monkeypatch.setattr(app_serve, "infill_records", lambda m, texts, s: calls.append((list(texts), s["seed"])) or [{"output": t} for t in texts])
    greedy, hot = dict(temperature=0.0, top_k=0, top_p=1.0, seed=None), dict(temperature=0.7, top_k=0, top_p=1.0, seed=None)
    seeded = dict(hot, seed=3)
    items = [
        app_serve.Item(t, 8, k, s, app_serve.sampling_group(s))
        for t, k, s in [("g1", 1, greedy), ("h1", 2, hot), ("s1", 1, seeded), ("g2", 3, dict(greedy, seed=9)), ("s2", 1, seeded), ("h2", 1, hot)]
    ]
    assert [r["output"] for r in replica.decode_batch(items)] == ["g1", "h1", "s1", "g2", "s2", "h2"]
    assert sorted(calls) == sorted([(["g1", "g2"], None), (["h2", "h1"], None), (["s1"], 3), (["s2"], 3)])
    monkeypatch.setattr(app_serve, "check_fits", lambda bb, n, length: (_ for _ in ()).throw(ValueError("too big")) if n > 2 else None)
    assert replica.fitting([0, 1, 2, 3, 4], items) == [[0, 1], [2], [3, 4]]


def test_bench_texts_mask_word_spans_with_their_token_counts(model):
    from tiny import CORPUS

    from maria.text import MASK_SPAN
    from maria_bench.serve import masked_passages

    article = " ".join(CORPUS)
    texts = masked_passages(model.bb.ar_tokenizer, [article, "too short"], 12, seed=0)
    assert len(texts) == 12 and len(set(texts)) > 6
    for text in texts:
        spans = MASK_SPAN.findall(text)
        assert 1 <= len(spans) <= 3 and all(int(n) >= 1 for n in spans)
        assert model.infill_text([text])[0]["mask"].count(True) == sum(int(n) for n in spans)
