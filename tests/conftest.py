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
            if "gpu" in item.keywords:
                item.add_marker(skip)
