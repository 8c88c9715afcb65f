"""Fleet extraction: corpora read on the workers, stable ids, Ray conventions, cluster configs, and a
multi-node cluster on one machine (head runs no work, two 1-CPU worker nodes) that loses a node
mid-job and still commits exactly the rows of an uninterrupted embedded run."""

import dataclasses
import gzip
import json
import os
import shlex
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from extract_fixtures import ARRAYS, config, config_from_args, maria_command, read_all
from faults import Faults, fault_command

from maria_extract.cluster import ActorRequest, RayClusterError, check_temp_dir, resolve_address, unsatisfiable
from maria_extract.corpus import CorpusError, block_id, corpus_fingerprint, doc_offsets, iter_documents, limit_rows, list_corpus, plan_blocks
from maria_extract.job import ExtractConfig, command_line, initial_actors, run_extract

ROOT = Path(__file__).parent.parent
pytestmark = pytest.mark.timeout(300)


def write_parquet(path, texts, column="text"):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({column: texts, "n": list(range(len(texts)))}), path)
    return path


def same_store(a, b):
    first, second = read_all(str(a)), read_all(str(b))
    assert first.keys() == second.keys()
    for blk in first:
        for name in ARRAYS:
            np.testing.assert_array_equal(first[blk][name], second[blk][name], err_msg=f"{blk}/{name}")


@pytest.fixture(scope="module")
def parquet_corpus(tmp_path_factory):
    """Three parquet files; the last one's second block holds only documents too short for a window."""
    from tiny import CORPUS

    root = tmp_path_factory.mktemp("fleet-corpus")
    docs = [" ".join(CORPUS[i : i + 2 + i % 3]) for i in range(11)]
    write_parquet(root / "part-0.parquet", docs[:5])
    write_parquet(root / "part-1.parquet", docs[5:9])
    write_parquet(root / "part-2.parquet", docs[9:] + ["hi", "ok", ""])
    (root / "_SUCCESS").write_text("")  # bookkeeping files are skipped, as Ray Data does
    return str(root)


# --- the corpus: formats, ids and errors, without Ray -------------------------------------------


@pytest.fixture(scope="module")
def formats(tmp_path_factory):
    """One small corpus per reader: JSONL (plain and gzip), .txt, CSV, a parquet glob, a datasets split."""
    import datasets

    root = tmp_path_factory.mktemp("formats")
    (root / "j").mkdir()
    with gzip.open(root / "j" / "b.jsonl.gz", "wt") as f:
        f.write(json.dumps({"text": "gz one"}) + "\n" + json.dumps({"text": "gz two"}) + "\n")
    (root / "j" / "a.jsonl").write_text(json.dumps({"text": "plain"}) + "\n" + json.dumps({"text": " "}) + "\n")
    (root / "t").mkdir()
    (root / "t" / "book.txt").write_text("line one\n\nline two\n")
    (root / "c.csv").write_text('text,n\n"a, quoted",1\n123,2\n')
    write_parquet(root / "p1.parquet", ["p one"])
    write_parquet(root / "p2.parquet", ["p two"])
    datasets.disable_progress_bars()
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": ["tr"]}), "test": datasets.Dataset.from_dict({"text": ["te"]})}).save_to_disk(
        str(root / "ds")
    )
    return {  # (source, split): the documents, in corpus order
        (str(root / "j"), None): ["plain", "gz one", "gz two"],  # sorted files, empty rows skipped
        (str(root / "t"), None): ["line one\n\nline two\n"],  # .txt: one file is one document
        (str(root / "c.csv"), None): ["a, quoted", "123"],  # the text column stays text
        (str(root / "p*.parquet"), None): ["p one", "p two"],  # a glob
        (str(root / "ds"), None): ["tr"],
        (str(root / "ds"), "test"): ["te"],
    }


