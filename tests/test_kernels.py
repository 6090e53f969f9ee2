"""Properties of the kernel building blocks."""
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import fastattn
from fastattn import _core

# The vectorised float32 exp of every path: relative error at most 1e-7
# (1.7 units of 2**-24) wherever exp(x) is a normal float; -inf gives 0 and
# NaN stays NaN.  Below the normal range the AVX2 path flushes to 0.
EXP_MAX_REL_ERROR = 1e-7


@pytest.mark.parametrize("isa", fastattn.available_isas())
def test_exp_accuracy(isa):
    index = fastattn.available_isas().index(isa)
    x = np.concatenate([
        np.linspace(-87.0, 0.0, 1_000_003, dtype=np.float32),
        -np.logspace(-9, 0, 10_001, dtype=np.float32),
        np.array([0.0, -0.0], np.float32),
    ])
    y = np.empty_like(x)
    _core.exp_f32(index, x, y)
    expected = np.exp(x.astype(np.float64))
    rel = np.abs(y - expected) / expected
    assert rel.max() <= EXP_MAX_REL_ERROR, rel.max()
    special = np.array([-np.inf, np.nan, -200.0, -1e30], np.float32)
    ys = np.empty_like(special)
    _core.exp_f32(index, special, ys)
    assert ys[0] == 0 and np.isnan(ys[1]) and ys[2] == 0 and ys[3] == 0


def test_peak_memory_is_independent_of_lq_times_lk():
    """(1, 8, 16384, 64) float32 attention: peak RSS stays within 64 MiB of its arrays."""
    code = textwrap.dedent(
        """
        import resource, numpy as np, fastattn
        shape = (1, 8, 16384, 64)
        rng = np.random.default_rng(0)
        q, k, v = (rng.standard_normal(shape, dtype=np.float32) for _ in range(3))
        out = np.empty_like(q)
        fastattn.attention(q[:, :, :64], k[:, :, :64], v[:, :, :64])  # warm up the runtime
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        fastattn.attention(q, k, v, out=out)
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        print((after - before) / 1024)
        """
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env=dict(os.environ))
    growth_mib = float(res.stdout.strip())
    # out was already touched by np.empty_like? no: its pages are first written by the
    # kernel, so the growth includes out itself (32 MiB) plus the kernel's scratch
    assert growth_mib < 32 + 64, growth_mib
