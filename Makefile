# memkv — developer entry points. Every target that needs the
# venv first runs scripts/bootstrap.sh (idempotent; fast when nothing changed).

SHELL := /bin/bash
.SHELLFLAGS := -euo pipefail -c
.DEFAULT_GOAL := help

VENV    ?= .venv
PY      := $(VENV)/bin/python
MEMKV   := $(VENV)/bin/memkv
# per-test timeout in seconds (pytest-timeout); extra pytest args: make test PYTEST_ARGS='-k foo -x'
TEST_TIMEOUT ?= 120
PYTEST_ARGS  ?=
# extra bench args: make bench BENCH_ARGS=--quick
BENCH_ARGS   ?=

.PHONY: help install install-vllm install-engines test lint demo demo-vllm bench chaos soak fuzz compose-up compose-down test-rdma clean

help:
	@echo "make install      set up Debian packages + .venv (scripts/bootstrap.sh)"
	@echo "make install-engines  .venv-vllm, .venv-lmcache, .venv-sglang for the engine tests (scripts/engine-venv.sh)"
	@echo "make test         pytest + ruff + import contracts (what CI runs; includes the engine tests)"
	@echo "make demo         run the end-to-end demo"
	@echo "make demo-vllm    the demo with two vLLM engine processes (memkv demo --engine vllm)"
	@echo "make bench        single-node benchmark vs Redis (BENCH_ARGS=--quick)"
	@echo "make lint         ruff check + import contracts (lint-imports)"
	@echo "make compose-up   docker-compose cluster (offline image build); make compose-down stops it"
	@echo "make chaos        every chaos scenario (CHAOS_TARGET=local|compose), report in chaos/results/"
	@echo "make soak         random overlapping faults under load (SOAK_SEED=1 SOAK_MINUTES=3), docs/chaos.md"
	@echo "make fuzz         atheris harnesses + long hypothesis fuzz runs (FUZZ_SECONDS=120 per harness)"
	@echo "make test-rdma    RDMA transport suite under Soft-RoCE in a qemu VM"

install:
	bash scripts/bootstrap.sh

# vLLM, LMCache and SGLang are tested with the real packages, each in its own venv
# .venv-<engine> (scripts/engine-venv.sh says why). MEMKV_SKIP_ENGINE_TESTS=1 skips
# installing and running them, and says so.
ENGINE_VENVS ?= vllm lmcache sglang
install-vllm: install
	bash scripts/engine-venv.sh vllm

install-engines: install
	@if [ "$${MEMKV_SKIP_ENGINE_TESTS:-0}" = 1 ]; then echo "MEMKV_SKIP_ENGINE_TESTS=1: not installing $(ENGINE_VENVS)" >&2; \
	else for e in $(ENGINE_VENVS); do bash scripts/engine-venv.sh $$e || { echo "make install-engines: building .venv-$$e failed (scripts/engine-venv.sh $$e; log above)" >&2; exit 1; }; done; fi

# pytest exit code 5 (no tests collected) is a failure here, as is any other non-zero.
test: install install-engines
	@rc=0; $(PY) -m pytest -q --timeout=$(TEST_TIMEOUT) $(PYTEST_ARGS) tests || rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test: pytest collected no tests -> FAIL" >&2; exit 1; fi; \
	if [ $$rc -ne 0 ]; then echo "make test: pytest failed (exit $$rc)" >&2; exit $$rc; fi
	@if [ "$${MEMKV_SKIP_ENGINE_TESTS:-0}" = 1 ]; then echo "make test: MEMKV_SKIP_ENGINE_TESTS=1: $(ENGINE_VENVS) tests SKIPPED" >&2; \
	else for e in $(ENGINE_VENVS); do rc=0; \
	  .venv-$$e/bin/python -m pytest -q --timeout=$(TEST_TIMEOUT) tests/venv_$$e || rc=$$?; \
	  if [ $$rc -eq 5 ]; then echo "make test: $$e: pytest collected no tests -> FAIL" >&2; exit 1; fi; \
	  if [ $$rc -ne 0 ]; then echo "make test: $$e tests failed (exit $$rc)" >&2; exit $$rc; fi; \
	done; fi
	$(PY) -m ruff check .
	$(PY) scripts/lint_imports.py

# ruff, then the layer contracts of pyproject.toml [tool.importlinter] (scripts/lint_imports.py)
lint: install
	$(PY) -m ruff check .
	$(PY) scripts/lint_imports.py

demo: install
	$(MEMKV) demo

demo-vllm: install-vllm
	$(MEMKV) demo --engine vllm

bench: install
	$(PY) -m bench.run $(BENCH_ARGS)

# chaos suite, every scenario (docs/chaos.md): CHAOS_TARGET=local (processes
# started here, in a private netns) or compose (builds the images with
# compose/build-offline.sh -- starts dockerd if needed, reuses cached images -- then a
# fresh deployment per scenario with MEMKV_RESTART_POLICY=no, torn down at the end);
# JSON report under chaos/results/. CHAOS_ARGS e.g. --set lease_ttl=3, --keep-deployment
CHAOS_TARGET ?= local
CHAOS_ARGS   ?=
chaos: install
	$(PY) -m chaos all --target $(CHAOS_TARGET) $(CHAOS_ARGS)

# soak (docs/chaos.md): one cluster, a seeded schedule of overlapping faults under load for
# SOAK_MINUTES, the checker over the whole history; CI runs the default (3 min, seed 1: the
# shortest that injects every kind).
# SOAK_ARGS e.g. --set deletes=0.3, --set kinds=kill9,net_clients, --keep
SOAK_SEED    ?= 1
SOAK_MINUTES ?= 3
SOAK_ARGS    ?=
soak: install
	$(PY) -m chaos soak --seed $(SOAK_SEED) --minutes $(SOAK_MINUTES) $(SOAK_ARGS)

# fuzzing at the edges, the long runs (docs/chaos.md "Fuzzing"): the atheris harnesses of
# tests/fuzz/ for FUZZ_SECONDS each (RESP against a live node, config files, tenants.json, segment recovery),
# then the hypothesis fuzz tests with larger example counts. make test runs the short ones.
FUZZ_SECONDS ?= 120
FUZZ_ARGS    ?=
fuzz: install
	$(PY) tests/fuzz/run.py --seconds $(FUZZ_SECONDS) $(FUZZ_ARGS)

# docker-compose deployment (compose/, docs/deployment.md): builds
# the images offline (debootstrap base + host wheelhouse; starts dockerd if needed),
# brings etcd + 3 nodes + the load generator up, waits until healthy, prints status.
# compose-down keeps the data volumes: make compose-down COMPOSE_DOWN_ARGS=-v drops them.
COMPOSE_DOWN_ARGS ?=
compose-up: install
	bash compose/up.sh

compose-down:
	bash compose/down.sh $(COMPOSE_DOWN_ARGS)

# RDMA transport suite for real: Soft-RoCE (rdma_rxe) in a qemu VM built from the
# Debian archive and cached in ~/.cache/memkv-rxe (tests/rdma/). Prints SKIP with
# the reason (exit 0) where qemu or the archive is unavailable.
test-rdma: install
	bash tests/rdma/run.sh

clean:
	rm -rf .pytest_cache .ruff_cache .hypothesis build dist *.egg-info bench/results/tmp
