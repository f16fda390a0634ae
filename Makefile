# Nestor: `make run` and `make test` are the whole quick start on a fresh machine.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install run demo test test-gpu gpu-wheels lint bench clean

# pyproject.toml declares the torch releases Nestor supports (>=2.10,<2.14), so installing it
# into an environment that has a CUDA torch keeps that torch; constraints.txt pins what the
# venv and CI test on: 2.13.0 (a CPU build pip takes from this machine's disk).
$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[dev]'
	$(BIN)/python -m service.vendor
	touch $(STAMP)

install: $(STAMP)

# The service on the embedded defaults: SQLite and runs in NESTOR_HOME (~/.nestor), a local
# Ray it starts, http://127.0.0.1:8000 (docs at /docs). Ctrl-C stops it and its Ray.
run: install
	$(BIN)/nestor serve

demo: install
	$(BIN)/python -m workers.demo

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# Where torch sees a CUDA device this runs the CUDA tier (tests/gpu) too; elsewhere the tier
# is deselected, in one line of the summary.
test: install lint
	$(BIN)/python -m pytest

# The CUDA tier alone. No `install`: a GPU machine may have no venv and no package index, only
# its own Python with torch (tests/gpu/README.md: the wheels it needs, and the one command).
# Where torch sees no CUDA device every test is deselected and pytest exits 5: a tier that ran
# nothing fails, it never looks green.
GPU_PYTHON := $(if $(wildcard $(BIN)/python),$(BIN)/python,python3)
test-gpu:
	@$(GPU_PYTHON) -m pytest -m cuda tests/gpu; status=$$?; \
	if [ $$status -eq 5 ]; then \
		echo "make test-gpu: no CUDA test ran (no CUDA device): this is not a pass" >&2; \
	fi; \
	exit $$status

# The pure-Python wheels the CUDA tier and bench/optimizers.py need on a GPU machine that has
# no package index, into .whl/ (tests/gpu/README.md).
gpu-wheels:
	tests/gpu/wheels.sh

bench: install
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[dev,bench]'
	$(BIN)/python bench/optimizers.py
	$(BIN)/python bench/optimizers.py --lowbit
	$(BIN)/python bench/state_memory.py
	$(BIN)/python bench/zero.py
	$(BIN)/python bench/restore.py
	$(BIN)/python bench/elastic.py
	$(BIN)/python bench/throughput.py
	$(BIN)/python bench/startup.py
	$(BIN)/python bench/service.py
	$(BIN)/python bench/service_start.py
	$(BIN)/python bench/load.py
	$(BIN)/python bench/artifacts.py
	$(BIN)/python bench/data.py
	$(BIN)/python bench/data.py --model mnist1d-cnn
	$(BIN)/python bench/sweep.py
	$(BIN)/python bench/dashboard.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info
