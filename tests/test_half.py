"""Half-precision storage (float16, bfloat16): float32 compute, output in the
input dtype, lse and scores in float32."""
import numpy as np
import pytest

import fastattn
import fastattn.reference as ref
from util import HALF, assert_close, randn, weight_rounding_allowance, stable_seed

ml_dtypes = pytest.importorskip("ml_dtypes")
BF16 = np.dtype(ml_dtypes.bfloat16)


def allowance(dtype, q, k, v, **options):
    """Extra error allowed where bfloat16 weights are rounded (AVX512-BF16 path)."""
    if dtype == BF16 and fastattn.get_isa() == "avx512bf16":
        return weight_rounding_allowance(q, k, v, **options)
    return None


@pytest.fixture(params=HALF, ids=str)
def half(request):
    return request.param


SHAPES = [
    ((), (), 1, 130, 17, 17),
    ((2, 3), (2, 3), 100, 130, 40, 24),
    ((1,), (1,), 193, 200, 128, 64),
    ((2, 8), (2, 2), 1, 2500, 64, 64),  # decode: grouped heads, split keys, few-row kernel
    ((1, 4), (1, 4), 3, 2100, 97, 9),
    ((1, 4), (1, 2), 1, 1501, 300, 160),  # decode: odd key count, dims beyond one register chunk
]


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("causal", [False, True])
def test_half_attention(isa, half, shape, causal):
    rng = np.random.default_rng(stable_seed((shape, causal)))
    lead_q, lead_k, lq, lk, d, dv = shape
    q, k = randn(rng, lead_q + (lq, d), half), randn(rng, lead_k + (lk, d), half)
    v = randn(rng, lead_k + (lk, dv), half)
    mask = rng.random((lq, lk)) < 0.9
    out, lse = fastattn.attention(q, k, v, causal=causal, mask=mask, return_lse=True)
    rout, rlse = ref.attention(q, k, v, causal=causal, mask=mask, return_lse=True)
    assert out.dtype == half and lse.dtype == np.float32
    assert_close(out, rout, extra=allowance(half, q, k, v, causal=causal, mask=mask))
    assert_close(lse, rlse)
    dot = fastattn.attention(q, k, v, causal=causal, weights="dot")
    assert_close(dot, ref.attention(q, k, v, causal=causal, weights="dot"),
                 extra=allowance(half, q, k, v, causal=causal, weights="dot"))


def test_half_scores_weighted_sum_varlen(isa, half):
    rng = np.random.default_rng(11)
    q, k, v = (randn(rng, (2, 50, 24), half) for _ in range(3))
    s = fastattn.scores(q, k, causal=True)
    assert s.dtype == np.float32
    assert_close(s, ref.scores(q, k, causal=True))
    w = randn(rng, (2, 50, 50), half)
    ws = fastattn.weighted_sum(w, v)
    assert ws.dtype == half
    assert_close(ws, ref.weighted_sum(w, v))
    cu = np.array([0, 20, 50])
    qv, kv = (randn(rng, (50, 4, 16), half) for _ in range(2))
    out, lse = fastattn.attention_varlen(qv, kv, kv, cu, cu, causal=True, return_lse=True)
    rout, rlse = ref.attention_varlen(qv, kv, kv, cu, cu, causal=True, return_lse=True)
    assert out.dtype == half and lse.dtype == np.float32
    extra = None
    if allowance(half, q, k, v) is not None:
        extra = 2.0**-8 * ref.attention_varlen(qv, kv, np.abs(kv.astype(np.float64)), cu, cu, causal=True)
    assert_close(out, rout, extra=extra)
    assert_close(lse, rlse)


def test_half_special_values_round_trip(half):
    """Infinities, NaN and tiny values in v pass through the conversions."""
    q = np.zeros((1, 4), half)
    v = np.array([[np.inf, np.nan, 1e-7, -0.0]], dtype=half)
    out = fastattn.attention(q, q, v)
    assert np.isinf(out[0, 0]) and np.isnan(out[0, 1])
    assert out[0, 2] == v[0, 2] and out[0, 3] == 0


