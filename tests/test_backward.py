"""attention_backward against the float64 reference backward, on every path."""
import numpy as np
import pytest

import fastattn
import fastattn.reference as ref
from util import HALF, assert_close, stable_seed

# (q shape, k shape, v shape): odd lengths and head dims, Lq != Lk, several
# query and key tiles, grouped heads, operands broadcast over leading dims
SHAPES = [
    ((2, 3, 70, 19), (2, 3, 97, 19), (2, 3, 97, 7)),
    ((1, 4, 65, 16), (1, 2, 130, 16), (1, 2, 130, 9)),  # 4 query heads over 2 kv heads
    ((3, 1, 9, 12), (1, 2, 20, 12), (1, 2, 20, 5)),  # q broadcast over heads, k and v over batch
    ((40, 8), (150, 8), (150, 33)),
]
OPTIONS = {
    "plain": {},
    "causal": dict(causal=True),
    "causal top-left": dict(causal=True, align="top-left"),
    "causal window at key 9": dict(causal=True, window=(20, -1), align=9),
    "window": dict(window=(13, 4)),
    "softcap alibi": dict(softcap=1.5, alibi_slopes=0.25, scale=0.7),
    "bool mask": dict(mask="bool"),
    "float mask causal": dict(mask="float", causal=True),
    "bool mask softcap alibi": dict(mask="bool", softcap=2.0, alibi_slopes=0.3),
    "float32 mask alibi window": dict(mask="float32", alibi_slopes=0.2, window=(30, 11)),
    "dot": dict(weights="dot"),
    "dot causal softcap": dict(weights="dot", causal=True, softcap=3.0),
}


def make(shapes, name, dtype, rng):
    q, k, v = (rng.standard_normal(s).astype(dtype) for s in shapes)
    options = dict(OPTIONS[name])
    lq, lk = shapes[0][-2], shapes[1][-2]
    if options.get("mask") == "bool":
        m = rng.random((lq, lk)) < 0.7
        m[1] = False  # a row that sees no key: zero gradients
        options["mask"] = m
    elif options.get("mask") in ("float", "float32"):
        m = np.where(rng.random((lq, lk)) < 0.2, -np.inf, rng.standard_normal((lq, lk)))
        options["mask"] = m.astype(np.float32 if options["mask"] == "float32" else np.float64)
    return q, k, v, options


def forward(q, k, v, options):
    if options.get("weights") == "dot":
        return fastattn.attention(q, k, v, **options), None
    return fastattn.attention(q, k, v, return_lse=True, **options)


@pytest.mark.parametrize("shapes", SHAPES, ids=lambda s: "x".join(map(str, s[0])))
@pytest.mark.parametrize("name", list(OPTIONS))
def test_backward_matches_reference(isa, dtype, shapes, name):
    rng = np.random.default_rng(stable_seed(shapes, name, str(dtype)))
    q, k, v, options = make(shapes, name, dtype, rng)
    out, lse = forward(q, k, v, options)
    dout = rng.standard_normal(out.shape).astype(dtype)
    dq, dk, dv = fastattn.attention_backward(dout, q, k, v, out, lse, **options)
    want = ref.attention_backward(dout, q, k, v, **options)
    for got, exp, x in zip((dq, dk, dv), want, (q, k, v)):
        assert got.shape == x.shape and got.dtype == x.dtype
        assert_close(got, exp)
    if options.get("mask") is not None and options["mask"].dtype == bool:
        assert np.all(dq[..., 1, :] == 0)


def half_allowance(u, dout, out, q, k, options):
    """What rounding the forward's output to 16 bits may move the gradients
    by: delta = rowsum(dout * out) moves by up to u a (a = sum |dout| |out|),
    so dS = P (dP - delta) by P u a, dq by scale u a (P |k|) and dk by
    scale u P^T (a |q|); dv does not use delta."""
    q64, k64 = np.asarray(q, np.float64), np.asarray(k, np.float64)
    scale = options.get("scale", 1 / np.sqrt(q.shape[-1]))
    s = ref.scores(q64, k64, **{n: o for n, o in options.items() if n != "weights"})
    p = ref.softmax(s)
    a = np.sum(np.abs(np.asarray(dout, np.float64)) * np.abs(np.asarray(out, np.float64)), axis=-1)[..., None]
    kr = ref._repeat_kv_heads(q64, np.abs(k64))
    extra_q = scale * u * a * (p @ kr)
    extra_k = scale * u * (np.swapaxes(p, -1, -2) @ (a * np.abs(q64)))
    return ref._sum_to_shape(extra_q, q.shape), ref._sum_to_shape(extra_k, k.shape), 0


