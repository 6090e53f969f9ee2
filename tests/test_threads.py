"""fastattn's thread pool: idle workers sleep after their spin time, OpenBLAS
runs its threaded work on the pool (and stops when told), OpenBLAS's own
workers are left asleep, forked children run threaded."""
import os
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

import fastattn
from fastattn import _core, reference

from util import assert_close, randn

pytestmark = pytest.mark.skipif(not fastattn._core.pool_threaded(), reason="a build without threads")


def _threaded_call(rng):
    q, k, v = (randn(rng, (1, 4, 300, 32), np.float32) for _ in range(3))
    out = fastattn.attention(q, k, v, causal=True, num_threads=2)
    assert_close(out, reference.attention(q, k, v, causal=True))


def _wait_until(predicate, seconds):
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(0.005)
    return predicate()


def test_idle_workers_spin_then_sleep():
    """A worker spins for the spin time after a call, then sleeps."""
    rng = np.random.default_rng(1)
    saved = fastattn.get_spin_time()
    try:
        fastattn.set_spin_time(0.5)
        assert fastattn.get_spin_time() == 0.5
        _threaded_call(rng)
        info = fastattn.thread_pool_info()
        assert info["workers"] >= 1
        assert info["sleeping"] < info["workers"]  # the worker that ran is spinning
        assert _wait_until(lambda: fastattn.thread_pool_info()["sleeping"] == info["workers"], 3.0)
        fastattn.set_spin_time(0)
        _threaded_call(rng)
        assert _wait_until(lambda: fastattn.thread_pool_info()["sleeping"] == fastattn.thread_pool_info()["workers"],
                           0.2)
    finally:
        fastattn.set_spin_time(saved)


def test_results_do_not_depend_on_spin_time():
    rng = np.random.default_rng(2)
    q, k, v = (randn(rng, (2, 3, 257, 40), np.float32) for _ in range(3))
    saved = fastattn.get_spin_time()
    try:
        outs = []
        for spin in (0, 1e-3):
            fastattn.set_spin_time(spin)
            outs += [fastattn.attention(q, k, v, causal=True, num_threads=n) for n in (1, 2, 3)]
    finally:
        fastattn.set_spin_time(saved)
    assert all(np.array_equal(outs[0], o) for o in outs[1:])


blas_shared = pytest.mark.skipif(not fastattn.thread_pool_info()["blas_shared"],
                                 reason="no loaded OpenBLAS accepts a threads callback (OpenBLAS >= 0.3.27)")


@blas_shared
def test_numpy_matmul_runs_on_the_pool_until_told_not_to():
    rng = np.random.default_rng(3)
    a = rng.standard_normal((600, 700))
    b = rng.standard_normal((700, 500))
    want = a @ b
    a32, b32 = a.astype(np.float32), b.astype(np.float32)
    before = fastattn.thread_pool_info()["blas_runs"]
    np.testing.assert_allclose(a32 @ b32, want, rtol=0, atol=1e-3)
    x = np.linalg.solve(a[:, :600], b[:600])
    np.testing.assert_allclose(a[:, :600] @ x, b[:600], rtol=0, atol=1e-8)
    assert fastattn.thread_pool_info()["blas_runs"] > before
    try:
        assert fastattn.share_blas_threads(False) == []
        before = fastattn.thread_pool_info()["blas_runs"]
        np.testing.assert_allclose(a32 @ b32, want, rtol=0, atol=1e-3)
        assert fastattn.thread_pool_info()["blas_runs"] == before
    finally:
        assert fastattn.share_blas_threads(True)
    before = fastattn.thread_pool_info()["blas_runs"]
    np.testing.assert_allclose(a32 @ b32, want, rtol=0, atol=1e-3)
    assert fastattn.thread_pool_info()["blas_runs"] > before


def _run(code, env=None, timeout=120):
    res = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                         timeout=timeout, env=dict(os.environ, **(env or {})))
    assert res.returncode == 0, res.stderr
    return res.stdout


