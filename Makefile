# Each target creates .venv and installs what it needs when missing.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-dev

.PHONY: demo run test test-fast test-compiled compiled clean-compiled lint bench soak screenshots docs clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

$(STAMP): pyproject.toml setup.py | $(BIN)/python
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

# `make demo PORT=8090` when 8080 is taken.
demo: $(STAMP)
	$(BIN)/ortto-gateway demo --listen 127.0.0.1:$(or $(PORT),8080)

run: $(STAMP)
	$(BIN)/ortto-gateway serve $(if $(CONFIG),--config $(CONFIG),)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy gateway tests setup.py

# `make test`: lint, then every test (real Redis, nginx, Chromium, Prometheus; ~3 min)
# in pure Python, then `make test-compiled`.
# `make test-fast`: only the tests that start no server and no process (pure modules,
# in seconds); tests/conftest.py marks the rest `integration`.
test: lint
	ORTTO_GATEWAY_NO_EXTENSIONS=1 $(BIN)/pytest $(PYTEST_ARGS)
	$(MAKE) --no-print-directory test-compiled

test-fast: $(STAMP)
	$(BIN)/pytest -q -m "not integration" $(PYTEST_ARGS)

# `make compiled`: the modules of gateway/compiled.py compiled with mypyc, in place
# (docs/compiled.md). The package runs them until a source of the package changes, then
# pure Python (with a warning) until the next `make compiled`.
compiled: $(STAMP) clean-compiled
	ORTTO_GATEWAY_COMPILE=1 $(BIN)/python setup.py --quiet build_ext --inplace

clean-compiled:
	find gateway -name '*.so' -delete
	rm -rf gateway/compiled.json build

# The suite again against a fresh compiled build, removed afterwards: all but the Chromium
# and `slow` tests (the rest runs the same server code), to keep `make test` under ten
# minutes. Without a C compiler it is left out, unless CI is set: then that is a failure.
test-compiled: $(STAMP)
	@command -v cc >/dev/null || case "$$CI" in 1|true|yes) \
	  echo "no C compiler (cc) to build the compiled modules" >&2; exit 1;; *) \
	  echo "test-compiled: left out, no C compiler (cc)"; exit 0;; esac; \
	$(MAKE) --no-print-directory compiled && \
	ORTTO_GATEWAY_EXPECT_COMPILED=1 $(BIN)/pytest -q -m "not chromium and not slow" $(PYTEST_ARGS); \
	status=$$?; $(MAKE) --no-print-directory clean-compiled; exit $$status

# `make bench` builds the compiled core first (when there is a C compiler): every gateway
# row runs it but `durable_pure`, the same row in pure Python (docs/benchmarks.md).
bench: $(STAMP)
	@if command -v cc >/dev/null; then $(MAKE) --no-print-directory compiled; \
	  else echo "bench: no C compiler (cc): every row runs pure Python"; fi
	$(BIN)/python -m tests.bench $(BENCH_ARGS)

# The console and demo screenshots the README links (docs/screenshots/).
screenshots: $(STAMP)
	GATEWAY_SCREENSHOTS_DIR=docs/screenshots $(BIN)/pytest -q tests/test_console_browser.py -k "dead_letter or demo or reasons"

soak: $(STAMP)
	$(BIN)/python -m tests.bench.soak $(SOAK_ARGS)

# The docs/ pages as a static site in site/ (strict: a broken link or anchor fails).
docs: $(STAMP)
	$(BIN)/mkdocs build --strict --site-dir site

clean: clean-compiled
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache site

# Regenerates the settings table (README.md or docs/*.md) from gateway/config.py.
.PHONY: settings-table
settings-table: $(STAMP)
	$(BIN)/python -m gateway.settings_docs --write
