#!/usr/bin/env bash
# Build fastattn with AddressSanitizer and UndefinedBehaviorSanitizer in a
# scratch virtual environment and run the test suite under them, then the
# C-level kernel check (tests/c/check_kernels.c) built with them.
#   tools/sanitize.sh [pytest args...]
# Python itself is not instrumented, so the ASan runtime is preloaded, leak
# checking (which would report the interpreter's own allocations) is off, and
# impossible allocations return NULL (numpy then raises MemoryError) as without ASan.
set -euo pipefail
src="$(cd "$(dirname "$0")/.." && pwd)"
work=$(mktemp -d)  # an instrumented build must not replace the checkout's own
trap 'rm -rf "$work"' EXIT
git -C "$src" ls-files -z | (cd "$src" && xargs -0 cp --parents -t "$work")
cd "$work"
venv=${SANITIZE_VENV:-/tmp/fastattn-sanitize}
python3 -m venv "$venv"
. "$venv/bin/activate"
python -m pip install -q --upgrade pip
python -m pip install -q cython setuptools wheel numpy ml_dtypes pytest hypothesis threadpoolctl
san="-fsanitize=address,undefined -fno-omit-frame-pointer -fno-sanitize-recover=undefined"
rm -rf build fastattn/_core.c fastattn/_core*.so
FASTATTN_EXTRA_CFLAGS="$san -O1 -g" FASTATTN_EXTRA_LDFLAGS="$san" \
    python setup.py -q build_ext --inplace
asan=$(${CC:-gcc} -print-file-name=libasan.so)
ubsan=$(${CC:-gcc} -print-file-name=libubsan.so)
# The RSS tests are left out: ASan's quarantine deliberately holds freed memory
# and its shadow memory counts too (and the peak-memory workloads, L = 16384,
# take tens of minutes instrumented).
LD_PRELOAD="$asan $ubsan" ASAN_OPTIONS=detect_leaks=0:abort_on_error=1:allocator_may_return_null=1 \
    UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
    python -m pytest -x -q -p no:cacheprovider -k "not memory_stays_flat and not peak_memory" "$@" tests
# The C-level kernel check under the same sanitizers (no Python in the way).
CHECK_CFLAGS="$san -g" ASAN_OPTIONS=detect_leaks=0:abort_on_error=1 UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
    bash tools/check_kernels.sh
