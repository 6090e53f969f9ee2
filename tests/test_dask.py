"""fastattn.dask.attention against single-process fastattn.attention: every
chunking and option, the threaded scheduler and a two-process cluster, the
shape of the task graph, out-of-core K/V, bad input."""
import operator
import os
import subprocess
import sys

import numpy as np
import pytest

da = pytest.importorskip("dask.array", reason="fastattn.dask needs dask (pip install 'fastattn[dask]')")
import dask  # noqa: E402

import fastattn  # noqa: E402
import fastattn.dask as fdask  # noqa: E402
from util import HALF, assert_close, stable_seed  # noqa: E402

# (q, k, v) shapes: grouped heads (4 over 2), lengths that no chunk size divides
SHAPE = ((2, 4, 70, 16), (2, 2, 90, 16), (2, 2, 90, 8))
OPTIONS = {
    "plain": {},
    "causal": dict(causal=True),
    "causal top-left": dict(causal=True, align="top-left"),
    "causal at key 25": dict(causal=True, align=25),
    "window": dict(window=(13, 4)),
    "window past the keys": dict(window=(9, 4), align="top-left"),
    "softcap alibi": dict(softcap=1.5, alibi_slopes=np.array([0.5, 0.25, 0.125, 0.0625]), scale=0.7),
    "bool mask causal": dict(mask="bool", causal=True),
    "float mask": dict(mask="float"),
    "dot": dict(weights="dot"),
    "dot causal": dict(weights="dot", causal=True),
}
# chunks of q (batch, heads, Lq) and of k/v (batch, heads, Lk); D is one chunk
CHUNKINGS = {
    "whole": ((2, 4, 70), (2, 2, 90)),
    "rows 16, keys 32": ((1, 4, 16), (2, 2, 32)),
    "rows 33, keys 7, heads": ((2, 1, 33), (1, 1, 7)),
    "rows 70, keys 25, heads 3": ((1, 3, 70), (2, 1, 25)),
}


def inputs(dtype, name, rng):
    q, k, v = (rng.standard_normal(s).astype(dtype) for s in SHAPE)
    options = dict(OPTIONS[name])
    if options.get("mask") == "bool":
        m = rng.random((70, 90)) < 0.6
        m[3] = False
        options["mask"] = m
    elif options.get("mask") == "float":
        options["mask"] = np.where(rng.random((1, 70, 90)) < 0.2, -np.inf, rng.standard_normal((1, 70, 90)))
    return q, k, v, options


def as_dask(q, k, v, options, chunking):
    (qb, qh, ql), (kb, kh, kl) = CHUNKINGS[chunking]
    dq = da.from_array(q, chunks=(qb, qh, ql, -1))
    dk = da.from_array(k, chunks=(kb, kh, kl, -1))
    dv = da.from_array(v, chunks=(kb, kh, kl, -1))
    opts = dict(options)
    if isinstance(opts.get("mask"), np.ndarray):
        opts["mask"] = da.from_array(opts["mask"], chunks=(23,) * (opts["mask"].ndim - 1) + (40,))
    return dq, dk, dv, opts


def attention_tasks(arr):
    """Number of attention tasks in a result's graph (merges not counted)."""
    return sum(1 for key in dict(arr.__dask_graph__()) if isinstance(key, tuple)
               and key[0].startswith("fastattn-attention-"))


@pytest.mark.parametrize("chunking", list(CHUNKINGS))
@pytest.mark.parametrize("name", list(OPTIONS))
def test_matches_single_process(name, chunking):
    rng = np.random.default_rng(stable_seed(name, chunking))
    q, k, v, options = inputs(np.float32, name, rng)
    want = fastattn.attention(q, k, v, **options)
    dq, dk, dv, opts = as_dask(q, k, v, options, chunking)
    got = fdask.attention(dq, dk, dv, split_every=2, **opts)
    assert got.shape == want.shape and got.dtype == want.dtype
    assert got.chunks[-2] == da.from_array(q, chunks=(-1, -1, CHUNKINGS[chunking][0][2], -1)).chunks[-2]
    assert_close(got.compute(scheduler="threads"), want)


@pytest.mark.parametrize("dtype", [np.dtype(np.float64)] + HALF, ids=str)
@pytest.mark.parametrize("name", ["causal", "softcap alibi", "dot causal"])
def test_dtypes(dtype, name):
    rng = np.random.default_rng(stable_seed(name, str(dtype)))
    q, k, v, options = inputs(dtype, name, rng)
    want = fastattn.attention(q, k, v, **options)
    dq, dk, dv, opts = as_dask(q, k, v, options, "rows 16, keys 32")
    got = fdask.attention(dq, dk, dv, **opts).compute()
    assert got.dtype == dtype
    # the merged partials are rounded to the 16-bit type once more than the whole
    assert_close(got, want, extra=float(np.abs(want.astype(np.float64)).max()) * 2.0**-7 if dtype in HALF else None)


