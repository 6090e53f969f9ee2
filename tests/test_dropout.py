"""Dropout on the attention weights: the kernels' mask is the reference's
(fastattn.reference.dropout_keep), forward and backward match the float64
reference on every path, and nothing depends on threads or tiles."""
import numpy as np
import pytest

import fastattn
import fastattn.reference as ref
from test_backward import half_allowance
from util import HALF, assert_close, stable_seed, weight_rounding_allowance

# (q shape, k shape, v shape): odd sizes, several tiles, grouped heads,
# broadcast leading dims, one-query decoding (few-row kernels, split keys)
SHAPES = [
    ((2, 3, 70, 19), (2, 3, 97, 19), (2, 3, 97, 7)),
    ((1, 4, 65, 16), (1, 2, 130, 16), (1, 2, 130, 9)),  # 4 query heads over 2 kv heads
    ((3, 1, 9, 12), (1, 2, 20, 12), (1, 2, 20, 5)),  # q broadcast over heads, k and v over batch
    ((2, 8, 1, 64), (2, 2, 2500, 64), (2, 2, 2500, 64)),  # decoding: split keys, few rows
    ((1, 2, 3, 32), (1, 2, 700, 32), (1, 2, 700, 40)),  # a few rows
]
OPTIONS = {
    "plain": {},
    "causal": dict(causal=True),
    "causal window at key 9": dict(causal=True, window=(20, -1), align=9),
    "softcap alibi": dict(softcap=1.5, alibi_slopes=0.25, scale=0.7),
    "bool mask": dict(mask="bool"),
    "float mask causal": dict(mask="float", causal=True),
    "sinks": dict(sinks=0.5),
    "dot": dict(weights="dot"),
}


def make(shapes, name, dtype, rng, p=0.3):
    q, k, v = (rng.standard_normal(s).astype(dtype) for s in shapes)
    options = dict(OPTIONS[name], dropout_p=p, dropout_seed=int(rng.integers(0, 2**63)))
    lq, lk = shapes[0][-2], shapes[1][-2]
    if options.get("mask") == "bool":
        m = rng.random((lq, lk)) < 0.7
        if lq > 1:
            m[1] = False  # a row that sees no key
        options["mask"] = m
    elif options.get("mask") == "float":
        options["mask"] = np.where(rng.random((lq, lk)) < 0.2, -np.inf, rng.standard_normal((lq, lk)))
    return q, k, v, options


def forward(q, k, v, options, **kw):
    if options.get("weights") == "dot":
        return fastattn.attention(q, k, v, **options, **kw), None
    return fastattn.attention(q, k, v, return_lse=True, **options, **kw)


# every option on prefill tiles; the decoding and few-row kernels with a few
CASES = [(shapes, name) for shapes in SHAPES[:3] for name in OPTIONS] + \
    [(shapes, name) for shapes in SHAPES[3:] for name in ("causal", "bool mask", "sinks", "dot")]


@pytest.mark.parametrize("shapes, name", CASES, ids=lambda x: "x".join(map(str, x[0])) if isinstance(x, tuple) else x)
def test_dropout_matches_reference(isa, dtype, shapes, name):
    rng = np.random.default_rng(stable_seed(shapes, name, str(dtype)))
    q, k, v, options = make(shapes, name, dtype, rng)
    out, lse = forward(q, k, v, options)
    want = ref.attention(q, k, v, return_lse=lse is not None, **options)
    if lse is not None:
        want, want_lse = want
        assert_close(lse, want_lse)
        # the lse counts every weight: dropout leaves it as it was
        assert np.array_equal(lse, forward(q, k, v, dict(options, dropout_p=0.0))[1])
    assert_close(out, want)
    assert not np.allclose(out, ref.attention(q, k, v, **dict(options, dropout_p=0.0)))
    dout = rng.standard_normal(out.shape).astype(dtype)
    grads = fastattn.attention_backward(dout, q, k, v, out, lse, **options)
    for got, exp, x in zip(grads, ref.attention_backward(dout, q, k, v, **options), (q, k, v)):
        assert got.shape == x.shape and got.dtype == x.dtype
        assert_close(got, exp)


