# Two commands set everything up on a fresh machine with only Python 3:
#   make train   creates .venv, installs requirements, runs the reference training
#   make test    creates .venv, installs requirements + pytest, runs the test suite
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
TRAIN_ARGS ?= --preset fast --subset 0.4 --max-hours 1
CLAIMS_ARGS ?=

.PHONY: venv dev train test bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.installed: requirements.txt | $(BIN)/python
	$(BIN)/python -m pip install --quiet -r requirements.txt
	touch $@

$(VENV)/.installed-dev: requirements.txt requirements-dev.txt $(VENV)/.installed
	$(BIN)/python -m pip install --quiet -r requirements-dev.txt
	touch $@

venv: $(VENV)/.installed
dev: $(VENV)/.installed-dev

train: venv
	$(BIN)/python main.py $(TRAIN_ARGS)

test: dev
	$(BIN)/python -m pytest -q tests

# The method's claims, re-measured: 10 variants x 3 seeds of the fast protocol
# (hours of CPU; resumable: run it again to continue), then runs/claims/comparison/.
claims: venv
	$(BIN)/python claims.py $(CLAIMS_ARGS)

.PHONY: claims

bench: venv
	$(BIN)/python benchmarks/data_bench.py
	$(BIN)/python benchmarks/speed.py

clean:
	rm -rf $(VENV) .pytest_cache
