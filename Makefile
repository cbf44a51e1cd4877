# The two commands of the README:
#   make bench   set up, then run the benchmark demo against torch
#   make test    set up, then run the test suite (what CI runs)
# Set-up: a virtual environment in .venv with torch installed first (the CPU
# wheel; a bare `torch` requirement would pull several GB of CUDA packages),
# then fastclip built in editable mode with its test, benchmark, triton and
# integration (Lightning) extras (without a GPU the tests run the Triton
# kernels in its interpreter), and timm without its dependencies.

PYTHON ?= python3
TORCH ?= torch==2.13.0
# The oldest triton fastclip supports (pyproject.toml's minimum; what torch
# 2.11 and 2.12 CUDA builds bring): its interpreter runs the Triton cases too.
TRITON_OLDEST ?= 3.6.0
VENV := .venv
PY := $(VENV)/bin/python
TRITON_OLDEST_DIR := $(VENV)/triton-$(TRITON_OLDEST)
SOURCES := pyproject.toml setup.py $(wildcard csrc/*/*.cpp csrc/*/*.h csrc/*/*.cu)

.PHONY: setup test test-triton-oldest bench gpu-deps sanitize clean

setup: $(VENV)/.installed

$(VENV)/.installed: $(SOURCES)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet $(TORCH)
	$(PY) -m pip install --quiet -e '.[test,bench,triton,integration]'
	# timm's AGC is the reference of adaptive_clip_grad_: without its dependencies (a plain
	# install would swap in a CUDA torch); the tests load its utils/agc.py by file
	$(PY) -m pip install --quiet --no-deps timm
	touch $@

# The whole suite with the newest triton (the venv's), then the Triton cases
# again with the oldest one (an overlay on PYTHONPATH) and Triton's
# interpreter as shipped (without tests/conftest.py's speed-up shim).  The
# oldest run leaves out the suites of ZClip, QuantileClip and the training-step
# functions: they launch no kernel of their own (the norm, scale and
# segmented kernels the other suites cover), and CI must stay under 15 minutes.
test: setup
	$(PY) -m pytest tests -q
	$(MAKE) test-triton-oldest

$(TRITON_OLDEST_DIR)/.installed:
	$(PY) -m pip install --quiet --no-deps --target $(TRITON_OLDEST_DIR) triton==$(TRITON_OLDEST)
	touch $@

test-triton-oldest: setup $(TRITON_OLDEST_DIR)/.installed
	PYTHONPATH=$(TRITON_OLDEST_DIR) FASTCLIP_TEST_FAST_INTERPRETER=0 FASTCLIP_EXPECT_TRITON=$(TRITON_OLDEST) \
		$(PY) -m pytest tests -q -k triton -p no:cacheprovider \
		--ignore=tests/test_zclip.py --ignore=tests/test_quantile_clip.py --ignore=tests/test_training_step.py

# The references the method tests and benchmarks compare with on a lent GPU
# machine, which has no network: zclip and autoclip (pure Python) and timm's
# AGC files (loaded by file), copied into .ci/gpu-deps (git-ignored).  `bash
# .ci/gpu` puts that folder on PYTHONPATH; the device tool carries it
# (carry=[".ci/gpu-deps"], about 0.3 MB).
GPU_DEPS := .ci/gpu-deps
gpu-deps: setup
	rm -rf $(GPU_DEPS)
	$(PY) -m pip install --quiet --no-deps --target $(GPU_DEPS) zclip==1.0.0 autoclip==0.2.1
	mkdir -p $(GPU_DEPS)/timm/utils  # (a namespace package: no __init__.py, nothing of timm's runs on import)
	timm=$$($(PY) -c "import importlib.util as u; print(list(u.find_spec('timm').submodule_search_locations)[0])") \
		&& cp $$timm/utils/agc.py $$timm/utils/clip_grad.py $(GPU_DEPS)/timm/utils/

# The whole suite with the CPU kernels and the CUDA emulation built with
# AddressSanitizer and UndefinedBehaviorSanitizer (setup.py's
# FASTCLIP_SANITIZE=1), in a copy of the tree under build/ so the regular
# in-place build stays as it is.  A finding stops the run with its report.
# ~15 minutes on 2 cores; not part of `make test`.  max_malloc_fill_size=0:
# fresh allocations stay unwritten, as a test past 2^31 elements relies on.
SANITIZE_DIR := build/sanitize
sanitize: setup
	rm -rf $(SANITIZE_DIR) && mkdir -p $(SANITIZE_DIR)
	git ls-files -z --cached --others --exclude-standard \
		| tar --null --ignore-failed-read -T - -cf - | tar -xf - -C $(SANITIZE_DIR)
	cd $(SANITIZE_DIR) && FASTCLIP_CUDA=0 FASTCLIP_SANITIZE=1 $(abspath $(PY)) setup.py -q build_ext --inplace
	cd $(SANITIZE_DIR) && LD_PRELOAD="$$(g++ -print-file-name=libasan.so) $$(g++ -print-file-name=libubsan.so)" \
		ASAN_OPTIONS=detect_leaks=0:max_malloc_fill_size=0 UBSAN_OPTIONS=print_stacktrace=1 \
		$(abspath $(PY)) -m pytest tests -q -p no:cacheprovider $(PYTEST_ARGS)

bench: setup
	$(PY) -m benchmarks

clean:
	rm -rf $(VENV) build fastclip/*.so *.egg-info