@pytest.mark.parametrize("half", HALF, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("name", ["plain", "causal", "dot"])
def test_dropout_16bit(isa, half, name):
    shapes = SHAPES[1]
    rng = np.random.default_rng(stable_seed(shapes, name, np.dtype(half).name))
    q, k, v, options = make(shapes, name, half, rng)
    out, lse = forward(q, k, v, options)
    bf16_rounds = np.dtype(half).name == "bfloat16" and fastattn.get_isa() == "avx512bf16"
    assert_close(out, ref.attention(q, k, v, **options),
                 extra=weight_rounding_allowance(q, k, v, **options) if bf16_rounds else None)
    dout = rng.standard_normal(out.shape).astype(half)
    grads = fastattn.attention_backward(dout, q, k, v, out, lse, **options)
    u = 2.0**-8 if np.dtype(half).name == "bfloat16" else 2.0**-11
    # delta moves with the rounded output as without dropout (dS's P is the undropped one)
    undropped = {n: o for n, o in options.items() if not n.startswith("dropout")}
    extras = half_allowance(u, dout, out, q, k, undropped) if name != "dot" else (0, 0, 0)
    for got, exp, extra in zip(grads, ref.attention_backward(dout, q, k, v, **options), extras):
        assert got.dtype == half
        assert_close(got, exp, extra=extra)


DECODE = ((2, 8, 1, 64), (2, 2, 600, 64), None)  # one query, split keys


@pytest.mark.parametrize("shapes", [SHAPES[0], SHAPES[1], DECODE], ids=lambda s: "x".join(map(str, s[0])))
def test_dropped_weights_are_the_reference_mask(isa, shapes):
    """With v the identity, each output row is the row's weights times its
    factors: exactly zero where the weight was dropped (and nowhere else,
    every weight being positive).  The kept ones are the reference mask's:
    its stream is the flat index of the output's leading dims, its row and
    key their indices."""
    rng = np.random.default_rng(stable_seed("mask", shapes))
    q = rng.standard_normal(shapes[0])
    lk = shapes[1][-2]
    k = rng.standard_normal(shapes[1])
    v = np.broadcast_to(np.eye(lk), shapes[1][:-1] + (lk,))
    out = fastattn.attention(q, k, v, dropout_p=0.25, dropout_seed=77)
    lead, lq = out.shape[:-2], out.shape[-2]
    streams = np.arange(int(np.prod(lead))).reshape(lead + (1, 1))
    keep = ref.dropout_keep(77, 0.25, streams, np.arange(lq)[:, None], np.arange(lk))
    assert np.array_equal(out != 0, keep)
    assert abs(keep.mean() - 0.75) < 6 * np.sqrt(0.25 * 0.75 / keep.size)
    w = ref.attention(q, k, v)
    assert_close(out[keep], w[keep] / 0.75)


def test_dropout_keep_is_the_documented_hash():
    """dropout_keep against the hash written out in plain Python integers
    (fastattn.h's description), for a few coordinates."""
    m64, m32 = 2**64 - 1, 2**32 - 1

    def mix64(x):
        x = (x + 0x9E3779B97F4A7C15) & m64
        x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & m64
        x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & m64
        return x ^ (x >> 31)

    def fmix32(h):
        h = ((h ^ (h >> 16)) * 0x85EBCA6B) & m32
        h = ((h ^ (h >> 13)) * 0xC2B2AE35) & m32
        return h ^ (h >> 16)

    seed, p = 2**64 - 5, 0.4
    for s, i, c in [(0, 0, 0), (3, 17, 2**32 + 5), (2**40, 9, 65), (1, 4, 64), (7, 2, 2**32 - 1), (7, 2, 2**32)]:
        r = mix64(seed ^ mix64(s ^ mix64(i)))
        t = fmix32(((((c & m32) >> 1) ^ (r >> 32)) * 0x9E3779B1 + (r & m32)) & m32)
        assert bool(ref.dropout_keep(seed, p, s, i, c)) == (((t >> (16 * (c & 1))) & 0xFFFF) >= round(p * 2**16))


@pytest.mark.parametrize("causal", [False, True])
def test_dropout_is_bitwise_the_same_for_any_thread_count(causal):
    shapes = ((1, 4, 300, 32), (1, 2, 300, 32), (1, 2, 300, 24))
    rng = np.random.default_rng(stable_seed("threads", causal))
    q, k, v = (rng.standard_normal(s).astype(np.float32) for s in shapes)
    options = dict(causal=causal, dropout_p=0.2, dropout_seed=5)
    out, lse = fastattn.attention(q, k, v, return_lse=True, num_threads=1, **options)
    dout = rng.standard_normal(out.shape).astype(np.float32)
    grads = fastattn.attention_backward(dout, q, k, v, out, lse, num_threads=1, **options)
    for threads in (2, 3, 5):
        assert np.array_equal(out, fastattn.attention(q, k, v, num_threads=threads, **options))
        for a, b in zip(grads, fastattn.attention_backward(dout, q, k, v, out, lse, num_threads=threads, **options)):
            assert np.array_equal(a, b)
    # decoding, its keys split across threads
    q1 = q[:, :, :1]
    one = fastattn.attention(q1, k, v, num_threads=1, **options)
    assert np.array_equal(one, fastattn.attention(q1, k, v, num_threads=4, **options))


def test_seeds_and_zero_probability():
    rng = np.random.default_rng(3)
    q, k, v = (rng.standard_normal((2, 40, 16)).astype(np.float32) for _ in range(3))
    plain = fastattn.attention(q, k, v)
    assert np.array_equal(fastattn.attention(q, k, v, dropout_p=0.0, dropout_seed=9), plain)
    a = fastattn.attention(q, k, v, dropout_p=0.5, dropout_seed=1)
    assert np.array_equal(a, fastattn.attention(q, k, v, dropout_p=0.5, dropout_seed=1))
    assert not np.array_equal(a, fastattn.attention(q, k, v, dropout_p=0.5, dropout_seed=2))


def test_dropout_is_unbiased_on_average():
    """The mean over many seeds of the dropped output tends to the output
    without dropout (each weight's factor has mean 1)."""
    rng = np.random.default_rng(4)
    q, k, v = (rng.standard_normal((1, 8, 16)) for _ in range(3))
    runs = np.stack([fastattn.attention(q, k, v, dropout_p=0.5, dropout_seed=s) for s in range(2000)])
    plain = fastattn.attention(q, k, v)
    spread = runs.std(axis=0) / np.sqrt(len(runs))
    assert np.all(np.abs(runs.mean(axis=0) - plain) <= 6 * spread + 1e-12)


VARLEN_OPTIONS = {
    "plain": {},
    "causal": dict(causal=True),
    "window softcap sinks": dict(window=(9, 2), softcap=2.0, sinks=np.array([0.3, -1.0, 0.1, 0.5])),
    "dot causal": dict(weights="dot", causal=True),
}


@pytest.mark.parametrize("name", list(VARLEN_OPTIONS))
def test_varlen_dropout_matches_reference(isa, dtype, name):
    rng = np.random.default_rng(stable_seed("varlen", name, str(dtype)))
    cu_q = np.array([0, 30, 31, 100])
    cu_k = np.array([0, 50, 60, 160])
    q = rng.standard_normal((100, 4, 12)).astype(dtype)
    k = rng.standard_normal((160, 2, 12)).astype(dtype)
    v = rng.standard_normal((160, 2, 7)).astype(dtype)
    options = dict(VARLEN_OPTIONS[name], dropout_p=0.35, dropout_seed=1234)
    lse = None
    if options.get("weights") == "dot":
        out = fastattn.attention_varlen(q, k, v, cu_q, cu_k, **options)
    else:
        out, lse = fastattn.attention_varlen(q, k, v, cu_q, cu_k, return_lse=True, **options)
    assert_close(out, ref.attention_varlen(q, k, v, cu_q, cu_k, **options))
    dout = rng.standard_normal(out.shape).astype(dtype)
    grads = fastattn.attention_varlen_backward(dout, q, k, v, out, lse, cu_q, cu_k, **options)
    for got, exp in zip(grads, ref.attention_varlen_backward(dout, q, k, v, cu_q, cu_k, **options)):
        assert_close(got, exp)


def test_varlen_dropout_is_one_long_sequence_with_a_document_mask():
    """Packed sequences drop the weights the same long sequence drops
    (stream = head, rows and keys as packed) under a block-diagonal mask."""
    rng = np.random.default_rng(8)
    cu = np.array([0, 13, 14, 90])
    q, k, v = (rng.standard_normal((90, 2, 16)) for _ in range(3))
    options = dict(dropout_p=0.3, dropout_seed=21)
    packed = fastattn.attention_varlen(q, k, v, cu, cu, **options)
    doc = np.repeat(np.arange(3), np.diff(cu))
    long = fastattn.attention(*(np.swapaxes(a, 0, 1) for a in (q, k, v)), mask=doc[:, None] == doc[None, :],
                              **options)
    assert_close(packed, np.swapaxes(long, 0, 1))


def test_reference_dropout_backward_matches_finite_differences():
    """The reference backward with dropout against central differences of
    the reference forward (the mask is fixed by the seed)."""
    rng = np.random.default_rng(12)
    q, k, v = rng.standard_normal((2, 5, 4)), rng.standard_normal((2, 7, 4)), rng.standard_normal((2, 7, 3))
    dout = rng.standard_normal((2, 5, 3))
    options = dict(causal=True, softcap=2.0, dropout_p=0.4, dropout_seed=6)
    grads = ref.attention_backward(dout, q, k, v, **options)
    eps = 1e-6
    for x, g in zip((q, k, v), grads):
        num = np.zeros_like(x)
        for idx in np.ndindex(x.shape):
            orig = x[idx]
            x[idx] = orig + eps
            up = np.sum(dout * ref.attention(q, k, v, **options))
            x[idx] = orig - eps
            down = np.sum(dout * ref.attention(q, k, v, **options))
            x[idx] = orig
            num[idx] = (up - down) / (2 * eps)
        np.testing.assert_allclose(g, num, rtol=1e-6, atol=1e-7)