def test_formats_one_rule_each_and_stable_ids(formats):
    for (source, split), docs in formats.items():
        assert list(iter_documents(source, split=split)) == docs, source
    # ids and blocks are pure functions of (rows per file, docs_per_block)
    rows = [5, 0, 3]
    assert plan_blocks(rows, 2) == [
        (block_id(0, 0), 0, 0, 2),
        (block_id(0, 2), 0, 2, 4),
        (block_id(0, 4), 0, 4, 5),
        (block_id(2, 0), 2, 0, 2),
        (block_id(2, 2), 2, 2, 3),
    ]
    assert doc_offsets(rows) == [0, 5, 5] and limit_rows(rows, 6) == [5, 0, 1]
    assert corpus_fingerprint([(5, "a"), (3, "b")], None) != corpus_fingerprint([(5, "a"), (3, "c")], None)


def test_corpus_errors_are_one_line_naming_the_fix(tmp_path):
    cases = {"missing": (tmp_path / "nope", "does not exist"), "mixed": (tmp_path / "mixed", "mixes file kinds"), "split": (tmp_path / "ds", "no split 'dev'")}
    (tmp_path / "mixed").mkdir()
    (tmp_path / "mixed" / "a.jsonl").write_text('{"text": "x"}\n')
    write_parquet(tmp_path / "mixed" / "b.parquet", ["y"])
    import datasets

    datasets.disable_progress_bars()
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": ["tr"]})}).save_to_disk(str(tmp_path / "ds"))
    for name, (path, message) in cases.items():
        with pytest.raises(CorpusError, match=message) as err:
            list_corpus(str(path), split="dev" if name == "split" else None)
        assert "\n" not in str(err.value)
    (tmp_path / "bad.jsonl").write_bytes(b'{"text": "caf\xe9"}\n')
    (tmp_path / "bad.csv").write_bytes(b"text\ncaf\xe9\n")
    (tmp_path / "num.jsonl").write_text('{"text": 1}\n')
    (tmp_path / "empty.jsonl").write_text("")
    for path, message in (("bad.jsonl", "not valid UTF-8"), ("bad.csv", "not valid UTF-8"), ("num.jsonl", "not text")):
        with pytest.raises(CorpusError, match=message):
            list(iter_documents(str(tmp_path / path)))
    assert list(iter_documents(str(tmp_path / "empty.jsonl"))) == []  # the job then says "no non-empty documents"


# --- Ray conventions, requests the cluster cannot satisfy, configs -------------------------------


def test_address_temp_dir_and_unsatisfiable_requests(monkeypatch):
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")
    assert resolve_address(None) == "10.0.0.1:6379" and resolve_address("auto") == "auto"
    monkeypatch.delenv("RAY_ADDRESS")
    assert resolve_address(None) is None  # embedded
    with pytest.raises(RayClusterError, match="must fit 107 bytes"):
        check_temp_dir("/tmp/" + "x" * 80)
    cpu_nodes = [{"CPU": 2.0, "memory": 8e9}, {"memory": 8e9}]  # a worker and a head with num-cpus 0
    gpu = ActorRequest(num_cpus=0.5, num_gpus=1, memory=None)
    msg = unsatisfiable(gpu, cpu_nodes, None, embedded=True)
    assert "1 GPU" in msg and "0 GPU, 2 CPU" in msg and "--device cpu" in msg
    assert unsatisfiable(gpu, cpu_nodes, [{"GPU": 1, "CPU": 8}], embedded=False) is None  # the autoscaler can add one
    assert unsatisfiable(gpu, cpu_nodes, None, embedded=False) is None  # unknown autoscaler: the bounded wait decides
    assert "--actor-cpus" in unsatisfiable(ActorRequest(100, 0, None), cpu_nodes, [], embedded=False)
    # the pool starts with one actor per GPU share the cluster has now, within --min/--max-actors
    gpu_nodes = [{"GPU": 4.0, "CPU": 16}, {"GPU": 2.0, "CPU": 8}, {"CPU": 0}]
    assert initial_actors(1, None, gpu, gpu_nodes) == 6 and initial_actors(1, 4, gpu, gpu_nodes) == 4
    assert initial_actors(1, None, ActorRequest(1, 0.5, None), gpu_nodes) == 12 and initial_actors(2, None, gpu, []) == 2


