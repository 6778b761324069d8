# mtvision — the README's commands. `make demo` and `make test` do all the set-up on a fresh machine.
#   make install   .venv with pinned torch/torchvision, the package (editable, with the test and
#                  ONNX export extras) and its C++/CUDA ops
#   make demo      install, then train on the built-in synthetic scenes, evaluate, write pictures
#   make test      install, then pytest and the C++ tests (ctest); pytest in PYTEST_WORKERS processes
#                  (pytest-xdist, default 2 for the CI's 2 cores, one torch thread each: tests/conftest.py)
#   make test-fast install, then the tests marked neither slow (subprocesses, real training runs) nor
#                  distributed (several processes): about a minute on 2 cores; no ctest
#   make bench     tools/benchmark.py (ops and training steps against their baselines)
# CUDA kernels are compiled whenever a CUDA toolkit is found (nvcc, or CUDA_HOME); MTV_CPU_ONLY=1
# skips them, FORCE_CUDA=1 insists. TORCH_CUDA_ARCH_LIST picks the GPU architectures (default 8.0;9.0).

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.mtvision-installed
CSRC := $(shell find csrc -name '*.cpp' -o -name '*.cu' -o -name '*.h')
CMAKE_BUILD := build-cmake
TORCH_PIN := torch==2.14.1 torchvision==0.29.1
# torch's CMake config probes for a GPU unless given architectures, also when `cmake --build`
# re-runs the configure step after a source file is added.
CMAKE_ENV := TORCH_CUDA_ARCH_LIST="$${TORCH_CUDA_ARCH_LIST:-9.0}"
# --dist loadfile: each test file in one process, so a module's fixtures (ONNX exports, training runs)
# are built once
PYTEST_WORKERS ?= 2

.PHONY: install demo test test-fast pytest ctest bench clean

install: $(STAMP)

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip setuptools wheel ninja

$(STAMP): $(PY) setup.py pyproject.toml $(CSRC)
	$(PIP) install -q $(TORCH_PIN)
	$(PIP) install -q --no-build-isolation -e '.[test,export]'
	$(PY) -c "import torch, mtvision.ops as o; print('mtvision ops built; CUDA kernels:', o.cuda_kernels_available())"
	touch $(STAMP)

demo: $(STAMP)
	$(PY) tools/demo.py

test: pytest ctest

pytest: $(STAMP)
	$(PY) -m pytest -q --durations=25 -n $(PYTEST_WORKERS) --dist loadfile

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow and not distributed"

# GoogleTest comes from Debian's libgtest-dev; installed here when missing and we may (root + apt).
ctest: $(STAMP)
	@if [ ! -f /usr/include/gtest/gtest.h ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q libgtest-dev; \
	  else echo "make ctest: GoogleTest is missing: install Debian's libgtest-dev (sudo apt-get install libgtest-dev)"; exit 1; fi; \
	fi
	@command -v cmake >/dev/null || { echo "make ctest: cmake is missing (apt-get install cmake)"; exit 1; }
	$(CMAKE_ENV) $(PY) tools/cmake_configure.py $(CMAKE_BUILD)
	$(CMAKE_ENV) cmake --build $(CMAKE_BUILD) -j2
	ctest --test-dir $(CMAKE_BUILD) --output-on-failure

bench: $(STAMP)
	$(PY) tools/benchmark.py

clean:
	rm -rf build $(CMAKE_BUILD) mtvision/_C*.so *.egg-info