@blas_shared
@pytest.mark.skipif(not os.path.exists("/proc/self/task"), reason="needs Linux's /proc")
def test_openblas_own_workers_fall_asleep_under_shared_work():
    """OpenBLAS's own workers, busy just before fastattn takes over its jobs,
    go to sleep while numpy keeps multiplying (jobs numbered past them); a
    worker kept awake would use about a core."""
    out = _run(
        """
        import os, time, numpy as np
        def cpu_seconds():
            ticks = {}
            for t in os.listdir("/proc/self/task"):
                with open(f"/proc/self/task/{t}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                ticks[int(t)] = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
            return ticks
        a = np.random.default_rng(0).standard_normal((1200, 1200)).astype(np.float32)
        end = time.monotonic() + 0.3
        while time.monotonic() < end:
            a @ a  # OpenBLAS's own workers run and spin
        openblas_workers = set(cpu_seconds()) - {os.getpid()}
        import fastattn
        assert fastattn.thread_pool_info()["blas_shared"]
        c0, t0 = cpu_seconds(), time.monotonic()
        while time.monotonic() < t0 + 1.5:
            a @ a
        c1, wall = cpu_seconds(), time.monotonic() - t0
        print(max((c1[t] - c0[t]) / wall for t in openblas_workers if t in c1) if openblas_workers else 0.0)
        """)
    assert float(out) < 0.25, out


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_forked_child_runs_threaded():
    out = _run(
        """
        import multiprocessing as mp, numpy as np, fastattn
        q = np.random.default_rng(0).standard_normal((2, 4, 300, 32), dtype=np.float32)
        a = np.random.default_rng(1).standard_normal((700, 700))
        expected, product = fastattn.attention(q, q, q, num_threads=2), a @ a
        assert fastattn.thread_pool_info()["workers"] >= 1
        def child(_):
            fresh = fastattn.thread_pool_info()["workers"]
            same = bool(np.array_equal(fastattn.attention(q, q, q, num_threads=2), expected))
            same &= bool(np.allclose(a @ a, product))  # numpy's BLAS too, on the child's pool when shared
            return fresh, fastattn.thread_pool_info()["workers"], same
        with mp.get_context("fork").Pool(2) as pool:
            print(pool.map(child, range(2)))
        """)
    rows = eval(out)
    assert all(same and after >= 1 for _, after, same in rows)
    assert min(fresh for fresh, _, _ in rows) == 0  # a child's pool starts empty


@pytest.fixture
def torch_openmp():
    """(torch, fastattn.torch) where torch runs its parallel work on OpenMP
    (skipped otherwise); afterwards fastattn.torch's calls go back to
    torch's threads and both thread counts are restored."""
    torch = pytest.importorskip("torch", reason="needs torch (pip install 'fastattn[torch]')")
    import fastattn.torch as ft
    from fastattn import _config

    if "parallel backend: OpenMP" not in torch.__config__.parallel_info() or not ft.share_threads(True):
        pytest.skip("this torch does not run its parallel work on OpenMP")
    threads, torch_threads = _config._num_threads, torch.get_num_threads()
    yield torch, ft
    ft.share_threads(True)
    fastattn.set_num_threads(threads)
    torch.set_num_threads(torch_threads)


def test_torch_calls_run_on_torchs_openmp_threads(torch_openmp):
    """Calls through fastattn.torch run their teams on torch's OpenMP
    threads (counted by the pool), forward and backward; numpy calls and
    share_threads(False) stay on the pool; the results are the same."""
    torch, ft = torch_openmp
    fastattn.set_num_threads(2)
    torch.set_num_threads(2)
    runtime = ft.share_threads(True)
    assert runtime is not None and fastattn.thread_pool_info()["torch_openmp"] == runtime
    g = torch.Generator().manual_seed(7)
    q, k, v = (torch.randn(1, 4, 300, 32, generator=g) for _ in range(3))
    runs = _core.host_runs()
    out = ft.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert _core.host_runs() > runs
    runs = _core.host_runs()
    ref = fastattn.attention(q.numpy(), k.numpy(), v.numpy(), causal=True, align="top-left")
    assert _core.host_runs() == runs
    assert np.array_equal(out.numpy(), ref)
    qg = q.clone().requires_grad_()
    ft.scaled_dot_product_attention(qg, k, v, is_causal=True).sum().backward()
    assert _core.host_runs() > runs
    assert ft.share_threads(False) is None and fastattn.thread_pool_info()["torch_openmp"] is None
    runs = fastattn.thread_pool_info()["torch_runs"]
    assert runs == _core.host_runs()
    assert np.array_equal(ft.scaled_dot_product_attention(q, k, v, is_causal=True).numpy(), ref)
    qg2 = q.clone().requires_grad_()
    ft.scaled_dot_product_attention(qg2, k, v, is_causal=True).sum().backward()
    assert _core.host_runs() == runs
    assert np.array_equal(qg.grad.numpy(), qg2.grad.numpy())


