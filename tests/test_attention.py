"""attention(), scores() and weighted_sum() against the float64 reference,
on every kernel path, in float32 and float64, over awkward shapes."""
import ml_dtypes
import numpy as np
import pytest

import fastattn
import fastattn.reference as ref
from util import assert_close, randn, stable_seed

# (q leading dims, k/v leading dims, Lq, Lk, D, Dv).  Lengths straddle the
# query tile (96) and key tile (64); head dims are not multiples of 16.
SHAPES = [
    ((), (), 1, 1, 1, 1),
    ((), (), 1, 130, 17, 17),
    ((2,), (2,), 100, 1, 80, 16),
    ((1, 3), (1, 3), 97, 97, 97, 33),
    ((2, 3), (2, 3), 100, 130, 17, 23),
    ((2, 1), (1, 3), 5, 65, 64, 64),  # broadcast both ways
    ((3,), (), 50, 70, 64, 80),  # k, v shared by every head
    ((), (), 193, 200, 128, 128),  # two full query tiles and a rest
    ((1,), (1,), 130, 40, 1, 7),  # Lk < Lq
]


def make_qkv(rng, shape, dtype):
    lead_q, lead_k, lq, lk, d, dv = shape
    q = randn(rng, lead_q + (lq, d), dtype)
    k = randn(rng, lead_k + (lk, d), dtype)
    v = randn(rng, lead_k + (lk, dv), dtype)
    return q, k, v


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("weights", ["softmax", "dot"])
def test_attention_matches_reference(isa, dtype, rng, shape, causal, weights):
    q, k, v = make_qkv(rng, shape, dtype)
    out = fastattn.attention(q, k, v, causal=causal, weights=weights)
    expected = ref.attention(q, k, v, causal=causal, weights=weights)
    assert out.dtype == dtype
    assert out.shape == expected.shape
    assert_close(out, expected)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("causal", [False, True])
def test_scores_match_reference(isa, dtype, rng, shape, causal):
    q, k, _ = make_qkv(rng, shape, dtype)
    s = fastattn.scores(q, k, causal=causal)
    assert s.dtype == dtype
    assert_close(s, ref.scores(q, k, causal=causal))


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_weighted_sum_matches_reference(isa, dtype, rng, shape):
    lead_q, lead_k, lq, lk, _, dv = shape
    w = randn(rng, lead_q + (lq, lk), dtype)
    v = randn(rng, lead_k + (lk, dv), dtype)
    out = fastattn.weighted_sum(w, v)
    assert out.dtype == dtype
    assert_close(out, ref.weighted_sum(w, v))


def test_scale_argument(isa, dtype, rng):
    q, k, v = make_qkv(rng, ((2,), (2,), 33, 47, 19, 5), dtype)
    for weights in ("softmax", "dot"):
        out = fastattn.attention(q, k, v, scale=0.37, weights=weights)
        assert_close(out, ref.attention(q, k, v, scale=0.37, weights=weights))
    assert_close(fastattn.scores(q, k, scale=-2.0), ref.scores(q, k, scale=-2.0))


def test_default_scales(rng):
    q, k, v = make_qkv(rng, ((), (), 4, 6, 16, 3), np.float64)
    s = fastattn.scores(q, k)
    assert_close(s, (q @ k.T) / 4.0)
    dot = fastattn.attention(q, k, v, weights="dot")
    assert_close(dot, (q @ k.T) @ v)  # plain dot-product weighting: scale 1


# ---- masks -----------------------------------------------------------------------

MASK_SHAPES = [(7, 75), (1, 75), (7, 1), (2, 1, 7, 75), (3, 1, 75), (75,), ()]


MASK_DTYPES = {"float32": np.float32, "float64": np.float64, "float16": np.float16, "bfloat16": ml_dtypes.bfloat16}


@pytest.mark.parametrize("mshape", MASK_SHAPES, ids=str)
@pytest.mark.parametrize("kind", ["bool", "float32", "float64", "float16", "bfloat16"])
@pytest.mark.parametrize("causal", [False, True])
def test_masks(isa, dtype, rng, mshape, kind, causal):
    q, k, v = make_qkv(rng, ((2, 3), (2, 3), 7, 75, 24, 9), dtype)
    if kind == "bool":
        mask = rng.random(mshape) < 0.7
    else:
        mask = np.asarray(rng.standard_normal(mshape)).astype(MASK_DTYPES[kind])
        mask[rng.random(mshape) < 0.2] = -np.inf
    out = fastattn.attention(q, k, v, mask=mask, causal=causal)
    assert_close(out, ref.attention(q, k, v, mask=mask, causal=causal))
    dot = fastattn.attention(q, k, v, mask=mask, causal=causal, weights="dot")
    assert_close(dot, ref.attention(q, k, v, mask=mask, causal=causal, weights="dot"))
    s = fastattn.scores(q, k, mask=mask, causal=causal)
    assert_close(s, ref.scores(q, k, mask=mask, causal=causal))


