# The README's commands. `make demo` and `make test` set everything up from a clean clone.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PIP := $(BIN)/pip install -c constraints.txt
STAMP := $(VENV)/.installed
# The oldest supported versions (setup.py's floors, pinned in constraints-floor.txt; docs/versions.md).
FLOOR_VENV := .venv-floor
FLOOR_BIN := $(FLOOR_VENV)/bin
FLOOR_PIP := $(FLOOR_BIN)/pip install -c constraints-floor.txt
FLOOR_STAMP := $(FLOOR_VENV)/.installed
FLOOR_EXTRAS := train,test,quantization,video

.PHONY: venv test test-fast test-floor lint demo docs clean

$(STAMP): setup.py constraints.txt
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(PIP) -q --upgrade pip
	$(PIP) -q torch==2.13.0
	$(PIP) -q -e ".[train,test,quantization,video,docs]" "deepspeed>=0.16"
	touch $(STAMP)

# Rebuilt from scratch whenever the floors change, so that nothing newer is left behind.
$(FLOOR_STAMP): setup.py constraints-floor.txt
	rm -rf $(FLOOR_VENV)
	$(PYTHON) -m venv $(FLOOR_VENV)
	$(FLOOR_PIP) -q --upgrade pip
	$(FLOOR_PIP) -q torch==2.13.0
	$(FLOOR_PIP) -q -e ".[$(FLOOR_EXTRAS)]"
	$(FLOOR_BIN)/pip check
	touch $(FLOOR_STAMP)

venv: $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff check src tests examples benchmarks
	$(BIN)/ruff format --check src tests examples benchmarks

test: lint
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -n 2 --durations=15

test-fast: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -n 2 -m "not slow"

# The fast tests (and lint, for ruff's floor) with every dependency at its floor.
test-floor: $(FLOOR_STAMP)
	$(FLOOR_BIN)/ruff check src tests examples benchmarks
	$(FLOOR_BIN)/ruff format --check src tests examples benchmarks
	HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 $(FLOOR_BIN)/python -m pytest -n 2 -m "not slow"

# The documentation site (mkdocs.yml, API reference from the docstrings) into site/, in the main venv (the
# `docs` extra). --strict: a broken link or anchor, a page missing from the nav or a docstring warning fails it.
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --site-dir site

demo: $(STAMP)
	PYTHONPATH=examples HF_HUB_OFFLINE=1 $(BIN)/python -m digits_demo --output_dir demo_output

clean:
	rm -rf $(VENV) $(FLOOR_VENV) build dist site src/*.egg-info .pytest_cache .ruff_cache