def test_ray_start_and_connect_failures_are_one_line(pairs, parquet_corpus, tmp_path):
    # not "--address auto": on a shared machine Ray's auto-discovery finds any running cluster
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    mlm, ar = pairs["modernbert-olmo"]
    base = ["extract", "--mlm", mlm, "--ar", ar, "--corpus", parquet_corpus, "--store", tmp_path / "s"]
    nobody = f"127.0.0.1:{_free_port()}"
    for extra, said in (
        (["--address", nobody], (f"cannot connect to the Ray cluster at '{nobody}'", "ray start --head")),
        (["--ray-temp-dir", "/tmp/" + "y" * 90], ("must fit 107 bytes", "/tmp/ray-maria")),
    ):
        t = time.monotonic()
        res = subprocess.run(maria_command(*base, *extra), capture_output=True, text=True, env=env, timeout=120)
        assert res.returncode == 2 and all(m in res.stderr for m in said), res.stderr[-2000:]
        assert len(res.stderr.strip().splitlines()) == 1 and time.monotonic() - t < 60, res.stderr[-2000:]
    assert not (tmp_path / "s").exists()


def test_command_line_round_trips():
    cfg = ExtractConfig(mlm="m", ar="a", corpus="s3://b/c/", store="s3://b/s", max_docs=10, mask_rate=0.5, actor_gpus=0.5, max_actors=8, trust_remote_code=True)
    line = command_line(cfg)
    assert line.startswith("maria extract --mlm m --ar a") and "--actor-gpus 0.5" in line and "--window-length" not in line
    assert config_from_args(shlex.split(line)[2:]) == cfg


def test_ray_cluster_yaml_matches_rays_schema_and_installs_the_stack():
    import jsonschema
    import ray

    text = (ROOT / "ray_cluster.yaml").read_text()
    cfg = yaml.safe_load(text)
    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    jsonschema.validate(cfg, schema)
    assert cfg["available_node_types"]["head"]["resources"] == {"CPU": 0}
    assert any("--dashboard-host=127.0.0.1" in c for c in cfg["head_start_ray_commands"])
    assert "0.0.0.0" not in text and "github.com" not in text  # no public dashboard, no placeholder URL
    setup = " ".join(cfg["setup_commands"])
    pins = {line.split("==")[0].lower(): line.strip() for line in (ROOT / "requirements.lock").read_text().splitlines() if "==" in line}
    assert "torch==2.13.0" in setup and "-r ~/maria/requirements.lock" in setup and "requirements-dev" not in setup
    assert {"ray", "transformers", "zarr"} <= set(pins) and not {"pytest", "moto", "flask"} & set(pins)  # runtime only
    assert "-e ~/maria" in setup and cfg["file_mounts"]["~/maria"] == "."


def test_kuberay_rayjob_structure_and_entrypoint():
    job = yaml.safe_load((ROOT / "k8s" / "rayjob.yaml").read_text())
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    spec = job["spec"]["rayClusterSpec"]
    assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    gpu_groups = [g for g in spec["workerGroupSpecs"] if any("nvidia.com/gpu" in c["resources"].get("limits", {}) for c in g["template"]["spec"]["containers"])]
    assert gpu_groups and gpu_groups[0]["maxReplicas"] >= 1
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[:2] == ["maria", "extract"] and "--address" not in argv  # KubeRay sets RAY_ADDRESS
    cfg = config_from_args(argv[2:])
    assert cfg.corpus.startswith("s3://") and cfg.store.startswith("s3://") and cfg.device == "auto"


