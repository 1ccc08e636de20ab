# Every target sets up its own virtual environment first, so a fresh clone needs nothing but python3.
#
#   make venv    create $(VENV) and install the package with its dev extras (fast no-op when up to date)
#   make test    ruff, mypy, pytest (what CI runs through .ci/run); installs headless Chromium first if it can
#   make demo    train a small MLP on sklearn's digits with all four callbacks; prints the TensorBoard/report paths
#   make browser install Debian's chromium for the report's browser test (needs root; skipped with a note otherwise)
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

.PHONY: venv test lint typecheck pytest demo docs bench clean distclean browser

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip
	$(BIN)/python -m pip install "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -e ".[dev]"
	touch $@

test: venv browser
	$(BIN)/ruff check .
	$(BIN)/mypy
	$(BIN)/python -m pytest -q -p no:cacheprovider --timeout=300 $(PYTEST_ARGS)

lint: venv
	$(BIN)/ruff check .

typecheck: venv
	$(BIN)/mypy

pytest: venv
	$(BIN)/python -m pytest -q -p no:cacheprovider --timeout=300 $(PYTEST_ARGS)

# The report test (tests/test_reporting.py, tests/test_report_browser.py) opens report.html in headless Chromium.
# Installing it needs root and network; without them the browser tests skip and say why, and make goes on.
browser:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || \
	  { if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	      (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium) || \
	        echo "make browser: could not install chromium; the browser tests will skip"; \
	    else echo "make browser: chromium missing and not root; install Debian's chromium to run the browser tests"; fi; }

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
