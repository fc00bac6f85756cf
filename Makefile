# `make test` and `make bench` each set themselves up on a fresh clone: they
# create .venv when no virtual environment is active, install torch and the
# build tools, and build the extension in place.
VENV ?= .venv
TORCH_SPEC ?= torch==2.14.1
TRANSFORMERS_SPEC ?= transformers==5.23.0
DEPS := $(TORCH_SPEC) ninja pybind11 pytest numpy matplotlib $(TRANSFORMERS_SPEC)
export CUDA_HOME ?= /usr/local/cuda

ifdef VIRTUAL_ENV
PY := python
else
PY := $(VENV)/bin/python
endif

SOURCES := $(shell find csrc -name '*.cpp' -o -name '*.cu' -o -name '*.h' -o -name '*.cuh') setup.py pyproject.toml
STAMP := build/.installed

.PHONY: test bench bench-full bench-linear bench-vocab-parallel sass setup clean

setup: $(STAMP)

$(PY):
	python3 -m venv $(VENV)

build/.deps: | $(PY)
	$(PY) -m pip install -q $(DEPS)
	@mkdir -p build && touch $@

# --no-build-isolation: compile against the torch installed above, not a
# second copy in a throwaway build environment.
$(STAMP): build/.deps $(SOURCES)
	$(PY) -m pip install -q --no-build-isolation --no-deps -e .
	@touch $@

test: $(STAMP)
	$(PY) -m pytest -q -rs tests

bench: $(STAMP)
	$(PY) bench/bench.py

bench-full: $(STAMP)
	$(PY) bench/bench.py --full

# linear_cross_entropy against F.linear_cross_entropy (heavy on a small CPU: tens of minutes)
bench-linear: $(STAMP)
	$(PY) bench/bench_linear.py

bench-vocab-parallel: $(STAMP)
	$(PY) bench/bench_vocab_parallel.py

# The static SASS report of the CUDA kernels for sm_90 (needs nvcc, no GPU);
# SASS_ARGS=--check fails on a spill inside a hot loop.
sass: build/.deps
	$(PY) bench/sass_report.py $(SASS_ARGS)

clean:
	rm -rf build *.egg-info fused_softmax_ce/_C*.so
