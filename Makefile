# Developer and CI entry points (CONTRACT.md): make install | run | test | lint | clean.
# Every path is relative to this directory; override variables on the command line, e.g.
#   make run RECSYS_MODEL_STORE=/tmp/models PORT=8080      make test PYTEST_ARGS='-k redis -x'

SHELL := bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help
.DELETE_ON_ERROR:
MAKEFLAGS += --no-builtin-rules

# The interpreter the venv is made from: python3.11 when on PATH, else python3 (checked >= 3.11).
PYTHON ?= $(shell command -v python3.11 2>/dev/null || command -v python3 2>/dev/null)
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

# The model `make run` trains (when it has no version yet) and serves; exported so that
# recsys-serve reads the same store.
RECSYS_MODEL_STORE ?= model_store
RECSYS_MODEL_NAME ?= default
export RECSYS_MODEL_STORE RECSYS_MODEL_NAME
MODEL_DIR := $(RECSYS_MODEL_STORE)/$(RECSYS_MODEL_NAME)
HOST ?= 127.0.0.1
PORT ?= 8000
PYTEST_ARGS ?=

# Trained versions of MODEL_DIR: positive-integer subdirectories holding a saved_model.pb (an empty
# directory is only an exporter's claim on a number, not a model). Decided when the Makefile is
# read, so that `make -n run` shows whether it would train.
no-digits = $(subst 9,,$(subst 8,,$(subst 7,,$(subst 6,,$(subst 5,,$(subst 4,,$(subst 3,,$(subst 2,,$(subst 1,,$(subst 0,,$(1)))))))))))
MODEL_VERSIONS := $(foreach v,$(notdir $(patsubst %/saved_model.pb,%,$(wildcard $(MODEL_DIR)/*/saved_model.pb))),$(if $(call no-digits,$(v)),,$(if $(subst 0,,$(v)),$(v))))

.PHONY: help install train run test lint lock clean clean-models chaos bench bench-quality

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(firstword $(MAKEFILE_LIST)) \
		| awk -F':.*## ' '{printf "  make %-13s %s\n", $$1, $$2}'

install: $(STAMP) ## create the venv (VENV, default .venv) and install the project with its dev extra

$(BIN)/python:
	@test -n "$(PYTHON)" || { echo "error: neither python3.11 nor python3 is on PATH" >&2; exit 1; }
	@"$(PYTHON)" -c 'import sys; sys.exit(sys.version_info < (3, 11))' || { \
		echo "error: $(PYTHON) is Python $$("$(PYTHON)" -c 'import platform; print(platform.python_version())'); this project needs >= 3.11 (make PYTHON=/path/to/python3.11 ...)" >&2; \
		exit 1; }
	"$(PYTHON)" -m venv $(VENV)

# Re-installs only when pyproject.toml is newer than the stamp.
$(STAMP): pyproject.toml | $(BIN)/python
	@$(BIN)/python -c 'import sys; sys.exit(sys.version_info < (3, 11))' || { \
		echo "error: $(VENV) has Python < 3.11; remove it and run make install again" >&2; exit 1; }
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet --progress-bar off -e '.[dev]'
	@touch $@

train: $(STAMP) ## train a new version of the model on synthetic data
	$(BIN)/recsys-train --data synthetic --model-store $(RECSYS_MODEL_STORE) --name $(RECSYS_MODEL_NAME)

# Redis: recsys-serve uses RECSYS_REDIS_URL when set, else starts a private one itself.
run: $(STAMP) $(if $(MODEL_VERSIONS),,train) ## train if no model yet, then serve on HOST:PORT
	OPENBLAS_NUM_THREADS=1 $(BIN)/recsys-serve --host $(HOST) --port $(PORT)

# The fixtures start a private Redis on a free port; nothing else needs to be running.
test: $(STAMP) ## run the whole test suite
	OPENBLAS_NUM_THREADS=1 $(BIN)/pytest $(PYTEST_ARGS)

# Chaos run: one real recsys-serve under load while Redis dies and comes back and new (and
# broken) versions appear; about two minutes. E.g. make chaos CHAOS_ARGS='--phase-seconds 20'
CHAOS_ARGS ?=
chaos: $(STAMP) ## chaos run: load while Redis dies/returns and versions appear (CHAOS_ARGS)
	OPENBLAS_NUM_THREADS=1 $(BIN)/python bench/chaos.py $(CHAOS_ARGS)

# Serving benchmark: trains/derives the benchmark models under bench/.store/ when missing (a few
# minutes, once), then a few minutes of scenarios; prints one table. E.g.
#   make bench BENCH_ARGS='--duration 5 --skip-1m'
BENCH_ARGS ?=
bench: $(STAMP) ## serving benchmark: latency/throughput/readiness/memory vs targets (BENCH_ARGS)
	OPENBLAS_NUM_THREADS=1 $(BIN)/python bench/serving.py $(BENCH_ARGS)

# Quality benchmark: the default and seed models (recsys-train) against popularity and implicit's
# ALS / BPR (tuned on the validation split), the default model also measured through a real
# recsys-serve over HTTP; one markdown table (about 5 minutes on ML-100K). E.g.
#   make bench-quality QUALITY_ARGS='--seeds 0,1,2'      make bench-quality QUALITY_DATA=/data/ml-1m
QUALITY_DATA ?= ../shared/data/ml-100k
QUALITY_ARGS ?=
bench-quality: $(STAMP) ## quality vs popularity/ALS/BPR, trainer vs HTTP (QUALITY_DATA, QUALITY_ARGS)
	OPENBLAS_NUM_THREADS=1 $(BIN)/python bench/quality.py --data $(QUALITY_DATA) $(QUALITY_ARGS)

lint: $(STAMP) ## ruff and mypy
	$(BIN)/ruff check .
	$(BIN)/mypy

# requirements.lock: the runtime closure of `pip install .` (no dev extra) at the versions
# installed in $(VENV), as pip's resolver computes it; the Dockerfile installs exactly this.
lock: $(STAMP) ## regenerate requirements.lock from the venv
	@tmp=$$(mktemp -d); trap 'rm -rf "$$tmp"' EXIT; \
	$(BIN)/python -m pip freeze --all --exclude-editable > "$$tmp/installed.txt"; \
	$(BIN)/python -m pip install --quiet --dry-run --ignore-installed \
		--constraint "$$tmp/installed.txt" --report "$$tmp/report.json" . ; \
	$(BIN)/python -c 'import json, sys; \
		items = json.load(open(sys.argv[1]))["install"]; \
		pins = [i["metadata"]["name"] + "==" + i["metadata"]["version"] for i in items if not i.get("is_direct")]; \
		print("# Runtime dependencies of the project (pyproject.toml without the dev extra), pinned to"); \
		print("# the versions installed in the dev venv. Generated by `make lock`: do not edit by hand."); \
		print(*sorted(pins, key=str.lower), sep="\n")' "$$tmp/report.json" > requirements.lock
	@echo "wrote requirements.lock ($$(grep -vc '^#' requirements.lock) pins)"

clean: ## remove caches and build outputs (keeps the venv and trained models)
	find . -path ./$(VENV) -prune -o -type d -name __pycache__ -prune -exec rm -rf {} +
	rm -rf .pytest_cache .mypy_cache .ruff_cache .hypothesis build dist *.egg-info

clean-models: ## remove every trained version under RECSYS_MODEL_STORE
	test ! -d '$(RECSYS_MODEL_STORE)' || find '$(RECSYS_MODEL_STORE)' -mindepth 2 -maxdepth 2 \
		-type d -name '[0-9]*' ! -name '*[!0-9]*' -prune -exec rm -rf {} +
