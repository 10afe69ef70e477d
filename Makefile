# `make test`: create .venv, install torch 2.13.0 (CPU build) then splitserve with its test
# extra, run the test suite. Installing torch first keeps pip from choosing a multi-GB CUDA build.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The folders installed as splitserve.<name>: pyproject.toml's package-dir, read once here.
PACKAGE_DIRS := $(shell sed -n '/^\[tool.setuptools.package-dir\]/,/^$$/s/^"[^"]*" = "\([^"]*\)"/\1/p' pyproject.toml)
# The editable install is in mode strict: build/__editable__.* holds a link per module, a tree
# that static tools (import-linter, tests/test_layering.py) read like an installed package; the
# default mode's import hook hides the files from them. Code changes need no reinstall (the
# links point at the files); a module added or removed does, so the module list is a prerequisite.
EDITABLE := --config-settings editable_mode=strict

.PHONY: install test clean FORCE

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# Rewritten only when the set of modules changes (its time then says "reinstall").
$(VENV)/.modules: FORCE | $(BIN)/python
	@find $(PACKAGE_DIRS) -name '*.py' -not -path '*/__pycache__/*' | LC_ALL=C sort > $@.new
	@cmp -s $@.new $@ && rm $@.new || mv $@.new $@

$(VENV)/.installed: pyproject.toml $(VENV)/.modules | $(BIN)/python
	$(BIN)/pip install torch==2.13.0
	$(BIN)/pip install -e '.[test]' $(EDITABLE)
	touch $@

install: $(VENV)/.installed

test: install
	$(BIN)/python -m pytest -x -q tests

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
