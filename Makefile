# The README's two commands: `make demo` (main job, offline) and `make test` (the suite).
# Both create .venv on first use: CPU torch pinned by constraints.txt (so no dependency can
# swap in a multi-GB CUDA build), the package with its dev + SAEBench extras, and no torchvision
# (the PyPI wheel is built against CUDA torch and breaks `transformers` on CPU torch).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
export PIP_CONSTRAINT := $(CURDIR)/constraints.txt
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export WANDB_MODE := disabled
export TOKENIZERS_PARALLELISM := false

.PHONY: setup demo test lint bench-quick clean

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[dev,saebench]"
	$(BIN)/pip uninstall -y -q torchvision || true
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(BIN)/itda-lens demo --out itda_report --overwrite

test: setup
	$(BIN)/python -m pytest -q

lint: setup
	$(BIN)/ruff check itda_lens tests benchmarks
	$(BIN)/ruff format --check itda_lens tests benchmarks

clean:
	rm -rf $(VENV) itda_report .pytest_cache
