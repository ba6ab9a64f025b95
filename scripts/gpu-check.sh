#!/usr/bin/env bash
# The whole GPU check in one go, for a lent CUDA machine with a PyTorch 2.x wheel (no network):
# the gpu-labelled tests, then `wuerstchen bench` at the real model sizes with random weights
# (1024x1024, prior 29 steps with guidance 4, decoder 12 steps: the anchors of the speed issue)
# in each mode that has a target. Results go to $OUT (default ./gpu-out): gpu-tests.log, one
# bench-<name>.json per run, bench.log with the progress lines.
#
#   sh .gpu-carry/gpu-build.sh && scripts/gpu-check.sh [quick]
#
# The build (build-gpu/, env.sh) is what ../shared/device/gpu-build.sh makes. Every step has its
# own time limit so that one hang cannot use up the machine's time; a failed step is reported
# and the next one still runs. `quick` runs the tests and the batch-1 benches only.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-gpu-out}"
mkdir -p "$OUT"
BUILD="${BUILD:-build-gpu}"
# shellcheck disable=SC1091
[ -f "$BUILD/env.sh" ] && . "$BUILD/env.sh"
CLI="$BUILD/examples/wuerstchen/wuerstchen"
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

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpu.txt" 2>&1

step "gpu tests" 240 ctest --test-dir "$BUILD" -L gpu --output-on-failure \
    > "$OUT/gpu-tests.log" 2>&1

bench() {  # bench NAME FLAGS...
    local name=$1
    shift
    step "bench $name" 150 "$CLI" bench --random-weights --device cuda --runs 3 --warmup 1 "$@" \
        > "$OUT/bench-$name.json" 2>> "$OUT/bench.log"
}
bench b1-fp16-eager --dtype fp16
bench b1-fp16-graphs --dtype fp16 --cuda-graphs
if [ "${1:-}" != quick ]; then
    bench b4-fp16-graphs --dtype fp16 --cuda-graphs --batch 4
    bench b1-bf16-graphs --dtype bf16 --cuda-graphs
    bench b1-fp16-offload --dtype fp16 --offload
    bench b1-fp16-sequential --dtype fp16 --sequential-offload --runs 1
fi
exit $status
