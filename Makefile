# The two commands of the README:
#   make bench   set up, then run the benchmark demo against torch
#   make test    set up, then run the test suite (what CI runs)
# Set-up: a virtual environment in .venv with torch installed first (the CPU
# wheel; a bare `torch` requirement would pull several GB of CUDA packages),
# then fastclip built in editable mode with its test, benchmark, triton and
# integration (Lightning) extras (without a GPU the tests run the Triton
# kernels in its interpreter).

PYTHON ?= python3
TORCH ?= torch==2.13.0
VENV := .venv
PY := $(VENV)/bin/python
SOURCES := pyproject.toml setup.py $(wildcard csrc/*/*.cpp csrc/*/*.h csrc/*/*.cu)

.PHONY: setup test bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: $(SOURCES)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet $(TORCH)
	$(PY) -m pip install --quiet -e '.[test,bench,triton,integration]'
	touch $@

test: setup
	$(PY) -m pytest tests -q

bench: setup
	$(PY) -m benchmarks

clean:
	rm -rf $(VENV) build fastclip/*.so *.egg-info
