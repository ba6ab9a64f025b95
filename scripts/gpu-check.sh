#!/usr/bin/env bash
# The GPU checks, in phases, for a lent CUDA machine with a PyTorch 2.x wheel (no network).
# Results go to $RESULTS (default ./gpu-out): build.log, gpu-tests.log, bench-<name>.json (+ bench.log
# with the progress lines), profile.json + profile-trace.json + profile-summary.txt, summary.txt.
# After every phase they are also packed into $OUT (the device tool's return folder, which takes
# few files), when set: results.tar.gz (all but the trace), profile-trace.json.gz, summary.txt and
# profile-summary.txt.
#
#   scripts/gpu-check.sh                   # every phase, most important first (one device call)
#   scripts/gpu-check.sh build tests       # chosen phases, in the order given
#
# GPU_CHECK_DEADLINE (seconds from the start, default 540) bounds the whole run: each step's own
# limit is cut to what is left, and a step that would have under 20 s is skipped and reported, so
# the command ends inside one device call and what ran comes back. The summary always runs.
#
# Phases:
#   build    the project against the wheel's libtorch, configured as ../shared/device/gpu-build.sh
#            does (its packages staged into .gpu-carry by ../shared/device/stage.sh); only the
#            targets the checks use (BUILD_TARGETS; default library, CLI, wuerstchen_profile,
#            the test executables)
#   smoke    the bench with the tiny models on CUDA; the later phases are skipped if it fails
#   headline `wuerstchen bench` at the real sizes with random weights, 1024x1024, prior 29 steps
#            with guidance 4, decoder 12 steps, fp16 with CUDA graphs: batch 1 and batch 4 (the
#            speed targets)
#   profile  one eager batch-1 run (prior 10 steps, decoder 4) under the Kineto profiler: top
#            CUDA kernels in profile.json, and scripts/profile-summary.py's split of the GPU time
#            by stage, block type and ATen op in profile-summary.txt (what the speed work needs
#            first, hence this early)
#   variants batch 1 and batch 4 in fp16 with graphs and channels-last (NHWC spares the layout
#            copies around norms and convolutions: a candidate for the CUDA default), and batch 1
#            so with the text's keys and values projected once per call (--project-text-kv on,
#            the CPU's default: a candidate for CUDA's)
#   tests    the gpu-labelled tests (CUDA fp32 / fp16 vs references, offload, graphs) and the
#            CUDA cases of the CPU suite (Lora.Cuda*)
#   memory   batch 1 with --offload and with --sequential-offload
#   extras   batch 1 bf16 with graphs, and batch 1 without graphs (the before of the graphs'
#            after)
#   cudnn    batch 1 with cuDNN's benchmark mode (timed algorithm choice per convolution shape),
#            without and with channels-last; not in the default list (on the H100 it saved
#            nothing at batch 1 and doubled the first run)
#   summary  scripts/bench-summary.py --targets over the bench JSON files: one table (stage
#            times, peak memory per stage) and the issue's bounds, in summary.txt
# A failed step is reported and the next one still runs; the exit status says whether all passed.
set -uo pipefail
cd "$(dirname "$0")/.."
RESULTS="${RESULTS:-gpu-out}"
mkdir -p "$RESULTS"
BUILD="${BUILD:-build-gpu}"
DEPS_LIB=/opt/deps/usr/lib/x86_64-linux-gnu  # the carried packages' libraries, once unpacked
DEADLINE="${GPU_CHECK_DEADLINE:-540}"
BUILD_TARGETS="${BUILD_TARGETS:-wuerstchen_cli wuerstchen_profile wuerstchen_gpu_tests wuerstchen_tests}"
CLI="$BUILD/examples/wuerstchen/wuerstchen"
PROFILER="$BUILD/examples/wuerstchen/wuerstchen_profile"
status=0
built=1
# Step reports go to fd 3 (the terminal), not into the file a step's output is redirected to.
exec 3>&1

step() {  # step NAME SECONDS COMMAND...
    local name=$1 limit=$2
    shift 2
    local left=$((DEADLINE - SECONDS))
    if [ "$left" -lt 20 ]; then
        echo "== $name: skipped (${left} s left of ${DEADLINE})" >&3
        status=1
        return 1
    fi
    [ "$limit" -le "$left" ] || limit=$left
    local t0=$SECONDS
    if timeout "$limit" "$@"; then
        echo "== $name: ok ($((SECONDS - t0)) s)" >&3
    else
        echo "== $name: FAILED or timed out (exit $?, $((SECONDS - t0)) s, limit $limit s)" >&3
        status=1
        return 1
    fi
}

