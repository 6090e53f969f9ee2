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


PEAK_WORKLOADS = {
    # prefill: (1, 8, 16384, 64) float32; an Lq x Lk score matrix would be 8 GiB
    "prefill": """
        q, k, v = (rng.standard_normal((1, 8, 16384, 64), dtype=np.float32) for _ in range(3))
        out = np.empty_like(q)
        run = lambda: fastattn.attention(q, k, v, out=out)
    """,
    # decode: 32 query heads on 8 kv heads against a 16384-key cache (split-KV)
    "decode": """
        q = rng.standard_normal((1, 32, 1, 128), dtype=np.float32)
        k, v = (rng.standard_normal((1, 8, 16384, 128), dtype=np.float32) for _ in range(2))
        out = np.empty_like(q)
        run = lambda: fastattn.attention(q, k, v, causal=True, out=out)
    """,
    # varlen: 16384 packed tokens in 3 sequences, 8 heads
    "varlen": """
        cu = np.array([0, 1000, 9000, 16384])
        q, k, v = (rng.standard_normal((16384, 8, 64), dtype=np.float32) for _ in range(3))
        out = np.empty_like(q)
        run = lambda: fastattn.attention_varlen(q, k, v, cu, cu, causal=True, out=out)
    """,
}


@pytest.mark.parametrize("workload", sorted(PEAK_WORKLOADS))
def test_peak_memory_is_independent_of_lq_times_lk(workload):
    """Peak RSS grows by less than 64 MiB beyond the output while attention runs."""
    code = textwrap.dedent(
        """
        import resource, numpy as np, fastattn
        rng = np.random.default_rng(0)
        """
    ) + textwrap.dedent(PEAK_WORKLOADS[workload]) + textwrap.dedent(
        """
        out_mib = out.nbytes / 2**20
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        run()
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        print((after - before) / 1024 - out_mib)
        """
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env=dict(os.environ))
    # out's pages are first written by the kernel, so its size is subtracted;
    # what remains is the kernel's scratch and partial results
    assert float(res.stdout.strip()) < 64, res.stdout
