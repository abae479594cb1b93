# `make up` sets everything up and runs the system; `make test` sets up and runs every test.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: setup up test lint format gen web bench clean help breaking lock

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-8s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	@touch $@

setup: $(STAMP) ## create .venv and install the package with its test tools

up: setup ## set up, then run the whole system on this machine (Ctrl-C stops it)
	$(BIN)/microapp up

test: setup ## set up, then run every test
	$(BIN)/python -m pytest

lint: setup ## ruff check, ruff format --check and pyright (strict on src/microapp)
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench
	$(BIN)/pyright --pythonpath $(BIN)/python

# The wire contract: what breaking compares the protos with. The previous commit by
# default; a branch's CI may set BREAKING_AGAINST='.git#branch=main'.
BREAKING_AGAINST ?= .git\#ref=HEAD~1

breaking: setup ## buf lint, and buf breaking against the previous commit's protos
	$(BIN)/buf lint
	@if [ "$(BREAKING_AGAINST)" != ".git#ref=HEAD~1" ] || git rev-parse -q --verify HEAD~1 >/dev/null; then \
		echo "buf breaking --against '$(BREAKING_AGAINST)'"; \
		$(BIN)/buf breaking --against '$(BREAKING_AGAINST)'; \
	else \
		echo "buf breaking: SKIPPED: this clone has no parent commit (a first commit, or a shallow clone: git fetch --deepen=1)"; \
	fi

# The image's packages (Dockerfile): pyproject's dependencies and the two server extras,
# pinned with hashes for Linux x86_64 and aarch64 (a universal resolution) on the image's
# Python. Pins still allowed by pyproject are kept; LOCK_ARGS=--upgrade moves them all.
LOCK_PYTHON := 3.11

lock: setup ## refresh image.lock, the image's hash-pinned packages, from pyproject.toml
	$(BIN)/uv pip compile pyproject.toml --extra granian --extra pyvoy --universal \
		--python-version $(LOCK_PYTHON) --generate-hashes --custom-compile-command 'make lock' \
		--quiet --output-file image.lock $(LOCK_ARGS)

format: setup ## apply ruff's fixes and formatting
	$(BIN)/ruff check --fix src tests bench
	$(BIN)/ruff format src tests bench

gen: setup ## regenerate src/microapp/gen from proto/ with buf
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/buf lint
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/buf generate

web: setup ## rebuild the web console bundle from web/ and proto/ (needs Node.js and npm)
	cd web && npm ci
	$(BIN)/buf generate --template buf.gen.web.yaml
	cd web && ./node_modules/.bin/tsc --noEmit && node build.mjs

bench: setup ## measure throughput and latency (needs h2load: apt-get install nghttp2-client)
	$(BIN)/python -m pip install --quiet -e '.[dev,bench]'
	$(BIN)/python -m bench.run $(BENCH_ARGS)

clean: ## remove the venv and local data
	rm -rf $(VENV) .microapp .pytest_cache
