# `make test`: create .venv, install torch 2.13.0 (CPU build) then splitserve with its test
# extra, run the test suite. Installing torch first keeps pip from choosing a multi-GB CUDA build.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: install test clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# Reinstall only when the package metadata changes (editable install: code changes need none).
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install torch==2.13.0
	$(BIN)/pip install -e '.[test]'
	touch $@

install: $(VENV)/.installed

test: install
	$(BIN)/python -m pytest -x -q tests

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
