# flowd: `make test` and `make run` work on a fresh machine with only Python >= 3.11.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-$(shell cksum pyproject.toml | cut -d' ' -f1)

.PHONY: run test lint fmt typecheck pytest test-external bench bench-smoke clean

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "flowd needs Python >= 3.11")'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test]'
	rm -f $(VENV)/.installed-* && touch $(STAMP)

## run: flowd on embedded NATS + PostgreSQL and a short live demo through flowctl
run: $(STAMP)
	BIN=$(BIN) bash scripts/demo.sh

## test: format check, lint, strict mypy, then every test (embedded servers unless URLs given)
test: lint typecheck pytest

lint: $(STAMP)
	$(BIN)/ruff format --check service tests bench
	$(BIN)/ruff check service tests bench

typecheck: $(STAMP)
	$(BIN)/mypy

pytest: $(STAMP)
	$(BIN)/pytest $(PYTEST_ARGS)

## test-external: the server-backed tests against servers given by URL
test-external: $(STAMP)
	FLOWD_TEST_DATABASE_URL=$${FLOWD_TEST_DATABASE_URL:-postgresql://postgres@127.0.0.1:5432/postgres} \
	FLOWD_TEST_NATS_URL=$${FLOWD_TEST_NATS_URL:-nats://127.0.0.1:4222} \
	$(BIN)/pytest -m "postgres or nats" $(PYTEST_ARGS)

BENCH_STAMP := $(VENV)/.bench-installed

$(BENCH_STAMP): $(STAMP)
	$(BIN)/python -m pip install -q -e '.[test,bench]'
	touch $(BENCH_STAMP)

## bench: every scenario at full size; writes bench/RESULTS.md and bench/out/ (25-40 min)
bench: $(BENCH_STAMP)
	$(BIN)/python bench/run.py

## bench-smoke: every scenario at tiny sizes, to keep the harness working (CI; asserts no speed)
bench-smoke: $(BENCH_STAMP)
	$(BIN)/python bench/run.py --smoke --out bench/out/smoke

fmt: $(STAMP)
	$(BIN)/ruff format service tests bench
	$(BIN)/ruff check --fix service tests bench

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis
