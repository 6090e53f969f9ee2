"""Shared test helpers: the tolerance table, input generators and seeds."""
import zlib

import numpy as np


def stable_seed(*parts):
    """A seed derived from `parts` (e.g. a test id) that is the same in every
    process, so a failure can be reproduced from its test id (Python's
    hash() of strings changes from process to process)."""
    return zlib.crc32(repr(parts).encode())

# Tolerances per dtype, applied as |actual - expected| <= ATOL * mag + RTOL * |expected|,
# where mag = max(1, max |expected|) over the finite entries.  They follow from each
# dtype's unit roundoff u (2**-24 for float32, 2**-53 for float64): a fused kernel's
# sums of up to a few thousand terms with O(1) inputs stay within ~100 u of the
# largest magnitude involved.
TOLERANCES = {
    np.dtype(np.float32): dict(rtol=1e-5, atol=1e-5),  # ~170 u
    np.dtype(np.float64): dict(rtol=1e-12, atol=1e-12),  # ~4500 u; typically 10 u
    # 16-bit storage, float32 compute: the float32 error (atol) plus one rounding
    # of the result to the storage type, at most u |result| (rtol = u).
    np.dtype(np.float16): dict(rtol=2.0**-11, atol=1e-5),
}
try:
    import ml_dtypes

    TOLERANCES[np.dtype(ml_dtypes.bfloat16)] = dict(rtol=2.0**-8, atol=1e-5)
except ImportError:  # pragma: no cover
    pass
HALF = [dt for dt in TOLERANCES if dt.itemsize == 2]


def tolerance(dtype):
    return TOLERANCES[np.dtype(dtype)]


def assert_close(actual, expected, dtype=None, mag=None, extra=None):
    """Compare with the tolerance of `dtype` (default actual's dtype), plus an
    optional per-element `extra` allowance (see weight_rounding_allowance).

    Infinite entries must match exactly, NaNs must sit in the same places.
    """
    actual = np.asarray(actual)
    expected = np.asarray(expected, dtype=np.float64)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    tol = tolerance(dtype if dtype is not None else actual.dtype)
    a = actual.astype(np.float64)
    nan_a, nan_e = np.isnan(a), np.isnan(expected)
    assert np.array_equal(nan_a, nan_e), "NaNs differ"
    inf_e = np.isinf(expected)
    assert np.array_equal(a[inf_e], expected[inf_e]), "infinite entries differ"
    finite = ~(inf_e | nan_e)
    assert np.all(np.isfinite(a[finite])), "non-finite value where the reference is finite"
    if mag is None:
        mag = max(1.0, float(np.max(np.abs(expected[finite]), initial=0.0)))
    err = np.abs(a[finite] - expected[finite])
    bound = tol["atol"] * mag + tol["rtol"] * np.abs(expected[finite])
    if extra is not None:
        bound = bound + np.broadcast_to(np.asarray(extra, dtype=np.float64), expected.shape)[finite]
    if err.size and not np.all(err <= bound):
        worst = int(np.argmax(err - bound))
        raise AssertionError(
            f"max error {err.max():.3e} exceeds tolerance ({tol}, magnitude {mag:.3g}); "
            f"worst entry {a[finite][worst]!r} vs {expected[finite][worst]!r}"
        )


def randn(rng, shape, dtype):
    return rng.standard_normal(shape).astype(dtype)


# bfloat16 on the AVX512-BF16 path rounds the attention weights to bfloat16
# before the P.V products (as GPU kernels do), so each output element may
# move by up to u * sum_j |w_ij| |v_jc| beyond the table, u = 2**-8.
BF16_WEIGHT_U = 2.0**-8


def weight_rounding_allowance(q, k, v, **options):
    """u * sum_j |w_ij| |v_j| from the float64 reference, for bfloat16 results."""
    import fastattn.reference as ref

    av = np.abs(np.asarray(v, dtype=np.float64))
    if options.get("weights") == "dot":
        score_opts = {key: val for key, val in options.items() if key != "weights"}
        s = ref.scores(q, k, **{"scale": 1.0, **score_opts})
        w = np.abs(np.where(np.isneginf(s), 0.0, s))
        return BF16_WEIGHT_U * (w @ ref._repeat_kv_heads(np.asarray(q, np.float64), av))
    return BF16_WEIGHT_U * ref.attention(q, k, av, **options)


def assert_planned_rerun(monkeypatch, args_class, fn, args, kwargs, checked, want):
    """fn(*args, **kwargs) answered without the full checks (fastattn.
    _validate's `args_class` is made to fail, so only a planned call's
    rerun can answer): bitwise `checked` (the same call checked) and within
    tolerance of `want` (the reference); results single or (out, lse)."""
    from fastattn import _validate

    with monkeypatch.context() as m:
        m.setattr(_validate, args_class, None)
        got = fn(*args, **kwargs)
    if not isinstance(got, tuple):
        got, checked, want = (got,), (checked,), (want,)
    for a, b, r in zip(got, checked, want):
        np.testing.assert_array_equal(a, b)
        assert_close(a, r)


# ---- paged caches ------------------------------------------------------------


def paged_cache(rng, dtype, n_blocks, block_size, g, d, dv):
    return randn(rng, (n_blocks, block_size, g, d), dtype), randn(rng, (n_blocks, block_size, g, dv), dtype)


def block_table(rng, seq_lens, block_size, n_blocks, width=None):
    """Each sequence's blocks, drawn at random without repeats; unused
    entries hold garbage ids that must never be read."""
    need = [(n + block_size - 1) // block_size for n in seq_lens]
    width = max(max(need), 1) if width is None else width
    ids = rng.permutation(n_blocks)[: sum(need)]
    table = np.full((len(seq_lens), width), 10**9, dtype=np.int32)
    at = 0
    for b, n in enumerate(need):
        table[b, :n] = ids[at: at + n]
        at += n
    return table


def quantized_cache(rng, kv, n_blocks, bs, g, d, dv, tensor_scale=0.05):
    """A float32 cache and its 8-bit copy written by cache_write, with the scales."""
    import fastattn

    kf, vf = paged_cache(rng, np.float32, n_blocks, bs, g, d, dv)
    kq, vq = np.zeros(kf.shape, kv), np.zeros(vf.shape, kv)
    if kv == np.int8:
        ks, vs = np.zeros(kf.shape[:3], np.float32), np.zeros(vf.shape[:3], np.float32)
    else:
        ks = vs = tensor_scale
    n = n_blocks * bs
    fastattn.cache_write(kf.reshape(n, g, d), vf.reshape(n, g, dv), kq, vq, np.arange(n), k_scale=ks, v_scale=vs)
    return kf, vf, kq, vq, ks, vs
