#!/usr/bin/env bash
# Builds the libFuzzer targets of fuzz/ with clang (ASan + UBSan) into build-fuzz/ and runs each
# for SECONDS (default 600), printing libFuzzer's final statistics (executions, coverage).
#
#   scripts/fuzz.sh [SECONDS]
#
# Environment:
#   FUZZ_TARGETS  targets to run (default: all four)
#   FUZZ_JOBS     targets run at the same time (default 2)
#   JOBS          build parallelism (default 2)
#   FUZZ_ARGS     extra libFuzzer flags, e.g. "-max_len=65536"
#   CXX           clang++ to use (default clang++)
#
# Corpora: the seeds in fuzz/corpus/<target>/ are read; new inputs go to fuzz/corpus-run/<target>/
# (git-ignored, kept between runs). Crashes, leaks and timeouts are written to
# build-fuzz/artifacts/<target>/ and make the script exit non-zero; reproduce one with
# build-fuzz/<target> <file>. Logs: build-fuzz/logs/<target>.log.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT="$(pwd)"
SECONDS_PER_TARGET="${1:-600}"
TARGETS=(${FUZZ_TARGETS:-fuzz_config fuzz_safetensors fuzz_tokenizer fuzz_tokenizer_files})
PARALLEL="${FUZZ_JOBS:-2}"
BUILD="$ROOT/build-fuzz"
CXX="${CXX:-clang++}"

if ! command -v "$CXX" >/dev/null 2>&1 || ! "$CXX" --version | grep -q clang; then
    echo "fuzz.sh: needs clang++ with libFuzzer (Debian: apt-get install clang libclang-rt-dev)" >&2
    exit 2
fi

cmake -S fuzz -B "$BUILD" -DCMAKE_CXX_COMPILER="$CXX" -DCMAKE_BUILD_TYPE=RelWithDebInfo >/dev/null
nice -n 10 cmake --build "$BUILD" -j "${JOBS:-2}" --target "${TARGETS[@]}"

# libFuzzer's own leak check runs after every input; libtorch's thread pools stay alive for the
# process and are not reported. UBSan findings abort (-fno-sanitize-recover=all) with a stack.
export ASAN_OPTIONS="${ASAN_OPTIONS:-detect_leaks=1:abort_on_error=1:symbolize=1}"
export UBSAN_OPTIONS="${UBSAN_OPTIONS:-print_stacktrace=1:halt_on_error=1}"
export OMP_NUM_THREADS=1

run_one() {
    local target="$1"
    mkdir -p "$ROOT/fuzz/corpus-run/$target" "$BUILD/artifacts/$target" "$BUILD/logs"
    local log="$BUILD/logs/$target.log"
    local rc=0
    # shellcheck disable=SC2086
    (cd "$BUILD" && nice -n 19 "./$target" -max_total_time="$SECONDS_PER_TARGET" -timeout=30 \
        -print_final_stats=1 -artifact_prefix="$BUILD/artifacts/$target/" ${FUZZ_ARGS:-} \
        "$ROOT/fuzz/corpus-run/$target" "$ROOT/fuzz/corpus/$target") >"$log" 2>&1 || rc=$?
    echo "$rc" >"$BUILD/logs/$target.rc"
}

pids=()
for target in "${TARGETS[@]}"; do
    while [ "$(jobs -rp | wc -l)" -ge "$PARALLEL" ]; do wait -n || true; done
    echo "fuzz.sh: running $target for ${SECONDS_PER_TARGET}s"
    run_one "$target" &
    pids+=($!)
done
for pid in "${pids[@]}"; do wait "$pid" || true; done

status=0
printf '\n%-22s %12s %8s %8s %8s %s\n' target executions exec/s cov ft result
for target in "${TARGETS[@]}"; do
    log="$BUILD/logs/$target.log"
    rc="$(cat "$BUILD/logs/$target.rc" 2>/dev/null || echo '?')"
    execs="$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)"
    speed="$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log" | tail -1)"
    last="$(grep -E '^#[0-9]+' "$log" | tail -1 || true)"
    cov="$(sed -n 's/.* cov: \([0-9]*\).*/\1/p' <<<"$last")"
    ft="$(sed -n 's/.* ft: \([0-9]*\).*/\1/p' <<<"$last")"
    result=ok
    if [ "$rc" != 0 ]; then
        result="FAILED (rc $rc, see $log; artifacts in $BUILD/artifacts/$target/)"
        status=1
    fi
    printf '%-22s %12s %8s %8s %8s %s\n' "$target" "${execs:-?}" "${speed:-?}" "${cov:-?}" "${ft:-?}" "$result"
done
exit "$status"
