"""No input, load or process event makes fastattn crash, hang, leak or return
a silently wrong number."""
import os
import platform
import subprocess
import sys
import textwrap
import threading

import numpy as np
import pytest

import fastattn
import fastattn.reference as ref
from util import assert_close, randn

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

# ---- property tests -----------------------------------------------------------


@st.composite
def problems(draw):
    dtype = draw(st.sampled_from([np.float32, np.float64]))
    lq = draw(st.integers(0, 40))
    lk = draw(st.integers(0, 70))
    d = draw(st.integers(0, 20))
    dv = draw(st.integers(0, 9))
    lead = tuple(draw(st.lists(st.integers(1, 3), min_size=0, max_size=2)))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)

    def array(shape):
        a = rng.standard_normal(shape).astype(dtype) * dtype(draw(st.sampled_from([1.0, 3.0])))
        layout = draw(st.sampled_from(["c", "f", "reversed", "strided"]))
        if layout == "f":
            a = np.asfortranarray(a)
        elif layout == "reversed" and a.ndim >= 2:
            a = a[..., ::-1, :].copy()[..., ::-1, :]
        elif layout == "strided":
            big = np.zeros(shape[:-1] + (2 * shape[-1],), dtype)
            big[..., ::2] = a
            a = big[..., ::2]
        return a

    q, k, v = array(lead + (lq, d)), array(lead + (lk, d)), array(lead + (lk, dv))
    special = draw(st.sampled_from([None, "nan", "inf"]))
    if special and q.size:
        q = q.copy()
        q.flat[draw(st.integers(0, q.size - 1))] = np.nan if special == "nan" else np.inf
    mask = None
    mask_kind = draw(st.sampled_from([None, "bool", "float"]))
    if mask_kind:
        mshape = (draw(st.sampled_from([1, lq])), draw(st.sampled_from([1, lk])))
        mask = rng.random(mshape) < 0.7 if mask_kind == "bool" else rng.standard_normal(mshape)
    opts = dict(
        causal=draw(st.booleans()),
        mask=mask,
        scale=draw(st.sampled_from([None, 0.5, -1.0])),
        weights=draw(st.sampled_from(["softmax", "dot"])),
    )
    return q, k, v, opts


@settings(max_examples=150, deadline=None)
@given(problems())
def test_attention_property(problem):
    q, k, v, opts = problem
    copies = [a.copy() for a in (q, k, v)]
    out = fastattn.attention(q, k, v, **opts)
    with np.errstate(invalid="ignore", over="ignore"):
        expected = ref.attention(q, k, v, **opts)
    assert out.shape == expected.shape
    assert_close(out, expected, dtype=out.dtype)
    for a, c in zip((q, k, v), copies):
        assert np.array_equal(a, c, equal_nan=True)


# ---- numerical range ------------------------------------------------------------


def test_same_shapes_in_other_layouts_between_calls():
    """Entry tables are cached by the operands' shapes and strides: calls that
    alternate between layouts of the same shapes (contiguous, transposed
    copies, broadcast, grouped heads, a slice of a bigger cache) each get
    their own table."""
    rng = np.random.default_rng(3)
    q = randn(rng, (2, 4, 3, 16), np.float32)
    kc = randn(rng, (2, 4, 40, 16), np.float32)
    vc = randn(rng, (2, 4, 40, 16), np.float32)
    layouts = [
        (kc, vc),
        (np.ascontiguousarray(kc.transpose(1, 0, 2, 3)).transpose(1, 0, 2, 3), vc),
        (np.broadcast_to(kc[:1], kc.shape), np.broadcast_to(vc[:, :1], vc.shape)),
        (kc[:, ::2], vc[:, 1::2]),  # grouped heads: 2 kv heads for 4 query heads
        (randn(rng, (2, 4, 64, 16), np.float32)[:, :, 10:50], vc),
    ]
    for _ in range(2):
        for k, v in layouts:
            for out in (None, np.empty((2, 4, 3, 16), np.float32, order="F")):
                got = fastattn.attention(q, k, v, causal=True, out=out)
                assert_close(got, ref.attention(q, k, v, causal=True))


def test_huge_scores_do_not_overflow(dtype):
    rng = np.random.default_rng(3)
    q = randn(rng, (2, 7, 16), dtype) * dtype.type(1e4)
    k = randn(rng, (2, 50, 16), dtype) * dtype.type(1e4)
    v = randn(rng, (2, 50, 5), dtype)
    out = fastattn.attention(q, k, v)
    assert np.all(np.isfinite(out))
    assert_close(out, ref.attention(q, k, v))


