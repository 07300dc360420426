# Two commands set everything up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
# Tests and CI run on the CPU; the same code runs on GPU/TPU when JAX sees one.
export JAX_PLATFORMS ?= cpu
# pytest-xdist workers (`make test WORKERS=4`; WORKERS=0 runs in this process). --dist loadfile keeps each test file
# in one worker, so the tests of a file share its module-scoped model and compiled programs.
WORKERS ?= 2
PYTEST  := $(PY) -m pytest -q -n $(WORKERS) --dist loadfile --durations=40

.PHONY: demo test test-all bench clean install

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -e .
	touch $@

$(VENV)/.test-installed: $(VENV)/.installed
	$(PIP) install -q -e '.[test]'
	touch $@

install: $(VENV)/.installed

demo: $(VENV)/.installed
	$(VENV)/bin/cachedattn demo
	$(VENV)/bin/cachedattn bench --config configs/bench/demo.yaml --out runs/demo-bench --no-progress

test: $(VENV)/.test-installed
	$(PYTEST) -m "not slow" tests

test-all: $(VENV)/.test-installed
	$(PYTEST) tests

clean:
	rm -rf $(VENV) build *.egg-info