def test_torch_calls_in_a_forked_child_run_on_the_pool(torch_openmp):
    """A child forked after fastattn.torch ran on torch's OpenMP threads runs
    its calls on its own pool (GNU's OpenMP hangs in a region started in
    such a child), with the parent's results."""
    out = _run(
        """
        import os, numpy as np, torch, fastattn, fastattn.torch as ft
        from fastattn import _core
        fastattn.set_num_threads(2)
        torch.set_num_threads(2)
        q = torch.randn(1, 8, 400, 64, generator=torch.Generator().manual_seed(3))
        expected = ft.scaled_dot_product_attention(q, q, q)
        assert _core.host_runs() > 0 and ft.share_threads(True)
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:
            runs = _core.host_runs()
            same = np.array_equal(ft.scaled_dot_product_attention(q, q, q).numpy(), expected.numpy())
            os.write(write, f"{int(same)} {_core.host_runs() - runs}".encode())
            os._exit(0)
        os.waitpid(pid, 0)
        print(os.read(read, 100).decode())
        """, timeout=60)
    assert out.split() == ["1", "0"]


@pytest.mark.skipif(not os.path.exists("/proc/self/task"), reason="needs Linux's /proc")
def test_torch_threads_survive_smaller_fastattn_teams(torch_openmp):
    """A fastattn.torch call that needs fewer threads than torch has (2
    work items, torch at 4 threads) leaves torch's OpenMP threads as they
    were: GNU's runtime ends the threads a smaller region leaves out, and
    torch's next operation would start new ones."""
    torch, ft = torch_openmp
    fastattn.set_num_threads(4)
    torch.set_num_threads(4)
    x = torch.ones(1 << 22)
    q = torch.randn(1, 1, 128, 64)

    def torch_op():
        x.mul_(1.0)  # parallel over torch's 4 threads

    torch_op()
    ft.scaled_dot_product_attention(q, q, q)  # fastattn's pool and scratch exist from here on
    torch_op()
    before = set(os.listdir("/proc/self/task"))
    runs = _core.host_runs()
    for _ in range(3):
        ft.scaled_dot_product_attention(q, q, q)
        torch_op()
    assert _core.host_runs() == runs + 3
    assert set(os.listdir("/proc/self/task")) == before


def test_the_environments_thread_count_is_read_by_set_num_threads_none(monkeypatch):
    """OMP_NUM_THREADS is read at import and by set_num_threads(None), not
    by each call (distributed's LocalCluster sets it to 1 in its parent
    process for good: calls there kept one thread); set_num_threads(n)
    wins over it."""
    from fastattn import _config

    if not _core.pool_threaded():
        pytest.skip("a build without the thread pool runs every call on one thread")
    saved = _config._num_threads, _config._environment_threads
    before = fastattn.get_num_threads()
    try:
        monkeypatch.setenv("OMP_NUM_THREADS", "3,2")
        assert fastattn.get_num_threads() == before
        fastattn.set_num_threads(None)
        assert fastattn.get_num_threads() == 3
        fastattn.set_num_threads(5)
        assert fastattn.get_num_threads() == 5
        for value in ("0", None):  # not a positive count, or unset: every usable CPU
            if value is None:
                monkeypatch.delenv("OMP_NUM_THREADS")
            else:
                monkeypatch.setenv("OMP_NUM_THREADS", value)
            fastattn.set_num_threads(None)
            assert fastattn.get_num_threads() == _config._usable_cpus()
    finally:
        monkeypatch.undo()
        _config._num_threads, _config._environment_threads = saved
