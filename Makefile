# The two commands of the README: `make demo` and `make test`. Both create the virtual
# environment on first use (Python 3.11+, from PyPI).
VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin

.PHONY: demo test lint serve bench bytecode clean constraints

$(BIN)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -c constraints.txt -e '.[dev]'
	touch $@

# Every dependency at the newest release pyproject.toml allows, written to constraints.txt
# (its comment first): test it before committing it. pip resolves through your own pip
# configuration: where it adds local wheel folders or mirrors, check that what it pinned
# is on PyPI (`pip download --isolated --no-deps -r constraints.txt`).
constraints:
	rm -rf .venv-resolve && $(PYTHON) -m venv .venv-resolve
	.venv-resolve/bin/pip install --quiet -e '.[dev]'
	{ grep '^#' constraints.txt; .venv-resolve/bin/pip freeze --exclude-editable; } > constraints.new
	mv constraints.new constraints.txt && rm -rf .venv-resolve

# Byte-compiled once, here, rather than by each process: with PYTHONDONTWRITEBYTECODE set
# (as in the Dockerfile) every `entraide` process would otherwise compile the whole app
# before it starts, about 0.1 s of CPU each. compileall rewrites only what changed, and a
# file edited since is compiled again in memory, never run stale.
bytecode: $(BIN)/.installed
	$(BIN)/python -m compileall -q app migrations

demo: bytecode
	$(BIN)/entraide demo

lint: $(BIN)/.installed
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy app

test: lint bytecode
	$(BIN)/pytest -q

# Every benchmark at moderate sizes (about 25 minutes on a 2-core machine); each prints its
# figures and writes bench/results/NAME.json. docs/benchmarks.md has the full-size runs.
bench: bytecode
	$(BIN)/python bench/throughput.py --runs 3 --duration 8 --prefill 100000
	$(BIN)/python bench/request_steps.py --requests 150 --runs 3
	$(BIN)/python bench/audit.py --entries 100000 --runs 1
	$(BIN)/python bench/soak.py --requests 100
	$(BIN)/python bench/claim.py --stored 100000 --due 5000 --runs 1

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache .hypothesis
