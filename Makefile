# `make demo` and `make test` work on a fresh clone: they create .venv and install what they need.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# DeepSpeed JIT-builds a communication op on first start; keep it between runs.
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/.cache/torch_extensions
export WANDB_MODE ?= disabled
DEMO := demo_out
DEMO_TRAIN ?= 8000
DEMO_VAL ?= 1000

.PHONY: demo demo-coca bind-audio test test-fast lint format install sysdeps clean

$(BIN)/.installed: setup.cfg constraints.txt pyproject.toml
	@$(MAKE) --no-print-directory sysdeps
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade-strategy only-if-needed -c constraints.txt -e ".[test,coca,bench]"
	touch $@

install: $(BIN)/.installed

# g++ builds DeepSpeed's CPU communication op; apt-get only runs when something is missing.
sysdeps:
	@missing=""; command -v g++ >/dev/null || missing="$$missing g++"; \
	$(PYTHON) -c "import venv, ensurepip" 2>/dev/null || missing="$$missing python3-venv"; \
	if [ -n "$$missing" ]; then \
	  echo "installing system packages:$$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; \
	fi

demo: install
	$(BIN)/mmcontrast data demo --out $(DEMO)/world --train $(DEMO_TRAIN) --val $(DEMO_VAL) --seed 0
	$(BIN)/mmcontrast train configs/demo.yaml run.dir=$(DEMO)/run
	$(BIN)/mmcontrast export $(DEMO)/run --out $(DEMO)/export
	$(BIN)/mmcontrast eval $(DEMO)/export --out $(DEMO)/metrics.json \
	  --benchmark $(DEMO)/world/benchmarks/demo-classes --benchmark $(DEMO)/world/benchmarks/demo-retrieval \
	  --benchmark $(DEMO)/world/benchmarks/demo-composition

# Bind a new audio tower to `make demo`'s exported image-text model, image and text locked.
bind-audio: install
	test -d $(DEMO)/export || $(MAKE) demo
	$(BIN)/mmcontrast train configs/bind-audio.yaml run.dir=$(DEMO)/run-bind-audio model.pretrained=$(DEMO)/export
	$(BIN)/mmcontrast export $(DEMO)/run-bind-audio --out $(DEMO)/export-bind-audio
	$(BIN)/mmcontrast eval $(DEMO)/export-bind-audio --out $(DEMO)/metrics-bind-audio.json \
	  --benchmark $(DEMO)/world/benchmarks/demo-classes --benchmark $(DEMO)/world/benchmarks/demo-retrieval

# CoCa (+ audio) on the same world: captions next to zero-shot and retrieval.
demo-coca: install
	test -d $(DEMO)/world/benchmarks/demo-captions || $(BIN)/mmcontrast data demo --out $(DEMO)/world --train $(DEMO_TRAIN) --val $(DEMO_VAL) --seed 0
	$(BIN)/mmcontrast train configs/demo-coca.yaml run.dir=$(DEMO)/run-coca
	$(BIN)/mmcontrast export $(DEMO)/run-coca --out $(DEMO)/export-coca
	$(BIN)/mmcontrast eval $(DEMO)/export-coca --out $(DEMO)/metrics-coca.json \
	  --benchmark $(DEMO)/world/benchmarks/demo-classes --benchmark $(DEMO)/world/benchmarks/demo-captions
	mkdir -p $(DEMO)/val-images && tar -xf $(DEMO)/world/val-000000.tar -C $(DEMO)/val-images \
	  $$(tar -tf $(DEMO)/world/val-000000.tar | grep '\.png$$' | head -4)
	$(BIN)/mmcontrast caption $(DEMO)/export-coca $(DEMO)/val-images/*.png

test: install
	$(BIN)/python -m pytest -q -ra --durations=40

test-fast: install
	$(BIN)/python -m pytest -q -m "not slow"

lint: install
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

format: install
	$(BIN)/ruff check --fix . && $(BIN)/ruff format .

clean:
	rm -rf $(DEMO) runs .pytest_cache
