"""Inference features: grouped-query heads, KV-cache decode (split-KV),
packed variable-length batches, windows, ALiBi, soft-capping, LSE, merge."""
import itertools

import numpy as np
import pytest

import fastattn
import fastattn.reference as ref
from util import assert_close, assert_planned_rerun, randn, weight_rounding_allowance, stable_seed


def gqa_inputs(rng, dtype, b, h, g, lq, lk, d, dv):
    return (randn(rng, (b, h, lq, d), dtype), randn(rng, (b, g, lk, d), dtype),
            randn(rng, (b, g, lk, dv), dtype))


# Decode shapes: few query rows per head against a long cache.  Lk >= 2048 with
# few entries splits the keys across items; D not a multiple of 16 and Lk not a
# multiple of the key tile leave tails everywhere.
DECODE = [
    (1, 8, 2, 1, 2100, 64, 64),
    (2, 4, 1, 3, 3001, 17, 9),
    (1, 6, 3, 2, 1500, 130, 40),
    (1, 4, 4, 16, 2500, 97, 33),
    (1, 2, 2, 5, 64, 8, 8),
    (1, 4, 2, 3, 1111, 300, 160),  # head dims beyond one register chunk of the few-row kernels
]


@pytest.mark.parametrize("shape", DECODE, ids=str)
@pytest.mark.parametrize("causal", [False, True])
def test_decode_matches_reference(isa, dtype, rng, shape, causal):
    q, k, v = gqa_inputs(rng, dtype, *shape)
    out, lse = fastattn.attention(q, k, v, causal=causal, return_lse=True)
    rout, rlse = ref.attention(q, k, v, causal=causal, return_lse=True)
    assert_close(out, rout)
    assert_close(lse, rlse)
    dot = fastattn.attention(q, k, v, causal=causal, weights="dot")
    assert_close(dot, ref.attention(q, k, v, causal=causal, weights="dot"))


def named_dtype(name):
    return np.dtype(pytest.importorskip("ml_dtypes").bfloat16 if name == "bfloat16" else name)


def assert_both_weightings_match(isa, q, k, v, k_in=None, v_in=None):
    """attention(q, k_in, v_in) (default k, v) against the reference over q,
    k, v, softmax and dot weights; bfloat16 on AVX512-BF16 rounds the weights."""
    for weights in ("softmax", "dot"):
        extra = None
        if q.dtype == named_dtype("bfloat16") and isa == "avx512bf16":
            extra = weight_rounding_allowance(q, k, v, weights=weights)
        out = fastattn.attention(q, k if k_in is None else k_in, v if v_in is None else v_in, weights=weights)
        assert_close(out, ref.attention(q, k, v, weights=weights), extra=extra)


