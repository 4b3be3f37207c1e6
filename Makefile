# The two commands of the README: `make demo` and `make test`. Each builds the venv it needs.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# `make test`: the tests not marked `serial` run on this many pytest-xdist processes (a file's
# tests on one process, so module fixtures start once), then the `serial` ones run alone.
TEST_PROCS ?= 2

.PHONY: demo test lint clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev,postgres]'
	touch $@

# PyTorch is optional: the trainer's parity tests and the `gp` sampler use it. 2.13.0 is the
# CPU build this machine kind carries offline; where it cannot be had, those tests skip.
$(BIN)/.torch: $(BIN)/.installed
	$(BIN)/python -m pip install --quiet 'torch==2.13.0' \
		|| echo "torch 2.13.0 unavailable: PyTorch parity tests and the gp sampler will skip"
	touch $@

demo: $(BIN)/.installed
	$(BIN)/hptune demo

# Bytecode is written even where PYTHONDONTWRITEBYTECODE is set: the suite starts some 250
# Python processes, and each compiled the project (and pytest re-wrote every test module and
# plugin) again without it.
test: $(BIN)/.installed $(BIN)/.torch
	$(BIN)/ruff check .
	env -u PYTHONDONTWRITEBYTECODE $(BIN)/python -m pytest -q -n $(TEST_PROCS) --dist loadfile -m "not serial"
	env -u PYTHONDONTWRITEBYTECODE $(BIN)/python -m pytest -q -m serial

lint: $(BIN)/.installed
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) hptune-demo .pytest_cache .ruff_cache
