"""Seeded random cases against the reference: shapes, views, broadcasts and
grouped heads drawn together, the combinations a case-by-case table misses
(a randomized search over them found grouped k beside a one-head v read past
its end, column-strided 16-bit k and v read as float32 rows, and divisions by
a zero row size).  Each case's seed comes from its test id.  Cases draw
attention and its backward, paged decoding, packed sequences and their
backward, scores, weighted sums, block masks (from a mask or a predicate)
and partial results merged over chunks of the keys."""
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


def dtypes(rng):
    """q's dtype and k's and v's: float32 or float64, or 16-bit k and v
    (read in place) under float32 q."""
    dtype = np.dtype(rng.choice([np.float32, np.float64]))
    if dtype == np.float32 and rng.random() < 0.3:
        return dtype, np.dtype(rng.choice([ml_dtypes.bfloat16, np.float16]))
    return dtype, dtype


def operands(rng, sizes=SIZES, head_counts=(1, 2, 4, 6)):
    """b, h, lq, lk and q, k, v of an attention case: lengths from `sizes`,
    head dims from DIMS, k and v heads from heads() (grouped k and v share
    their head count; one of them may broadcast instead), batch of k and v
    b or 1, dtypes(), each operand a view()."""
    b, h = int(rng.integers(1, 3)), int(rng.choice(head_counts))
    lq, lk = (int(rng.choice(sizes)) for _ in range(2))
    d, dv = (int(rng.choice(DIMS)) for _ in range(2))
    hk, hv = heads(rng, h)
    if hk != hv and 1 not in (hk, hv):
        hv = hk
    dtype, kv_dtype = dtypes(rng)
    q = view(rng, (b, h, lq, d), dtype)
    k = view(rng, (int(rng.choice([b, 1])), hk, lk, d), kv_dtype)
    v = view(rng, (k.shape[0], hv, lk, dv), kv_dtype)
    return b, h, lq, lk, q, k, v


@pytest.mark.parametrize("case", range(40))
def test_random_attention_cases(isa, case):
    rng = np.random.default_rng(stable_seed("attention", case))
    b, h, lq, lk, q, k, v = operands(rng)
    dtype, kv_dtype = q.dtype, k.dtype
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


# ---- the other entry points ----------------------------------------------------


def packed(rng, shape, dtype):
    """A packed (rows, heads, dim) operand as view() draws it, its rows
    reversed in memory one time in four."""
    x = view(rng, shape, dtype)
    return x[::-1] if rng.random() < 0.25 else x


def relaid(rng, a):
    """a's values in a layout view() draws (for results passed back in, as
    out and lse are to a backward)."""
    x = view(rng, a.shape, a.dtype)
    x[...] = a
    return x


def offsets(rng, lens):
    """Cumulative lengths, starting at 0, as int32 or int64."""
    return np.concatenate([[0], np.cumsum(lens)]).astype(rng.choice([np.int32, np.int64]))


def positional(rng, h):
    """causal, window, soft-cap, ALiBi slopes (one per head, or one for all)
    and align, each drawn or not."""
    options = {}
    if rng.random() < 0.5:
        options["causal"] = True
    if rng.random() < 0.3:
        options["window"] = (int(rng.integers(0, 40)), int(rng.integers(-1, 10)))
    if rng.random() < 0.3:
        options["softcap"] = float(rng.choice([5.0, 30.0]))
    if rng.random() < 0.3:
        options["alibi_slopes"] = rng.uniform(0.0, 0.5, h) if rng.random() < 0.7 else 0.25
    if rng.random() < 0.3:
        options["align"] = "top-left" if rng.random() < 0.5 else int(rng.integers(-20, 40))
    return options


MASK_DTYPES = [np.float32, np.float64, np.float16, ml_dtypes.bfloat16]


def float_mask(rng, shape):
    """An additive mask: normal values, a fifth of them -inf, in a float dtype of 16 to 64 bits."""
    m = np.where(rng.random(shape) < 0.2, -np.inf, rng.standard_normal(shape))
    return m.astype(rng.choice(MASK_DTYPES))


def random_mask(rng, shape):
    """A bool mask (a fifth hidden) or, one time in two, a float_mask()."""
    return rng.random(shape) < 0.8 if rng.random() < 0.5 else float_mask(rng, shape)


def check_gradients(grads, want, operands):
    """Each gradient of its operand's shape and dtype, within tolerance of the reference's."""
    for got, exp, x in zip(grads, want, operands):
        assert got.shape == x.shape and got.dtype == x.dtype
        assert_close(got, exp)