@pytest.mark.parametrize("dt", ["float32", "float64", "float16", "bfloat16"])
def test_decode_every_key_counts(isa, dt):
    """Few-row kernels handle every key of a tile and of its tails: with one
    key's value row 1000 times the others, leaving that key out (or reading
    it twice) moves the output far beyond the tolerance."""
    rng = np.random.default_rng(5)
    for lk in (1, 2, 15, 17, 33, 64, 65, 129):
        for j in sorted({0, lk // 2, lk - 1}):
            q, k, v = gqa_inputs(rng, np.float32, 1, 4, 2, 1, lk, 40, 64)
            v[:, :, j] *= 1000
            assert_both_weightings_match(isa, *(x.astype(named_dtype(dt)) for x in (q, k, v)))


def padded_rows(vals, pad, shift):
    """vals (..., L, D) copied into rows of D + pad elements (the padding NaN),
    the array starting `shift` bytes past a 64-byte boundary with NaN before
    and after it."""
    item = vals.dtype.itemsize
    n = vals.size // vals.shape[-1] * (vals.shape[-1] + pad)
    buf = np.full(n + 256 // item, np.nan, dtype=np.float32).astype(vals.dtype)
    start = ((-buf.ctypes.data) % 64 + 64 + shift) // item
    full = buf[start:start + n].reshape(vals.shape[:-1] + (vals.shape[-1] + pad,))
    out = full[..., :vals.shape[-1]]
    out[...] = vals
    return out


@pytest.mark.parametrize("dt", ["float32", "float64", "float16", "bfloat16"])
def test_decode_rows_at_any_alignment(isa, dt):
    """K and V rows at every offset from a 64-byte boundary, NaN in the
    padding after each row and around the arrays: the few-row kernels align
    their loads and mask them to the rows, so nothing else is read."""
    dtype = named_dtype(dt)
    per_line = 64 // dtype.itemsize  # K rows padded to whole 64-byte lines, V rows by 64 elements
    q, k, v = gqa_inputs(np.random.default_rng(7), dtype, 1, 4, 2, 1, 77, 56, 64)
    for shift in range(0, 64, dtype.itemsize):
        ks, vs = padded_rows(k, per_line - 56 % per_line, shift), padded_rows(v, 64, shift)
        assert_both_weightings_match(isa, q, k, v, ks, vs)


@pytest.mark.parametrize("shape", DECODE[:3], ids=str)
def test_decode_bitwise_identical_across_thread_counts(isa, rng, shape):
    q, k, v = gqa_inputs(rng, np.float32, *shape)
    runs = [fastattn.attention(q, k, v, causal=True, return_lse=True, num_threads=n) for n in (1, 2, 5)]
    for out, lse in runs[1:]:
        assert np.array_equal(out, runs[0][0]) and np.array_equal(lse, runs[0][1])


def test_decode_with_window_alibi_softcap_and_mask(isa, dtype, rng):
    q, k, v = gqa_inputs(rng, dtype, 1, 8, 2, 2, 2300, 32, 16)
    mask = rng.random((8, 2, 2300)) < 0.9  # per query head
    kw = dict(causal=True, window=(1000, 0), alibi_slopes=np.linspace(0.01, 0.1, 8), softcap=4.0,
              mask=mask)
    out, lse = fastattn.attention(q, k, v, return_lse=True, **kw)
    rout, rlse = ref.attention(q, k, v, return_lse=True, **kw)
    assert_close(out, rout)
    assert_close(lse, rlse)


@pytest.mark.parametrize("lq", [5, 50])
def test_grouped_heads_spanning_items(isa, dtype, rng, lq):
    """Query rows of several heads share one item (and items span heads)."""
    q, k, v = gqa_inputs(rng, dtype, 2, 8, 2, lq, 77, 20, 12)
    for causal in (False, True):
        out = fastattn.attention(q, k, v, causal=causal, window=(9, 3))
        assert_close(out, ref.attention(q, k, v, causal=causal, window=(9, 3)))


def test_kv_never_repeated_for_gqa(rng):
    """K and V are read in place (a read-only, non-contiguous view works)."""
    q = randn(rng, (1, 8, 3, 16), np.float32)
    kbig = randn(rng, (1, 2, 40, 32), np.float32)
    k, v = kbig[..., ::2], kbig[..., 1::2]
    k.flags.writeable = False
    assert_close(fastattn.attention(q, k, v), ref.attention(q, k, v))


@pytest.mark.parametrize("layout", ["k head axis of 1", "k without leading axes"])
@pytest.mark.parametrize("lq", [1, 3, 70])
def test_kv_broadcast_over_heads_runs_as_one_group(isa, dtype, rng, layout, lq):
    """q (B, G, R, Lq, D) against k, v broadcast along q's last leading axis
    (grouped-query heads written with broadcasting): the kernels take the R
    heads as one group, reading each K and V row once for all of them, with
    every per-head option (mask, slopes, sinks, lse) still per head."""
    from fastattn import _problem, _validate

    q = randn(rng, (2, 3, 4, lq, 24), dtype)
    k = randn(rng, (2, 3, 1, 130, 24), dtype)
    v = randn(rng, (2, 3, 1, 130, 16), dtype)
    if layout == "k without leading axes":
        k, v = k[0, 0, 0], v[0, 0, 0]  # (130, D): one K and V for every head
    args = _validate.ScoreArgs(q, k, v, None, True, None, None, None, None, "softmax")
    out = np.empty(args.lead + (lq, 16), dtype)
    assert args.group == 1 and _problem._attention_fields(args, out, None)["group"] == 4
    mask = rng.random((4, lq, 130)) < 0.8
    kw = dict(causal=True, window=(60, 0), alibi_slopes=np.linspace(0.02, 0.2, 4), mask=mask)
    out, lse = fastattn.attention(q, k, v, return_lse=True, **kw)
    rout, rlse = ref.attention(q, k, v, return_lse=True, **kw)
    assert_close(out, rout)
    assert_close(lse, rlse)
    sinks = np.linspace(-1, 1, 4).astype(np.float32)
    assert_close(fastattn.attention(q, k, v, sinks=sinks), ref.attention(q, k, v, sinks=sinks))
    runs = [fastattn.attention(q, k, v, causal=True, num_threads=n) for n in (1, 2, 3)]
    assert all(np.array_equal(runs[0], r) for r in runs[1:])


# ---- every combination of options -------------------------------------------------

OPTIONS = dict(
    causal=[False, True],
    window=[None, (7, 2)],
    mask=[None, "bool", "float"],
    alibi=[False, True],
    softcap=[None, 2.0],
    gqa=[False, True],
)


@pytest.mark.parametrize("combo", list(itertools.product(*OPTIONS.values())),
                         ids=lambda c: "-".join(map(str, c)))
def test_option_combinations(dtype, combo):
    causal, window, mask_kind, alibi, softcap, gqa = combo
    rng = np.random.default_rng(stable_seed(combo))
    h, g = (4, 2) if gqa else (4, 4)
    q, k, v = gqa_inputs(rng, dtype, 2, h, g, 19, 41, 12, 7)
    mask = None
    if mask_kind == "bool":
        mask = rng.random((h, 19, 41)) < 0.8
    elif mask_kind == "float":
        mask = rng.standard_normal((19, 41))
        mask[rng.random((19, 41)) < 0.2] = -np.inf
    kw = dict(causal=causal, window=window, mask=mask, softcap=softcap,
              alibi_slopes=np.linspace(0.05, 0.5, h) if alibi else None)
    out, lse = fastattn.attention(q, k, v, return_lse=True, **kw)
    rout, rlse = ref.attention(q, k, v, return_lse=True, **kw)
    assert_close(out, rout)
    assert_close(lse, rlse)
    dot = fastattn.attention(q, k, v, weights="dot", **kw)
    assert_close(dot, ref.attention(q, k, v, weights="dot", **kw))
    assert_close(fastattn.scores(q, k, **kw), ref.scores(q, k, **kw))


def test_window_cost_grows_with_window_not_length(rng):
    """Tiles outside the window are skipped: a local window over a long sequence
    matches the reference computed on the visible band only."""
    q, k, v = gqa_inputs(rng, np.float32, 1, 1, 1, 3000, 3000, 16, 8)
    out = fastattn.attention(q, k, v, window=(32, 0))
    rows = slice(2000, 2100)
    band = slice(2000 - 32, 2100)
    expected = ref.attention(q[:, :, rows], k[:, :, band], v[:, :, band], window=(32, 0))
    assert_close(out[:, :, rows], expected)


# ---- variable-length batches -----------------------------------------------------

VARLEN = [
    ([0, 5, 5, 70, 200], [0, 9, 20, 20, 300]),  # an empty query and an empty key sequence
    ([0, 1, 2, 3], [0, 2500, 2501, 5000]),  # decode rows, long caches (split-KV)
    ([0, 97], [0, 97]),
]


@pytest.mark.parametrize("cu", VARLEN, ids=lambda c: str(len(c[0]) - 1))
@pytest.mark.parametrize("causal", [False, True])
def test_varlen_matches_reference(isa, dtype, rng, cu, causal):
    cu_q, cu_k = (np.array(c) for c in cu)
    h, g = 4, 2
    q = randn(rng, (cu_q[-1], h, 24), dtype)
    k = randn(rng, (cu_k[-1], g, 24), dtype)
    v = randn(rng, (cu_k[-1], g, 10), dtype)
    kw = dict(causal=causal, window=(40, 3), softcap=3.0, alibi_slopes=np.linspace(0.1, 0.4, h))
    out, lse = fastattn.attention_varlen(q, k, v, cu_q, cu_k, return_lse=True, **kw)
    rout, rlse = ref.attention_varlen(q, k, v, cu_q, cu_k, return_lse=True, **kw)
    assert out.shape == (cu_q[-1], h, 10) and lse.shape == (h, cu_q[-1])
    assert_close(out, rout)
    assert_close(lse, rlse)
    dot = fastattn.attention_varlen(q, k, v, cu_q, cu_k, weights="dot", causal=causal)
    assert_close(dot, ref.attention_varlen(q, k, v, cu_q, cu_k, weights="dot", causal=causal))


def test_varlen_equals_per_sequence_attention(rng):
    cu = np.array([0, 30, 31, 100])
    q = randn(rng, (100, 2, 8), np.float32)
    out = fastattn.attention_varlen(q, q, q, cu, cu, causal=True)
    for b in range(3):
        s = slice(cu[b], cu[b + 1])
        one = fastattn.attention(q[s].swapaxes(0, 1), q[s].swapaxes(0, 1), q[s].swapaxes(0, 1), causal=True)
        assert np.array_equal(out[s], one.swapaxes(0, 1))


def test_varlen_calls_rerun_their_layouts_problem(rng, monkeypatch):
    """A call of attention_varlen whose layouts and options were seen before
    (decoding steps over packed keys that grow, batches of one size mixing
    chunks and single queries) reruns the first call's problem over its own
    offsets: it needs none of the full checks (they are made to fail here)
    and gives bitwise the result of a checked call (out=)."""
    h, g, d, dv = 8, 2, 24, 16
    kbuf, vbuf = randn(rng, (3000, g, d), np.float32), randn(rng, (3000, g, dv), np.float32)
    lens = [[100, 7, 260], [101, 8, 261], [3, 1800, 1], [0, 5, 9]]  # keys per sequence
    n_q = [[1, 1, 1], [1, 4, 2], [3, 1, 1], [1, 1, 1]]  # queries per sequence (with return_lse: one each)
    for return_lse in (False, True):
        for step, (lk, lq) in enumerate(zip(lens, n_q)):
            lq = [1, 1, 1] if return_lse else lq
            cu_q, cu_k = (np.concatenate([[0], np.cumsum(n)]) for n in (lq, lk))
            q = randn(rng, (cu_q[-1], h, d), np.float32)
            k, v = kbuf[: cu_k[-1]], vbuf[: cu_k[-1]]
            options = dict(causal=True, softcap=20.0, return_lse=return_lse)
            checked = fastattn.attention_varlen(q, k, v, cu_q, cu_k, out=np.empty((cu_q[-1], h, dv), np.float32),
                                                **options)
            if step == 0:
                fastattn.attention_varlen(q, k, v, cu_q, cu_k, **options)  # plans the layout
            assert_planned_rerun(monkeypatch, "VarlenArgs", fastattn.attention_varlen, (q, k, v, cu_q, cu_k), options,
                                 checked, ref.attention_varlen(q, k, v, cu_q, cu_k, **options))


def test_varlen_layers_reuse_the_last_calls_entries(rng, monkeypatch):
    """Calls of a planned layout with the offsets of the call before (a
    model's layers, one after the other) reuse its checked entries: the
    offsets are not checked again (made to fail here), the results are the
    reference's; other offsets are checked."""
    from fastattn import _validate

    cu_q, cu_k = np.array([0, 1, 5, 6]), np.array([0, 40, 47, 300])
    call = [randn(rng, (6, 4, 16), np.float32)] + [randn(rng, (300, 2, 16), np.float32) for _ in range(2)]
    fastattn.attention_varlen(*call, cu_q, cu_k, causal=True)  # plans the layout
    fastattn.attention_varlen(*call, cu_q, cu_k.copy(), causal=True)  # and checks these offsets
    with monkeypatch.context() as m:
        m.setattr(_validate, "offsets_ok", None)
        for layer in range(3):
            call = [randn(rng, a.shape, np.float32) for a in call]
            assert_close(fastattn.attention_varlen(*call, cu_q.copy(), cu_k, causal=True),
                         ref.attention_varlen(*call, cu_q, cu_k, causal=True))
    with pytest.raises(ValueError, match="same length and heads"):  # the same offsets, v one row short
        fastattn.attention_varlen(*call[:2], call[2][:299], cu_q, cu_k, causal=True)
    with pytest.raises(ValueError, match="cu_seqlens_k"):
        fastattn.attention_varlen(*call, cu_q, np.array([0, 40, 30, 300]), causal=True)


def test_planned_varlen_calls_keep_their_checks(rng):
    """Offsets a planned layout's check refuses go through the full checks,
    which name what is wrong; a packed length of 1 (a stride of 0) is a
    layout of its own, and so is every total_q of a call returning the lse
    (H, total_q)."""
    q, k = randn(rng, (3, 4, 8), np.float32), randn(rng, (30, 2, 8), np.float32)
    cu_q, cu_k = np.array([0, 1, 2, 3]), np.array([0, 10, 20, 30])
    fastattn.attention_varlen(q, k, k, cu_q, cu_k)
    for args, message in [((q, k, k, np.array([0, 2, 1, 3]), cu_k), "cu_seqlens_q must start at 0"),
                          ((q, k, k, cu_q, np.array([0, 9 * 10**18, -9 * 10**18, 30])), "cu_seqlens_k"),
                          ((q, k, k, cu_q, np.array([0, 10, 20, 29])), "cu_seqlens_k"),
                          ((q, k, k[:29], cu_q, np.array([0, 10, 20, 29])), "same length and heads")]:
        with pytest.raises(ValueError, match=message):
            fastattn.attention_varlen(*args)
    for rows in (1, 3, 2):  # one sequence of `rows` queries
        cu_q1 = np.array([0, rows])
        q1 = randn(rng, (rows, 4, 8), np.float32)
        assert_close(fastattn.attention_varlen(q1, k, k, cu_q1, np.array([0, 30])),
                     ref.attention_varlen(q1, k, k, cu_q1, np.array([0, 30])))
    for n_q in ([1, 1, 1], [2, 2, 1]):
        cu_qn = np.concatenate([[0], np.cumsum(n_q)])
        qn = randn(rng, (cu_qn[-1], 4, 8), np.float32)
        for got, want in zip(fastattn.attention_varlen(qn, k, k, cu_qn, cu_k, return_lse=True),
                             ref.attention_varlen(qn, k, k, cu_qn, cu_k, return_lse=True)):
            assert_close(got, want)


# ---- merging partial results -------------------------------------------------------


def test_merge_of_chunks_equals_whole(isa, dtype, rng):
    q, k, v = gqa_inputs(rng, dtype, 2, 4, 2, 9, 300, 16, 8)
    mask = rng.random((9, 300)) < 0.7
    mask[:, 200:] = False  # the last chunk sees nothing: lse -inf there
    whole, whole_lse = fastattn.attention(q, k, v, mask=mask, return_lse=True)
    parts = [(0, 50), (50, 200), (200, 300)]
    outs, lses = zip(*(fastattn.attention(q, k[..., a:b, :], v[..., a:b, :], mask=mask[:, a:b],
                                          return_lse=True) for a, b in parts))
    assert np.all(np.isneginf(lses[2]))
    merged, merged_lse = fastattn.merge(outs, lses)
    assert_close(merged, whole)
    assert_close(merged_lse, whole_lse)
    rm, rl = ref.merge(outs, lses)
    assert_close(merged, rm)
    assert_close(merged_lse, rl)


def test_merge_rows_with_no_keys():
    out = np.ones((2, 3), np.float32)
    lse = np.full(2, -np.inf, np.float32)
    merged, mlse = fastattn.merge([out, out], [lse, lse])
    assert np.all(merged == 0) and np.all(np.isneginf(mlse))


def test_varlen_alibi_slopes_broadcast_as_in_attention(rng):
    """One rule for slopes: anything that broadcasts to the query heads."""
    cu = np.array([0, 7, 20])
    q = randn(rng, (20, 4, 8), np.float32)
    k = randn(rng, (20, 2, 8), np.float32)
    full = fastattn.attention_varlen(q, k, k, cu, cu, alibi_slopes=np.full(4, 0.5))
    for slopes in (0.5, np.array([0.5]), np.full((1,), 0.5, np.float32)):
        assert np.array_equal(fastattn.attention_varlen(q, k, k, cu, cu, alibi_slopes=slopes), full)
    seq = q[7:20].swapaxes(0, 1)
    kv = k[7:20].swapaxes(0, 1)
    one = fastattn.attention(seq, kv, kv, alibi_slopes=np.array([0.5]))
    assert_close(full[7:20], one.swapaxes(0, 1))
