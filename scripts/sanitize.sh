#!/usr/bin/env bash
# Builds the library and the test suite with AddressSanitizer + UndefinedBehaviorSanitizer
# (-DWUERSTCHEN_SANITIZE=ON) into build-asan/ and runs every CPU test under them.
#
#   scripts/sanitize.sh [ctest arguments...]     e.g. scripts/sanitize.sh -R 'SafeTensors|Fuzz'
#
# Environment: BUILD_DIR (default build-asan), BUILD_TYPE (default RelWithDebInfo), JOBS (build
# and ctest parallelism, default 2), CMAKE_ARGS (extra configure arguments).
#
# Any ASan or UBSan report fails the test that triggered it (halt_on_error, non-zero exit).
# LeakSanitizer stays on: libtorch keeps its allocations reachable at exit, so it reports
# nothing unless the library leaks. The consumer_find_package test is skipped: it links a
# separate, uninstrumented program against the instrumented library, which tests packaging,
# not memory safety (scripts/test.sh runs it).
set -euo pipefail
cd "$(dirname "$0")/.."
BUILD_DIR="${BUILD_DIR:-build-asan}"
JOBS="${JOBS:-2}"

# Exported before the build as well: gtest_discover_tests runs the instrumented test binary
# at build time to list the tests.
export ASAN_OPTIONS="${ASAN_OPTIONS:-detect_leaks=1:abort_on_error=0:halt_on_error=1:strict_string_checks=1:detect_stack_use_after_return=1:check_initialization_order=1}"
export UBSAN_OPTIONS="${UBSAN_OPTIONS:-print_stacktrace=1:halt_on_error=1}"
# Fewer torch threads: less noise in reports, and the tests stay fast under ASan.
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}"
export CCACHE_SLOPPINESS="${CCACHE_SLOPPINESS:-pch_defines,time_macros,include_file_mtime,include_file_ctime}"

GENERATOR=()
if command -v ninja >/dev/null 2>&1; then GENERATOR=(-G Ninja); fi
# shellcheck disable=SC2086
cmake -S . -B "$BUILD_DIR" "${GENERATOR[@]}" -DWUERSTCHEN_SANITIZE=ON \
    -DCMAKE_BUILD_TYPE="${BUILD_TYPE:-RelWithDebInfo}" -DWUERSTCHEN_BUILD_EXAMPLES=ON ${CMAKE_ARGS:-}
cmake --build "$BUILD_DIR" -j "$JOBS"
ctest --test-dir "$BUILD_DIR" --output-on-failure -j "$JOBS" -LE gpu -E '^consumer_find_package$' "$@"
