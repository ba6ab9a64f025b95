#!/usr/bin/env bash
# Installs the build and test dependencies on Debian 12 / Ubuntu (libtorch 1.13 CPU from Debian).
set -euo pipefail
SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends \
    build-essential cmake ninja-build ccache pkg-config \
    libtorch-dev nlohmann-json3-dev libstb-dev libutf8proc-dev libgtest-dev
