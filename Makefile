# Nestor: `make run` and `make test` are the whole quick start on a fresh machine.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install run demo test lint bench clean

# torch is pinned to 2.13.0 in pyproject.toml (a CPU build pip takes from this machine's disk).
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
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

test: install lint
	$(BIN)/python -m pytest

bench: install
	$(BIN)/python -m pip install -q -e '.[dev,bench]'
	$(BIN)/python bench/optimizers.py
	$(BIN)/python bench/zero.py
	$(BIN)/python bench/restore.py
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
