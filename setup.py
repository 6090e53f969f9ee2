"""Build script for fastattn's compiled core.

The C kernels in csrc/ and the Cython wrapper fastattn/_core.pyx build into
one extension, fastattn._core.  OpenMP is detected by compiling, linking and
running a small program; without it the extension is built serially (with a
warning, or an error when FASTATTN_REQUIRE_OPENMP=1).  No -march flag is
used: instruction-set specific kernels carry target pragmas and are chosen at
run time.
"""
import glob
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import textwrap
import warnings

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

OPENMP_PROBE = textwrap.dedent(
    """
    #include <omp.h>
    #include <stdio.h>
    int main(void) {
        int n = 0;
        #pragma omp parallel num_threads(2) reduction(+:n)
        n += 1;
        printf("%d\\n", n);
        return n == 2 ? 0 : 1;
    }
    """
)

# Flag sets to try, in order: GCC/clang with their own runtime, then Apple
# clang with Homebrew's libomp.
OPENMP_CANDIDATES = [
    (["-fopenmp"], ["-fopenmp"]),
    (["-Xpreprocessor", "-fopenmp"], ["-lomp"]),
]


def _compiler_command():
    cc = os.environ.get("CC") or sysconfig.get_config_var("CC") or "cc"
    return cc.split()


def detect_openmp():
    """Return (compile_args, link_args) that build, link and run an OpenMP program."""
    tmp = tempfile.mkdtemp(prefix="fastattn-omp-")
    try:
        src = os.path.join(tmp, "probe.c")
        exe = os.path.join(tmp, "probe")
        with open(src, "w") as f:
            f.write(OPENMP_PROBE)
        env_c = os.environ.get("CFLAGS", "").split()
        env_l = os.environ.get("LDFLAGS", "").split()
        for cflags, lflags in OPENMP_CANDIDATES:
            cmd = _compiler_command() + env_c + cflags + [src, "-o", exe] + env_l + lflags
            try:
                subprocess.run(cmd, check=True, capture_output=True, timeout=120)
                subprocess.run([exe], check=True, capture_output=True, timeout=60)
            except (OSError, subprocess.SubprocessError):
                continue
            return cflags, lflags
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    message = (
        "fastattn: the C compiler cannot build and run an OpenMP program; "
        "building a serial (single-threaded) extension"
    )
    if os.environ.get("FASTATTN_REQUIRE_OPENMP", "") not in ("", "0"):
        raise RuntimeError(message + " (FASTATTN_REQUIRE_OPENMP is set)")
    warnings.warn(message)
    return [], []


class BuildExt(build_ext):
    def build_extensions(self):
        if os.environ.get("FASTATTN_DISABLE_OPENMP", "") not in ("", "0"):
            omp_c, omp_l = [], []
        else:
            omp_c, omp_l = detect_openmp()
        extra_c = os.environ.get("FASTATTN_EXTRA_CFLAGS", "").split()
        extra_l = os.environ.get("FASTATTN_EXTRA_LDFLAGS", "").split()
        for ext in self.extensions:
            ext.extra_compile_args = ext.extra_compile_args + omp_c + extra_c
            ext.extra_link_args = ext.extra_link_args + omp_l + extra_l
        super().build_extensions()


# The dispatcher and driver, and every kernel path (fa_path_<name>.c; a
# path for another architecture compiles to nothing).
C_SOURCES = ["csrc/fa_dispatch.c", "csrc/fa_driver.c"] + sorted(glob.glob("csrc/fa_path_*.c"))

# -fno-wrapv undoes the -fwrapv that Python's own build flags carry: with it,
# GCC orders the decoding kernels' loads differently and they read memory
# 25-45% slower.  Nothing here relies on signed overflow wrapping.
compile_args = ["-O3", "-std=gnu11", "-fno-strict-aliasing", "-fno-wrapv", "-Wno-unknown-pragmas"]
if sys.platform == "win32":
    compile_args = ["/O2"]

extensions = [
    Extension(
        "fastattn._core",
        sources=["fastattn/_core.pyx"] + C_SOURCES,
        include_dirs=["csrc"],
        extra_compile_args=compile_args,
        depends=[
            "csrc/fastattn.h",
            "csrc/fa_internal.h",
            "csrc/fa_tile.h",
            "csrc/fa_tile_impl.h",
            "csrc/fa_tile_bf16dp.h",
            "csrc/fa_tile_bwd.h",
            "csrc/fa_path_instances.h",
            "csrc/fa_vec.h",
            "csrc/fa_half.h",
            "csrc/fa_omp.h",
            "fastattn/_capi.pxd",
        ],
    )
]

try:
    from Cython.Build import cythonize
except ImportError as exc:  # pragma: no cover - Cython is a build requirement
    raise RuntimeError("building fastattn needs Cython >= 3 (pip install cython)") from exc

setup(
    ext_modules=cythonize(extensions, language_level=3),
    cmdclass={"build_ext": BuildExt},
)
