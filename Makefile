# Two entry points for a newcomer (see README.md):
#   make run   install into .venv and start a node on embedded defaults
#   make test  install into .venv and run every quality gate and test
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: run test lint typecheck pytest fuzz protos clean constraints

$(STAMP): setup.py pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -c constraints.txt '.[test,h2]'
	touch $(STAMP)

# After changing setup.py's dependencies: pin the runtime closure again.
constraints: $(STAMP)
	PYTHONPATH=$(CURDIR) $(BIN)/python tests/support/constraints.py > constraints.txt

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

# Not part of `make test`: ten minutes of coverage-guided fuzzing of the
# accelerator's head parser against twisted.web (tests/fuzz/fuzz_head.py).
FUZZ_SECONDS ?= 600
fuzz: $(STAMP)
	$(BIN)/pip install --quiet '.[fuzz]'
	mkdir -p .fuzz-corpus
	PYTHONPATH=$(CURDIR) $(BIN)/python tests/fuzz/fuzz_head.py \
		-max_total_time=$(FUZZ_SECONDS) -max_len=17000 -timeout=10 .fuzz-corpus

# Regenerate kura/reapi/gen (committed) from kura/reapi/protos; see
# kura/reapi/protos/README.md.
protos: $(STAMP)
	$(BIN)/pip install --quiet '.[protos]'
	$(BIN)/python -m kura.reapi.generate

clean:
	rm -rf $(VENV) kura-data build *.egg-info .fuzz-corpus
