#!/usr/bin/env bash
# Build and run the C-level kernel check (tests/c/check_kernels.c): every
# kernel path of a build against a scalar float64 reference, without Python.
#   tools/check_kernels.sh            native build: the paths this CPU runs
#   tools/check_kernels.sh --aarch64  cross-compiled for AArch64 and run under
#                                     qemu-aarch64 (the generic and NEON paths);
#                                     installs Debian's gcc-aarch64-linux-gnu and
#                                     qemu-user first if they are missing (root)
# Compiling takes 10-20 s on 2 cores (the sources compile in parallel); the
# check itself about 1 s natively and 5-10 s under qemu.
set -euo pipefail
cd "$(dirname "$0")/.."
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
# CHECK_CFLAGS adds flags, e.g. "-fsanitize=address,undefined -g" (tools/sanitize.sh)
flags="-O2 -std=gnu11 -fno-strict-aliasing -pthread -Wall -Wextra -Werror -Icsrc ${CHECK_CFLAGS:-}"
if [ "${1:-}" = "--aarch64" ]; then
    if ! command -v aarch64-linux-gnu-gcc >/dev/null || ! command -v qemu-aarch64 >/dev/null; then
        echo "installing gcc-aarch64-linux-gnu and qemu-user"
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq
        apt-get install -y -qq gcc-aarch64-linux-gnu qemu-user >/dev/null
    fi
    cc=aarch64-linux-gnu-gcc
    run=(qemu-aarch64 -L /usr/aarch64-linux-gnu)
else
    cc=${CC:-cc}
    run=()
fi
# one compiler per source, in parallel
pids=()
for src in tests/c/check_kernels.c csrc/fa_*.c; do
    $cc $flags -c "$src" -o "$out/$(basename "$src" .c).o" &
    pids+=($!)
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=1; done
[ "$status" = 0 ] || { echo "check_kernels: compiling failed" >&2; exit 1; }
# the library's allocations through the check's wrappers, which fail them on demand
$cc -pthread ${CHECK_CFLAGS:-} "$out"/*.o -lm -Wl,--wrap=malloc,--wrap=aligned_alloc -o "$out/check_kernels"
# a hang (a thread waiting for work that never comes) fails the check instead of stalling it
timeout 1800 "${run[@]}" "$out/check_kernels"
