# tactful: `make serve` and `make test` are all a fresh machine needs (Python 3.11 on PATH).
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PROTOS := $(wildcard proto/tactful/v1/*.proto)
STUBS := $(patsubst proto/%.proto,src/%_pb2.py,$(PROTOS))
# The last released tactful.v1 contract: `buf breaking` compares proto/ with it (buf.yaml
# says how to update it on a release).
RELEASED := proto/released/tactful-v1.binpb

.DEFAULT_GOAL := help
.PHONY: help setup proto promtool serve test lint typecheck docs bench loadtest clean

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml src/tactful/_slate.pyx src/tactful/_features.pyx
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

$(STUBS) &: $(PROTOS) $(STAMP)
	$(BIN)/python -m grpc_tools.protoc -Iproto --python_out=src --pyi_out=src --grpc_python_out=src $(PROTOS)
	touch $(STUBS)

setup: $(STAMP) $(STUBS) ## create .venv, install, generate the gRPC stubs

proto: $(STUBS) ## regenerate the gRPC stubs from proto/

# promtool checks and unit-tests deploy/prometheus/alerts.yml (tests/test_deploy.py). No PyPI
# package ships it; Debian's `prometheus` package does. Installed only when missing, as root,
# with apt-get; never fails the build (the tests then skip, loudly). The package's prometheus
# binary is used too: tests/test_dashboard_live.py runs one on a free port, for its duration,
# to query every dashboard panel and alert rule. No Prometheus *service* is ever wanted: a
# policy-rc.d that denies service starts is put in place for the
# install when the system has none (Debian's container images have one), and the service the
# package installs is then stopped and disabled in case it was started anyway.
promtool: ## install promtool (Debian package prometheus) if missing: root and apt-get only
	@if command -v promtool >/dev/null 2>&1; then exit 0; fi; \
	warn() { printf '\n*** %s\n*** the promtool tests in tests/test_deploy.py will be SKIPPED\n\n' "$$1" >&2; }; \
	if [ "$$(id -u)" != 0 ]; then warn "promtool is not on PATH and this is not root: not installing it"; exit 0; fi; \
	if ! command -v apt-get >/dev/null 2>&1; then warn "promtool is not on PATH and there is no apt-get: not installing it"; exit 0; fi; \
	policy=/usr/sbin/policy-rc.d; \
	if [ ! -e "$$policy" ]; then \
		trap 'rm -f "$$policy"' EXIT; printf '#!/bin/sh\nexit 101\n' > "$$policy"; chmod 755 "$$policy"; fi; \
	apt_install() { DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
		-o DPkg::Lock::Timeout=300 prometheus >/dev/null; }; \
	echo "promtool: apt-get install --no-install-recommends prometheus"; \
	apt_install || { apt-get update -q -o DPkg::Lock::Timeout=300 >/dev/null && apt_install; }; \
	status=$$?; \
	if [ $$status != 0 ] || ! command -v promtool >/dev/null 2>&1; then \
		warn "could not install promtool with apt-get (package prometheus)"; exit 0; fi; \
	if [ -d /run/systemd/system ] && command -v systemctl >/dev/null 2>&1; then \
		systemctl disable --now prometheus.service >/dev/null 2>&1 || true; \
	elif [ -x /etc/init.d/prometheus ]; then \
		/etc/init.d/prometheus stop >/dev/null 2>&1 || true; \
		update-rc.d prometheus disable >/dev/null 2>&1 || true; fi; \
	promtool --version 2>&1 | head -1

# Development: no API keys, so authentication is off (the server says so loudly). A real
# deployment sets TACTFUL_API_KEYS instead (docs/operations.md, "Security"). Two worker processes by
# default, so development runs the supervisor, SO_REUSEPORT and summed /metrics as the
# container does; two, not one per CPU, because redis-server and the client need CPU too on
# a laptop. `TACTFUL_WORKERS=1 make serve` runs one process. Server reflection on, so
# grpcurl needs no .proto files (off by default, and in the container and Kubernetes).
TACTFUL_WORKERS ?= 2
serve: setup ## start tactful on :50051 (metrics :9464), 2 worker processes, embedded redis-server in .tactful/, no auth, reflection on
	TACTFUL_AUTH_DISABLED=true TACTFUL_GRPC_REFLECTION=true TACTFUL_WORKERS=$(TACTFUL_WORKERS) $(BIN)/python -m tactful serve

test: setup promtool ## lint (ruff, buf lint and breaking), type-check and run the test suite (starts its own redis-servers)
	$(BIN)/ruff check
	$(BIN)/ruff format --check src tests bench loadtests
	$(BIN)/buf lint
	$(BIN)/buf breaking --against $(RELEASED)
	$(BIN)/mypy
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: setup ## ruff on the Python, buf lint and buf breaking on the protos
	$(BIN)/ruff check
	$(BIN)/ruff format --check src tests bench loadtests
	$(BIN)/buf lint
	$(BIN)/buf breaking --against $(RELEASED)

typecheck: setup ## mypy only
	$(BIN)/mypy

docs: setup ## regenerate docs/configuration.md from the settings (tests/test_readme.py checks it)
	$(BIN)/python docs/gen_configuration.py

bench: setup ## Decide latency next to a bare gRPC echo server, measured in the same run
	$(BIN)/python bench/decide_latency.py

loadtest: setup ## short headless Locust run against a server this target starts
	$(BIN)/python loadtests/run.py

clean: ## remove the environment, generated stubs and embedded data
	rm -rf $(VENV) .tactful src/tactful/v1/*_pb2*.py src/tactful/v1/*_pb2*.pyi