def same_values(a, b):
    """a and b hold the same numbers (NaN where the other has NaN)."""
    return np.array_equal(np.asarray(a, np.float64), np.asarray(b, np.float64), equal_nan=True)


@pytest.mark.parametrize("mask_dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("layout", ["tiles", "rows", "strided", "blocks"])
def test_16bit_masks_add_their_float32_values(isa, mask_dtype, layout):
    """A float16 or bfloat16 mask is read in place and converted on load, so
    every result is bitwise that of the same mask in the compute type (the
    conversion is exact), in each way the kernels read a mask: 8 x 8 vector
    tiles with a tail of keys, rows of a few queries, a strided mask's
    scalar loop, and tiles classified hidden, visible or mixed (a mask
    shared by the batch); forward, scores and backward, over every data
    dtype.  The mask's gradient is the compute type's rounded once."""
    mdt = np.dtype(MASK_DTYPES[mask_dtype])
    rng = np.random.default_rng(stable_seed("16-bit masks", mask_dtype, layout))
    lq, lk = {"rows": (3, 75), "blocks": (200, 200)}.get(layout, (70, 75))
    if layout == "strided":  # every other element of a wider array
        mask = rng.standard_normal((3, lq, 2 * lk)).astype(mdt)[..., ::2]
    elif layout == "blocks":  # 4 documents (0 / -0 / -inf), one mixed block with values added
        mask = np.where(document_mask(lq, lk, 4), np.where(np.arange(lk) % 3 == 0, -0.0, 0.0), -np.inf)
        mask[70:80, 60:90] += rng.standard_normal((10, 30))
        mask = mask.astype(mdt)
    else:
        mask = rng.standard_normal((3, lq, lk)).astype(mdt)
    if layout != "blocks":
        mask[rng.random(mask.shape) < 0.2] = -np.inf
    for dtype in (np.float32, np.float64, np.float16, ml_dtypes.bfloat16):
        wide = mask.astype(np.float64 if dtype == np.float64 else np.float32)
        q, k, v = make_qkv(rng, ((2, 3), (2, 3), lq, lk, 24, 9), np.float32)
        q, k, v = q.astype(dtype), k.astype(dtype), v.astype(dtype)
        for kw in (dict(), dict(causal=True)):
            out, lse = fastattn.attention(q, k, v, mask=mask, return_lse=True, **kw)
            out_w, lse_w = fastattn.attention(q, k, v, mask=wide, return_lse=True, **kw)
            assert same_values(out, out_w) and same_values(lse, lse_w)
            assert same_values(fastattn.scores(q, k, mask=mask, **kw), fastattn.scores(q, k, mask=wide, **kw))
            dout = rng.standard_normal(out.shape).astype(dtype)
            grads = fastattn.attention_backward(dout, q, k, v, out, lse, mask=mask, return_dmask=True, **kw)
            grads_w = fastattn.attention_backward(dout, q, k, v, out, lse, mask=wide, return_dmask=True, **kw)
            for g, g_w in zip(grads[:3], grads_w[:3]):
                assert same_values(g, g_w)
            assert grads[3].dtype == mdt and grads[3].shape == mask.shape
            assert same_values(grads[3], grads_w[3].astype(mdt))
    assert_close(out, ref.attention(q, k, v, mask=mask, causal=True))


def document_mask(lq, lk, docs):
    """Block-diagonal: query i and key j attend iff they fall in the same of
    `docs` equal documents (bottom-right aligned)."""
    qd = (np.arange(lq) + lk - lq) * docs // lk
    kd = np.arange(lk) * docs // lk
    return qd[:, None] == kd[None, :]


@pytest.mark.parametrize("case", ["documents", "documents causal", "key padding", "per-head documents",
                                  "decode", "split-KV decode"])
def test_structured_bool_masks(isa, dtype, rng, case):
    """Masks whose tiles are wholly hidden (skipped), wholly visible (run
    unmasked) or mixed, in every layout the tile classification reads, as
    bool masks and as additive masks of every float dtype (0 / -0 / -inf)."""
    h, g = (4, 2) if case == "per-head documents" else (2, 2)
    lq, lk = {"decode": (1, 700), "split-KV decode": (2, 5000)}.get(case, (300, 300))
    q, k, v = make_qkv(rng, ((2, h), (2, g), lq, lk, 16, 8), dtype)
    kw = dict(causal=case.endswith("causal") or "decode" in case)
    if case == "key padding":
        mask = np.ones((2, 1, 1, lk), dtype=bool)
        mask[0, ..., :130] = False  # left padding, whole tiles and a part
        mask[1, ..., 250:] = False
    elif case == "per-head documents":
        mask = np.stack([document_mask(lq, lk, n) for n in (2, 3, 5, 7)])[None]
    else:
        mask = np.broadcast_to(document_mask(lq, lk, 6), (2, 1, lq, lk))
    rout, rlse = ref.attention(q, k, v, mask=mask, return_lse=True, **kw)
    zero = np.where(np.arange(lk) % 7 == 0, -0.0, 0.0)  # -0.0 adds nothing too
    additive = np.where(mask, zero, -np.inf)
    for m in (mask, *(additive.astype(t) for t in MASK_DTYPES.values())):
        for given in (m, fastattn.block_mask(m)):  # classified per call, or once with its table
            out, lse = fastattn.attention(q, k, v, mask=given, return_lse=True, **kw)
            assert_close(out, rout)
            assert_close(lse, rlse)


def test_block_mask_table_decides_the_tiles(isa, rng):
    """The kernels follow a BlockMask's table, not a reading of its mask:
    paired with an all-visible mask, a document mask's table (documents on
    block boundaries, so no mixed blocks) gives the document-masked result."""
    q, k, v = make_qkv(rng, ((1, 4), (1, 2), 256, 256, 16, 8), np.float64)
    docs = document_mask(256, 256, 4)  # 4 documents of 64
    table = fastattn.block_mask(docs)
    assert set(np.unique(table.kinds)) == {table.HIDDEN, table.VISIBLE}
    fooled = fastattn.BlockMask(np.ones((256, 256), bool), table.kinds)
    assert_close(fastattn.attention(q, k, v, mask=fooled), ref.attention(q, k, v, mask=docs))
    assert not np.allclose(fastattn.attention(q, k, v, mask=np.ones((256, 256), bool)),
                           ref.attention(q, k, v, mask=docs))


def test_block_mask_classifies_each_block(rng):
    m = np.ones((3, 150, 200), bool)
    m[0, :64, :64] = False  # hidden
    m[1, 70, 130] = False  # one mixed block
    m[2, 128:, :] = False  # the last row block (22 rows) hidden
    bm = fastattn.block_mask(m)
    assert bm.kinds.shape == (3, 3, 4) and bm.shape == m.shape
    want = np.full((3, 3, 4), bm.VISIBLE)
    want[0, 0, 0] = bm.HIDDEN
    want[1, 1, 2] = bm.MIXED
    want[2, 2, :] = bm.HIDDEN
    np.testing.assert_array_equal(bm.kinds, want)
    assert bm.density() == 1 - 5 / 36 and "hidden" in repr(bm)
    f = np.where(m, np.float32(0), np.float32(-np.inf))
    f[0, 100, 100] = 0.5  # adds something: mixed
    np.testing.assert_array_equal(fastattn.block_mask(f).kinds[0, 1, 1], bm.MIXED)
    row = fastattn.block_mask(np.ones((1, 300), bool))  # broadcast rows: one row block
    assert row.kinds.shape == (1, 5) and fastattn.block_mask(row) is row


@pytest.mark.parametrize("kind", ["bool", "float32", "float64", "float16", "bfloat16"])
def test_shared_mask_blocks_are_classified_per_block(rng, kind):
    """A mask shared by several heads is classified once per call, a stripe
    of block rows at a time: hidden, visible and mixed blocks (one key or
    one row making a block mixed, at its edges), partial last blocks, and
    masks broadcast over rows or keys all give the masked result."""
    q, k, v = make_qkv(rng, ((2, 3), (2, 3), 150, 200, 8, 8), np.float64)
    m = np.ones((150, 200), bool)
    m[:64, :64] = False  # hidden
    m[64:128, 64] = False  # mixed by its first key column
    m[127, 128:192] = False  # mixed by its last row
    m[128:, 192:] = False  # the partial corner block hidden
    m[:64, 128:192] = rng.random((64, 64)) < 0.5  # random: mixed
    masks = [m, m[70:71], m[:, 64:65]]  # and broadcast over rows, over keys
    for mask in masks:
        if kind != "bool":
            mask = np.where(mask, 0.0, -np.inf).astype(MASK_DTYPES[kind])
            mask[mask.shape[0] - 1, 0] = 0.25 if mask[-1, 0] == 0 else mask[-1, 0]  # adds: mixed
        assert_close(fastattn.attention(q, k, v, mask=mask), ref.attention(q, k, v, mask=mask))


def test_block_mask_in_scores_and_backward(rng):
    q, k, v = make_qkv(rng, ((2,), (2,), 70, 90, 8, 8), np.float64)
    m = document_mask(70, 90, 3)
    bm = fastattn.block_mask(m)
    np.testing.assert_array_equal(fastattn.scores(q, k, mask=bm), fastattn.scores(q, k, mask=m))
    out, lse = fastattn.attention(q, k, v, mask=bm, return_lse=True)
    dout = rng.standard_normal(out.shape)
    for got, want in zip(fastattn.attention_backward(dout, q, k, v, out, lse, mask=bm),
                         ref.attention_backward(dout, q, k, v, mask=m)):
        assert_close(got, want)


def test_bool_mask_hides_nan_keys(isa, dtype, rng):
    """Scores a bool mask hides do not reach the result, NaN ones included
    (keys of an unfilled cache past its length, masked out; their values
    must still be finite: a weight of 0 times NaN is NaN, as in torch)."""
    q, k, v = make_qkv(rng, ((2,), (2,), 70, 90, 16, 8), dtype)
    keep = rng.random((70, 90)) < 0.5
    keep[:, 80:] = False
    k[:, 80:] = np.nan
    got = fastattn.attention(q, k, v, mask=keep)
    assert np.isfinite(got).all()
    assert_close(got, ref.attention(q[:, :, :], k[:, :80], v[:, :80], mask=keep[:, :80]))


def test_mask_broadcasts_leading_dims(rng, dtype):
    q, k, v = make_qkv(rng, ((3,), (3,), 6, 8, 4, 4), dtype)
    mask = rng.random((2, 1, 6, 8)) < 0.5
    out = fastattn.attention(q, k, v, mask=mask)
    assert out.shape == (2, 3, 6, 4)
    assert_close(out, ref.attention(q, k, v, mask=mask))


def test_mask_is_read_through_strides(rng):
    """A large strided mask view is used in place (result matches, nothing copied)."""
    q, k, v = make_qkv(rng, ((), (), 40, 50, 8, 8), np.float32)
    big = rng.random((80, 150)) < 0.6
    mask = big[::2, ::3]
    assert not mask.flags.c_contiguous
    assert_close(fastattn.attention(q, k, v, mask=mask), ref.attention(q, k, v, mask=mask))


def test_fully_masked_rows_give_zeros(isa, dtype, rng):
    q, k, v = make_qkv(rng, ((2,), (2,), 9, 70, 16, 5), dtype)
    mask = rng.random((9, 70)) < 0.5
    mask[[0, 4, 8]] = False
    out, lse = fastattn.attention(q, k, v, mask=mask, return_lse=True)
    assert np.all(out[:, [0, 4, 8]] == 0)
    assert np.all(np.isneginf(lse[:, [0, 4, 8]]))
    assert_close(out, ref.attention(q, k, v, mask=mask))
    fmask = np.where(mask, 0.0, -np.inf)
    assert_close(fastattn.attention(q, k, v, mask=fmask), ref.attention(q, k, v, mask=mask))


def test_causal_is_bottom_right_aligned(dtype, rng):
    """With Lq < Lk the last query sees every key (a decode step)."""
    q, k, v = make_qkv(rng, ((), (), 3, 10, 8, 4), dtype)
    s = fastattn.scores(q, k, causal=True)
    visible = np.isfinite(s)
    assert visible[2].all()
    assert visible[0, :8].all() and not visible[0, 8:].any()
    full = fastattn.attention(q, k, v)
    assert_close(fastattn.attention(q, k, v, causal=True)[2], full[2])
    # Lq > Lk: the first Lq - Lk rows see nothing and give zeros
    q2, k2, v2 = make_qkv(rng, ((), (), 10, 3, 8, 4), dtype)
    out = fastattn.attention(q2, k2, v2, causal=True)
    assert np.all(out[:7] == 0)
    assert_close(out, ref.attention(q2, k2, v2, causal=True))


# ---- empty and degenerate sizes --------------------------------------------------


@pytest.mark.parametrize(
    "qs, ks, vs",
    [
        ((0, 8), (5, 8), (5, 3)),  # no queries
        ((4, 8), (0, 8), (0, 3)),  # no keys: zeros
        ((0, 4, 8), (0, 5, 8), (0, 5, 3)),  # empty batch
        ((4, 0), (5, 0), (5, 3)),  # D = 0: uniform weights
        ((4, 8), (5, 8), (5, 0)),  # Dv = 0
    ],
)
def test_empty_sizes(dtype, qs, ks, vs):
    rng = np.random.default_rng(1)
    q, k, v = (randn(rng, s, dtype) for s in (qs, ks, vs))
    for weights in ("softmax", "dot"):
        out = fastattn.attention(q, k, v, weights=weights)
        expected = ref.attention(q, k, v, weights=weights)
        assert out.shape == expected.shape
        assert_close(out, expected)
    s = fastattn.scores(q, k)
    assert s.shape == ref.scores(q, k).shape
    assert_close(s, ref.scores(q, k))


@pytest.mark.parametrize(
    "qs, ks, vs",
    [
        ((2, 0, 8), (2, 5, 8), (2, 5, 3)),  # no queries
        ((2, 4, 8), (2, 0, 8), (2, 0, 3)),  # no keys
        ((2, 7, 0), (2, 63, 0), (2, 63, 7)),  # D = 0
        ((2, 4, 8), (2, 5, 8), (2, 5, 0)),  # Dv = 0
    ],
)
def test_empty_sizes_backward_and_given_outputs(qs, ks, vs):
    """The backward (and a float mask's gradient) of empty and degenerate
    sizes against the reference (D = 0 divided by zero; no queries or keys
    with a mask gradient were refused), and out=, dq= of the exact empty
    shapes accepted (numpy gives them zero strides)."""
    rng = np.random.default_rng(2)
    q, k, v = (randn(rng, s, np.float64) for s in (qs, ks, vs))
    mask = rng.standard_normal((qs[-2], ks[-2]))
    out, lse = fastattn.attention(q, k, v, mask=mask, return_lse=True)
    given = np.empty(out.shape)
    assert fastattn.attention(q, k, v, mask=mask, out=given) is given
    assert_close(given, out)
    dout = randn(rng, out.shape, np.float64)
    want = ref.attention_backward(dout, q, k, v, mask=mask, return_dmask=True)
    got = fastattn.attention_backward(dout, q, k, v, out, lse, mask=mask, return_dmask=True)
    for g, w in zip(got, want):
        assert g.shape == w.shape
        assert_close(g, w)
    dests = [np.empty(x.shape) for x in (q, k, v)]
    written = fastattn.attention_backward(dout, q, k, v, out, lse, mask=mask, dq=dests[0], dk=dests[1], dv=dests[2])
    for w, d, g in zip(written, dests, got):
        assert w is d
        assert_close(d, g)


# ---- layouts, dtypes, out= -------------------------------------------------------


def test_non_contiguous_inputs(isa, dtype, rng):
    # (B, L, H, D) memory viewed as (B, H, L, D); a step slice; reversed rows; Fortran order
    q = randn(rng, (2, 40, 3, 20), dtype).transpose(0, 2, 1, 3)
    k = randn(rng, (2, 3, 110, 40), dtype)[:, :, ::2, ::2]
    v = np.asfortranarray(randn(rng, (2, 3, 55, 11), dtype))[:, :, ::-1, :]
    mask = (rng.random((55, 40)) < 0.8).T
    for causal in (False, True):
        out = fastattn.attention(q, k, v, causal=causal, mask=mask)
        assert_close(out, ref.attention(q, k, v, causal=causal, mask=mask))
    w = randn(rng, (2, 3, 55, 40), dtype).swapaxes(-1, -2)
    assert_close(fastattn.weighted_sum(w, v), ref.weighted_sum(w, v))


def test_read_only_inputs_are_not_modified(dtype, rng):
    q, k, v = make_qkv(rng, ((2,), (2,), 30, 70, 16, 8), dtype)
    mask = rng.random((30, 70)) < 0.5
    copies = [a.copy() for a in (q, k, v, mask)]
    for a in (q, k, v, mask):
        a.flags.writeable = False
    out = fastattn.attention(q, k, v, mask=mask, causal=True)
    fastattn.scores(q, k, mask=mask)
    fastattn.weighted_sum(q @ k.swapaxes(-1, -2), v)
    for a, c in zip((q, k, v, mask), copies):
        assert np.array_equal(a, c)
    assert_close(out, ref.attention(q, k, v, mask=mask, causal=True))


def test_mixed_dtypes_follow_result_type(rng):
    q = randn(rng, (5, 8), np.float32)
    k = randn(rng, (6, 8), np.float64)
    v = randn(rng, (6, 3), np.float32)
    out = fastattn.attention(q, k, v)
    assert out.dtype == np.float64
    assert_close(out, ref.attention(q, k, v))


def test_array_likes_are_accepted():
    q = [[0.1, 0.2], [0.3, -0.4]]
    out = fastattn.attention(q, q, q)
    assert out.dtype == np.float64
    assert_close(out, ref.attention(q, q, q))


def test_out_argument(dtype, rng):
    q, k, v = make_qkv(rng, ((2,), (2,), 30, 40, 16, 8), dtype)
    out = np.full((2, 30, 8), np.nan, dtype=dtype)
    res = fastattn.attention(q, k, v, out=out)
    assert res is out
    assert_close(out, ref.attention(q, k, v))
    # a strided out (every other column of a wider buffer)
    buf = np.zeros((2, 30, 16), dtype=dtype)
    fastattn.attention(q, k, v, out=buf[..., ::2])
    assert_close(buf[..., ::2], ref.attention(q, k, v))
    assert np.all(buf[..., 1::2] == 0)
    sbuf = np.empty((2, 30, 40), dtype=dtype)
    assert fastattn.scores(q, k, out=sbuf) is sbuf
    wbuf = np.empty((2, 30, 8), dtype=dtype)
    assert fastattn.weighted_sum(sbuf, v, out=wbuf) is wbuf


# ---- options of the fused kernel -----------------------------------------------


@pytest.mark.parametrize("window", [(0, 0), (5, -1), (-1, 3), (20, 7), (70, 70)], ids=str)
@pytest.mark.parametrize("causal", [False, True])
def test_window(isa, dtype, rng, window, causal):
    q, k, v = make_qkv(rng, ((2,), (2,), 150, 170, 16, 8), dtype)
    out = fastattn.attention(q, k, v, window=window, causal=causal)
    assert_close(out, ref.attention(q, k, v, window=window, causal=causal))


@pytest.mark.parametrize("align", [0, 37, -20, 200, -80])
def test_int_align(isa, dtype, rng, align):
    """An int align is the key position of query 0: causal, window and ALiBi
    follow it, and rows placed before every key they may see give zeros."""
    q, k, v = make_qkv(rng, ((2, 3), (2, 3), 70, 90, 16, 8), dtype)
    for kw in (dict(causal=True), dict(window=(9, 4), alibi_slopes=np.array([0.5, 0.25, 0.125])),
               dict(causal=True, window=(30, -1), softcap=2.0)):
        out, lse = fastattn.attention(q, k, v, align=align, return_lse=True, **kw)
        rout, rlse = ref.attention(q, k, v, align=align, return_lse=True, **kw)
        assert_close(out, rout)
        assert_close(lse, rlse)
        assert_close(fastattn.scores(q, k, align=align, **kw), ref.scores(q, k, align=align, **kw))


def test_int_align_splits_a_sequence(dtype, rng):
    """Blocks of queries against blocks of keys, each with align = a - c +
    Lk - Lq, merged by their LSE, give the causal attention of the whole."""
    q, k, v = make_qkv(rng, ((2,), (2,), 100, 130, 16, 8), dtype)
    whole = fastattn.attention(q, k, v, causal=True)
    rows = []
    for a in range(0, 100, 33):
        parts = [fastattn.attention(q[:, a:a + 33], k[:, c:c + 50], v[:, c:c + 50], causal=True,
                                    align=a - c + 30, return_lse=True) for c in range(0, 130, 50)]
        rows.append(fastattn.merge(*zip(*parts))[0])
    assert_close(np.concatenate(rows, axis=1), whole)


def test_softcap_alibi_and_lse(isa, dtype, rng):
    q, k, v = make_qkv(rng, ((2, 4), (2, 4), 70, 90, 24, 8), dtype)
    q *= 3
    slopes = 2.0 ** -np.arange(1, 5)
    mask = rng.random((70, 90)) < 0.8
    kw = dict(softcap=2.5, alibi_slopes=slopes, mask=mask, causal=True)
    out, lse = fastattn.attention(q, k, v, return_lse=True, **kw)
    rout, rlse = ref.attention(q, k, v, return_lse=True, **kw)
    assert lse.shape == (2, 4, 70) and lse.dtype == dtype
    assert_close(out, rout)
    assert_close(lse, rlse)
    assert_close(fastattn.scores(q, k, **kw), ref.scores(q, k, **kw))


def test_grouped_query_heads(isa, dtype, rng):
    q = randn(rng, (2, 8, 33, 16), dtype)
    k = randn(rng, (2, 2, 50, 16), dtype)
    v = randn(rng, (2, 2, 50, 12), dtype)
    out = fastattn.attention(q, k, v, causal=True)
    expected = ref.attention(q, np.repeat(k, 4, axis=1), np.repeat(v, 4, axis=1), causal=True)
    assert_close(out, expected)
    assert_close(out, ref.attention(q, k, v, causal=True))


@pytest.mark.parametrize("k_heads, v_heads", [(2, 1), (1, 2)])
def test_grouped_heads_beside_one_broadcast_head(isa, k_heads, v_heads, rng):
    """k grouped (2 heads for 8) and v of one head broadcast over all 8, or
    the other way round: the one-head operand is read at its only head (it
    was indexed as grouped: reads past its end)."""
    dtype = np.float64
    q = randn(rng, (2, 8, 33, 16), dtype)
    k = randn(rng, (2, k_heads, 50, 16), dtype)
    v = randn(rng, (2, v_heads, 50, 12), dtype)
    out, lse = fastattn.attention(q, k, v, causal=True, return_lse=True)
    assert_close(out, ref.attention(q, k, v, causal=True))
    dout = randn(rng, out.shape, dtype)
    for got, want in zip(fastattn.attention_backward(dout, q, k, v, out, lse, causal=True),
                         ref.attention_backward(dout, q, k, v, causal=True)):
        assert got.shape == want.shape
        assert_close(got, want)


# ---- threads -------------------------------------------------------------------


@pytest.mark.parametrize("causal", [False, True])
def test_bitwise_identical_across_thread_counts(isa, dtype, rng, causal):
    q, k, v = make_qkv(rng, ((2, 3), (2, 3), 300, 310, 40, 24), dtype)
    mask = rng.random((300, 310)) < 0.9
    one = fastattn.attention(q, k, v, causal=causal, mask=mask, num_threads=1)
    two = fastattn.attention(q, k, v, causal=causal, mask=mask, num_threads=2)
    three = fastattn.attention(q, k, v, causal=causal, mask=mask, num_threads=3)
    assert np.array_equal(one, two) and np.array_equal(one, three)
    assert np.array_equal(one, fastattn.attention(q, k, v, causal=causal, mask=mask, num_threads=2))
    s1 = fastattn.scores(q, k, num_threads=1)
    assert np.array_equal(s1, fastattn.scores(q, k, num_threads=2))


def test_num_threads_setting():
    default = fastattn.get_num_threads()
    assert default >= 1
    try:
        fastattn.set_num_threads(1)
        assert fastattn.get_num_threads() == 1
        fastattn.set_num_threads(3)
        assert fastattn.get_num_threads() == 3
    finally:
        fastattn.set_num_threads(None)
    assert fastattn.get_num_threads() == default


def test_threadpoolctl_limits_apply():
    threadpoolctl = pytest.importorskip("threadpoolctl")
    fastattn.set_num_threads(None)
    default = fastattn.get_num_threads()
    assert [lib["num_threads"] for lib in threadpoolctl.threadpool_info() if lib["user_api"] == "fastattn"] == [default]
    with threadpoolctl.threadpool_limits(1, user_api="fastattn"):
        assert fastattn.get_num_threads() == 1
    with threadpoolctl.threadpool_limits(1):
        assert fastattn.get_num_threads() == 1
    assert fastattn.get_num_threads() == default
    fastattn.set_num_threads(None)


def test_isa_selection():
    paths = fastattn.available_isas()
    assert paths[0] == "generic"
    assert fastattn.get_isa() in paths
    with fastattn.use_isa("generic"):
        assert fastattn.get_isa() == "generic"


def test_block_mask_from_function(isa, rng):
    """A predicate gives the mask and table that block_mask gives for its
    dense evaluation (hidden blocks left unwritten), per head with `lead`,
    and attention with it matches the reference."""
    lq, lk = 200, 333
    doc = lambda i, j: (i + lk - lq) // 70 == j // 70  # noqa: E731  documents, bottom-right
    bm = fastattn.block_mask_from_function(doc, lq, lk)
    i, j = np.arange(lq)[:, None], np.arange(lk)[None, :]
    dense = fastattn.block_mask(doc(i, j))
    np.testing.assert_array_equal(bm.kinds, dense.kinds)
    seen = np.repeat(np.repeat(bm.kinds != bm.HIDDEN, 64, 0), 64, 1)[:lq, :lk]
    np.testing.assert_array_equal(bm.mask[seen], dense.mask[seen])
    assert not bm.mask[~seen].any()
    q, k, v = make_qkv(rng, ((2, 4), (2, 2), lq, lk, 16, 8), np.float64)
    assert_close(fastattn.attention(q, k, v, mask=bm), ref.attention(q, k, v, mask=doc(i, j)))
    # per head: a sliding window that widens with the head, and a strided (dilated) pattern
    per_head = lambda h, i, j: (j <= i + lk - lq) & ((i + lk - lq - j) < 40 * (h + 1)) | (j % 5 == 0)  # noqa: E731
    bh = fastattn.block_mask_from_function(per_head, lq, lk, lead=(4,))
    want = per_head(np.arange(4)[:, None, None], i, j)
    assert bh.kinds.shape == (4, 4, 6)
    assert_close(fastattn.attention(q, k, v, mask=bh), ref.attention(q, k, v, mask=want))


def test_block_mask_from_function_leaves_hidden_blocks_unallocated():
    """8 documents in 16384 x 16384: a dense bool mask is 256 MiB; only the
    visible eighth (and a page's worth of neighbours) is touched."""
    import subprocess
    import sys

    code = ("import resource, fastattn\n"
            "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
            "bm = fastattn.block_mask_from_function(lambda i, j: i // 2048 == j // 2048, 16384, 16384)\n"
            "print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024)\n")
    grown_mib = float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                     check=True).stdout)
    assert grown_mib < 100, grown_mib


