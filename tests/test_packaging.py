"""What an install gives a researcher: only maria* import names, compatible ranges (no pins) that admit
Python 3.11-3.13 and the GPU image's torch/transformers, and `from maria import ...` as documented."""

import os
import re
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def test_ranges_not_pins_and_python_311_to_313():
    deps = PYPROJECT["dependencies"] + [d for extra in PYPROJECT["optional-dependencies"].values() for d in extra]
    assert not [d for d in deps if "==" in d], "pyproject.toml pins exactly; the locks hold exact versions"
    from packaging.specifiers import SpecifierSet

    python = SpecifierSet(PYPROJECT["requires-python"])
    assert all(v in python for v in ("3.11.7", "3.12.1", "3.13.0")) and "3.10.12" not in python
    lower = {"torch": "2.11.0", "transformers": "5.17.0"}  # the lent GPU image
    for d in PYPROJECT["dependencies"]:
        name = re.split(r"[<>=\[ ;]", d, maxsplit=1)[0]
        if name in lower:
            assert lower[name] in SpecifierSet(d[len(name) :]), f"{d} excludes the GPU image's {name} {lower[name]}"


def test_a_built_wheel_installs_only_maria_import_names(tmp_path):
    # from a copy of the source: setuptools reuses a build/ folder, where files since deleted would linger
    src = shutil.copytree(
        ROOT,
        tmp_path / "src",
        ignore=shutil.ignore_patterns(".git", ".venv", ".lower-bounds", "build", "runs", "results", "*.egg-info", "__pycache__", ".device-wheels"),
    )
    out = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(tmp_path), str(src)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )
    assert out.returncode == 0, out.stderr[-2000:]
    (wheel,) = tmp_path.glob("maria_infill-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names if not n.split("/")[0].endswith((".dist-info", ".data"))}
    assert top == {"maria", "maria_storage", "maria_extract", "maria_train_head", "maria_defaults", "maria_bench", "maria_app"}
    assert "maria/modeling_maria.py" in names and "maria_storage/store.py" in names and not [n for n in names if "tests/" in n]
    entry = next(n for n in names if n.endswith("entry_points.txt"))
    assert "maria = maria_app.cli:main" in zipfile.ZipFile(wheel).read(entry).decode()


def test_public_names():
    import maria

    assert {"MariaModel", "MariaConfig", "export", "__version__"} <= set(dir(maria)) and maria.__version__


@pytest.mark.skipif(not os.environ.get("MARIA_LOWER_BOUNDS"), reason="only in `make test-lower`")
def test_the_lower_bound_run_really_runs_on_the_lower_bounds():
    from importlib.metadata import version

    import huggingface_hub
    import transformers

    want = dict(line.split("==") for line in Path(os.environ["MARIA_LOWER_BOUNDS"]).read_text().split() if "==" in line)
    have = {"transformers": transformers.__version__, "huggingface_hub": huggingface_hub.__version__}
    assert have == {k: want[k] for k in have} and version("maria-infill")