def test_kuberay_rayjob_retries_has_a_deadline_a_hub_token_and_a_model_cache():
    """A retry is safe (the re-run resumes exactly), so KubeRay retries; a hung job ends; backbones are downloaded
    once into a shared cache, with the hub token from an optional secret."""
    job = yaml.safe_load((ROOT / "k8s" / "rayjob.yaml").read_text())
    assert job["spec"]["backoffLimit"] >= 1 and job["spec"]["activeDeadlineSeconds"] > 3600
    pvc = yaml.safe_load((ROOT / "k8s" / "hf-cache.yaml").read_text())
    assert pvc["kind"] == "PersistentVolumeClaim" and "ReadWriteMany" in pvc["spec"]["accessModes"]
    spec = job["spec"]["rayClusterSpec"]
    for pod in [spec["headGroupSpec"]["template"]["spec"]] + [g["template"]["spec"] for g in spec["workerGroupSpecs"]]:
        volumes = {v["name"]: v for v in pod["volumes"]}
        (container,) = pod["containers"]
        env = {e["name"]: e for e in container["env"]}
        mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
        assert volumes["hf-cache"]["persistentVolumeClaim"]["claimName"] == pvc["metadata"]["name"]
        assert env["HF_HOME"]["value"] == mounts["hf-cache"]
        token = env["HF_TOKEN"]["valueFrom"]["secretKeyRef"]
        assert token["optional"] is True and token["name"] == "maria-hf-token"


# --- embedded Ray: the reader on the workers, and fast refusals --------------------------------


@pytest.mark.ray
def test_workers_read_what_the_local_reader_reads(ray_local, parquet_corpus):
    from maria_extract.job import _scan
    from maria_extract.source import read_corpus

    corpus = list_corpus(parquet_corpus)
    assert [Path(f).name for f in corpus.files] == ["part-0.parquet", "part-1.parquet", "part-2.parquet"]
    cfg = ExtractConfig(mlm="m", ar="a", corpus=parquet_corpus, store="o", docs_per_block=3)
    rows, fingerprint = _scan(cfg, corpus)
    assert rows == [5, 4, 5]
    offsets = doc_offsets(rows)
    plan = {f: (offsets[f], rows[f], list(range(0, rows[f], 3))) for f in range(3)}
    got = sorted(read_corpus(corpus, [0, 1, 2], "text", "blocks", 3, plan).take_all(), key=lambda r: r["block_id"])
    assert [r["block_id"] for r in got] == [b for b, *_ in plan_blocks(rows, 3)]
    texts = [t for r in got for t in r["texts"] if t]
    assert texts == list(iter_documents(parquet_corpus))
    assert [int(d) for r in got for d in r["doc_ids"]] == list(range(14))  # every row keeps its id, empty ones too
    _, limited = _scan(ExtractConfig(mlm="m", ar="a", corpus=parquet_corpus, store="o", max_docs=6), corpus)
    assert limited != fingerprint


@pytest.mark.ray
def test_every_format_reads_the_same_on_the_workers(ray_local, formats):
    from maria_extract.job import _scan
    from maria_extract.source import read_corpus

    for (source, split), docs in formats.items():
        corpus = list_corpus(source, split)
        rows, _ = _scan(ExtractConfig(mlm="m", ar="a", corpus=source, split=split, store="o"), corpus)
        plan = {f: (offset, rows[f], [0]) for f, offset in enumerate(doc_offsets(rows)) if rows[f]}
        got = sorted(read_corpus(corpus, sorted(plan), "text", "blocks", 8, plan).take_all(), key=lambda r: r["block_id"])
        assert [t for r in got for t in r["texts"] if t.strip()] == docs, source


