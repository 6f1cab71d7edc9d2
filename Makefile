# One entry point. Each target does its own set-up: creates .venv and installs the pinned
# environment (pyproject.toml) the first time, or again when pyproject.toml changes.
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
CORES ?= all

.PHONY: setup test test-fast figures demo report report-test slurm-test check-model benchmark gpu-check clean-results

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; assert sys.version_info[:2] == (3, 11), "Python 3.11 is required (found %s); set PYTHON=/path/to/python3.11" % sys.version.split()[0]'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# torch first, pinned: on this project's CPU machines pip takes the local CPU build.
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e '.[test]'
	@touch $(STAMP)

setup: $(STAMP)

## Run the test suite (what CI runs): one pytest-xdist worker per core, each test file on one worker
## (its module fixtures are built once); TEST_WORKERS=0 runs it in this process.
TEST_WORKERS ?= auto
test: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile --durations=25

## Regenerate every figure and table from GPT-2 small (needs network once, or model_path).
figures: $(STAMP)
	$(BIN)/python -m ioi check-model --configfile config/config.yaml
	$(BIN)/snakemake --cores $(CORES)

## The whole figure DAG on the planted-circuit model, offline.
demo: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/snakemake --cores $(CORES) --configfile config/offline.yaml

## The HTML report (one self-contained file) of the configured model's results.
report: $(STAMP)
	$(BIN)/snakemake --cores $(CORES) --report results/report.html

## The report of the CI demo opened in headless Chromium (screenshot: results/planted-ioi-ci/browser/).
report-test: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q tests/test_report_browser.py

## Part of the CI demo through profiles/slurm on a one-node SLURM cluster started here (root; also in `make test`).
slurm-test: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q tests/test_slurm.py

check-model: $(STAMP)
	$(BIN)/python -m ioi check-model --configfile config/config.yaml

benchmark: $(STAMP)
	$(BIN)/python benchmarks/patching.py

## On a CUDA machine: device tests on the GPU, benchmarks/patching.py and benchmarks/dag.py on CUDA, one table.
gpu-check: $(STAMP)
	$(BIN)/python benchmarks/gpu_check.py

clean-results:
	rm -rf results .snakemake