def test_same_shapes_in_other_layouts_reuse_nothing_stale(rng):
    """Calls with the same shapes but other strides, dtypes or options (the
    problem fields are cached by layout) each match the reference."""
    base = rng.standard_normal((2, 5, 3, 16))
    views = [np.ascontiguousarray(base[..., :8].transpose(0, 2, 1, 3)),  # (2, 3, 5, 8) contiguous
             base[..., ::2].transpose(0, 2, 1, 3),  # the same shape, strided columns and heads
             base[..., 8:].transpose(0, 2, 1, 3)]
    k = rng.standard_normal((2, 3, 7, 8))
    for q in views:
        for dt in (np.float64, np.float32):
            for causal in (False, True):
                got = fastattn.attention(q.astype(dt, copy=False), k.astype(dt), k.astype(dt), causal=causal)
                assert_close(got, ref.attention(q, k, k, causal=causal), dtype=dt)


def test_repeated_layouts_rerun_the_first_calls_problem(rng, monkeypatch):
    """The first call of a layout of plain arrays is validated and builds the
    problem; later calls of it rerun that problem on their own arrays
    without validating again (what a model's per-layer calls cost), with
    the reference's results; a mask, another dtype or `out` goes through
    the checks."""
    from fastattn import _api, _validate

    checked = []
    real = _validate.score_args
    monkeypatch.setattr(_validate, "score_args", lambda *a: checked.append(1) or real(*a))
    monkeypatch.setattr(_api, "_planned", {})
    shape = (1, 4, 3, 24)
    for i in range(3):
        q = rng.standard_normal(shape, dtype=np.float32)
        k, v = (rng.standard_normal((1, 2, 11, 24), dtype=np.float32) for _ in range(2))
        got, lse = fastattn.attention(q, k, v, causal=True, return_lse=True)
        want, want_lse = ref.attention(q, k, v, causal=True, return_lse=True)
        assert_close(got, want, np.float32)
        assert_close(lse, want_lse, np.float32)
        assert len(checked) == 1
    fastattn.attention(q, k, v, causal=True, mask=np.ones((3, 11), bool))
    fastattn.attention(q, k.astype(np.float64), v, causal=True)
    fastattn.attention(q, k, v, causal=True, out=np.empty((1, 4, 3, 24), np.float32))
    assert len(checked) == 4


