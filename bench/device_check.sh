#!/usr/bin/env bash
# The prepared device check (README "The device check"), from the repository root of a plain checkout:
#   bash bench/device_check.sh --prepare      # here, once: copy pytest and its pure-Python dependencies into
#                                             # .device-wheels/ (git-ignored, ~12 MB) for an image without pytest
#   bash bench/device_check.sh [FLAGS]        # on the lent machine: GPU-marked tests, then the paper preset in bf16
# FLAGS go to `python -m maria_bench.device_check` (--dry-run: the CPU rehearsal). Results go to $OUT (the device
# tool's folder that comes back), else results/device. No pip install: the rooms are made importable under their
# maria_* names by a temporary folder of symlinks on PYTHONPATH; the image's torch and transformers are used as they are.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PYTHON=${PYTHON:-python3}

if [ "${1:-}" = "--prepare" ]; then
    [ -x .venv/bin/python ] && PYTHON=${PYTHON_PREPARE:-.venv/bin/python}  # the project's test tools
    rm -rf .device-wheels && mkdir .device-wheels
    "$PYTHON" - <<'PY'
import importlib.metadata as md
import shutil
from pathlib import Path

for name in ("pytest", "pluggy", "iniconfig", "pygments", "packaging", "pytest-timeout"):
    dist = md.distribution(name)
    for f in dist.files:
        if f.parts[0] == ".." or "__pycache__" in f.parts:  # console scripts live outside site-packages; bytecode is rebuilt
            continue
        dest = Path(".device-wheels", f)
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(dist.locate_file(f), dest)
print(f"copied into .device-wheels: {sum(p.stat().st_size for p in Path('.device-wheels').rglob('*') if p.is_file()) / 1e6:.1f} MB")
PY
    exit 0
fi

LINKS=$(mktemp -d)
trap 'rm -rf "$LINKS"' EXIT
for pair in maria:maria maria_storage:storage maria_extract:extract maria_train_head:train_head maria_defaults:defaults \
            maria_bench:bench maria_app:app; do
    ln -s "$ROOT/${pair#*:}" "$LINKS/${pair%%:*}"
done
export PYTHONPATH="$LINKS${PYTHONPATH:+:$PYTHONPATH}"
if ! "$PYTHON" -c "import pytest" 2>/dev/null && [ -d .device-wheels ]; then
    export PYTHONPATH="$PYTHONPATH:$ROOT/.device-wheels"  # after everything the image has
fi
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONDONTWRITEBYTECODE=1
exec "$PYTHON" -m maria_bench.device_check --out "${OUT:-$ROOT/results/device}" --tests "$@"
