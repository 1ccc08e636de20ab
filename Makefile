# Every target sets up its own virtual environment first, so a fresh clone needs nothing but python3.
#
#   make venv    create $(VENV) and install the package with its dev extras (fast no-op when up to date)
#   make test    ruff, mypy, pytest (what CI runs through .ci/run)
#   make demo    train a small MLP on sklearn's digits and print its curvature summary
#   make docs    build the Sphinx HTML docs with warnings as errors
#   make bench   run the benchmarks in benchmarks/ (ratios measured in one run)
#   make clean   remove build output, caches and run directories (keeps $(VENV); see distclean)

PY ?= python3
VENV ?= .venv
# torch is installed on its own, before the project: on this project's machines `torch==2.13.0` resolves to
# the CPU wheel that lies on disk, while a plain `torch` requirement would pull a multi-GB CUDA build.
TORCH_SPEC ?= torch==2.13.0
PYTEST_ARGS ?=

BIN := $(VENV)/bin
STAMP := $(VENV)/.stamp

.PHONY: venv test lint typecheck pytest demo docs bench clean distclean

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip
	$(BIN)/python -m pip install "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -e ".[dev]"
	touch $@

test: venv
	$(BIN)/ruff check .
	$(BIN)/mypy
	$(BIN)/python -m pytest -q -p no:cacheprovider --timeout=300 $(PYTEST_ARGS)

lint: venv
	$(BIN)/ruff check .

typecheck: venv
	$(BIN)/mypy

pytest: venv
	$(BIN)/python -m pytest -q -p no:cacheprovider --timeout=300 $(PYTEST_ARGS)

demo: venv
	$(BIN)/lightning-influence demo --out runs/demo

docs: venv
	$(BIN)/sphinx-build -W --keep-going -b html docs docs/_build/html

bench: venv
	$(BIN)/python benchmarks/run.py --out runs/bench

clean:
	rm -rf docs/_build runs lightning_logs wandb build dist *.egg-info .mypy_cache .ruff_cache .pytest_cache
	find . -path ./$(VENV) -prune -o -type d -name __pycache__ -prune -exec rm -rf {} +

distclean: clean
	rm -rf $(VENV)
