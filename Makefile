# Quick start:
#   make demo   builds the CLI and runs its demo: needs CMake >= 3.25 and a C++20 compiler; installs nothing.
#   make test   builds everything (GoogleTest too), installs the pinned Python test packages into .venv
#               (requirements*.txt: numpy, pytest, torch 2.11.0 with its CUDA libraries, diffusers, matplotlib;
#               about 3.5 GB, then cached by pip) and runs every test this machine can run (CTest, then pytest).
PYTHON ?= python3
VENV := .venv
BUILD := build
JOBS ?= $(shell nproc)
# Extra pip arguments, e.g. PIP_ARGS="--find-links /path/to/wheels" to install from local wheels.
PIP_ARGS ?=
REQUIREMENTS := requirements.txt requirements-torch.txt requirements-calibrate.txt

.PHONY: setup build demo test clean

setup: $(VENV)/.installed

# --no-deps: every package is pinned in the requirement files, so nothing floats; `pip check` proves none is
# missing.
$(VENV)/.installed: $(REQUIREMENTS)
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --no-deps --only-binary=:all: $(PIP_ARGS) $(addprefix -r ,$(REQUIREMENTS))
	$(VENV)/bin/pip check
	touch $@

# The demo configures without the tests, so it does not need GoogleTest.
demo:
	cmake -S . -B $(BUILD) -DTILEWISE_TESTS=OFF $(CMAKE_ARGS)
	cmake --build $(BUILD) -j $(JOBS) --target tilewise
	./$(BUILD)/tilewise demo

build:
	cmake -S . -B $(BUILD) -DTILEWISE_TESTS=ON $(CMAKE_ARGS)
	cmake --build $(BUILD) -j $(JOBS)

# The import check turns a broken environment into a failure instead of skipped torch/diffusers/report tests;
# only tests that need a GPU skip here (pytest -rs lists them).
test: build setup
	ctest --test-dir $(BUILD) --output-on-failure -j $(JOBS)
	$(VENV)/bin/python -c "import torch, diffusers, matplotlib, tqdm"
	TILEWISE_LIBRARY=$(CURDIR)/$(BUILD)/libtilewise.so PYTHONPATH=$(CURDIR)/python \
		$(VENV)/bin/python -m pytest -q -rs tests/python

clean:
	rm -rf $(BUILD)