def test_half_linear_attention(half):
    rng = np.random.default_rng(12)
    q, k, v = (randn(rng, (2, 300, 16), half) for _ in range(3))
    out = fastattn.linear_attention(q, k, v, causal=True)
    assert out.dtype == half
    assert_close(out, ref.linear_attention(q, k, v, causal=True))


def test_mixed_half_dtypes(half):
    rng = np.random.default_rng(13)
    q = randn(rng, (5, 8), half)
    k = randn(rng, (6, 8), np.float32)
    out = fastattn.attention(q, k, k)
    assert out.dtype == np.float32
    assert_close(out, ref.attention(q, k, k))


def test_half_out_argument(half):
    rng = np.random.default_rng(14)
    q = randn(rng, (2, 30, 8), half)
    out = np.empty((2, 30, 8), half)
    assert fastattn.attention(q, q, q, out=out) is out
    assert_close(out, ref.attention(q, q, q), extra=allowance(half, q, q, q))


def test_half_bitwise_identical_across_threads(isa, half):
    rng = np.random.default_rng(15)
    q, k, v = (randn(rng, (2, 3, 300, 40), half) for _ in range(3))
    one = fastattn.attention(q, k, v, causal=True, num_threads=1)
    two = fastattn.attention(q, k, v, causal=True, num_threads=2)
    assert np.array_equal(one.view(np.uint16), two.view(np.uint16))


# float32 queries over float16 or bfloat16 keys and values: the forward reads
# k and v in place (as a 16-bit KV cache), widening them in registers.
MIXED_SHAPES = SHAPES + [
    ((1, 32), (1, 8), 1, 700, 128, 128),  # a grouped decode of whole-vector rows
    ((3,), (), 50, 70, 64, 80),  # k, v shared by every head
]


@pytest.mark.parametrize("shape", MIXED_SHAPES, ids=str)
@pytest.mark.parametrize("causal", [False, True])
def test_float32_queries_over_16_bit_keys_and_values(isa, half, shape, causal):
    """Within float32 rounding of the reference on the 16-bit values, with
    every score option (mask, window, soft-cap, ALiBi, sinks; dot weights)."""
    rng = np.random.default_rng(stable_seed((shape, causal, str(half))))
    lead_q, lead_k, lq, lk, d, dv = shape
    q = randn(rng, lead_q + (lq, d), np.float32)
    k, v = randn(rng, lead_k + (lk, d), half), randn(rng, lead_k + (lk, dv), half)
    out, lse = fastattn.attention(q, k, v, causal=causal, return_lse=True)
    rout, rlse = ref.attention(q, k, v, causal=causal, return_lse=True)
    assert out.dtype == np.float32 and lse.dtype == np.float32
    assert_close(out, rout)
    assert_close(lse, rlse)
    heads = lead_q[-1:] if lead_q else ()
    options = dict(causal=causal, mask=rng.random((lq, lk)) < 0.9, window=(300, 40), softcap=20.0,
                   alibi_slopes=rng.uniform(0.01, 0.1, heads), sinks=rng.standard_normal(heads))
    assert_close(fastattn.attention(q, k, v, **options), ref.attention(q, k, v, **options))
    dot = dict(causal=causal, window=(300, -1))
    assert_close(fastattn.attention(q, k, v, weights="dot", **dot), ref.attention(q, k, v, weights="dot", **dot))


def test_float32_queries_over_16_bit_packed_sequences(isa, half):
    rng = np.random.default_rng(16)
    cu_q, cu_k = np.array([0, 1, 41, 42]), np.array([0, 1500, 1560, 1690])
    q = randn(rng, (42, 8, 72), np.float32)
    k, v = randn(rng, (1690, 2, 72), half), randn(rng, (1690, 2, 40), half)
    for causal in (False, True):
        out, lse = fastattn.attention_varlen(q, k, v, cu_q, cu_k, causal=causal, softcap=15.0, return_lse=True)
        rout, rlse = ref.attention_varlen(q, k, v, cu_q, cu_k, causal=causal, softcap=15.0, return_lse=True)
        assert out.dtype == np.float32
        assert_close(out, rout)
        assert_close(lse, rlse)


