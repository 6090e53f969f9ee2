"""Build script for fastattn's compiled core.

The C kernels in csrc/ and the Cython wrapper fastattn/_core.pyx build into
one extension, fastattn._core, threaded by its own pool of POSIX threads
(csrc/fa_pool.c; no OpenMP runtime).  No -march flag is used: instruction-set
specific kernels carry target pragmas and are chosen at run time.
"""
import glob
import os
import sys
from concurrent.futures import ThreadPoolExecutor

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext


class BuildExt(build_ext):
    def build_extensions(self):
        extra_c = os.environ.get("FASTATTN_EXTRA_CFLAGS", "").split()
        extra_l = os.environ.get("FASTATTN_EXTRA_LDFLAGS", "").split()
        for ext in self.extensions:
            ext.extra_compile_args = ext.extra_compile_args + extra_c
            ext.extra_link_args = ext.extra_link_args + extra_l
        # The sources of the one extension compile in parallel (setuptools'
        # --parallel only runs separate extensions at once).
        jobs = min(len(C_SOURCES) + 1, os.cpu_count() or 1)
        compiler = self.compiler
        serial = compiler.compile

        def compile_parallel(sources, *args, **kwargs):
            if jobs < 2 or len(sources) < 2:
                return serial(sources, *args, **kwargs)
            with ThreadPoolExecutor(jobs) as pool:
                parts = pool.map(lambda src: serial([src], *args, **kwargs), sources)
                return [obj for objs in parts for obj in objs]

        compiler.compile = compile_parallel
        super().build_extensions()


# The dispatcher and driver, and every kernel path (fa_path_<name>.c; a
# path for another architecture compiles to nothing).
C_SOURCES = ["csrc/fa_dispatch.c", "csrc/fa_driver.c", "csrc/fa_pool.c"] + sorted(glob.glob("csrc/fa_path_*.c"))

# -fno-wrapv undoes the -fwrapv that Python's own build flags carry: with it,
# GCC orders the decoding kernels' loads differently and they read memory
# 25-45% slower.  Nothing here relies on signed overflow wrapping.
compile_args = ["-O3", "-std=gnu11", "-fno-strict-aliasing", "-fno-wrapv", "-Wno-unknown-pragmas", "-pthread"]
link_args = ["-pthread"]
if sys.platform == "win32":
    compile_args, link_args = ["/O2"], []

extensions = [
    Extension(
        "fastattn._core",
        sources=["fastattn/_core.pyx"] + C_SOURCES,
        include_dirs=["csrc"],
        extra_compile_args=compile_args,
        extra_link_args=link_args,
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
            "csrc/fa_pool.h",
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
