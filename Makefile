# tactful: `make serve` and `make test` are all a fresh machine needs (Python 3.11 on PATH).
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PROTOS := $(wildcard proto/tactful/v1/*.proto)
STUBS := $(patsubst proto/%.proto,src/%_pb2.py,$(PROTOS))

.DEFAULT_GOAL := help
.PHONY: help setup proto serve test lint typecheck bench loadtest clean

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

$(STUBS) &: $(PROTOS) $(STAMP)
	$(BIN)/python -m grpc_tools.protoc -Iproto --python_out=src --pyi_out=src --grpc_python_out=src $(PROTOS)
	touch $(STUBS)

setup: $(STAMP) $(STUBS) ## create .venv, install, generate the gRPC stubs

proto: $(STUBS) ## regenerate the gRPC stubs from proto/

serve: setup ## start tactful on :50051 (metrics :9464) with an embedded redis-server in .tactful/
	$(BIN)/python -m tactful serve

test: setup ## lint (ruff, buf), type-check and run the test suite (starts its own redis-servers)
	$(BIN)/ruff check
	$(BIN)/ruff format --check src tests bench loadtests
	$(BIN)/buf lint
	$(BIN)/mypy
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: setup ## ruff on the Python, buf on the protos
	$(BIN)/ruff check
	$(BIN)/ruff format --check src tests bench loadtests
	$(BIN)/buf lint

typecheck: setup ## mypy only
	$(BIN)/mypy

bench: setup ## Decide latency next to a bare gRPC echo server, measured in the same run
	$(BIN)/python bench/decide_latency.py

loadtest: setup ## short headless Locust run against a server this target starts
	$(BIN)/python loadtests/run.py

clean: ## remove the environment, generated stubs and embedded data
	rm -rf $(VENV) .tactful src/tactful/v1/*_pb2*.py src/tactful/v1/*_pb2*.pyi