@pytest.mark.ray
def test_corpus_on_object_storage_reads_as_the_local_copy(ray_local, s3_endpoint, parquet_corpus):
    import s3fs

    from maria_extract.job import _scan
    from maria_extract.source import read_corpus

    fs = s3fs.S3FileSystem(endpoint_url=s3_endpoint)
    for f in Path(parquet_corpus).iterdir():
        fs.put_file(str(f), f"maria-test/corpus/{f.name}")
    url = "s3://maria-test/corpus/"
    corpus = list_corpus(url)
    assert corpus.files == tuple(f"s3://maria-test/corpus/part-{i}.parquet" for i in range(3))
    assert list(iter_documents(url)) == list(iter_documents(parquet_corpus))
    cfg = ExtractConfig(mlm="m", ar="a", corpus=url, store="o", docs_per_block=3)
    rows, fingerprint = _scan(cfg, corpus)  # read tasks on the workers, through s3fs with the test endpoint
    assert (rows, fingerprint) == _scan(dataclasses.replace(cfg, corpus=parquet_corpus), list_corpus(parquet_corpus))
    plan = {f: (offset, rows[f], [0]) for f, offset in enumerate(doc_offsets(rows))}
    first = sorted(read_corpus(corpus, [0, 1, 2], "text", "blocks", 3, plan).take_all(), key=lambda r: r["block_id"])
    assert [list(r["texts"]) for r in first][0] == list(iter_documents(parquet_corpus))[:3]


@pytest.mark.ray
def test_impossible_requests_fail_at_once_on_embedded_ray(ray_local, pairs, parquet_corpus, tmp_path):
    t = time.monotonic()
    with pytest.raises(RayClusterError, match=r"asks for 1 GPU .* the cluster has .* 0 GPU"):
        run_extract(config(pairs, parquet_corpus, tmp_path / "a", device="cuda"))
    with pytest.raises(RayClusterError, match="100 CPU per backbone actor.*--actor-cpus"):
        run_extract(config(pairs, parquet_corpus, tmp_path / "b", actor_cpus=100))
    assert time.monotonic() - t < 60 and not (tmp_path / "a").exists()


# --- a multi-node cluster on one machine ----------------------------------------------------------


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def fleet():
    """Head (no work, dashboard for job submission on 127.0.0.1) + two 1-CPU worker nodes. RAY_TMPDIR
    is private, so the cluster never registers as this machine's default ("auto") cluster."""
    import shutil
    from types import SimpleNamespace

    from ray._private.utils import get_dashboard_dependency_error

    if get_dashboard_dependency_error():
        pytest.skip("`ray job submit` needs Ray's dashboard: pip install 'ray[default]==2.60.0'")
    from ray.cluster_utils import Cluster

    tmp = tempfile.mkdtemp(prefix="rf", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    os.makedirs(f"{tmp}/ray")
    saved = {k: os.environ.get(k) for k in ("RAY_TMPDIR", "RAY_ADDRESS")}
    os.environ["RAY_TMPDIR"] = tmp
    os.environ.pop("RAY_ADDRESS", None)
    port = _free_port()
    agent = lambda: {"dashboard_agent_listen_port": _free_port()}  # noqa: E731 -- Ray's default 52365 may be taken
    cluster = Cluster(
        initialize_head=True,
        head_node_args={
            "num_cpus": 0,
            "include_dashboard": True,
            "temp_dir": tmp,
            "dashboard_host": "127.0.0.1",
            "dashboard_port": port,
            **agent(),
            # a killed node is declared dead in ~3 s, not ~30 s
            "_system_config": {"health_check_period_ms": 1000, "health_check_timeout_ms": 1000, "health_check_failure_threshold": 2},
        },
    )
    try:
        workers = [cluster.add_node(num_cpus=1, **agent()) for _ in range(2)]
        cluster.wait_for_nodes()
        yield SimpleNamespace(cluster=cluster, workers=workers, address=cluster.address, dashboard=f"http://127.0.0.1:{port}")
    finally:
        cluster.shutdown()
        for k, v in saved.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)
        shutil.rmtree(tmp, ignore_errors=True)


def _actor_node(fleet):
    """The worker node whose raylet started the backbone actor (Ray titles the process after it)."""
    import psutil

    raylets = {w.all_processes["raylet"][0].process.pid: w for w in fleet.workers}
    for p in psutil.process_iter(["cmdline", "ppid"]):
        if "FeatureActor" in " ".join(p.info["cmdline"] or []) and p.info["ppid"] in raylets:
            return raylets[p.info["ppid"]]
    return None


