# Two entry points for a newcomer (see README.md):
#   make run   install into .venv and start a node on embedded defaults
#   make test  install into .venv and run every quality gate and test
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: run test lint typecheck pytest clean

$(STAMP): setup.py pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet '.[test,h2]'
	touch $(STAMP)

# The checkout goes first on the path, so the node and the tests always run the
# working tree (twistd finds twisted/plugins/kura_plugin.py through it too).
run: $(STAMP)
	PYTHONPATH=$(CURDIR) $(BIN)/twistd --nodaemon --pidfile= kura

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(STAMP)
	$(BIN)/mypy

pytest: $(STAMP)
	PYTHONPATH=$(CURDIR) $(BIN)/pytest

test: lint typecheck pytest

clean:
	rm -rf $(VENV) kura-data build *.egg-info
