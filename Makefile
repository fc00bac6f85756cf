# `make test` and `make bench` each set themselves up on a fresh clone: they
# create .venv when no virtual environment is active, install torch and the
# build tools, and build the extension in place.
VENV ?= .venv
TORCH_SPEC ?= torch==2.14.1
TRANSFORMERS_SPEC ?= transformers==5.23.0
DEPS := $(TORCH_SPEC) ninja pybind11 pytest numpy matplotlib $(TRANSFORMERS_SPEC)
export CUDA_HOME ?= /usr/local/cuda

# The extension and the emulated CUDA drivers (make emu) build side by side.
MAKEFLAGS += -j2

ifdef VIRTUAL_ENV
PY := python
else
PY := $(VENV)/bin/python
endif

SOURCES := $(shell find csrc -name '*.cpp' -o -name '*.cu' -o -name '*.h' -o -name '*.cuh') setup.py pyproject.toml
STAMP := build/.installed

.PHONY: test bench bench-full bench-cpu bench-linear bench-vocab-parallel sass setup clean emu mutate

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

test: $(STAMP) emu
	$(PY) -m pytest -q -rs tests

bench: $(STAMP)
	$(PY) bench/bench.py

bench-full: $(STAMP)
	$(PY) bench/bench.py --full

# Issue 20's CPU goals, each measured (tens of minutes on 2 cores; BENCH_ARGS=--quick: a smoke run)
bench-cpu: $(STAMP)
	$(PY) bench/bench_cpu.py $(BENCH_ARGS)

# linear_cross_entropy against F.linear_cross_entropy (heavy on a small CPU: tens of minutes)
bench-linear: $(STAMP)
	$(PY) bench/bench_linear.py

bench-vocab-parallel: $(STAMP)
	$(PY) bench/bench_vocab_parallel.py

# The static SASS report of the CUDA kernels for sm_90 (needs nvcc, no GPU);
# SASS_ARGS=--check fails on a spill inside a hot loop.
sass: build/.deps
	$(PY) tools/sass_report.py $(SASS_ARGS)

# The CUDA kernels compiled as host C++ over the CPU emulation
# (tools/cuda_emu), in three builds: plain, ASan+UBSan, TSan. The tests
# (tests/test_cuda_emulated.py) run them; EMU_CSRC builds another copy of
# csrc/ (the mutation check does).
EMU_CSRC ?= csrc
EMU_OUT ?= build/emu
EMU_VARIANTS ?= plain asan tsan
EMU_CXX ?= $(if $(shell command -v ccache),ccache g++,g++)
EMU_COMMON := -std=c++17 -g -fno-strict-aliasing -pthread -Wall -Wno-unknown-pragmas -Itools/cuda_emu/include
EMU_FLAGS_plain := -O2
EMU_FLAGS_asan := -O1 -fsanitize=address,undefined -fno-sanitize-recover=all -fno-omit-frame-pointer
EMU_FLAGS_tsan := -O1 -fsanitize=thread

emu: $(foreach v,$(EMU_VARIANTS),$(EMU_OUT)/$(v)/driver $(EMU_OUT)/$(v)/jsd_driver)

EMU_OBJECTS := $(foreach v,$(EMU_VARIANTS),$(EMU_OUT)/$(v)/kernels.o $(EMU_OUT)/$(v)/driver.o)
# Kept between builds: a change to the driver alone does not recompile the kernels.
.SECONDARY: $(EMU_OBJECTS)

# Each object is rebuilt when a file it includes changes, as the compiler
# lists them (-MMD: kernels.d, driver.d; a missing list rebuilds it), not on
# every change under csrc/.
EMU_DEPS := -MMD -MP
-include $(wildcard $(EMU_OUT)/*/*.d)
$(EMU_OBJECTS:.o=.d): ;

$(EMU_OUT)/%/kernels.o: $(EMU_CSRC)/cuda/kernels.cu $(EMU_OUT)/%/kernels.d
	@mkdir -p $(@D)
	$(EMU_CXX) $(EMU_COMMON) $(EMU_DEPS) $(EMU_FLAGS_$*) -x c++ -c $< -o $@

$(EMU_OUT)/%/driver.o: tools/cuda_emu/driver.cpp $(EMU_OUT)/%/driver.d
	@mkdir -p $(@D)
	$(EMU_CXX) $(EMU_COMMON) $(EMU_DEPS) $(EMU_FLAGS_$*) -c $< -o $@

$(EMU_OUT)/%/driver: $(EMU_OUT)/%/kernels.o $(EMU_OUT)/%/driver.o
	$(EMU_CXX) $(EMU_FLAGS_$*) -pthread $^ -o $@

# The generalized JSD's kernels (csrc/cuda/jsd.cu) and their driver, the same way.
$(EMU_OUT)/%/jsd.o: $(EMU_KERNEL_SOURCES) $(EMU_TOOL)
	@mkdir -p $(@D)
	$(EMU_CXX) $(EMU_COMMON) $(EMU_FLAGS_$*) -x c++ -c $(EMU_CSRC)/cuda/jsd.cu -o $@

$(EMU_OUT)/%/jsd_driver.o: tools/cuda_emu/jsd_driver.cpp csrc/cuda/jsd_kernels.h csrc/jsd_params.h $(EMU_TOOL)
	@mkdir -p $(@D)
	$(EMU_CXX) $(EMU_COMMON) $(EMU_FLAGS_$*) -c $< -o $@

$(EMU_OUT)/%/jsd_driver: $(EMU_OUT)/%/jsd.o $(EMU_OUT)/%/jsd_driver.o
	$(EMU_CXX) $(EMU_FLAGS_$*) -pthread $^ -o $@

# Injects typical GPU bugs into copies of kernels.cu and checks that the
# emulated tests catch each one (minutes per bug; not part of CI).
mutate: $(STAMP)
	$(PY) tools/cuda_emu/mutate.py

clean:
	rm -rf build *.egg-info fused_softmax_ce/_C*.so
