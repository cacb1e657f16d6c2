PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo test lint bench clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(BIN)/python examples/fold_bn_onnx.py

test: install
	$(BIN)/ruff check lkfx tests examples benchmarks
	$(BIN)/python -m pytest -n 2 -q

# every benchmark (full; QUICK=1: their --quick smoke runs), then BENCHMARKS.md from benchmarks/results/*.json
bench: install
	$(BIN)/python benchmarks/report.py $(if $(QUICK),--quick)

clean:
	rm -rf $(VENV) build *.egg-info
