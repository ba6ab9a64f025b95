#!/usr/bin/env bash
# Installs the build and test dependencies on Debian 12 / Ubuntu (libtorch 1.13 CPU from Debian).
set -euo pipefail
SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
# libtorch-dev links the generic libblas.so.3, which the reference (netlib) BLAS provides unless
# an optimised one is installed: OpenBLAS (OpenMP build, as libtorch's own pool) makes CPU
# matrix products about 25x faster (README, "Speed on the CPU").
$SUDO apt-get install -y -qq --no-install-recommends \
    build-essential cmake ninja-build ccache pkg-config \
    libtorch-dev libopenblas0-openmp nlohmann-json3-dev libstb-dev libutf8proc-dev libgtest-dev
