#!/usr/bin/env bash
# The GPU checks, in phases, for a lent CUDA machine with a PyTorch 2.x wheel (no network).
# Results go to $OUT (default ./gpu-out): build.log, gpu-tests.log, bench-<name>.json (+ bench.log
# with the progress lines), profile.json + profile-trace.json, summary.txt.
#
#   scripts/gpu-check.sh build tests                     # first device call (about 6 minutes)
#   scripts/gpu-check.sh bench memory profile summary    # second call, same warm machine (about 6)
# (no phase given: build tests bench summary)
#
# Phases:
#   build    the project against the wheel's libtorch (../shared/device/gpu-build.sh, staged into
#            .gpu-carry by ../shared/device/stage.sh), plus the wuerstchen_profile tool
#   tests    the gpu-labelled tests (CUDA fp32 / fp16 vs references, offload, graphs) and the
#            CUDA cases of the CPU suite (Lora.Cuda*)
#   bench    `wuerstchen bench` at the real sizes with random weights, 1024x1024, prior 29 steps
#            with guidance 4, decoder 12 steps, fp16: batch 1 eager, batch 1 with CUDA graphs,
#            batch 4 with CUDA graphs (the speed targets), batch 1 with graphs and channels-last
#   memory   batch 1 with --offload, with --sequential-offload, and bf16 with graphs
#   profile  one eager batch-1 run under the Kineto profiler: top CUDA kernels in profile.json
#   summary  scripts/bench-summary.py --targets over the bench JSON files: one table (stage
#            times, peak memory per stage) and the issue's bounds, in summary.txt
# Every step has its own time limit so that one hang cannot use up the machine's time; a failed
# step is reported and the next one still runs.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-gpu-out}"
mkdir -p "$OUT"
BUILD="${BUILD:-build-gpu}"
CLI="$BUILD/examples/wuerstchen/wuerstchen"
PROFILER="$BUILD/examples/wuerstchen/wuerstchen_profile"
status=0

step() {  # step NAME SECONDS COMMAND...
    local name=$1 limit=$2
    shift 2
    local t0=$SECONDS
    if timeout "$limit" "$@"; then
        echo "== $name: ok ($((SECONDS - t0)) s)"
    else
        echo "== $name: FAILED or timed out (exit $?, $((SECONDS - t0)) s)"
        status=1
    fi
}

env_sh() {  # the library path of the carried packages
    # shellcheck disable=SC1091
    [ -f "$BUILD/env.sh" ] && . "$BUILD/env.sh"
    return 0
}

bench() {  # bench NAME LIMIT FLAGS...
    local name=$1 limit=$2
    shift 2
    step "bench $name" "$limit" "$CLI" bench --random-weights --device cuda --runs 3 --warmup 1 \
        "$@" > "$OUT/bench-$name.json" 2>> "$OUT/bench.log"
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpu.txt" 2>&1
[ $# -gt 0 ] || set -- build tests bench summary
for phase in "$@"; do
    case "$phase" in
        build)
            step "build" 420 sh .gpu-carry/gpu-build.sh > "$OUT/build.log" 2>&1
            step "build wuerstchen_profile" 120 cmake --build "$BUILD" --target wuerstchen_profile \
                -j 16 >> "$OUT/build.log" 2>&1
            ;;
        tests)
            env_sh
            step "gpu tests" 240 ctest --test-dir "$BUILD" -L gpu --output-on-failure \
                > "$OUT/gpu-tests.log" 2>&1
            step "cuda cases of the cpu suite" 120 ctest --test-dir "$BUILD" -R '\.Cuda' \
                --output-on-failure >> "$OUT/gpu-tests.log" 2>&1
            ;;
        bench)
            env_sh
            bench b1-fp16-eager 120 --dtype fp16
            bench b1-fp16-graphs 120 --dtype fp16 --cuda-graphs
            bench b4-fp16-graphs 150 --dtype fp16 --cuda-graphs --batch 4
            bench b1-fp16-graphs-cl 120 --dtype fp16 --cuda-graphs --channels-last
            ;;
        memory)
            env_sh
            bench b1-fp16-offload 150 --dtype fp16 --offload
            bench b1-fp16-sequential 240 --dtype fp16 --sequential-offload --runs 1
            bench b1-bf16-graphs 120 --dtype bf16 --cuda-graphs
            ;;
        profile)
            env_sh
            step "profile" 150 "$PROFILER" bench --random-weights --device cuda --dtype fp16 \
                --runs 1 --warmup 1 --profile "$OUT/profile-trace.json" \
                > "$OUT/profile.json" 2>> "$OUT/bench.log"
            ;;
        summary)
            # Its exit status says whether every bound held; the phase itself only reports.
            python3 scripts/bench-summary.py --targets "$OUT"/bench-*.json > "$OUT/summary.txt" 2>&1
            echo "== summary: $OUT/summary.txt"
            cat "$OUT/summary.txt"
            ;;
        *)
            echo "unknown phase '$phase' (build, tests, bench, memory, profile, summary)" >&2
            exit 2
            ;;
    esac
done
exit $status
