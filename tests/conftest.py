import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).parent))

import pytest  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

transformers.utils.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()
torch.set_num_threads(2)


@pytest.fixture(scope="session")
def pairs(tmp_path_factory):
    """Tiny random (mlm, ar) folder pairs, saved and loaded like real checkpoints."""
    from tiny import build_pair

    root = tmp_path_factory.mktemp("backbones")
    return {kind: build_pair(root, kind) for kind in ("modernbert-olmo", "bert-gpt2")}


def pytest_collection_modifyitems(config, items):
    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs a CUDA GPU; CI and this machine have none")
        for item in items:
            if item.get_closest_marker("gpu"):  # the marker, not a keyword: a checkout in a folder named gpu has that keyword
                item.add_marker(skip)


@pytest.fixture(scope="session")
def s3_endpoint():
    """A local S3-compatible server (moto) for the session; its endpoint and test credentials go
    into the environment before Ray starts, so Ray's workers reach the same server."""
    moto_server = pytest.importorskip("moto.server", reason="moto[server] is not installed")
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    url = f"http://{host}:{port}"
    os.environ.update({"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1", "MARIA_S3_ENDPOINT_URL": url})
    import s3fs

    s3fs.S3FileSystem(endpoint_url=url).mkdir("maria-test")
    yield url
    server.stop()


@pytest.fixture(scope="session")
def ray_local(tmp_path_factory, s3_endpoint):
    """One embedded Ray (2 CPUs, no dashboard, logs in the test's temp folder) for the session."""
    import ray

    from maria_extract.cluster import init_ray

    init_ray(None, str(tmp_path_factory.mktemp("ray")), num_cpus=2)
    yield
    ray.shutdown()


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    import json

    from tiny import CORPUS

    path = tmp_path_factory.mktemp("corpus") / "docs.jsonl"
    docs = [" ".join(CORPUS[i : i + 1 + i % 3]) for i in range(12)] + ["   "]  # a whitespace doc: an empty last block
    path.write_text("".join(json.dumps({"text": d, "n": i}) + "\n" for i, d in enumerate(docs)))
    return str(path)


@pytest.fixture(scope="session")
def store_a(ray_local, pairs, corpus, tmp_path_factory):
    """An uninterrupted extraction: the reference the fault tests compare against."""
    from extract_fixtures import config

    from maria_extract.job import run_extract

    out = tmp_path_factory.mktemp("stores") / "a"
    summary = run_extract(config(pairs, corpus, out))
    assert summary["blocks"] == 5 and summary["rows"] > 0
    return out
