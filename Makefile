# Two commands for a fresh machine:
#   make test   build if needed, then run the test suite
#   make bench  build if needed, then run the fused-vs-PyTorch benchmark on the best device
# Both install what is missing: torch only if `import torch` fails (as torch==$(TORCH_VERSION)),
# plus the build and test tools (expecttest: torch.testing._internal, whose OpInfo and ModuleInfo
# samples tests/test_exactness.py runs, imports it); `make test` also the frameworks its
# integration tests train with (transformers, accelerate, lightning: pinned to the versions tested,
# none of which asks for another torch) and MONAI's and nnU-Net's losses (their packages alone, no
# dependencies). The extension is rebuilt when a source changed.

PYTHON ?= python3
TORCH_VERSION ?= 2.13.0
PIP := $(PYTHON) -m pip --disable-pip-version-check -q
STAMP := build/.built
# the product's sources (the emulator, tests/emulator and tests/emulated, is the tests':
# tests/emulation.py rebuilds what changed)
SOURCES := $(shell find csrc -type f \( -name '*.cpp' -o -name '*.h' -o -name '*.cu' -o -name '*.cuh' \)) \
           setup.py pyproject.toml
NVCC ?= $(shell command -v nvcc 2>/dev/null || echo /usr/local/cuda/bin/nvcc)

.PHONY: test bench build deps test-deps emulator emulator-asan cuda-headers bench-deps cuda-check \
	cuda-emu-asan gpu-check clean

deps:
	@$(PYTHON) -c "import torch" 2>/dev/null || $(PIP) install "torch==$(TORCH_VERSION)"
	@$(PYTHON) -c "import ninja, pytest, pytest_benchmark, numpy, setuptools, expecttest" 2>/dev/null || \
		$(PIP) install ninja pytest pytest-benchmark numpy "setuptools>=64" expecttest

# The CUDA headers that the emulated CUDA kernels (tests/emulation.py, test-only) are built with: a
# CUDA toolkit's, or else NVIDIA's header wheels (a few MB, no libraries used).
EMU_HEADERS := tests/emulated/headers.py
cuda-headers:
	@$(PYTHON) $(EMU_HEADERS) >/dev/null || $(PIP) install $$($(PYTHON) $(EMU_HEADERS) --wheels)

# the training frameworks of tests/test_mixed_precision_frameworks.py (test-only), and the
# segmentation libraries whose losses tests/test_segmentation_integrations.py compares with:
# their loss modules import with torch and numpy alone, so without their other dependencies
FRAMEWORKS := transformers==5.24.0 accelerate==1.16.0 lightning==2.6.6
SEGMENTATION := monai==1.5.0 nnunetv2==2.8.1 parameterized==0.9.0
test-deps: deps cuda-headers
	@$(PYTHON) -c "import transformers, accelerate, lightning" 2>/dev/null || $(PIP) install $(FRAMEWORKS)
	@$(PYTHON) -c "import monai, nnunetv2, parameterized" 2>/dev/null || \
		$(PIP) install --no-deps $(SEGMENTATION)

# what the benchmark's table and plot use (it runs without them, plainer and with no PNG), and
# the segmentation losses its Dice + cross-entropy cases compare with (SEGMENTATION, above)
bench-deps: deps
	@$(PYTHON) -c "import rich, matplotlib" 2>/dev/null || $(PIP) install rich matplotlib
	@$(PYTHON) -c "import monai, nnunetv2, parameterized" 2>/dev/null || \
		$(PIP) install --no-deps $(SEGMENTATION)

$(STAMP): $(SOURCES) | deps
	$(PIP) install --no-build-isolation --no-deps -e .
	@mkdir -p build && touch $(STAMP)

build: deps $(STAMP)

# the CUDA kernels built by the host compiler against the emulator, as an extension of their own
# (build/emulated/, op namespace weighted_loss_emulated), for the tests; ninja rebuilds what changed
emulator: build test-deps
	$(PYTHON) tests/emulation.py

# the test suite (with the benchmark tool's own tests, which need bench-deps), plus the smoke
# case of the bench/ pytest-benchmark suites (the rest run with `pytest bench/ --benchmark-only`);
# a fixed quarter of the parity grids unless `make test TEST_ARGS=--full-grid`
test: build bench-deps test-deps emulator
	$(PYTHON) -m pytest tests bench -q --durations=25 $(TEST_ARGS)

# the quick suite on the best device: table, bench/out/<stamp>.{json,md,png}; options with
# `make bench ARGS="--full"` or `python bench/suite.py --help`
bench: build bench-deps
	$(PYTHON) bench/suite.py $(ARGS)

# Compiles every CUDA kernel with nvcc for sm_80 and sm_90 (or CUDA_CHECK_ARCHS) without torch;
# fails on an error or a register spill and prints registers per kernel.
cuda-check:
	@bash bench/cuda_check.sh "$(NVCC)"

# The emulated CUDA kernels and the glue built with AddressSanitizer and UndefinedBehaviorSanitizer
# (build/asan/emulated, -O0; the sanitized library loads only with the sanitizer's runtime
# preloaded), run over the tests marked emulated but not asan_skip (docs/development.md, "CI").
# --capture=sys: a sanitizer's report (written to fd 2 as the process dies) reaches the log.
ASAN_PRELOAD = $(shell $(CXX) -print-file-name=libasan.so) $(shell $(CXX) -print-file-name=libstdc++.so)
ASAN_ENV = WEIGHTED_LOSS_SANITIZE=1 LD_PRELOAD="$(ASAN_PRELOAD)" ASAN_OPTIONS=detect_leaks=0
emulator-asan: build test-deps
	$(ASAN_ENV) $(PYTHON) tests/emulation.py
cuda-emu-asan: emulator-asan bench-deps
	$(ASAN_ENV) $(PYTHON) -m pytest tests -q -p no:cacheprovider --capture=sys \
		-m "emulated and not asan_skip"

# On a GPU machine (no network), in one call of under 8 minutes: build for sm_90 against its torch,
# the CUDA-device tests, memcheck, the key benchmark cases; bench/results/<date>-<gpu>.{json,md}.
gpu-check:
	@bash bench/gpu_check.sh

clean:
	rm -rf build weighted_loss/*.so *.egg-info