def test_long_float32_accumulation():
    """Lk = 128k keys: float32 accumulation stays within the float32 tolerance."""
    rng = np.random.default_rng(4)
    q = randn(rng, (1, 2, 3, 64), np.float32)
    k = randn(rng, (1, 2, 131072, 64), np.float32)
    v = randn(rng, (1, 2, 131072, 16), np.float32) + np.float32(1)
    assert_close(fastattn.attention(q, k, v, causal=True), ref.attention(q, k, v, causal=True))


@pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64", "aarch64", "arm64"),
                    reason="the kernels flush subnormals on x86-64 and AArch64 (their floating-point mode bits)")
def test_subnormal_terms_are_flushed_and_the_callers_mode_restored(isa):
    """One query over two keys, scores 100 and 20: key 1's weight exp(-80)
    is a normal float, but its dS = P (dP - delta) = exp(-80) * 1e-5 is not.
    The kernels run with subnormals flushed (on Intel CPUs each one cost a
    microcode assist), so key 1's dk is exactly 0 where the float64
    reference's is 1.8e-39, while its dv (exp(-80), normal) is kept; and
    the calling thread's own mode is back after each call."""
    q = np.array([[[10.0]]], np.float32)
    k = np.array([[[10.0], [2.0]]], np.float32)
    v = np.array([[[0.0], [1e-5]]], np.float32)
    dout = np.ones((1, 1, 1), np.float32)
    out, lse = fastattn.attention(q, k, v, scale=1.0, return_lse=True)
    dq, dk, dv = fastattn.attention_backward(dout, q, k, v, out, lse, scale=1.0)
    want = ref.attention_backward(dout, q, k, v, scale=1.0)
    assert want[1][0, 1, 0] != 0 and np.float32(want[1][0, 1, 0]) != 0
    assert dk[0, 1, 0] == 0
    assert dv[0, 1, 0] == pytest.approx(np.exp(-80.0), rel=1e-5)
    for threads in (1, 2):
        fastattn.attention(q, k, v, num_threads=threads)
        fastattn.attention_backward(dout, q, k, v, out, lse, scale=1.0, num_threads=threads)
        assert (np.array([1e-30], np.float32) * np.float32(1e-10))[0] != 0


# ---- concurrency, fork, memory -------------------------------------------------


def test_concurrent_python_threads_get_identical_results():
    rng = np.random.default_rng(5)
    shared = [randn(rng, (2, 4, 200, 32), np.float32) for _ in range(3)]
    own = [[randn(rng, (1, 2, 150, 16), np.float32) for _ in range(3)] for _ in range(8)]
    expected_shared = fastattn.attention(*shared, causal=True)
    expected_own = [fastattn.attention(*o) for o in own]
    failures = []

    def work(i):
        for _ in range(15):
            if not np.array_equal(fastattn.attention(*shared, causal=True), expected_shared):
                failures.append(("shared", i))
            if not np.array_equal(fastattn.attention(*own[i]), expected_own[i]):
                failures.append(("own", i))

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads)
    assert failures == []


def _run_python(code, timeout=120):
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                          text=True, timeout=timeout, env=dict(os.environ))


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_fork_after_threaded_use_does_not_hang():
    res = _run_python(
        """
        import multiprocessing as mp, numpy as np, fastattn
        q = np.random.default_rng(0).standard_normal((4, 8, 300, 32), dtype=np.float32)
        expected = fastattn.attention(q, q, q, num_threads=2)
        def child(_):
            return bool(np.array_equal(fastattn.attention(q, q, q, num_threads=2), expected))
        with mp.get_context("fork").Pool(2) as pool:
            print(all(pool.map(child, range(4))))
        """,
        timeout=120,
    )
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "True"


def test_memory_stays_flat_over_many_calls():
    res = _run_python(
        """
        import numpy as np, fastattn
        def rss_kib():
            with open("/proc/self/status") as f:
                return next(int(l.split()[1]) for l in f if l.startswith("VmRSS"))
        q = np.random.default_rng(0).standard_normal((2, 2, 40, 16), dtype=np.float32)
        for _ in range(500):
            fastattn.attention(q, q, q, causal=True, return_lse=True)
        before = rss_kib()
        for _ in range(10000):
            fastattn.attention(q, q, q, causal=True, return_lse=True)
            fastattn.scores(q, q)
        print(rss_kib() - before)
        """
    )
    if res.returncode != 0 and "StopIteration" in res.stderr:
        pytest.skip("no /proc/self/status")
    assert res.returncode == 0, res.stderr
    assert int(res.stdout) < 4096  # KiB


def test_unallocatable_request_raises_memory_error():
    q = np.zeros((2_000_000, 1), np.float32)
    with pytest.raises(MemoryError):
        fastattn.scores(q, q)  # the (2e6, 2e6) result alone is 16 TB

