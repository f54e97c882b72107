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

run: $(STAMP)
	$(BIN)/python -m rotator.devrun

test: $(STAMP) $(TEST_TOOLS)
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check rotator backends tests bench
	$(BIN)/mypy

bench: $(STAMP)
	command -v wrk >/dev/null || (apt-get update -qq && apt-get install -y -qq wrk)
	$(BIN)/python bench/bench_rotation.py
	$(BIN)/python bench/bench_cloud.py
	$(BIN)/python bench/bench_revoke.py
	$(BIN)/python bench/bench_api.py

clean:
	rm -rf $(VENV) .run .pytest_cache .mypy_cache .ruff_cache
