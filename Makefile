# Two entry points: `make demo` and `make test`. Both build .venv once; it is rebuilt
# only when pyproject.toml changes.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup demo test lint stack-up stack-down stack-status stack-stop stack-start stack-restart pipelines-up pipelines-down bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python pipelines/demo.py

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -v --durations=20 tests

lint: $(STAMP)
	$(BIN)/ruff check .

# make stack-up DB=postgres: MLflow on PostgreSQL instead of SQLite
DB ?= sqlite
stack-up: $(STAMP)
	$(BIN)/python -m infra.local.stack up --db $(DB)

stack-down: $(STAMP)
	$(BIN)/python -m infra.local.stack down

stack-status: $(STAMP)
	$(BIN)/python -m infra.local.stack status

# One service, on its ports and data: make stack-restart SERVICE=mlflow (s3, mlflow, ray)
stack-stop stack-start stack-restart: $(STAMP)
	$(BIN)/python -m infra.local.stack $(@:stack-%=%) $(SERVICE)

# Dagster's daemon and webserver (UI on 127.0.0.1:3000) over .dagster; with the stack's
# variables (source .stack/env) their steps run on the stack's Ray cluster. DB=postgres:
# runs, events and schedules in the stack's PostgreSQL (make stack-up DB=postgres).
pipelines-up: $(STAMP)
	$(BIN)/python -m infra.local.dagster up --db $(DB)

pipelines-down: $(STAMP)
	$(BIN)/python -m infra.local.dagster down

clean:
	rm -rf $(VENV) .stack
