# The README's commands. `make demo` and `make test` set everything up from a clean clone.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PIP := $(BIN)/pip install -c constraints.txt
STAMP := $(VENV)/.installed

.PHONY: venv test test-fast lint demo docs clean

$(STAMP): setup.py constraints.txt
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(PIP) -q --upgrade pip
	$(PIP) -q torch==2.13.0
	$(PIP) -q -e ".[train,test,quantization]" "deepspeed>=0.16"
	touch $(STAMP)

venv: $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff check src tests examples benchmarks
	$(BIN)/ruff format --check src tests examples benchmarks

test: lint
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -n 2 --durations=15

test-fast: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -n 2 -m "not slow"

demo: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python -m scfm_diffusers.evaluation.demo --output_dir demo_output

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache .ruff_cache
