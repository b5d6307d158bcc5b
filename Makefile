# The README's two commands: `make demo` (main job, offline) and `make test` (the suite).
# Both create .venv on first use: CPU torch pinned by constraints.txt (so no dependency can
# swap in a multi-GB CUDA build), the package with its dev + SAEBench + nnsight (nnsight, accelerate)
# extras, and no torchvision (the PyPI wheel is built against CUDA torch and breaks `transformers` on
# CPU torch).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
export PIP_CONSTRAINT := $(CURDIR)/constraints.txt
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export WANDB_MODE := disabled
export TOKENIZERS_PARALLELISM := false

.PHONY: setup browser demo test lint check-install clean

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[dev,saebench,nnsight]"
	$(BIN)/pip uninstall -y -q torchvision || true
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(BIN)/itda-lens demo --out itda_report --overwrite

# Headless Chromium for the dashboard's browser tests, from Debian (needs root); without it those
# tests skip and say how to install it.
browser:
	@command -v chromium >/dev/null 2>&1 || apt-get install -y -q chromium >/dev/null 2>&1 \
	  || (apt-get update -q >/dev/null 2>&1 && apt-get install -y -q chromium >/dev/null 2>&1) \
	  || echo "note: could not install chromium (needs root on Debian); the browser tests will skip"

test: setup browser
	$(BIN)/python -m pytest -q --durations=15

lint: setup
	$(BIN)/ruff check itda_lens tests benchmarks
	$(BIN)/ruff format --check itda_lens tests benchmarks

# A plain `pip install .` (no extras, CPU torch pinned as above) in a throwaway venv: the CLI must
# start and build without the dev / SAEBench extras.
check-install:
	rm -rf /tmp/itda_check_install && $(PYTHON) -m venv /tmp/itda_check_install
	/tmp/itda_check_install/bin/pip install -q torch==2.13.0
	/tmp/itda_check_install/bin/pip install -q .
	/tmp/itda_check_install/bin/pip uninstall -y -q torchvision || true
	cd /tmp && /tmp/itda_check_install/bin/itda-lens --help > /dev/null
	cd /tmp && /tmp/itda_check_install/bin/itda-lens build --hook blocks.1.hook_resid_post \
		--max-tokens 4096 --k 8 --out /tmp/itda_check_install/itda
	cd /tmp && /tmp/itda_check_install/bin/itda-lens inspect /tmp/itda_check_install/itda --top 3
	@echo "check-install: a plain install builds and inspects an ITDA"

clean:
	rm -rf $(VENV) itda_report .pytest_cache
