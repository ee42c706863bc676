# The verbs a user types. `make run` and `make test` set everything up first.
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
PIP    := $(BIN)/python -m pip install --disable-pip-version-check -q

.PHONY: setup run test test-fast lint format bench bench-gpu bench-gpu-prepare images clean

setup: $(STAMP)

# torch/torchvision go in first and stay pinned (constraints.txt) for every later install,
# so no other package can pull a different (multi-GB) torch build.
$(STAMP): pyproject.toml constraints.txt
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) --upgrade pip
	$(PIP) -c constraints.txt torch torchvision
	$(PIP) -c constraints.txt -e '.[dev]'
	@touch $(STAMP)

run: setup
	$(BIN)/drseg --config configs/local.yaml run

# One worker per core, each file on one worker (its module fixtures built once), the
# longest files first (tests/conftest.py: SLOWEST_FIRST).
test: setup
	$(BIN)/pytest -n auto --dist loadfile --no-loadscope-reorder

test-fast: setup
	$(BIN)/pytest -m "not integration"

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

format: setup
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

# The four container images (images/); needs a Docker engine with BuildKit.
images:
	images/build.sh

bench: setup
	$(BIN)/python bench/ingest_clahe.py

# drseg measured on one GPU in one command (bench/gpu_suite.py, at most ~8 minutes): every
# figure into $(OUT)/gpu_suite.json and .md. IDRID: the IDRiD lesion set (default .gpu/idrid).
bench-gpu:
	bench/gpu_run.sh

# For a GPU machine without a package index: wheels, IDRiD and its validation photographs
# into .gpu/ (git-ignored), to copy along with the checkout.
bench-gpu-prepare: setup
	bench/gpu_prepare.sh $(IDRID)

clean:
	rm -rf .drseg .pytest_cache .mypy_cache .ruff_cache
