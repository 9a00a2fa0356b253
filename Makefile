# Quick start: `make demo` (set up, build, run the demo) and `make test` (build and run every test).
PYTHON ?= python3
VENV := .venv
BUILD := build
JOBS ?= $(shell nproc)
CUTLASS_DIR = $(shell $(VENV)/bin/python -c "import cutlass_library, os; print(os.path.join(os.path.dirname(cutlass_library.__file__), 'source', 'include'))")

.PHONY: setup configure build demo test clean

setup: $(VENV)/.installed

$(VENV)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --no-deps -r requirements.txt
	touch $@

configure: setup
	cmake -S . -B $(BUILD) -DTILEWISE_CUTLASS_DIR="$(CUTLASS_DIR)" $(CMAKE_ARGS)

build: configure
	cmake --build $(BUILD) -j $(JOBS)

demo: build
	./$(BUILD)/tilewise demo

test: build
	ctest --test-dir $(BUILD) --output-on-failure -j $(JOBS)
	TILEWISE_LIBRARY=$(CURDIR)/$(BUILD)/libtilewise.so PYTHONPATH=$(CURDIR)/python $(VENV)/bin/python -m pytest -q tests/python

clean:
	rm -rf $(BUILD)
