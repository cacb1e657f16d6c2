PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo test lint bench clean gpu-check gpu-wheels

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

# the demo needs only the [onnx] extra (no torch): a fresh clone runs it in well under a minute
DEMO_STAMP := $(VENV)/.installed-onnx
$(DEMO_STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e '.[onnx]'
	touch $(DEMO_STAMP)

demo: $(DEMO_STAMP)
	$(BIN)/python examples/deploy_onnx.py

test: install
	$(BIN)/ruff check lkfx tests examples benchmarks
	$(BIN)/python -m pytest -n 2 -q

# every benchmark (full; QUICK=1: their --quick smoke runs), then BENCHMARKS.md from benchmarks/results/*.json
bench: install
	$(BIN)/python benchmarks/report.py $(if $(QUICK),--quick)

# on a GPU machine: CUDA tests + GPU benchmarks, results in $$OUT (else gpu-check/); exits 2 at once without CUDA.
# The Python that has torch with CUDA (the venv's where there is one, else python3); nothing is downloaded.
GPU_PY := $(if $(wildcard $(BIN)/python),$(BIN)/python,$(PY))
gpu-check:
	$(GPU_PY) scripts/gpu_check.py

# where pip can download: the pure-Python wheels gpu-check installs on a GPU machine that lacks them (into .whl/)
gpu-wheels: install
	$(BIN)/pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 -d .whl \
		onnx-graphsurgeon==$$($(BIN)/python -c "import importlib.metadata as m; print(m.version('onnx-graphsurgeon'))")

clean:
	rm -rf $(VENV) build *.egg-info