def test_repeated_layouts_keep_no_arrays(rng):
    """attention() remembers the validated arguments and the kernel problem
    of a layout (a model calls it with the same layouts over and over), never
    the arrays: each call computes on its own data, the arrays are freed
    after it, and an option refused for its type stays refused after an
    accepted one of the same value."""
    import gc
    import weakref

    shape = (2, 3, 17, 24)
    for _ in range(3):
        q, k, v = (rng.standard_normal(shape, dtype=np.float32) for _ in range(3))
        got, lse = fastattn.attention(q, k, v, causal=True, return_lse=True)
        want, want_lse = ref.attention(q, k, v, causal=True, return_lse=True)
        assert_close(got, want, np.float32)
        assert_close(lse, want_lse, np.float32)
    refs = [weakref.ref(a) for a in (q, k, v, got, lse)]
    del q, k, v, got, lse
    gc.collect()
    assert all(r() is None for r in refs)
    q = rng.standard_normal(shape, dtype=np.float32)
    fastattn.attention(q, q, q, causal=True, scale=1.0)
    with pytest.raises(TypeError, match="causal"):
        fastattn.attention(q, q, q, causal=1, scale=1.0)
    with pytest.raises(TypeError, match="scale"):
        fastattn.attention(q, q, q, causal=True, scale=True)