@pytest.mark.parametrize("case", range(25))
def test_random_varlen_cases(isa, case):
    rng = np.random.default_rng(stable_seed("varlen", case))
    h = int(rng.choice([1, 2, 4, 6]))
    g = int(rng.choice([n for n in range(1, h + 1) if h % n == 0]))
    d, dv = (int(rng.choice(DIMS)) for _ in range(2))
    n = int(rng.integers(1, 5))
    lens_q = rng.choice(SIZES, size=n) * (rng.random(n) >= 0.25)  # a quarter of the sequences empty
    lens_k = lens_q if rng.random() < 0.5 else rng.choice(SIZES, size=n) * (rng.random(n) >= 0.25)
    cu_q, cu_k = offsets(rng, lens_q), offsets(rng, lens_k)
    dtype, kv_dtype = dtypes(rng)
    q = packed(rng, (int(cu_q[-1]), h, d), dtype)
    k = packed(rng, (int(cu_k[-1]), g, d), kv_dtype)
    v = packed(rng, (int(cu_k[-1]), g, dv), kv_dtype)
    options = positional(rng, h)
    dot = rng.random() < 0.15
    if dot:
        options["weights"] = "dot"  # no lse
    elif rng.random() < 0.3:
        options["sinks"] = rng.standard_normal(h)
    threads = int(rng.integers(1, 4))
    got = fastattn.attention_varlen(q, k, v, cu_q, cu_k, return_lse=not dot, num_threads=threads, **options)
    out, lse = (got, None) if dot else got
    want, want_lse = ref.attention_varlen(q, k, v, cu_q, cu_k, return_lse=True, **options)
    assert out.shape == want.shape
    assert_close(out, want)
    if not dot:
        assert lse.shape == (h, q.shape[0])
        assert_close(lse, want_lse)
    if kv_dtype != dtype:
        return  # the backward takes k and v in q's type
    sinks = "sinks" in options
    dout = packed(rng, out.shape, dtype)
    grads = fastattn.attention_varlen_backward(dout, q, k, v, relaid(rng, out), None if dot else relaid(rng, lse),
                                               cu_q, cu_k, return_dsinks=sinks, num_threads=threads, **options)
    want = ref.attention_varlen_backward(dout, q, k, v, cu_q, cu_k, return_dsinks=sinks, **options)
    check_gradients(grads, want, (q, k, v))
    if sinks:
        assert grads[3].shape == (h,)
        assert_close(grads[3], want[3])


@pytest.mark.parametrize("case", range(20))
def test_random_scores_cases(isa, case):
    rng = np.random.default_rng(stable_seed("scores", case))
    b, h = int(rng.integers(1, 3)), int(rng.choice([1, 2, 4, 6]))
    lq, lk = (int(rng.choice(SIZES)) for _ in range(2))
    d = int(rng.choice(DIMS))
    hk = heads(rng, h)[0]
    dtype, k_dtype = dtypes(rng)
    if dtype == np.float32 and rng.random() < 0.2:  # both 16-bit, scores in float32
        dtype = k_dtype = np.dtype(rng.choice([ml_dtypes.bfloat16, np.float16]))
    hq = 1 if hk == h and rng.random() < 0.3 else h  # q broadcast over k's heads
    q = view(rng, (b, hq, lq, d), dtype)
    k = view(rng, (int(rng.choice([b, 1])), hk, lk, d), k_dtype)
    options = positional(rng, h)
    if rng.random() < 0.4:
        shape = [(lq, lk), (b, 1, 1, lk), (1, h, lq, lk), (lq, 1)][rng.integers(4)]
        options["mask"] = random_mask(rng, shape)
    want = ref.scores(q, k, **options)
    out_dtype = np.dtype(np.float64 if dtype == np.float64 else np.float32)  # scores come in the compute type
    given = view(rng, want.shape, out_dtype) if rng.random() < 0.3 else None
    got = fastattn.scores(q, k, out=given, num_threads=int(rng.integers(1, 4)), **options)
    assert given is None or got is given
    assert got.dtype == out_dtype
    assert_close(got, want)


@pytest.mark.parametrize("case", range(16))
def test_random_weighted_sum_cases(isa, case):
    rng = np.random.default_rng(stable_seed("weighted_sum", case))
    b, h = int(rng.integers(1, 3)), int(rng.choice([1, 2, 4, 6]))
    lq, lk = (int(rng.choice(SIZES)) for _ in range(2))
    dv = int(rng.choice(DIMS))
    w_dtype, v_dtype = (np.dtype(rng.choice([np.float32, np.float64])),) * 2
    if rng.random() < 0.3:
        v_dtype = np.dtype(rng.choice([ml_dtypes.bfloat16, np.float16]))
        w_dtype = v_dtype if rng.random() < 0.5 else np.dtype(np.float32)
    w_lead = [(b, h), (h,), ()][rng.integers(3)]
    v_lead = [(int(rng.choice([b, 1])), int(rng.choice([h, 1]))), (int(rng.choice([h, 1])),), ()][rng.integers(3)]
    w = view(rng, w_lead + (lq, lk), w_dtype)
    v = view(rng, v_lead + (lk, dv), v_dtype)
    want = ref.weighted_sum(w, v)
    dtype = np.result_type(w_dtype, v_dtype)
    given = view(rng, want.shape, dtype) if rng.random() < 0.3 else None
    got = fastattn.weighted_sum(w, v, out=given, num_threads=int(rng.integers(1, 4)))
    assert given is None or got is given
    assert got.dtype == dtype
    assert_close(got, want)


