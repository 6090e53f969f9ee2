"""The disassembly check finds AVX code outside the dispatched kernels."""
import os
import shutil
import subprocess
import sys

import pytest

TOOL = os.path.join(os.path.dirname(__file__), os.pardir, "tools", "check_isa.py")
pytestmark = pytest.mark.skipif(
    not (shutil.which("objdump") and shutil.which("cc")) or os.uname().machine not in ("x86_64", "AMD64"),
    reason="needs objdump, a C compiler and x86-64",
)


def check(path):
    return subprocess.run([sys.executable, TOOL, str(path)], capture_output=True, text=True)


def test_installed_extension_keeps_avx_in_kernels():
    import fastattn._core

    res = check(fastattn._core.__file__)
    assert res.returncode == 0, res.stdout
    assert "all in dispatched kernels" in res.stdout


def test_check_flags_avx_in_common_code(tmp_path):
    src = tmp_path / "lib.c"
    src.write_text(
        "void scale_all(float *x, int n) { for (int i = 0; i < n; i++) x[i] *= 2.0f; }\n"
        "__attribute__((target(\"avx2\"))) void scale_avx2(float *x, int n)"
        " { for (int i = 0; i < n; i++) x[i] *= 3.0f; }\n"
    )
    good = tmp_path / "good.so"
    subprocess.run(["cc", "-O3", "-shared", "-fPIC", str(src), "-o", str(good)], check=True)
    assert check(good).returncode == 0
    bad = tmp_path / "bad.so"
    subprocess.run(["cc", "-O3", "-mavx2", "-shared", "-fPIC", str(src), "-o", str(bad)], check=True)
    res = check(bad)
    assert res.returncode == 1 and "scale_all" in res.stdout


def test_decode_kernels_prefetch():
    """The few-row (decoding) kernels prefetch the K and V rows of later
    tiles: the instructions are in the extension's kernels of every x86 path
    (a compiler may drop a function's prefetches altogether, as GCC 12 did
    while the prefetching helper was not forced inline)."""
    import re

    import fastattn._core

    dump = subprocess.run(["objdump", "-d", "--no-show-raw-insn", fastattn._core.__file__], capture_output=True,
                          text=True, check=True).stdout
    with_prefetch, fn = set(), None
    for line in dump.splitlines():
        m = re.match(r"[0-9a-f]+ <(.*)>:$", line)
        if m:
            fn = m.group(1)
        elif "prefetcht" in line and fn:
            with_prefetch.add(fn)
    for path in ("avx2", "avx512"):
        assert any(re.search(rf"qk_rows\w*_{path}\b", f) for f in with_prefetch), (path, sorted(with_prefetch))
