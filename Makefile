# Two commands set up everything: `make run` and `make test`. Each creates .venv on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: install bytecode run lint test bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test,celery]'
	touch $(STAMP)

install: $(STAMP)

# Every Dagster run is a new process that imports the project; where PYTHONDONTWRITEBYTECODE is
# set (this machine sets it) none of them would write bytecode, so each compiled every module of
# the project again (~85 ms of its start). Compiled here once; stale files are simply not used.
bytecode: $(STAMP)
	$(PY) -m compileall -q sync_project

run: bytecode
	$(VENV)/bin/sync-project dev

# The gates: style (ruff), types (mypy, configured in pyproject.toml) and the package's layers
# (import-linter's contracts). `make test`, and so CI, runs them first: keep them green.
lint: $(STAMP)
	$(VENV)/bin/ruff check sync_project sync_project_tests benchmarks
	$(VENV)/bin/ruff format --check sync_project sync_project_tests benchmarks
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports

# Two pytest-xdist workers: one takes the heavy tests (daemons, `sync-project dev`, Celery hosts) one at
# a time, the other the in-process ones (sync_project_tests/conftest.py, HEAVY_MODULES). TEST_WORKERS=0: serial.
TEST_WORKERS ?= 2
test: lint
	$(PY) -m pytest -n $(TEST_WORKERS) --dist loadgroup $(PYTEST_ARGS)

# Benchmarks need peers (dlt) that the project itself never imports: the `bench` extra.
BENCH_STAMP := $(VENV)/.bench-stamp

$(BENCH_STAMP): $(STAMP)
	$(PY) -m pip install --quiet -e '.[test,celery,bench]'
	touch $(BENCH_STAMP)

# Runs every benchmark and rewrites the table in benchmarks/README.md. BENCH_ARGS=--quick for small sizes.
bench: $(BENCH_STAMP) bytecode
	$(PY) benchmarks/report.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) data .dagster_home .pytest_cache .mypy_cache .ruff_cache .import_linter_cache
