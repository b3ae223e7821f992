# Two commands set everything up on a fresh machine with only Python 3:
#   make train         creates .venv, installs requirements, runs the reference training
#   make test          creates .venv, installs requirements + pytest, runs the test suite (TEST_JOBS=2 workers)
# and then:
#   make report        draws the figures and report.md of a run (RUN, default runs/latest)
#   make claims        re-measures the method's claims (hours of CPU; resumable), then compares the runs
#   make sweep         runs a sweep file (SWEEP, default sweeps/levers.json; SWEEP_ARGS e.g. "--jobs 2")
#   make docs          rewrites the generated tables of README.md and docs/ (presets.json, run folders)
#   make bench         the benchmarks a user should run: bench-speed, bench-faults, bench-loop, bench-data, bench-sweep
#   make bench-speed   the model's step and evaluation, every cell and layout (and PyTorch if installed)
#   make bench-faults  the step with and without the allocator settings
#   make bench-loop    the training loop against its bare steps
#   make bench-data    the data pipeline (needs the archive in data/)
#   make bench-sweep   a sweep's runs per hour: one run at a time with 2 threads, two with 1 (needs data/)
#   make bench-deep    the deep preset's step: FLOP rate against the matrix-product peak, phases, memory, PyTorch
#   make ab REV=X      the working tree against git revision X: bit for bit, then the step's speed
#   make venv, dev     only the environment (dev adds pytest and Ray)
#   make clean         removes .venv and pytest's cache (never runs/ or data/)
#   make help          prints this list
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
TRAIN_ARGS ?= --preset fast --subset 0.4 --max-hours 1
CLAIMS_ARGS ?=
SWEEP ?= sweeps/levers.json
SWEEP_ARGS ?=
RUN ?= runs/latest
REV ?=

.PHONY: help venv dev train test report claims sweep docs bench bench-speed bench-faults bench-loop bench-data bench-sweep bench-deep ab clean

help:
	@sed -n '/^# Two/,/^# *make help/p' Makefile | sed 's/^# \{0,1\}//'

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.installed: requirements.txt | $(BIN)/python
	$(BIN)/python -m pip install --quiet -r requirements.txt
	touch $@

$(VENV)/.installed-dev: requirements.txt requirements-dev.txt requirements-ray.txt $(VENV)/.installed
	$(BIN)/python -m pip install --quiet -r requirements-dev.txt
	touch $@

venv: $(VENV)/.installed
dev: $(VENV)/.installed-dev

train: venv
	$(BIN)/python main.py $(TRAIN_ARGS)

# The suite on TEST_JOBS pytest workers (pytest-xdist), each taking whole files: CI's pytest on 2 cores
# took 5.3-8.3 min so (the host varies), 10.6-10.8 min one at a time. TEST_JOBS=1 runs them in this process.
TEST_JOBS ?= 2
test: dev
	$(BIN)/python -m pytest -q tests $(if $(filter-out 1,$(TEST_JOBS)),-n $(TEST_JOBS) --dist loadfile)

report: venv
	$(BIN)/python viz.py $(RUN)

# The method's claims, re-measured: 10 variants x 3 seeds of the fast protocol
# (hours of CPU; resumable: run it again to continue), then runs/claims/comparison/.
claims: venv
	$(BIN)/python claims.py $(CLAIMS_ARGS)

# Any sweep file (sweeps/*.json): variants x seeds, many runs at a time (resumable), then compare.py.
sweep: venv
	$(BIN)/python sweep.py $(SWEEP) $(SWEEP_ARGS)

docs: venv
	$(BIN)/python docs/tables.py

bench: bench-speed bench-faults bench-loop bench-data bench-sweep

bench-speed: venv
	$(BIN)/python benchmarks/speed.py --repeats 3 --profile

bench-faults: venv
	$(BIN)/python benchmarks/page_faults.py

bench-loop: venv
	$(BIN)/python benchmarks/loop_overhead.py --repeats 3

bench-data: venv
	$(BIN)/python benchmarks/data_bench.py --data-dir data

bench-sweep: venv
	$(BIN)/python benchmarks/sweep_jobs.py --subset 0.1 --epochs 2 --repeats 3 --data-dir data

bench-deep: venv
	$(BIN)/python benchmarks/deep_step.py

ab: venv
	@test -n "$(REV)" || { echo 'make ab needs a git revision: make ab REV=ea53f72' >&2; exit 2; }
	$(BIN)/python benchmarks/ab_identical.py $(REV)
	$(BIN)/python benchmarks/ab_presets.py $(REV)
	$(BIN)/python benchmarks/ab_step.py $(REV)

clean:
	rm -rf $(VENV) .pytest_cache