@pytest.mark.parametrize("name", ["plain", "causal at key 25", "window past the keys"])
def test_return_lse(name):
    rng = np.random.default_rng(stable_seed(name))
    q, k, v, options = inputs(np.float32, name, rng)
    want, want_lse = fastattn.attention(q, k, v, return_lse=True, **options)
    dq, dk, dv, opts = as_dask(q, k, v, options, "rows 16, keys 32")
    out, lse = fdask.attention(dq, dk, dv, return_lse=True, **opts)
    assert lse.shape == want_lse.shape and lse.dtype == want_lse.dtype
    got, got_lse = dask.compute(out, lse)
    assert_close(got, want)
    assert_close(got_lse, want_lse)


def test_numpy_inputs_are_wrapped():
    rng = np.random.default_rng(1)
    q, k, v, _ = inputs(np.float32, "plain", rng)
    got = fdask.attention(q, k, v, causal=True)
    assert isinstance(got, da.Array)
    assert_close(got.compute(), fastattn.attention(q, k, v, causal=True))


def test_broadcast_leading_dims():
    """q broadcast over the batch, k and v over heads: the output's chunks
    come from whichever operand has the axis."""
    rng = np.random.default_rng(2)
    q = rng.standard_normal((1, 3, 40, 8)).astype(np.float32)
    k = rng.standard_normal((4, 1, 50, 8)).astype(np.float32)
    v = rng.standard_normal((4, 1, 50, 6)).astype(np.float32)
    got = fdask.attention(da.from_array(q, chunks=(1, 2, 15, 8)), da.from_array(k, chunks=(3, 1, 20, 8)),
                          da.from_array(v, chunks=(2, 1, 50, 6)), causal=True)
    assert got.shape == (4, 3, 40, 6) and got.chunks[:2] == ((3, 1), (2, 1))
    assert_close(got.compute(), fastattn.attention(q, k, v, causal=True))


# ---- the task graph ---------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 3, 8])
def test_causal_makes_a_triangle_of_tasks(n):
    """Causal attention over n x n equal chunks: n(n+1)/2 attention tasks."""
    q = da.zeros((2, 16 * n, 8), chunks=(2, 16, 8), dtype=np.float32)
    assert attention_tasks(fdask.attention(q, q, q, causal=True)) == n * (n + 1) // 2
    assert attention_tasks(fdask.attention(q, q, q)) == n * n
    # a window of one chunk to the left: the diagonal and the chunk before it
    assert attention_tasks(fdask.attention(q, q, q, causal=True, window=(16, 0))) == 2 * n - 1


def test_decode_against_a_sharded_cache():
    """One query row against keys in 6 chunks: 6 tasks, merged in a tree of
    split_every partials per merge."""
    q = da.zeros((4, 1, 8), dtype=np.float32)
    k = da.zeros((4, 600, 8), chunks=(4, 100, 8), dtype=np.float32)
    out = fdask.attention(q, k, k, causal=True, split_every=3)
    keys = [key for key in dict(out.__dask_graph__()) if isinstance(key, tuple)]
    assert attention_tasks(out) == 6
    assert sum(1 for key in keys if key[0].startswith("fastattn-merge-")) == 3  # 2 of 3, then 1 of 2


def test_rows_that_see_no_key_make_no_attention_task():
    q = da.ones((1, 40, 8), chunks=(1, 10, 8), dtype=np.float32)
    k = da.ones((1, 30, 8), chunks=(1, 10, 8), dtype=np.float32)
    out, lse = fdask.attention(q, k, k, causal=True, align="top-left", window=(0, 0), return_lse=True)
    assert attention_tasks(out) == 3  # query chunk 3 (rows 30-39) sees no key: zeros, no task
    got, got_lse = dask.compute(out, lse)
    want, want_lse = fastattn.attention(*(np.asarray(x) for x in (q, k, k)), causal=True, align="top-left",
                                        window=(0, 0), return_lse=True)
    assert_close(got, want)
    assert np.all(got[:, 30:] == 0) and np.all(np.isneginf(got_lse[:, 30:]))


def test_chunked_head_dim_is_rechunked():
    rng = np.random.default_rng(3)
    q, k, v, _ = inputs(np.float32, "plain", rng)
    got = fdask.attention(da.from_array(q, chunks=(1, 2, 35, 5)), da.from_array(k, chunks=(1, 1, 30, 7)),
                          da.from_array(v, chunks=(1, 1, 30, 3)))
    assert got.chunks[-1] == (8,)
    assert_close(got.compute(), fastattn.attention(q, k, v))