build() {
    set -e
    for f in .gpu-carry/debs/*.deb; do dpkg -x "$f" /opt/deps; done
    # The test executables are listed (run) as they are linked.
    export LD_LIBRARY_PATH=$DEPS_LIB:${LD_LIBRARY_PATH:-}
    local torch_prefix
    torch_prefix=$(python3 -c 'import torch; print(torch.utils.cmake_prefix_path)')
    cmake -S . -B "$BUILD" -G Ninja -DCMAKE_BUILD_TYPE=Release \
        -DCMAKE_PREFIX_PATH="$torch_prefix;/opt/deps/usr" -DCMAKE_CUDA_ARCHITECTURES=90
    # shellcheck disable=SC2086
    cmake --build "$BUILD" -j "$(nproc)" --target $BUILD_TARGETS
    echo "export LD_LIBRARY_PATH=$DEPS_LIB:\${LD_LIBRARY_PATH:-}" > "$BUILD/env.sh"
}

env_sh() {  # the library path of the carried packages
    # shellcheck disable=SC1091
    [ -f "$BUILD/env.sh" ] && . "$BUILD/env.sh"
    return 0
}

bench() {  # [RUNS=N] bench NAME LIMIT FLAGS...   (3 timed runs unless RUNS says otherwise)
    local name=$1 limit=$2
    shift 2
    step "bench $name" "$limit" "$CLI" bench --random-weights --device cuda --runs "${RUNS:-3}" \
        --warmup 1 "$@" > "$RESULTS/bench-$name.json" 2>> "$RESULTS/bench.log"
}

pack() {  # copies what there is so far into $OUT, if the caller gave one
    [ -n "${OUT:-}" ] && [ "$OUT" != "$RESULTS" ] || return 0
    mkdir -p "$OUT"
    tar -czf "$OUT/results.tar.gz" -C "$RESULTS" --exclude profile-trace.json . 2>/dev/null
    [ -f "$RESULTS/summary.txt" ] && cp "$RESULTS/summary.txt" "$OUT/"
    [ -f "$RESULTS/profile-summary.txt" ] && cp "$RESULTS/profile-summary.txt" "$OUT/"
    if [ -f "$RESULTS/profile-trace.json" ] && [ ! -f "$OUT/profile-trace.json.gz" ]; then
        gzip -c "$RESULTS/profile-trace.json" > "$OUT/profile-trace.json.gz"
    fi
    return 0
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$RESULTS/gpu.txt" 2>&1
[ $# -gt 0 ] || set -- build smoke headline profile variants tests memory extras summary
for phase in "$@"; do
    if [ "$built" = 0 ] && [ "$phase" != summary ]; then
        echo "== $phase: skipped (the build or the smoke run failed)"
        continue
    fi
    case "$phase" in
        build)
            export -f build
            export BUILD BUILD_TARGETS DEPS_LIB
            step "build" 420 bash -c build > "$RESULTS/build.log" 2>&1 || built=0
            [ "$built" = 1 ] || tail -n 40 "$RESULTS/build.log"
            ;;
        smoke)
            # The tiny models through the bench on CUDA: if this fails, the real sizes would too.
            env_sh
            step "smoke" 60 "$CLI" bench --random-weights --tiny --device cuda --runs 1 \
                --warmup 0 > "$RESULTS/smoke.json" 2>> "$RESULTS/bench.log" || built=0
            ;;
        headline)
            env_sh
            bench b1-fp16-graphs 100 --dtype fp16 --cuda-graphs
            bench b4-fp16-graphs 120 --dtype fp16 --cuda-graphs --batch 4
            ;;
        tests)
            env_sh
            step "gpu tests" 180 ctest --test-dir "$BUILD" -L gpu -j 6 --output-on-failure \
                > "$RESULTS/gpu-tests.log" 2>&1
            step "cuda cases of the cpu suite" 90 ctest --test-dir "$BUILD" -R '\.Cuda' -j 4 \
                --output-on-failure >> "$RESULTS/gpu-tests.log" 2>&1
            ;;
        extras)
            env_sh
            bench b1-bf16-graphs 90 --dtype bf16 --cuda-graphs
            bench b1-fp16-eager 90 --dtype fp16
            ;;
        memory)
            env_sh
            bench b1-fp16-offload 120 --dtype fp16 --offload
            RUNS=1 bench b1-fp16-sequential 180 --dtype fp16 --sequential-offload
            ;;
        profile)
            env_sh
            # Fewer steps than the headline (the same work per step): a smaller trace.
            step "profile" 120 "$PROFILER" bench --random-weights --device cuda --dtype fp16 \
                --prior-steps 10 --decoder-steps 4 --runs 1 --warmup 1 \
                --profile "$RESULTS/profile-trace.json" \
                > "$RESULTS/profile.json" 2>> "$RESULTS/bench.log" &&
                step "profile summary" 60 python3 scripts/profile-summary.py \
                    "$RESULTS/profile-trace.json" > "$RESULTS/profile-summary.txt" 2>&1
            ;;
        variants)
            env_sh
            bench b1-fp16-graphs-cl 90 --dtype fp16 --cuda-graphs --channels-last
            bench b1-fp16-graphs-cl-kv 90 --dtype fp16 --cuda-graphs --channels-last \
                --project-text-kv on
            bench b4-fp16-graphs-cl 120 --dtype fp16 --cuda-graphs --channels-last --batch 4
            ;;
        cudnn)
            env_sh
            bench b1-fp16-graphs-bm 90 --dtype fp16 --cuda-graphs --cudnn-benchmark
            bench b1-fp16-graphs-cl-bm 90 --dtype fp16 --cuda-graphs --channels-last --cudnn-benchmark
            ;;
        summary)
            # Its exit status says whether every bound held; the phase itself only reports.
            python3 scripts/bench-summary.py --targets "$RESULTS"/bench-*.json > "$RESULTS/summary.txt" 2>&1
            echo "== summary: $RESULTS/summary.txt"
            cat "$RESULTS/summary.txt"
            ;;
        *)
            echo "unknown phase '$phase' (build, smoke, headline, profile, variants, tests, memory," \
                "extras, cudnn, summary)" >&2
            exit 2
            ;;
    esac
    pack
done
echo "== done after $SECONDS s"
exit $status
