# One place for dev tasks. `make run` and `make test` set everything up on a fresh machine first.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin

.PHONY: setup run test lint typecheck bench audit clean

setup: $(VENV)/.installed node_modules/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	@touch $@

# Node peers (npm bullmq, @upstash/qstash) prove wire compatibility; skipped with a note where npm is absent.
node_modules/.installed: package.json package-lock.json
	@if command -v npm >/dev/null 2>&1; then npm ci --no-audit --no-fund --loglevel=error; \
	 else echo "npm not found: the Node parity tests will be skipped"; mkdir -p node_modules; fi
	@touch $@

run: setup
	$(BIN)/whatrack run

# Three workers on two cores: most tests wait on servers, retries and timeouts rather than CPU. One file per worker
# (loadfile): a file's module fixtures (stacks, servers) are made once, and each notebook executes once.
TEST_WORKERS ?= 3

test: setup
	$(BIN)/pytest -n $(TEST_WORKERS) --dist loadfile

lint: setup
	$(BIN)/ruff check whatrack tests bench
	$(BIN)/mypy
	$(BIN)/lint-imports --no-cache

bench: setup
	@for b in $(filter-out bench/httpload.py,$(wildcard bench/*.py)); do echo "== $$b"; $(BIN)/python $$b || exit 1; done

audit: setup
	$(BIN)/pip-audit --skip-editable --strict

clean:
	rm -rf $(VENV) node_modules runs/.stack