def _preempt_actor_node(fleet, commits: Path, done: threading.Event, log: list):
    """Spot preemption: once the first block is committed, remove the worker node that hosts the
    backbone actor, without a graceful shutdown."""
    while not done.is_set() and not list(commits.glob("*.json")):
        time.sleep(0.2)
    # the actor's node when its process title shows it; else (a loaded machine may lag the title) a worker
    # node all the same, at once: the preemption must land mid-job
    victim = None if done.is_set() else (_actor_node(fleet) or fleet.workers[0])
    if victim is not None:
        log.append(len(list(commits.glob("*.json"))))
        fleet.cluster.remove_node(victim, allow_graceful=False)


@pytest.mark.ray
@pytest.mark.timeout(420)
def test_ray_job_submit_survives_a_lost_worker_node(fleet, ray_local, pairs, parquet_corpus, tmp_path):
    from ray.job_submission import JobSubmissionClient

    reference = config(pairs, parquet_corpus, tmp_path / "embedded")
    run_extract(reference)  # the uninterrupted run, on embedded Ray
    out = tmp_path / "fleet"
    args = shlex.split(command_line(dataclasses.replace(reference, store=str(out))))[1:]
    assert "--address" not in args  # the job finds the cluster through RAY_ADDRESS only
    sid = f"maria-{os.getpid()}-{int(time.time())}"
    submit = [
        str(Path(sys.executable).parent / "ray"),
        "job",
        "submit",
        "--address",
        fleet.dashboard,
        "--submission-id",
        sid,
        "--",
        *fault_command(Faults(sleep_s=2), *args),
    ]
    done, preempted = threading.Event(), []
    killer = threading.Thread(target=_preempt_actor_node, args=(fleet, out / "commits", done, preempted), daemon=True)
    killer.start()
    try:
        res = subprocess.run(submit, capture_output=True, text=True, timeout=360)
    finally:
        done.set()
        killer.join(60)
    assert "succeeded" in res.stdout, res.stdout[-3000:] + res.stderr[-1500:]
    status = JobSubmissionClient(fleet.dashboard).get_job_status(sid)
    logs = subprocess.run(
        [str(Path(sys.executable).parent / "ray"), "job", "logs", "--address", fleet.dashboard, sid], capture_output=True, text=True, timeout=120
    ).stdout
    assert str(status).endswith("SUCCEEDED"), res.stdout[-3000:] + res.stderr[-2000:]
    assert preempted and preempted[0] < 6, f"the actor's node was not removed mid-job ({preempted})"
    assert "(from RAY_ADDRESS)" in logs and "backbone actor on cpu" in logs  # worker output reaches `ray job logs`
    assert "blocks, " in logs and "maria extract: done" in logs
    verify = subprocess.run(maria_command("verify", "--store", out), capture_output=True, text=True, timeout=120)
    assert verify.returncode == 0, verify.stdout + verify.stderr
    same_store(reference.store, out)
    assert len(read_all(str(out))[block_id(2, 3)]["targets"]) == 0  # documents too short for a window: an empty block


@pytest.mark.ray
def test_cluster_that_cannot_place_an_actor_fails_in_bounded_time(fleet, pairs, parquet_corpus, tmp_path):
    env = {**os.environ, "RAY_ADDRESS": fleet.address}
    args = shlex.split(command_line(config(pairs, parquet_corpus, tmp_path / "s", device="cuda", actor_start_timeout_s=5)))[1:]
    t = time.monotonic()
    res = subprocess.run(maria_command(*args), capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 2 and "placed no backbone actor within" in res.stderr and "1 GPU" in res.stderr, res.stderr[-2000:]
    assert len(res.stderr.strip().splitlines()) == 1 and time.monotonic() - t < 90
