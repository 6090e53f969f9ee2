"""Seeded random cases against the reference: shapes, views, broadcasts and
grouped heads drawn together, the combinations a case-by-case table misses
(a randomized search over them found grouped k beside a one-head v read past
its end, column-strided 16-bit k and v read as float32 rows, and divisions by
a zero row size).  Each case's seed comes from its test id."""
import numpy as np
import pytest

import fastattn
import fastattn.reference as ref
from util import assert_close, block_table, quantized_cache, stable_seed

ml_dtypes = pytest.importorskip("ml_dtypes")
SIZES = [0, 1, 2, 3, 7, 13, 31, 33, 63, 65, 100, 129]
DIMS = [0, 1, 3, 8, 16, 17, 40, 64, 80]


def view(rng, shape, dtype):
    """An array of `shape` as one of: contiguous, every other column of a
    wider array from its first or second column, rows and heads swapped in
    memory, or reversed rows."""
    kind = rng.integers(4)
    if kind == 1:
        start = int(rng.integers(2))
        return rng.standard_normal(shape[:-1] + (2 * shape[-1] + start,)).astype(dtype)[..., start::2]
    if kind == 2 and len(shape) >= 3:
        return np.swapaxes(rng.standard_normal(shape[:-3] + (shape[-2], shape[-3], shape[-1])).astype(dtype), -2, -3)
    if kind == 3 and len(shape) >= 2:
        return rng.standard_normal(shape).astype(dtype)[..., ::-1, :]
    return rng.standard_normal(shape).astype(dtype)


def heads(rng, h):
    """k and v head counts under h query heads: each h, one that divides it, or 1."""
    g = int(rng.choice([d for d in range(1, h + 1) if h % d == 0]))
    return tuple(int(rng.choice([h, g, 1])) for _ in range(2))


@pytest.mark.parametrize("case", range(40))
def test_random_attention_cases(isa, case):
    rng = np.random.default_rng(stable_seed("attention", case))
    b, h = int(rng.integers(1, 3)), int(rng.choice([1, 2, 4, 6]))
    lq, lk = (int(rng.choice(SIZES)) for _ in range(2))
    d, dv = (int(rng.choice(DIMS)) for _ in range(2))
    hk, hv = heads(rng, h)
    if hk != hv and 1 not in (hk, hv):
        hv = hk  # grouped k and v share their head count (one of them may broadcast instead)
    dtype = np.dtype(rng.choice([np.float32, np.float64]))
    kv_dtype = dtype
    if dtype == np.float32 and rng.random() < 0.3:  # 16-bit k and v read in place under float32 queries
        kv_dtype = np.dtype(rng.choice([ml_dtypes.bfloat16, np.float16]))
    q = view(rng, (b, h, lq, d), dtype)
    k = view(rng, (int(rng.choice([b, 1])), hk, lk, d), kv_dtype)
    v = view(rng, (k.shape[0], hv, lk, dv), kv_dtype)
    options = {}
    if rng.random() < 0.5:
        options["causal"] = True
    if rng.random() < 0.3:
        options["window"] = (int(rng.integers(0, 40)), int(rng.integers(-1, 10)))
    if rng.random() < 0.3:
        options["softcap"] = 5.0
    if rng.random() < 0.3:
        shape = [(lq, lk), (b, 1, 1, lk), (1, h, lq, lk)][rng.integers(3)]
        options["mask"] = rng.random(shape) < 0.8 if rng.random() < 0.5 else rng.standard_normal(shape)
    threads = int(rng.integers(1, 4))
    out, lse = fastattn.attention(q, k, v, return_lse=True, num_threads=threads, **options)
    want, want_lse = ref.attention(q, k, v, return_lse=True, **options)
    assert out.shape == want.shape
    assert_close(out, want)
    assert_close(lse, want_lse)
    if kv_dtype != dtype:
        return  # the backward takes k and v in q's type
    dout = rng.standard_normal(out.shape).astype(dtype)
    grads = fastattn.attention_backward(dout, q, k, v, out, lse, num_threads=threads, **options)
    for got, exp, x in zip(grads, ref.attention_backward(dout, q, k, v, **options), (q, k, v)):
        assert got.shape == x.shape and got.dtype == x.dtype
        assert_close(got, exp)


@pytest.mark.parametrize("case", range(30))
def test_random_paged_cases(isa, case):
    rng = np.random.default_rng(stable_seed("paged", case))
    g = int(rng.choice([1, 2]))
    h, bs = g * int(rng.choice([1, 2, 4])), int(rng.choice([1, 5, 16]))
    d, dv = int(rng.choice([1, 8, 16, 20, 64])), int(rng.choice([1, 8, 16, 24, 64]))
    kv = rng.choice(["float32", "bfloat16", "int8"])
    lens = rng.integers(1, 60, size=int(rng.integers(1, 4)))
    n_q = np.minimum(lens, rng.choice([1, 1, 5], size=lens.size))
    cu = np.concatenate([[0], np.cumsum(n_q)])
    n_blocks = int(sum((n + bs - 1) // bs for n in lens)) + 2
    table = block_table(rng, lens, bs, n_blocks)
    q = rng.standard_normal((cu[-1], h, d)).astype(np.float32)
    scales = {}
    if kv == "int8":
        _, _, kc, vc, ks, vs = quantized_cache(rng, np.dtype(np.int8), n_blocks, bs, g, d, dv)
        scales = dict(k_scale=ks, v_scale=vs)
    else:
        dt = ml_dtypes.bfloat16 if kv == "bfloat16" else np.float32
        kc, vc = view(rng, (n_blocks, bs, g, d), dt), view(rng, (n_blocks, bs, g, dv), dt)
    options = dict(cu_seqlens_q=cu, **scales)
    got = fastattn.attention_paged(q, kc, vc, table, lens.astype(np.int32), num_threads=int(rng.integers(1, 4)),
                                   **options)
    assert_close(got, ref.attention_paged(q, kc, vc, table, lens.astype(np.int32), **options))
