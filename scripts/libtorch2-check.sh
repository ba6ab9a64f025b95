#!/usr/bin/env bash
# Builds the project against libtorch 2.x on a machine without a GPU, using Debian's packages of
# libtorch: Debian 13's libtorch-dev 2.6 (CPU) and, from contrib, libtorch-cuda-dev 2.6 (CUDA
# 12.4); Debian unstable's libtorch-dev (2.14 at the time of writing) on request.
#
#   sudo scripts/libtorch2-check.sh [cpu] [cuda] [unstable]      (default: cpu cuda)
#
# cpu       configures, builds and runs the whole test suite (scripts/test.sh) against libtorch
#           2.6 for the CPU: the 2.x code paths (scaled_dot_product_attention, the 2.x allocator
#           interface, float16 on the CPU) run, not just compile.
# cuda      configures and builds everything against the CUDA libtorch 2.6 with CUDA graphs
#           enabled, the CUDA bench code and the Kineto profiler tool (wuerstchen_profile), and
#           the tests, but runs nothing: Debian's nvidia-cudnn only downloads cuDNN from NVIDIA
#           when installed, so here it is replaced by an empty package, and programs that need
#           libcudnn.so.9 cannot start. (Links therefore use --allow-shlib-undefined.)
# unstable  as cpu, with Debian unstable's newest libtorch and compiler. Unstable changes daily:
#           a failure there may be Debian's.
#
# Each variant has its own Debian tree made with debootstrap under $LIBTORCH2_ROOT (default
# /var/tmp/wuerstchen-libtorch2/VARIANT; cpu about 3.5 GB, cuda 9.5 GB, builds included), kept
# between runs together with a build directory per source checkout and ccache, so later runs
# are incremental and need no network once the packages are in. One run at a time per tree
# (a lock file beside it). The source tree (and
# ../shared, when present, for the tests that read it) is bind-mounted read-only at /src inside a
# private mount namespace (unshare), so no mount outlives the script. Needs root, network access
# to the Debian archive ($DEBIAN_MIRROR), debootstrap (installed with apt-get when missing).
set -euo pipefail
cd "$(dirname "$0")/.."
SRC="$(pwd)"
ROOT_BASE="${LIBTORCH2_ROOT:-/var/tmp/wuerstchen-libtorch2}"
MIRROR="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
JOBS="${JOBS:-$(nproc)}"
variants=("$@")
if [ ${#variants[@]} -eq 0 ]; then variants=(cpu cuda); fi
for v in "${variants[@]}"; do
    case "$v" in
        cpu | cuda | unstable) ;;
        *) echo "libtorch2-check: unknown variant '$v' (cpu, cuda, unstable)" >&2; exit 2 ;;
    esac
done
if [ "$(id -u)" -ne 0 ]; then
    echo "libtorch2-check: needs root (debootstrap, chroot, mounts)" >&2
    exit 2
fi
if ! command -v debootstrap >/dev/null 2>&1; then
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends debootstrap
fi

common_packages=(build-essential cmake ninja-build ccache pkg-config git nlohmann-json3-dev
                 libstb-dev libutf8proc-dev libgtest-dev)

# Runs a command inside the tree $1 with /proc, /dev, /sys and the sources mounted, all in a
# private mount namespace that ends with the command.
in_tree() {
    local tree="$1"
    shift
    local shared_mount=""
    if [ -d "$SRC/../shared" ]; then
        shared_mount="mkdir -p '$tree/shared' && mount --bind '$SRC/../shared' '$tree/shared' &&
                      mount -o remount,bind,ro '$tree/shared'"
    fi
    unshare --mount --propagation private -- bash -euo pipefail -c "
        mount -t proc proc '$tree/proc'
        mount --rbind /dev '$tree/dev'
        mount -t sysfs sys '$tree/sys'
        mkdir -p '$tree/src'
        mount --bind '$SRC' '$tree/src'
        mount -o remount,bind,ro '$tree/src'
        ${shared_mount:-true}
        cp --remove-destination /etc/resolv.conf '$tree/etc/resolv.conf'
        chroot '$tree' /usr/bin/env -i HOME=/root PATH=/usr/sbin:/usr/bin:/sbin:/bin \
            LANG=C.UTF-8 DEBIAN_FRONTEND=noninteractive \
            CCACHE_SLOPPINESS=pch_defines,time_macros,include_file_mtime,include_file_ctime \
            JOBS='$JOBS' bash -euo pipefail -c \"\$1\"
    " in_tree "$*"
}

