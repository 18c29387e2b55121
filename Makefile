# Each target creates .venv and installs what it needs when missing.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-dev

.PHONY: demo run test test-fast lint bench soak screenshots docs clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

$(STAMP): pyproject.toml | $(BIN)/python
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
	$(BIN)/mypy gateway tests

# `make test`: lint, then every test (real Redis, nginx, Chromium, Prometheus; ~3 min).
# `make test-fast`: only the tests that start no server and no process (pure modules,
# in seconds); tests/conftest.py marks the rest `integration`.
test: lint
	$(BIN)/pytest $(PYTEST_ARGS)

test-fast: $(STAMP)
	$(BIN)/pytest -q -m "not integration" $(PYTEST_ARGS)

bench: $(STAMP)
	$(BIN)/python -m tests.bench $(BENCH_ARGS)

# The console and demo screenshots the README links (docs/screenshots/).
screenshots: $(STAMP)
	GATEWAY_SCREENSHOTS_DIR=docs/screenshots $(BIN)/pytest -q tests/test_console_browser.py -k "dead_letter or demo or reasons"

soak: $(STAMP)
	$(BIN)/python -m tests.bench.soak $(SOAK_ARGS)

# The docs/ pages as a static site in site/ (strict: a broken link or anchor fails).
docs: $(STAMP)
	$(BIN)/mkdocs build --strict --site-dir site

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache site

# Regenerates the settings table (README.md or docs/*.md) from gateway/config.py.
.PHONY: settings-table
settings-table: $(STAMP)
	$(BIN)/python -m gateway.settings_docs --write
