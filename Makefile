# Two commands for a newcomer: `make run` (see it work on embedded defaults) and `make test`.
# Both build their own virtual environment from pyproject.toml; nothing is installed by hand.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: run test lint bench clean venv

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

-include infra/tools.mk
-include infra/peers.mk

run: $(STAMP)
	$(BIN)/python -m rotator.devrun

# The tests start `python -m rotator` hundreds of times: compiled once here, not at every start
# (bytecode is not written where PYTHONDONTWRITEBYTECODE is set, as on CI machines).
test: $(STAMP) $(TEST_TOOLS)
	$(BIN)/python -m compileall -q -j 0 rotator backends clients tests bench > /dev/null
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check rotator backends tests bench
	$(BIN)/mypy

bench: $(STAMP)
	command -v wrk >/dev/null || (apt-get update -qq && apt-get install -y -qq wrk)
	$(BIN)/python -m bench.bench_rotation
	$(BIN)/python -m bench.bench_cloud
	$(BIN)/python -m bench.bench_revoke
	$(BIN)/python -m bench.bench_api

clean:
	rm -rf $(VENV) .run .pytest_cache .mypy_cache .ruff_cache