# Makes (once) the Debian tree $1 for suite $2 and installs the packages $3... that are missing
# (no network when none is). Unstable starts from Debian 13 and switches its sources.
prepare_tree() {
    local tree="$1" suite="$2"
    shift 2
    if [ ! -f "$tree/.bootstrapped" ]; then
        echo "== debootstrap Debian 13 into $tree"
        if [ -e "$tree" ]; then
            echo "libtorch2-check: $tree is an unfinished tree from an earlier run; remove it" >&2
            exit 1
        fi
        mkdir -p "$tree"
        debootstrap --variant=minbase --components=main,contrib,non-free trixie "$tree" "$MIRROR" \
            > "$tree.debootstrap.log" 2>&1 || { tail -30 "$tree.debootstrap.log"; exit 1; }
        touch "$tree/.bootstrapped"
    fi
    local sources="deb $MIRROR $suite main contrib non-free"
    if [ "$(cat "$tree/etc/apt/sources.list" 2>/dev/null)" != "$sources" ]; then
        rm -f "$tree/etc/apt/sources.list"
        echo "$sources" > "$tree/etc/apt/sources.list"
    fi
    if in_tree "$tree" "status=\$(dpkg-query -W -f '\${Status}\n' $* 2>/dev/null)
                        ! grep -qv 'install ok installed' <<< \"\$status\"" 2>/dev/null; then
        return 0
    fi
    echo "== packages ($suite): $*"
    in_tree "$tree" "apt-get -o Acquire::Check-Valid-Until=false update -qq &&
                     apt-get install -y -qq --no-install-recommends $* > /var/log/libtorch2-apt.log ||
                     { tail -30 /var/log/libtorch2-apt.log; exit 1; }
                     apt-get clean"
}

# One build directory per source checkout: ninja compares file times only, so checkouts sharing
# one would see each other's objects as up to date.
build_dir="/build/$(printf '%s' "$SRC" | sha1sum | cut -c1-12)"
mkdir -p "$ROOT_BASE"
for v in "${variants[@]}"; do
    tree="$ROOT_BASE/$v"
    exec 9> "$tree.lock"
    flock 9
    case "$v" in
        cpu | unstable)
            suite=trixie
            if [ "$v" = unstable ]; then suite=sid; fi
            prepare_tree "$tree" "$suite" "${common_packages[*]}" libtorch-dev libopenblas0-openmp python3
            echo "== $v: build and test"
            in_tree "$tree" "dpkg-query -W libtorch-dev g++ | sed 's/^/   /'
                             cd /src && BUILD_DIR=$build_dir scripts/test.sh"
            ;;
        cuda)
            # An empty nvidia-cudnn first, so the real one (a downloader) is never installed.
            prepare_tree "$tree" trixie "${common_packages[*]}" equivs
            in_tree "$tree" "
                if ! dpkg-query -W -f '\${Version}' nvidia-cudnn 2>/dev/null | grep -qx 9.99; then
                    cd /tmp && printf '%s\n' 'Section: misc' 'Priority: optional' \
                        'Standards-Version: 4.6.2' 'Package: nvidia-cudnn' 'Version: 9.99' \
                        'Description: empty stand-in (cuDNN cannot be downloaded here)' > cudnn.ctl
                    equivs-build cudnn.ctl > equivs.log 2>&1 || { tail -20 equivs.log; exit 1; }
                    dpkg -i nvidia-cudnn_9.99_all.deb > /dev/null
                fi"
            prepare_tree "$tree" trixie "${common_packages[*]}" libtorch-cuda-dev nvidia-cuda-toolkit
            echo "== cuda: build everything, run nothing"
            in_tree "$tree" "dpkg-query -W libtorch-cuda-dev g++ | sed 's/^/   /'
                cd /src &&
                cmake -S . -B $build_dir -G Ninja -DCMAKE_BUILD_TYPE=Release \
                    -DCMAKE_EXE_LINKER_FLAGS=-Wl,--allow-shlib-undefined \
                    -DCMAKE_GTEST_DISCOVER_TESTS_DISCOVERY_MODE=PRE_TEST > /tmp/configure.log 2>&1 ||
                    { tail -40 /tmp/configure.log; exit 1; }
                grep -q 'CUDA graphs enabled' /tmp/configure.log ||
                    { echo 'libtorch2-check: the CUDA build did not enable CUDA graphs' >&2; exit 1; }
                cmake --build $build_dir -j \"\$JOBS\"
                cmake --build $build_dir -j \"\$JOBS\" --target wuerstchen_profile"
            ;;
    esac
    echo "== $v: ok"
done