@pytest.mark.parametrize("lq", [1, 3, 70], ids=["decode", "rows", "prefill-tail"])
def test_float32_queries_over_column_strided_16_bit_keys_and_values(isa, half, lq):
    """16-bit k and v whose elements lie 4 bytes apart (every other element of
    a wider array, from the second one) are converted, not read as float32
    rows: the few-row kernels took them for float32 rows of the same stride
    (wrong results on the AVX2 and AVX-512 paths: decodes, a prefill's last
    rows, packed sequences and paged caches)."""
    rng = np.random.default_rng(stable_seed(("strided", lq, str(half))))
    q = randn(rng, (2, 4, lq, 32), np.float32)
    k = randn(rng, (2, 2, 80, 65), half)[..., 1::2]
    v = randn(rng, (2, 2, 80, 48), half)[..., ::2]
    assert k.strides[-1] == v.strides[-1] == 4
    for options in (dict(), dict(causal=True, softcap=10.0)):
        assert_close(fastattn.attention(q, k, v, **options), ref.attention(q, k, v, **options))
    qv, kv, vv = q[0].swapaxes(0, 1), k[0].swapaxes(0, 1), v[0].swapaxes(0, 1)  # (total, heads, dim)
    cu_q, cu_k = np.array([0, lq]), np.array([0, 80])
    assert_close(fastattn.attention_varlen(qv, kv, vv, cu_q, cu_k), ref.attention_varlen(qv, kv, vv, cu_q, cu_k))
    kc, vc = kv.reshape(5, 16, 2, 32), vv.reshape(5, 16, 2, 24)  # pages of 16 keys, column-strided views
    table, lens = np.array([[4, 2, 0, 1, 3]], np.int32), np.array([80], np.int32)
    got = fastattn.attention_paged(qv, kc, vc, table, lens, cu_seqlens_q=cu_q)
    assert_close(got, ref.attention_paged(qv, kc, vc, table, lens, cu_seqlens_q=cu_q))


def test_float32_queries_read_16_bit_keys_and_values_in_place(isa, half):
    """No float32 copy of k or v is made (numpy reports its allocations to
    tracemalloc: converting them would allocate 2 x 12 MB); the results are
    those of converting them first, bit for bit (each element is widened
    exactly, and the sums run in the same order)."""
    import tracemalloc

    rng = np.random.default_rng(17)
    q, qv = randn(rng, (1, 8, 1, 64), np.float32), randn(rng, (1, 8, 64), np.float32)
    k, v = (randn(rng, (1, 2, 48000, 64), half) for _ in range(2))
    kv, vv = k[0].swapaxes(0, 1), v[0].swapaxes(0, 1)  # (total, G, D) views of the same rows
    cu_q, cu_k = np.array([0, 1]), np.array([0, 48000])
    calls = (lambda: fastattn.attention(q, k, v), lambda: fastattn.attention_varlen(qv, kv, vv, cu_q, cu_k))
    for call in calls:
        call()  # validation caches filled
        tracemalloc.start()
        try:
            call()
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert peak < 1 << 20, f"{peak} bytes allocated"
    k32, v32 = k.astype(np.float32), v.astype(np.float32)
    assert np.array_equal(fastattn.attention(q, k, v), fastattn.attention(q, k32, v32))
    qp = randn(rng, (1, 8, 300, 64), np.float32)  # prefill: K and V tiles widened into scratch
    assert np.array_equal(fastattn.attention(qp, k[..., :700, :], v[..., :700, :], causal=True),
                          fastattn.attention(qp, k32[..., :700, :], v32[..., :700, :], causal=True))
