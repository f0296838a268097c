# Two entry points for a fresh clone: `make quickstart` and `make test`. Both create .venv on first use.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
# the package's extras to install (.ci/run adds `lab` for the browser test: make test EXTRAS=dev,lab)
EXTRAS ?= dev
comma := ,
STAMP := $(VENV)/.installed-$(subst $(comma),-,$(EXTRAS))

.PHONY: quickstart test lint format data clean-venv

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch is pinned in the same command as deepspeed so pip keeps the CPU build (see README).
	$(BIN)/python -m pip install -q "torch==2.13.0" -e ".[$(EXTRAS)]"
	touch $(STAMP)

data: $(STAMP)
	$(BIN)/smoe-lab data prepare

quickstart: $(STAMP)
	$(BIN)/smoe-lab run quickstart

test: $(STAMP)
	$(BIN)/smoe-lab data prepare
	$(BIN)/ruff check smoe_lab tests benchmarks
	$(BIN)/python -m pytest -q --nbmake --nbmake-kernel=python3 tests notebooks

lint: $(STAMP)
	$(BIN)/ruff check smoe_lab tests benchmarks
	$(BIN)/ruff format --check smoe_lab tests benchmarks

format: $(STAMP)
	$(BIN)/ruff format smoe_lab tests benchmarks
	$(BIN)/ruff check --fix smoe_lab tests benchmarks

clean-venv:
	rm -rf $(VENV)