def test_task_threads():
    """A task's default share of the CPUs: usable CPUs // min(worker threads, tasks)."""
    with fastattn.use_isa(fastattn.get_isa()):
        saved = fastattn._config._num_threads
        try:
            fastattn.set_num_threads(8)
            with dask.config.set(num_workers=4):
                assert fdask.task_threads(None, 100) == 2
                assert fdask.task_threads(None, 2) == 4
                assert fdask.task_threads(3, 100) == 3
            with dask.config.set(num_workers=16):
                assert fdask.task_threads(None, 100) == 1
        finally:
            fastattn.set_num_threads(saved)


# ---- a cluster of two worker processes ------------------------------------------------


@pytest.fixture(scope="module")
def client():
    distributed = pytest.importorskip("distributed", reason="needs dask.distributed (pip install 'fastattn[dask]')")
    with distributed.LocalCluster(n_workers=2, processes=True, threads_per_worker=1, dashboard_address=None,
                                  worker_dashboard_address=None) as cluster, distributed.Client(cluster) as c:
        yield c


@pytest.mark.parametrize("name", ["causal", "causal at key 25", "softcap alibi", "bool mask causal", "dot causal"])
def test_on_a_two_process_cluster(client, name):
    from distributed import get_task_stream

    rng = np.random.default_rng(stable_seed(name, "cluster"))
    q, k, v, options = inputs(np.float32, name, rng)
    dot = name.startswith("dot")
    want = fastattn.attention(q, k, v, return_lse=not dot, **options)
    dq, dk, dv, opts = as_dask(q, k, v, options, "rows 33, keys 7, heads")
    with get_task_stream(client) as stream:
        got = client.compute(fdask.attention(dq, dk, dv, return_lse=not dot, **opts), sync=True)
    if dot:
        assert_close(got, want)
    else:
        assert_close(got[0], want[0])
        assert_close(got[1], want[1])
    assert len({t["worker"] for t in stream.data}) == 2  # both worker processes took part


def memmap_rows(path, chunk):
    """A dask array of the rows of the .npy file at path, chunk rows per
    block, each block read by its task from the memory-mapped file (no data
    in the graph)."""
    shape, dtype = np.load(path, mmap_mode="r").shape, np.load(path, mmap_mode="r").dtype
    name = "rows-" + dask.base.tokenize(str(path), chunk)
    starts = range(0, shape[0], chunk)
    graph = {(name, n, 0): (operator.getitem, (np.load, str(path), "r"), slice(s, s + chunk))
             for n, s in enumerate(starts)}
    chunks = (tuple(min(chunk, shape[0] - s) for s in starts), (shape[1],))
    return da.Array(graph, name, chunks, dtype=dtype)


@pytest.mark.slow
def test_out_of_core_keys_and_values(tmp_path):
    """2 GiB of K and V in memory-mapped files, attended on a cluster of two
    worker processes of 1 GiB each: completes, and matches single-process
    attention over the same files."""
    distributed = pytest.importorskip("distributed", reason="needs dask.distributed")
    lk, d, rows, chunk = 1 << 22, 64, 4, 1 << 19  # K and V: 1 GiB each, float32; chunks of 128 MiB
    rng = np.random.default_rng(7)
    block = rng.standard_normal((1 << 16, d), dtype=np.float32)
    for name, sign in (("k", lambda n: 1 if n % 3 else -1), ("v", lambda n: n % 5 - 2)):
        x = np.lib.format.open_memmap(tmp_path / f"{name}.npy", mode="w+", dtype=np.float32, shape=(lk, d))
        for n, s in enumerate(range(0, lk, 1 << 16)):  # a repeating block, its sign changing: cheap to write
            x[s:s + (1 << 16)] = block * sign(n) if name == "k" else block[::-1] * sign(n)
        x.flush()
        del x
    q = rng.standard_normal((rows, d)).astype(np.float32)
    with distributed.LocalCluster(n_workers=2, processes=True, threads_per_worker=1, memory_limit="1GiB",
                                  dashboard_address=None, worker_dashboard_address=None) as cluster, distributed.Client(cluster) as c:
        dk, dv = memmap_rows(tmp_path / "k.npy", chunk), memmap_rows(tmp_path / "v.npy", chunk)
        out, lse = c.compute(fdask.attention(q, dk, dv, return_lse=True, num_threads=1), sync=True)
    k, v = np.load(tmp_path / "k.npy", mmap_mode="r"), np.load(tmp_path / "v.npy", mmap_mode="r")
    assert k.nbytes + v.nbytes == 2 << 30
    want, want_lse = fastattn.attention(q, k, v, return_lse=True)
    assert_close(out, want)
    assert_close(lse, want_lse)


@pytest.mark.slow
def test_sharded_decode_example():
    pytest.importorskip("distributed", reason="needs dask.distributed")
    path = os.path.join(os.path.dirname(__file__), os.pardir, "examples", "dask_sharded_decode.py")
    res = subprocess.run([sys.executable, path, "--tokens", "5000", "--steps", "2", "--heads", "4", "2"],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "2 shards on 2 workers" in res.stdout and "max |difference|" in res.stdout
