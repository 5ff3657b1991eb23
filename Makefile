# Thin wrapper around CMake. `make demo` runs the main job, `make test` passes the tests; both
# install missing Debian packages first (scripts/install-deps.sh).
BUILD      ?= build
TEST_BUILD ?= build-asan
FUZZ_BUILD ?= build-fuzz
PYTHON     ?= /usr/bin/python3
JOBS       ?= $(shell nproc)

.PHONY: all build deps browser-deps test unit integration conformance fuzz-smoke bench demo clean

all: build

deps:
	@scripts/install-deps.sh

build: deps
	cmake -S . -B $(BUILD) -DCMAKE_BUILD_TYPE=RelWithDebInfo >/dev/null
	cmake --build $(BUILD) -j $(JOBS)

# The whole suite, as CI runs it: an ASan+UBSan build with warnings as errors, the unit tests,
# the integration tests and the change-stream conformance run against that build, then the
# fuzz targets for a short while each.
test: deps
	cmake -S . -B $(TEST_BUILD) -DCMAKE_BUILD_TYPE=Debug -DMC_SANITIZE=ON -DMC_WERROR=ON >/dev/null
	cmake --build $(TEST_BUILD) -j $(JOBS)
	$(MAKE) --no-print-directory unit integration conformance fuzz-smoke BUILD=$(TEST_BUILD)

unit:
	cd $(BUILD) && ctest -L unit --output-on-failure -j $(JOBS)

# Chromium (Debian's) and playwright-core for the viewer test in tests/integration; no browser
# is ever downloaded.
browser-deps:
	@scripts/install-deps.sh --browser
	cd tests/browser && PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1 npm install --no-audit --no-fund --prefer-offline

integration: browser-deps
	MC_BUILD_DIR=$(abspath $(BUILD)) $(PYTHON) -m pytest -q tests/integration

conformance:
	MC_BUILD_DIR=$(abspath $(BUILD)) $(PYTHON) tests/conformance/run.py

fuzz-smoke: deps
	CC=clang cmake -S . -B $(FUZZ_BUILD) -DCMAKE_BUILD_TYPE=Debug -DMC_FUZZ=ON -DMC_BUILD_TESTS=OFF >/dev/null
	cmake --build $(FUZZ_BUILD) -j $(JOBS)
	scripts/fuzz-smoke.sh $(FUZZ_BUILD) 20

bench: build
	scripts/bench.sh $(BUILD)

demo: build
	scripts/demo.sh $(BUILD)

clean:
	rm -rf $(BUILD) $(TEST_BUILD) $(FUZZ_BUILD)