@pytest.mark.parametrize("half", HALF, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("name", ["plain", "causal", "softcap alibi", "bool mask", "dot"])
def test_backward_16bit(isa, half, name):
    shapes = SHAPES[1]
    rng = np.random.default_rng(stable_seed(shapes, name, np.dtype(half).name))
    q, k, v, options = make(shapes, name, half, rng)
    out, lse = forward(q, k, v, options)
    dout = rng.standard_normal(out.shape).astype(half)
    grads = fastattn.attention_backward(dout, q, k, v, out, lse, **options)
    want = ref.attention_backward(dout, q, k, v, **options)
    u = 2.0**-8 if np.dtype(half).name == "bfloat16" else 2.0**-11
    extras = half_allowance(u, dout, out, q, k, options) if options.get("weights") != "dot" else (0, 0, 0)
    for got, exp, x, extra in zip(grads, want, (q, k, v), extras):
        assert got.shape == x.shape and got.dtype == x.dtype
        assert_close(got, exp, extra=extra)


@pytest.mark.parametrize("half", HALF, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("shapes", [((8,), (1,)), ((3, 4), (1, 4)), ((1, 4), (3, 4))], ids=str)
def test_backward_16bit_broadcast_gradients_are_rounded_once(half, shapes):
    """Where q, k or v is broadcast over a leading dimension, the 16-bit
    gradients are the float32 backward's on the same values, rounded once
    (each sharing entry's rows were written in 16 bits and then summed:
    hundreds of ulps off where the sums cancel)."""
    rng = np.random.default_rng(stable_seed(shapes, np.dtype(half).name))
    lead_q, lead_kv = shapes
    q = rng.standard_normal(lead_q + (50, 16)).astype(half)
    k, v = (rng.standard_normal(lead_kv + (50, 16)).astype(half) for _ in range(2))
    out, lse = fastattn.attention(q, k, v, causal=True, return_lse=True)
    dout = rng.standard_normal(out.shape).astype(half)
    grads = fastattn.attention_backward(dout, q, k, v, out, lse, causal=True)
    wide = [np.asarray(a, np.float32) for a in (dout, q, k, v, out)]
    once = fastattn.attention_backward(*wide, lse, causal=True)
    given = [np.empty_like(x) for x in (q, k, v)]
    into = fastattn.attention_backward(dout, q, k, v, out, lse, causal=True, dq=given[0], dk=given[1], dv=given[2])
    for got, want, x, dest, written in zip(grads, once, (q, k, v), given, into):
        assert got.shape == x.shape and got.dtype == x.dtype
        assert np.array_equal(got.view(np.uint16), want.astype(half).view(np.uint16))
        assert written is dest and np.array_equal(dest.view(np.uint16), got.view(np.uint16))


@pytest.mark.parametrize("name", ["causal", "causal top-left", "window", "dot causal softcap"])
def test_backward_bounded_tiles_ignore_what_earlier_tiles_left(isa, name):
    """On tiles the causal or window bounds cut, the products no row sees
    are not computed: their scores and dP stay what the thread's previous
    tile left in its scratch (here NaN: the first entry's q and dout are
    NaN) and must weigh nothing.  One thread, so the second entry's tiles
    run on that scratch right after the first's."""
    rng = np.random.default_rng(stable_seed("stale scratch", name))
    q, k, v = (rng.standard_normal((2, 1, 150, 32)).astype(np.float32) for _ in range(3))
    options = dict(OPTIONS[name])
    q[0] = np.nan
    out, lse = forward(q, k, v, options)
    dout = rng.standard_normal(out.shape).astype(np.float32)
    dout[0] = np.nan
    grads = fastattn.attention_backward(dout, q, k, v, out, lse, num_threads=1, **options)
    want = ref.attention_backward(dout[1], q[1], k[1], v[1], **options)
    for got, exp in zip(grads, want):
        assert np.isfinite(got[1]).all()
        assert_close(got[1], exp)


@pytest.mark.parametrize("name", ["causal", "softcap alibi", "dot"])
def test_backward_is_bitwise_the_same_for_any_thread_count(isa, name):
    shapes = ((1, 4, 300, 32), (1, 2, 300, 32), (1, 2, 300, 24))
    rng = np.random.default_rng(stable_seed(shapes, name))
    q, k, v, options = make(shapes, name, np.float32, rng)
    out, lse = forward(q, k, v, options)
    dout = rng.standard_normal(out.shape).astype(np.float32)
    one = fastattn.attention_backward(dout, q, k, v, out, lse, num_threads=1, **options)
    for threads in (2, 3, 5):
        many = fastattn.attention_backward(dout, q, k, v, out, lse, num_threads=threads, **options)
        for a, b in zip(one, many):
            assert np.array_equal(a, b)


def test_backward_beyond_one_round_of_dq_accumulators():
    """2100 heads of 33 float64 queries need 64 MiB of dq accumulators (64
    rows of 64 per head): they run in three rounds of at most 32 MiB, and
    every head's gradients match the reference."""
    rng = np.random.default_rng(stable_seed("rounds"))
    q, k, v = (rng.standard_normal((2100, 33, 64)) for _ in range(3))
    out, lse = fastattn.attention(q, k, v, causal=True, return_lse=True)
    dout = rng.standard_normal(out.shape)
    for got, want in zip(fastattn.attention_backward(dout, q, k, v, out, lse, causal=True),
                         ref.attention_backward(dout, q, k, v, causal=True)):
        assert_close(got, want)


def test_backward_writes_given_arrays_and_leaves_inputs():
    rng = np.random.default_rng(5)
    q, k, v = (rng.standard_normal((2, 30, 8)).astype(np.float32) for _ in range(3))
    out, lse = fastattn.attention(q, k, v, return_lse=True)
    dout = rng.standard_normal(out.shape).astype(np.float32)
    before = [a.copy() for a in (dout, q, k, v, out, lse)]
    dq, dk, dv = (np.empty_like(a) for a in (q, k, v))
    got = fastattn.attention_backward(dout, q, k, v, out, lse, dq=dq, dk=dk, dv=dv)
    assert got[0] is dq and got[1] is dk and got[2] is dv
    for g, w in zip(got, ref.attention_backward(dout, q, k, v)):
        assert_close(g, w)
    for a, b in zip(before, (dout, q, k, v, out, lse)):
        assert np.array_equal(a, b)


VARLEN_OPTIONS = {
    "plain": {},
    "causal": dict(causal=True),
    "window softcap alibi": dict(window=(9, 2), softcap=2.0, alibi_slopes=np.array([0.3, 0.2, 0.1, 0.05])),
    "dot causal": dict(weights="dot", causal=True),
}


@pytest.mark.parametrize("name", list(VARLEN_OPTIONS))
def test_varlen_backward_matches_reference(isa, dtype, name):
    rng = np.random.default_rng(stable_seed("varlen", name, str(dtype)))
    cu_q = np.array([0, 30, 31, 100])  # a sequence of one query among longer ones
    cu_k = np.array([0, 50, 60, 160])
    q = rng.standard_normal((100, 4, 12)).astype(dtype)
    k = rng.standard_normal((160, 2, 12)).astype(dtype)  # 4 query heads over 2 kv heads
    v = rng.standard_normal((160, 2, 7)).astype(dtype)
    options = VARLEN_OPTIONS[name]
    if options.get("weights") == "dot":
        out, lse = fastattn.attention_varlen(q, k, v, cu_q, cu_k, **options), None
    else:
        out, lse = fastattn.attention_varlen(q, k, v, cu_q, cu_k, return_lse=True, **options)
    dout = rng.standard_normal(out.shape).astype(dtype)
    grads = fastattn.attention_varlen_backward(dout, q, k, v, out, lse, cu_q, cu_k, **options)
    want = ref.attention_varlen_backward(dout, q, k, v, cu_q, cu_k, **options)
    for got, exp, x in zip(grads, want, (q, k, v)):
        assert got.shape == x.shape and got.dtype == x.dtype
        assert_close(got, exp)


def test_varlen_backward_equals_per_sequence_backward():
    rng = np.random.default_rng(11)
    cu = np.array([0, 40, 41, 130])
    q, k, v = (rng.standard_normal((130, 2, 16)).astype(np.float32) for _ in range(3))
    out, lse = fastattn.attention_varlen(q, k, v, cu, cu, causal=True, return_lse=True)
    dout = rng.standard_normal(out.shape).astype(np.float32)
    dq, dk, dv = fastattn.attention_varlen_backward(dout, q, k, v, out, lse, cu, cu, causal=True)
    for b in range(3):
        s = slice(cu[b], cu[b + 1])
        t = [np.swapaxes(a[s], 0, 1) for a in (dout, q, k, v, out)]
        one = fastattn.attention_backward(*t, np.ascontiguousarray(lse[:, s]), causal=True)
        for full, part in zip((dq, dk, dv), one):
            assert np.array_equal(full[s], np.swapaxes(part, 0, 1))


@pytest.mark.parametrize("shapes", SHAPES[:2], ids=lambda s: "x".join(map(str, s[0])))
@pytest.mark.parametrize("sinks_shape", ["scalar", "per head", "per batch and head"])
def test_sinks_gradient_matches_reference(isa, dtype, shapes, sinks_shape):
    """return_dsinks: the sinks' gradient in their own shape, with a row
    that sees no key (its sink takes the whole weight, adding nothing) and
    a head without a sink (-inf: a zero gradient); dq, dk, dv as without."""
    rng = np.random.default_rng(stable_seed(shapes, sinks_shape, str(dtype)))
    q, k, v, options = make(shapes, "bool mask", dtype, rng)
    options["causal"] = True
    b, h = shapes[0][0], shapes[0][1]
    sinks = {"scalar": np.float64(0.7), "per head": rng.standard_normal(h) * 2,
             "per batch and head": rng.standard_normal((b, h)) * 2}[sinks_shape]
    if sinks_shape == "per head":
        sinks[-1] = -np.inf
    out, lse = fastattn.attention(q, k, v, sinks=sinks, return_lse=True, **options)
    dout = rng.standard_normal(out.shape).astype(dtype)
    *grads, dsinks = fastattn.attention_backward(dout, q, k, v, out, lse, sinks=sinks, return_dsinks=True,
                                                 **options)
    want = ref.attention_backward(dout, q, k, v, sinks=sinks, return_dsinks=True, **options)
    assert dsinks.shape == np.shape(sinks) and dsinks.dtype == dtype
    assert_close(dsinks, want[3])
    if sinks_shape == "per head":
        assert dsinks[-1] == 0
    for got, plain in zip(grads, fastattn.attention_backward(dout, q, k, v, out, lse, sinks=sinks, **options)):
        assert np.array_equal(got, plain)


def test_varlen_sinks_gradient_matches_reference(isa, dtype):
    """return_dsinks over packed sequences: each sink's gradient summed over
    every sequence (one of them without queries)."""
    rng = np.random.default_rng(stable_seed("varlen sinks", str(dtype)))
    cu_q, cu_k = np.array([0, 30, 30, 100]), np.array([0, 50, 60, 160])
    q = rng.standard_normal((100, 4, 12)).astype(dtype)
    k = rng.standard_normal((160, 2, 12)).astype(dtype)
    v = rng.standard_normal((160, 2, 7)).astype(dtype)
    options = dict(causal=True, window=(40, 0), sinks=np.array([0.5, -1.0, 2.5, -np.inf]))
    out, lse = fastattn.attention_varlen(q, k, v, cu_q, cu_k, return_lse=True, **options)
    dout = rng.standard_normal(out.shape).astype(dtype)
    grads = fastattn.attention_varlen_backward(dout, q, k, v, out, lse, cu_q, cu_k, return_dsinks=True, **options)
    want = ref.attention_varlen_backward(dout, q, k, v, cu_q, cu_k, return_dsinks=True, **options)
    for got, exp in zip(grads, want):
        assert_close(got, exp)
    assert grads[3][3] == 0 and grads[3].dtype == dtype


# (mask shape, options, shapes): a mask per head, one broadcast over
# everything, a padding-style row per batch entry, one per head shared by
# the batch, one per query row (a column for every key), with grouped
# heads (4 query heads over 2 kv heads), soft-cap, dropout, dot weights
# and -inf entries
MASK_GRADIENT_CASES = {
    "per head, causal": ((1, 4, 65, 130), dict(causal=True), SHAPES[1]),
    "broadcast, softcap alibi": ((65, 130), dict(softcap=1.5, alibi_slopes=0.25), SHAPES[1]),
    "padding rows, window": ((1, 1, 1, 130), dict(window=(40, 10)), SHAPES[1]),
    "per head, dropout": ((4, 65, 130), dict(dropout_p=0.3, dropout_seed=5), SHAPES[1]),
    "per head, dot": ((1, 4, 65, 130), dict(weights="dot"), SHAPES[1]),
    "per head over the batch, causal": ((3, 70, 97), dict(causal=True), SHAPES[0]),
    "per query row, dot": ((1, 4, 65, 1), dict(weights="dot"), SHAPES[1]),
    "one key, dot": ((1, 3, 5, 1), dict(weights="dot"), ((2, 3, 5, 8), (2, 3, 1, 8), (2, 3, 1, 8))),
    "a scalar, dot": ((), dict(weights="dot"), SHAPES[0]),
}


@pytest.mark.parametrize("name", list(MASK_GRADIENT_CASES))
def test_mask_gradient_matches_reference(isa, dtype, name):
    """return_dmask: the gradient of a float mask (a learned bias), summed
    to its shape, against the reference; hidden (-inf) entries get 0; it is
    the same bitwise for any thread count."""
    mask_shape, options, shapes = MASK_GRADIENT_CASES[name]
    rng = np.random.default_rng(stable_seed("dmask", name, str(dtype)))
    q, k, v = (rng.standard_normal(s).astype(dtype) for s in shapes)
    mask = np.asarray(rng.standard_normal(mask_shape)).astype(dtype)
    hidden = mask.ndim > 0 and mask_shape[-1] > 3  # a column of -inf
    if hidden:
        mask[..., :, 3] = -np.inf
    out, lse = forward(q, k, v, dict(options, mask=mask))
    dout = rng.standard_normal(out.shape).astype(dtype)
    grads = fastattn.attention_backward(dout, q, k, v, out, lse, mask=mask, return_dmask=True, **options)
    want = ref.attention_backward(dout, q, k, v, mask=mask, return_dmask=True, **options)
    assert len(grads) == 4 and grads[3].shape == mask.shape and grads[3].dtype == mask.dtype
    for got, exp in zip(grads, want):
        assert_close(got, exp)
    if hidden:
        assert np.all(grads[3][..., :, 3] == 0)
    again = fastattn.attention_backward(dout, q, k, v, out, lse, mask=mask, return_dmask=True, num_threads=3,
                                        **options)
    assert np.array_equal(again[3], grads[3])


def test_shared_mask_gradient_takes_the_mask_size(isa):
    """A bias shared by the batch gets its gradient summed in the kernel, in
    an array of its own size: no (B, H, Lq, Lk) array per head is made
    (numpy reports its allocations to tracemalloc; one would add 16 times
    the mask's bytes here), and the result is the reference's."""
    import tracemalloc

    rng = np.random.default_rng(stable_seed("shared dmask"))
    q, k, v = (rng.standard_normal((16, 4, 128, 16)).astype(np.float32) for _ in range(3))
    mask = rng.standard_normal((4, 128, 128)).astype(np.float32)
    out, lse = forward(q, k, v, dict(mask=mask, causal=True))
    dout = rng.standard_normal(out.shape).astype(np.float32)
    peaks = []
    for dmask in (False, True):
        call = lambda: fastattn.attention_backward(dout, q, k, v, out, lse, mask=mask, causal=True,
                                                   return_dmask=dmask)
        call()  # validation caches filled
        tracemalloc.start()
        try:
            grads = call()
            peaks.append(tracemalloc.get_traced_memory()[1])
        finally:
            tracemalloc.stop()
    assert peaks[1] - peaks[0] < 2 * mask.nbytes, f"{peaks[1] - peaks[0]} bytes more for the mask's gradient"
    want = ref.attention_backward(dout, q, k, v, mask=mask, causal=True, return_dmask=True)
    assert_close(grads[3], want[3])


def test_shared_mask_gradient_over_many_entries():
    """A bias shared by a batch of 16 (entries past the first round of the
    backward's accumulators wait on entries of the round before): its
    gradient is the sum of those of each batch entry alone, and the same
    bitwise for any thread count.  On the best kernel path only (the order
    is the driver's, the same on every path; this size takes seconds on the
    generic one)."""
    rng = np.random.default_rng(stable_seed("shared dmask, many entries"))
    q, k, v = (rng.standard_normal((16, 2, 1024, 128)).astype(np.float32) for _ in range(3))
    mask = rng.standard_normal((1, 2, 1024, 1024)).astype(np.float32)
    out, lse = forward(q, k, v, dict(mask=mask, causal=True))
    dout = rng.standard_normal(out.shape).astype(np.float32)
    got = fastattn.attention_backward(dout, q, k, v, out, lse, mask=mask, causal=True, return_dmask=True)[3]
    want = sum(fastattn.attention_backward(dout[b:b + 1], q[b:b + 1], k[b:b + 1], v[b:b + 1], out[b:b + 1],
                                           lse[b:b + 1], mask=mask, causal=True, return_dmask=True)[3].astype(np.float64)
               for b in range(16))
    assert_close(got, want)
    again = fastattn.attention_backward(dout, q, k, v, out, lse, mask=mask, causal=True, return_dmask=True,
                                        num_threads=3)[3]
    assert np.array_equal(got, again)
