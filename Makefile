# `make demo` and `make test` work on a fresh machine: they create/reuse .venv and install what is missing.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.autocomp-installed

.PHONY: setup demo test bench clean-studies

$(BIN)/python:
	$(PY) -m venv $(VENV)

# torch==2.13.0 is the CPU wheel on this machine's disk; installing it first keeps any looser
# requirement from pulling a CUDA build, and pip leaves an already-installed 2.13.0 alone.
$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q --disable-pip-version-check "torch==2.13.0"
	$(BIN)/pip install -q --disable-pip-version-check "torch==2.13.0" -e ".[hf,hardware,multimodal,distributed,report,deploy,test]"
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(BIN)/autocomp search --model minilm --budget 10MB --trials 60 --seeds ilp --study demo-minilm-10MB
	$(BIN)/autocomp plan --study demo-minilm-10MB --pick best --out studies/demo-minilm-10MB/best-plan.json
	$(BIN)/autocomp export --plan studies/demo-minilm-10MB/best-plan.json --out studies/demo-minilm-10MB/best.acz.safetensors
	$(BIN)/autocomp export --plan studies/demo-minilm-10MB/best-plan.json --format onnx --out studies/demo-minilm-10MB/best.onnx
	$(BIN)/autocomp evaluate --plan studies/demo-minilm-10MB/best-plan.json

test: $(STAMP)
	$(BIN)/python -m pytest -q -p no:cacheprovider tests

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_core.py

clean-studies:
	find studies -mindepth 1 ! -name README.md -exec rm -rf {} +