KINDS = fastattn.BlockMask  # HIDDEN, VISIBLE, MIXED
TILE = 64  # the kernels' tile, a block mask's block
LONG = [1, 64, 65, 100, 128, 129, 193, 200]


def blocks(n):
    return -(-n // TILE)


def bool_pattern(rng, rows, keys):
    """A bool mask of one of three kinds: documents (random boundaries, one
    time in two on block edges; causal or not), a table of hidden, visible
    and mixed 64 x 64 blocks, or a dense draw of random density."""
    kind = rng.integers(3)
    if kind == 0:
        edges = np.sort(rng.integers(0, max(rows, keys) + 1, size=int(rng.integers(1, 5))))
        if rng.random() < 0.5:
            edges = edges // TILE * TILE
        pos = np.arange(rows)[:, None] + keys - rows
        j = np.arange(keys)[None, :]
        m = np.searchsorted(edges, pos, side="right") == np.searchsorted(edges, j, side="right")
        return m & (j <= pos) if rng.random() < 0.5 else m
    if kind == 1:
        table = rng.integers(3, size=(blocks(rows), blocks(keys)))  # 0 hidden, 1 visible, 2 mixed
        full = np.repeat(np.repeat(table, TILE, 0), TILE, 1)[:rows, :keys]
        return np.where(full == 2, rng.random((rows, keys)) < 0.5, full == 1)
    return rng.random((rows, keys)) < rng.choice([0.01, 0.5, 0.99])


def mask_pattern(rng, shape):
    """bool_pattern drawn for each leading index of `shape`."""
    m = np.empty(shape, dtype=bool)
    for idx in np.ndindex(shape[:-2]):
        m[idx] = bool_pattern(rng, *shape[-2:])
    return m


def additive(rng, m):
    """A float mask hiding what bool mask m hides (-inf) and adding to what
    it shows normal values in about two blocks of five, 0 in the others."""
    rows, keys = m.shape[-2:]
    biased = rng.random(m.shape[:-2] + (blocks(rows), blocks(keys))) < 0.4
    biased = np.repeat(np.repeat(biased, TILE, -2), TILE, -1)[..., :rows, :keys]
    return np.where(m, np.where(biased, rng.standard_normal(m.shape), 0.0), -np.inf).astype(rng.choice(MASK_DTYPES))


def block_kinds(m):
    """The kind of each 64 x 64 block of mask m, element by element."""
    hidden, shown = (~m, m) if m.dtype == bool else (m == -np.inf, m == 0)
    rows, keys = m.shape[-2:]
    kinds = np.empty(m.shape[:-2] + (blocks(rows), blocks(keys)), dtype=np.uint8)
    for r in range(blocks(rows)):
        for c in range(blocks(keys)):
            at = (..., slice(r * TILE, (r + 1) * TILE), slice(c * TILE, (c + 1) * TILE))
            kinds[..., r, c] = np.where(hidden[at].all(axis=(-2, -1)), KINDS.HIDDEN,
                                        np.where(shown[at].all(axis=(-2, -1)), KINDS.VISIBLE, KINDS.MIXED))
    return kinds


def predicate(rng, lead, lq, lk):
    """An index predicate over `lead` + (i, j) of one of four kinds:
    documents, a prefix-LM per leading index, a sliding window per leading
    index beside every n-th key, or a lookup in a mask_pattern."""
    kind = rng.integers(4)
    shift = lk - lq
    if kind == 0:
        edges = np.sort(rng.integers(0, max(lq, lk) + 1, size=int(rng.integers(1, 5))))
        doc_q = np.searchsorted(edges, np.arange(lq) + shift, side="right")
        doc_k = np.searchsorted(edges, np.arange(lk), side="right")
        return lambda *idx: doc_q[idx[-2]] == doc_k[idx[-1]]
    if kind == 1:
        prefix = rng.integers(0, lk + 1, size=lead)
        return lambda *idx: (idx[-1] <= idx[-2] + shift) | (idx[-1] < prefix[idx[:-2]])
    if kind == 2:
        width, every = rng.integers(0, 100, size=lead), int(rng.integers(2, 70))
        return lambda *idx: (np.abs(idx[-2] + shift - idx[-1]) <= width[idx[:-2]]) | (idx[-1] % every == 0)
    pattern = mask_pattern(rng, lead + (lq, lk))
    return lambda *idx: pattern[idx]


def evaluate(fn, lead, lq, lk):
    """fn on every index at once, as a dense mask of lead + (lq, lk)."""
    nd = len(lead)
    idx = [np.arange(n).reshape((1,) * a + (n,) + (1,) * (nd - a + 1)) for a, n in enumerate(lead)]
    return np.broadcast_to(fn(*idx, np.arange(lq)[:, None], np.arange(lk)[None, :]), lead + (lq, lk))


@pytest.mark.parametrize("case", range(30))
def test_random_block_mask_cases(isa, case):
    rng = np.random.default_rng(stable_seed("block mask", case))
    b, h, lq, lk, q, k, v = operands(rng, LONG, [1, 2, 4])
    dtype, kv_dtype = q.dtype, k.dtype
    if rng.random() < 0.6:
        shape = [(lq, lk), (1, lk), (lq, 1), (h, lq, lk), (b, 1, lq, lk), (1, h, lq, lk)][rng.integers(6)]
        dense = mask_pattern(rng, shape)
        if rng.random() < 0.5:
            dense = additive(rng, dense)
        bm = fastattn.block_mask(dense)
    else:
        lead = [(), (h,), (b, h), (b, 1)][rng.integers(4)]
        fn = predicate(rng, lead, lq, lk)
        dense = evaluate(fn, lead, lq, lk)
        bm = fastattn.block_mask_from_function(fn, lq, lk, lead=lead)
        np.testing.assert_array_equal(bm.mask, dense)  # hidden blocks unwritten, so False
    np.testing.assert_array_equal(bm.kinds, block_kinds(dense))
    options = positional(rng, h)
    if rng.random() < 0.3:
        assert_close(fastattn.scores(q, k, mask=bm, num_threads=int(rng.integers(1, 4)), **options),
                     ref.scores(q, k, mask=dense, **options))
    dot = rng.random() < 0.15
    if dot:
        options["weights"] = "dot"  # no lse
    threads = int(rng.integers(1, 4))
    got = fastattn.attention(q, k, v, mask=bm, return_lse=not dot, num_threads=threads, **options)
    out, lse = (got, None) if dot else got
    want, want_lse = ref.attention(q, k, v, mask=dense, return_lse=True, **options)
    assert_close(out, want)
    if not dot:
        assert_close(lse, want_lse)
    if kv_dtype != dtype:
        return
    dmask = dense.dtype != bool and rng.random() < 0.5
    dout = view(rng, out.shape, dtype)
    grads = fastattn.attention_backward(dout, q, k, v, relaid(rng, out), None if dot else relaid(rng, lse), mask=bm,
                                        return_dmask=dmask, num_threads=threads, **options)
    want = ref.attention_backward(dout, q, k, v, mask=dense, return_dmask=dmask, **options)
    check_gradients(grads, want, (q, k, v))
    if dmask:
        assert grads[3].shape == dense.shape and grads[3].dtype == dense.dtype
        tol = np.float32 if np.float32 in (dtype, dense.dtype) else np.float64
        assert_close(grads[3], want[3], dtype=dense.dtype if dense.dtype.itemsize == 2 else tol)  # 16 bits: rounded


@pytest.mark.parametrize("case", range(20))
def test_random_merge_cases(isa, case):
    rng = np.random.default_rng(stable_seed("merge", case))
    b, h, lq, lk, q, k, v = operands(rng)
    dtype, kv_dtype = q.dtype, k.dtype
    options = positional(rng, h)
    if rng.random() < 0.3:
        shape = [(lq, lk), (b, 1, 1, lk), (1, h, lq, lk)][rng.integers(3)]
        options["mask"] = random_mask(rng, shape)
    want, want_lse = ref.attention(q, k, v, return_lse=True, **options)
    # keys cut into chunks (some empty), each chunk at its key position in the whole
    align = options.pop("align", "bottom-right")
    at = lk - lq if align == "bottom-right" else 0 if align == "top-left" else align
    mask = options.pop("mask", None)
    edges = [0, *np.sort(rng.integers(0, lk + 1, size=int(rng.integers(0, 4)))), lk]
    threads = int(rng.integers(1, 4))
    parts = []
    for c0, c1 in zip(edges[:-1], edges[1:]):
        part_mask = None if mask is None else mask[..., c0:c1]
        parts.append(fastattn.attention(q, k[..., c0:c1, :], v[..., c0:c1, :], mask=part_mask, align=int(at - c0),
                                        return_lse=True, num_threads=threads, **options))
    order = rng.permutation(len(parts))
    out, lse = fastattn.merge([parts[i][0] for i in order], [parts[i][1] for i in order])
    assert out.dtype == parts[0][0].dtype and lse.dtype == parts[0][1].dtype
    assert_close(out, want)
    assert_close(lse, want_lse)
