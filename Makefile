# make fit   set up .venv with the pinned versions, then train the quickstart model
# make test  set up .venv with the pinned versions, then run the test suite (two processes: pytest-xdist)
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: install fit test clean

$(VENV)/.installed: constraints.txt setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --constraint constraints.txt --editable ".[test,bench,hub]"
	touch $@

install: $(VENV)/.installed

fit: install
	$(BIN)/python cli.py fit --config configs/quickstart.yaml

test: install
	$(BIN)/python -m pytest -q -n 2 --dist loadfile

clean:
	rm -rf $(VENV) logs
