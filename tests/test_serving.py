"""Serving: attention sinks, the paged KV cache (attention_paged, cache_write)
and mixed prefill/decode batches in one call."""
import numpy as np
import pytest

import fastattn
import fastattn.reference as ref
from util import assert_close, assert_planned_rerun, block_table, paged_cache, quantized_cache, randn, stable_seed


# ---- sinks ------------------------------------------------------------------------


def sink_values(rng, h):
    """One sink per head, some above every score, one head without (-inf)."""
    s = rng.uniform(-3.0, 4.0, h)
    s[0] = -np.inf
    return s


@pytest.mark.parametrize("shape", [(2, 4, 2, 33, 47, 16, 8), (1, 8, 2, 1, 3000, 64, 32), (1, 2, 1, 70, 20, 8, 8)],
                         ids=["prefill-gqa", "split-kv-decode", "lq>lk"])
@pytest.mark.parametrize("causal", [False, True])
def test_sinks_match_reference(isa, dtype, rng, shape, causal):
    b, h, g, lq, lk, d, dv = shape
    q, k, v = randn(rng, (b, h, lq, d), dtype), randn(rng, (b, g, lk, d), dtype), randn(rng, (b, g, lk, dv), dtype)
    sinks = sink_values(rng, h)
    # top-left causal with lq > lk leaves rows with no key: their weight is all the sink's
    align = "top-left" if lq > lk else "bottom-right"
    out, lse = fastattn.attention(q, k, v, causal=causal, sinks=sinks, return_lse=True, align=align)
    rout, rlse = ref.attention(q, k, v, causal=causal, sinks=sinks, return_lse=True, align=align)
    assert_close(out, rout)
    assert_close(lse, rlse)


def test_sinks_are_a_key_with_no_value(rng):
    """A sink is the same as one more key whose score is the sink and whose
    value is zero: computed that way through an additive mask."""
    q, k, v = randn(rng, (2, 3, 9, 8), np.float64), randn(rng, (2, 3, 12, 8), np.float64), randn(rng, (2, 3, 12, 5),
                                                                                               np.float64)
    sinks = np.array([0.7, -1.0, 3.0])
    k1 = np.concatenate([k, np.zeros((2, 3, 1, 8))], axis=2)
    v1 = np.concatenate([v, np.zeros((2, 3, 1, 5))], axis=2)
    mask = np.zeros((3, 1, 13))
    mask[:, 0, -1] = sinks
    want, want_lse = fastattn.attention(q, k1, v1, mask=mask, return_lse=True)
    got, got_lse = fastattn.attention(q, k, v, sinks=sinks, return_lse=True)
    assert_close(got, want)
    assert_close(got_lse, want_lse)
    assert_close(ref.attention(q, k, v, sinks=sinks), want)


def test_sink_of_minus_inf_changes_nothing(rng):
    q, k, v = (randn(rng, (1, 4, 20, 16), np.float32) for _ in range(3))
    plain = fastattn.attention(q, k, v, causal=True, return_lse=True)
    none = fastattn.attention(q, k, v, causal=True, sinks=np.full(4, -np.inf), return_lse=True)
    np.testing.assert_array_equal(none[0], plain[0])
    np.testing.assert_array_equal(none[1], plain[1])


def test_sinks_varlen_and_backward(dtype, rng):
    cu_q, cu_k = np.array([0, 5, 5, 40]), np.array([0, 9, 20, 61])
    q, k, v = randn(rng, (40, 4, 8), dtype), randn(rng, (61, 2, 8), dtype), randn(rng, (61, 2, 6), dtype)
    sinks = sink_values(rng, 4)
    out, lse = fastattn.attention_varlen(q, k, v, cu_q, cu_k, causal=True, sinks=sinks, return_lse=True)
    rout, rlse = ref.attention_varlen(q, k, v, cu_q, cu_k, causal=True, sinks=sinks, return_lse=True)
    assert_close(out, rout)
    assert_close(lse, rlse)
    dout = randn(rng, out.shape, dtype)
    grads = fastattn.attention_varlen_backward(dout, q, k, v, out, lse, cu_q, cu_k, causal=True, sinks=sinks)
    want = ref.attention_varlen_backward(dout, q, k, v, cu_q, cu_k, causal=True, sinks=sinks)
    for g, w in zip(grads, want):
        assert_close(g, w, mag=max(1.0, float(np.abs(w).max())) * 4)


def test_sinks_backward_matches_finite_differences():
    """The reference backward with sinks against central differences of the
    reference forward (the kernel's backward is checked against it above)."""
    rng = np.random.default_rng(stable_seed("sinks-fd"))
    q, k, v = (rng.standard_normal((1, 2, 4, 3)) for _ in range(3))
    sinks, dout = np.array([0.5, -0.3]), rng.standard_normal((1, 2, 4, 3))
    grads = ref.attention_backward(dout, q, k, v, causal=True, sinks=sinks)
    for x, g in zip((q, k, v), grads):
        num = np.zeros_like(x)
        for idx in np.ndindex(x.shape):
            old = x[idx]
            x[idx] = old + 1e-6
            up = np.sum(dout * ref.attention(q, k, v, causal=True, sinks=sinks))
            x[idx] = old - 1e-6
            down = np.sum(dout * ref.attention(q, k, v, causal=True, sinks=sinks))
            x[idx] = old
            num[idx] = (up - down) / 2e-6
        np.testing.assert_allclose(g, num, atol=1e-7)


# ---- the paged cache --------------------------------------------------------------


@pytest.mark.parametrize("block_size", [1, 7, 16, 32, 64, 100])
def test_paged_decode_matches_reference(isa, dtype, rng, block_size):
    h, g, d, dv = 8, 2, 24, 16
    lens = [1, 150, 77, 300, block_size * 3]
    n_blocks = sum((n + block_size - 1) // block_size for n in lens) + 3
    kc, vc = paged_cache(rng, dtype, n_blocks, block_size, g, d, dv)
    table = block_table(rng, lens, block_size, n_blocks)
    q = randn(rng, (len(lens), h, d), dtype)
    out, lse = fastattn.attention_paged(q, kc, vc, table, lens, return_lse=True)
    rout, rlse = ref.attention_paged(q, kc, vc, table, lens, return_lse=True)
    assert_close(out, rout)
    assert_close(lse, rlse)


@pytest.mark.parametrize("block_size", [7, 32, 100])
def test_paged_decode_of_wide_rows_matches_reference(isa, rng, block_size):
    """Heads whose K and V rows of a token span more than 4 KiB (8 x 160
    float32 values each), which decoding walks in tiles of at most 16 keys
    that also end at page ends, match the reference (a check of the
    results, not of the tile size: that is a speed matter, in bench
    --paged); packed sequences the same."""
    h, g, d = 16, 8, 160
    lens = [1, 150, 77, 301]
    n_blocks = sum((n + block_size - 1) // block_size for n in lens) + 2
    kc, vc = paged_cache(rng, np.float32, n_blocks, block_size, g, d, d)
    table = block_table(rng, lens, block_size, n_blocks)
    q = randn(rng, (len(lens), h, d), np.float32)
    out, lse = fastattn.attention_paged(q, kc, vc, table, lens, return_lse=True)
    rout, rlse = ref.attention_paged(q, kc, vc, table, lens, return_lse=True)
    assert_close(out, rout)
    assert_close(lse, rlse)
    kp = np.concatenate([kc[table[b, np.arange(n) // block_size], np.arange(n) % block_size] for b, n in enumerate(lens)])
    vp = np.concatenate([vc[table[b, np.arange(n) // block_size], np.arange(n) % block_size] for b, n in enumerate(lens)])
    cu_q, cu_k = np.arange(len(lens) + 1), np.concatenate([[0], np.cumsum(lens)])
    assert_close(fastattn.attention_varlen(q, kp, vp, cu_q, cu_k, causal=True), rout)


def test_paged_mixed_batch_with_every_option(isa, dtype, rng):
    """Sequences decoding one token, one prefilling a chunk, one whole
    prompt, a long one split over the keys, and an empty one, in one call,
    with grouped heads, window, soft-cap, ALiBi and sinks."""
    h, g, d, dv, bs = 6, 3, 16, 8, 16
    lens = np.array([2100, 40, 90, 1, 0, 33])
    n_q = np.array([1, 40, 25, 1, 0, 3])
    cu = np.concatenate([[0], np.cumsum(n_q)])
    n_blocks = int(sum((n + bs - 1) // bs for n in lens)) + 2
    kc, vc = paged_cache(rng, dtype, n_blocks, bs, g, d, dv)
    table = block_table(rng, lens, bs, n_blocks)
    q = randn(rng, (cu[-1], h, d), dtype)
    opts = dict(window=(60, 0), softcap=3.0, alibi_slopes=rng.uniform(0.01, 0.1, h), sinks=sink_values(rng, h))
    out, lse = fastattn.attention_paged(q, kc, vc, table, lens, cu_seqlens_q=cu, return_lse=True, **opts)
    rout, rlse = ref.attention_paged(q, kc, vc, table, lens, cu_seqlens_q=cu, return_lse=True, **opts)
    assert_close(out, rout)
    assert_close(lse, rlse)
    plain = fastattn.attention_paged(q, kc, vc, table, lens, cu_seqlens_q=cu, causal=False)
    assert_close(plain, ref.attention_paged(q, kc, vc, table, lens, cu_seqlens_q=cu, causal=False))


def contiguous_kv(kc, vc, table, n, bs):
    j = np.arange(n)
    pages = table[j // bs]
    return kc[pages, j % bs], vc[pages, j % bs]  # (n, G, D)


def packed_kv(kc, vc, table, lens, bs):
    """The sequences' keys and values packed one after the other (total, G, D)."""
    kv = [contiguous_kv(kc, vc, table[b], n, bs) for b, n in enumerate(lens)]
    return np.concatenate([k for k, _ in kv]), np.concatenate([v for _, v in kv])


def test_paged_equals_contiguous_attention(isa, rng):
    """Pages of 64 keys fall on the contiguous kernel's key tiles: the same
    sums in the same order, bit for bit, where neither call splits the keys
    (a paged bundle of heads splits its keys finer than one contiguous head
    does: the same values up to rounding)."""
    h, g, d, bs = 8, 2, 64, 64
    lens = [3000, 700]
    n_blocks = 64
    kc, vc = paged_cache(rng, np.float32, n_blocks, bs, g, d, d)
    table = block_table(rng, lens, bs, n_blocks)
    q = randn(rng, (2, h, d), np.float32)
    out = fastattn.attention_paged(q, kc, vc, table, lens)
    for b, n in enumerate(lens):
        k, v = contiguous_kv(kc, vc, table[b], n, bs)
        want = fastattn.attention(q[b][:, None], np.swapaxes(k, 0, 1), np.swapaxes(v, 0, 1))[:, 0]
        assert_close(out[b], want)
    # one sequence alone, too short for either call to split its keys: the
    # tiles are the contiguous call's
    one = fastattn.attention_paged(q[1:], kc, vc, table[1:], lens[1:])
    k, v = contiguous_kv(kc, vc, table[1], lens[1], bs)
    kt, vt = np.ascontiguousarray(np.swapaxes(k, 0, 1)), np.ascontiguousarray(np.swapaxes(v, 0, 1))
    same = fastattn.attention(q[1][None, :, None], kt[None], vt[None])[0, :, 0]
    np.testing.assert_array_equal(one[0], same)


@pytest.mark.parametrize("kv", ["float32", "int8", "wide", "bfloat16"])
def test_small_pages_share_a_tile(isa, rng, kv):
    """A decoding tile spans the pages smaller than itself (a segment per
    page; the score options and weights once per tile): the same keys in
    pages of 64, 16 and 9 give the same sums in the same order, bit for bit,
    with a window, soft-cap, ALiBi and sinks.  Pages of 9 end segments
    where no vector of keys ends; the window starts a tile mid-page.
    "wide": float32 rows of K and V over 4 KiB per token (which the kernels
    read in segments of at most 16 keys, pages of 64 too); "bfloat16": 2 KB
    of K and V rows per token, read in segments of 32 keys (64 KiB), so
    that pages of 64 come in two.  (Two query rows per head: a few-row item
    on every path but the portable C one, which has no few-row kernels;
    there float32 keys are gathered into whole tiles, but 8-bit and 16-bit
    ones are read in place, in tiles that end at pages: the same values up
    to rounding.)"""
    h, g, d, n = (8, 4, 160, 500) if kv == "wide" else (8, 4, 128, 600) if kv == "bfloat16" else (4, 2, 64, 700)
    kf, vf = randn(rng, (n, g, d), np.float32), randn(rng, (n, g, d), np.float32)
    q = randn(rng, (1, h, d), np.float32)
    opts = dict(window=(300, 0), softcap=8.0, alibi_slopes=rng.uniform(0.01, 0.1, h), sinks=sink_values(rng, h))
    dt = {"int8": np.int8, "bfloat16": pytest.importorskip("ml_dtypes").bfloat16}.get(kv, np.float32)
    outs = []
    for bs in (64, 16, 9):
        n_blocks = (n + bs - 1) // bs + 3
        table = block_table(rng, [n], bs, n_blocks)
        slots = table[0, np.arange(n) // bs].astype(np.int64) * bs + np.arange(n) % bs
        kc, vc = np.zeros((n_blocks, bs, g, d), dt), np.zeros((n_blocks, bs, g, d), dt)
        scales = {}
        if kv == "int8":
            scales = dict(k_scale=np.zeros((n_blocks, bs, g), np.float32), v_scale=np.zeros((n_blocks, bs, g), np.float32))
        fastattn.cache_write(kf, vf, kc, vc, slots, **scales)
        outs.append(fastattn.attention_paged(q, kc, vc, table, [n], num_threads=1, **scales, **opts))
    for out in outs[1:]:
        if isa == "generic" and kv in ("int8", "bfloat16"):
            assert_close(out, outs[0])
        else:
            np.testing.assert_array_equal(out, outs[0])


@pytest.mark.parametrize("rows", ["wide", "4KiB", "short"])
def test_decoding_packed_sequences_equals_paged_bitwise(isa, rng, rows):
    """Decoding from packed sequences (attention_varlen: each token's heads
    side by side, as in a paged cache) runs the bundles of a paged cache:
    tiles of 64 keys in segments (rows over 4 KiB: segments of 16 keys;
    others: at most 64 KiB of K and V rows), so both give the same sums in
    the same order, bit for bit.  (The portable C path has no few-row
    kernels: the same values up to rounding.)"""
    h, g, d = {"wide": (16, 8, 160), "4KiB": (16, 8, 64), "short": (4, 2, 48)}[rows]
    bs = 32
    lens = np.array([700, 90, 1300])
    n_blocks = int(((lens + bs - 1) // bs).sum()) + 2
    kc, vc = paged_cache(rng, np.float32, n_blocks, bs, g, d, d)
    q, table = decoding_step(rng, kc, lens, bs, h, None, 10**9)
    opts = dict(softcap=6.0, sinks=sink_values(rng, h))
    paged = fastattn.attention_paged(q, kc, vc, table, lens, num_threads=1, **opts)
    kp, vp = packed_kv(kc, vc, table, lens, bs)
    cu_q, cu_k = np.arange(len(lens) + 1), np.concatenate([[0], np.cumsum(lens)])
    packed = fastattn.attention_varlen(q, kp, vp, cu_q, cu_k, num_threads=1, **opts)
    if isa == "generic":
        assert_close(packed, paged)
    else:
        np.testing.assert_array_equal(packed, paged)
    assert_close(packed, ref.attention_paged(q, kc, vc, table, lens, **opts))


def test_paged_bitwise_identical_across_thread_counts(isa, rng):
    h, g, d, bs = 4, 2, 32, 16
    lens = np.array([5000, 300, 17])
    n_q = np.array([1, 100, 1])
    cu = np.concatenate([[0], np.cumsum(n_q)])
    n_blocks = int(sum((n + bs - 1) // bs for n in lens))
    kc, vc = paged_cache(rng, np.float32, n_blocks, bs, g, d, d)
    table = block_table(rng, lens, bs, n_blocks)
    q = randn(rng, (cu[-1], h, d), np.float32)
    outs = [fastattn.attention_paged(q, kc, vc, table, lens, cu_seqlens_q=cu, num_threads=t) for t in (1, 2, 3, 7)]
    for o in outs[1:]:
        np.testing.assert_array_equal(o, outs[0])


def decoding_step(rng, kc, lens, bs, h, width, pad):
    """Queries and a block table (padded with `pad` past each sequence's
    blocks) for one decoding step over the cache kc."""
    n_blocks = kc.shape[0]
    table = block_table(rng, lens, bs, n_blocks, width)
    table[table == 10**9] = pad
    return randn(rng, (len(lens), h, kc.shape[3]), np.float32), table


@pytest.mark.parametrize("kv", ["float32", "int8", "float8_e4m3fn"])
def test_paged_decoding_steps_rerun_their_layouts_problem(rng, monkeypatch, kv):
    """A decoding call whose layouts and options were seen before reruns the
    first call's problem with its own lengths, block table and arrays: it
    needs none of the full checks (they are made to fail here), and gives
    bitwise the result of the checked call, whose padding past each
    sequence's blocks (-1, or ids out of range) is never read."""
    h, g, d, bs, n_blocks = 8, 2, 32, 16, 40
    kf, vf = paged_cache(rng, np.float32, n_blocks, bs, g, d, d)
    if kv == "float32":
        kc, vc, scales = kf, vf, {}
    else:
        dt = np.dtype(np.int8) if kv == "int8" else np.dtype(getattr(ml_dtypes, kv))
        _, _, kc, vc, ks, vs = quantized_cache(rng, dt, n_blocks, bs, g, d, d)
        scales = dict(k_scale=ks, v_scale=vs)
    steps = [(np.array([100, 7, 260]), -1), (np.array([101, 8, 261]), 10**9), (np.array([3, 180, 1]), 0)]
    q, table = decoding_step(rng, kc, steps[0][0], bs, h, 20, steps[0][1])
    fastattn.attention_paged(q, kc, vc, table, steps[0][0], **scales)  # plans the layout
    for lens, pad in steps[1:]:
        q, table = decoding_step(rng, kc, lens, bs, h, 20, pad)
        checked = fastattn.attention_paged(q, kc, vc, table, lens, out=np.empty_like(q), **scales)  # out=: checked
        want = ref.attention_paged(q, kc, vc, table, lens, **scales)
        assert_planned_rerun(monkeypatch, "PagedArgs", fastattn.attention_paged, (q, kc, vc, table, lens), scales,
                             checked, want)


def test_planned_paged_calls_keep_their_checks(rng):
    """Lengths and block tables a planned layout's cheap check refuses go
    through the full checks, which name what is wrong."""
    h, g, d, bs, n_blocks = 4, 2, 16, 8, 30
    kc, vc = paged_cache(rng, np.float32, n_blocks, bs, g, d, d)
    lens = np.array([20, 9])
    q, table = decoding_step(rng, kc, lens, bs, h, 5, -1)
    fastattn.attention_paged(q, kc, vc, table, lens)
    bad_id = table.copy()
    bad_id[1, 0] = n_blocks
    for args, message in [((table, np.array([20, 0])), "seq_lens\\[1\\] = 0 keys"),
                          ((table, np.array([20, 41])), "seq_lens must be in"),
                          ((bad_id, lens), "block_table row 1 uses block ids outside")]:
        with pytest.raises(ValueError, match=message):
            fastattn.attention_paged(q, kc, vc, *args)


@pytest.mark.parametrize("kv", ["float32", "int8"])
def test_paged_mixed_batches_rerun_their_layouts_problem(rng, monkeypatch, kv):
    """A call with query offsets (chunks of prefill beside decoding steps)
    whose layouts and options were seen before reruns the first call's
    problem over its own offsets, lengths and block table: no full check
    (made to fail here), bitwise the result of a checked call, the
    reference's within tolerance; with return_lse too (same total_q)."""
    h, g, d, bs, n_blocks = 8, 2, 32, 16, 60
    kf, vf = paged_cache(rng, np.float32, n_blocks, bs, g, d, d)
    if kv == "float32":
        kc, vc, scales = kf, vf, {}
    else:
        _, _, kc, vc, ks, vs = quantized_cache(rng, np.dtype(np.int8), n_blocks, bs, g, d, d)
        scales = dict(k_scale=ks, v_scale=vs)
    steps = [([100, 7, 260], [1, 7, 1]), ([101, 40, 261], [1, 33, 1]), ([5, 41, 262], [5, 1, 1]),
             ([6, 42, 300], [1, 1, 38])]  # (keys, queries) of each sequence
    for return_lse in (False, True):
        for step, (lens, n_q) in enumerate(steps):
            n_q = [1, 2, 3] if return_lse else n_q
            lens, cu_q = np.array(lens), np.concatenate([[0], np.cumsum(n_q)])
            _, table = decoding_step(rng, kc, lens, bs, h, 20, -1)
            q = randn(rng, (cu_q[-1], h, d), np.float32)
            call = dict(cu_seqlens_q=cu_q, softcap=30.0, return_lse=return_lse, **scales)
            checked = fastattn.attention_paged(q, kc, vc, table, lens, out=np.empty_like(q), **call)
            want = ref.attention_paged(q, kc, vc, table, lens, **call)
            if step == 0:
                fastattn.attention_paged(q, kc, vc, table, lens, **call)  # plans the layout
            assert_planned_rerun(monkeypatch, "PagedArgs", fastattn.attention_paged, (q, kc, vc, table, lens), call,
                                 checked, want)


def test_paged_layers_reuse_the_last_calls_entries(rng, monkeypatch):
    """Calls of a planned layout with the lengths and query offsets of the
    call before (a model's layers) reuse its checked entries (the plan's
    memo stays the same object; query offsets are not checked again: made
    to fail here) but for the block ids, which the kernel checks every
    call; the results are the reference's."""
    from fastattn import _api, _validate

    h, g, d, bs, n_blocks = 4, 2, 16, 8, 40
    lens, cu_q = np.array([20, 9, 33]), np.array([0, 1, 5, 6])
    _, table = decoding_step(rng, paged_cache(rng, np.float32, n_blocks, bs, g, d, d)[0], lens, bs, h, 6, -1)
    for cu in (None, cu_q):
        rows = 3 if cu is None else 6
        call = lambda: (randn(rng, (rows, h, d), np.float32),) + paged_cache(rng, np.float32, n_blocks, bs, g, d, d)
        fastattn.attention_paged(*call(), table, lens, cu_seqlens_q=cu)  # plans the layout
        fastattn.attention_paged(*call(), table, lens.copy(), cu_seqlens_q=cu)  # and checks these lengths
        q, kc, vc = call()
        memo = _api._paged_planned[_api._paged_key(q, kc, vc, table, lens, cu, None, True, None, None, None, None,
                                                   False)][-1]
        checked = memo[0]
        with monkeypatch.context() as m:
            m.setattr(_validate, "offsets_ok", None)
            for layer in range(3):
                q, kc, vc = call()
                assert_close(fastattn.attention_paged(q, kc, vc, table, lens, cu_seqlens_q=cu),
                             ref.attention_paged(q, kc, vc, table, lens, cu_seqlens_q=cu))
        assert memo[0] is checked
        bad = table.copy()
        bad[2, 0] = n_blocks
        with pytest.raises(ValueError, match="block_table row 2 uses block ids outside"):
            fastattn.attention_paged(*call(), bad, lens, cu_seqlens_q=cu)


@pytest.mark.parametrize("kv", ["float32", "bfloat16", "int8"])
def test_head_major_pages(rng, kv):
    """A cache whose pages hold each head's rows together, (blocks, G,
    block_size, D), passed as its (blocks, block_size, G, D) view (as
    fastattn._bench.head_major makes it): cache_write fills it as it fills
    the token-major cache, and attention_paged reads the same keys and
    values from it (within float32 rounding: its heads are not bundled)."""
    from fastattn._bench import head_major

    h, g, d, bs, n_blocks = 8, 2, 32, 16, 30
    dt = np.dtype(ml_dtypes.bfloat16) if kv == "bfloat16" else np.dtype(kv)
    lens, n_q = np.array([200, 1, 77]), np.array([1, 1, 9])
    cu_q = np.concatenate([[0], np.cumsum(n_q)])
    table = block_table(rng, lens, bs, n_blocks)
    k, v = (randn(rng, (n_blocks * bs, g, d), np.float32) for _ in range(2))
    caches = [np.zeros((n_blocks, bs, g, d), dt) for _ in range(2)]
    scales = [np.zeros((n_blocks, bs, g), np.float32) for _ in range(2)] if kv == "int8" else [None, None]
    token_major = caches + scales
    heads = [None if x is None else head_major(x) for x in token_major]
    for kc, vc, ks, vs in (token_major, heads):
        fastattn.cache_write(k, v, kc, vc, np.arange(n_blocks * bs), k_scale=ks, v_scale=vs)
    for a, b in zip(token_major, heads):
        assert a is None or (np.array_equal(a, b) and not b.flags.c_contiguous)
    q = randn(rng, (cu_q[-1], h, d), np.float32)
    kc, vc, ks, vs = heads
    call = dict(cu_seqlens_q=cu_q, k_scale=ks, v_scale=vs, return_lse=True)
    for got, want in zip(fastattn.attention_paged(q, kc, vc, table, lens, **call),
                         ref.attention_paged(q, kc, vc, table, lens, **call)):
        assert_close(got, want)


def test_paged_queries_with_a_zero_row_stride(rng):
    """q broadcast along its rows (one query row for every sequence): each
    head still reads its own query, with and without query offsets, checked
    and planned."""
    kc, vc = paged_cache(rng, np.float32, 4, 8, 2, 16, 16)
    table, lens = np.array([[0, 1], [2, 3]], np.int32), np.array([10, 12], np.int32)
    q1 = randn(rng, (1, 4, 16), np.float32)
    for rows, cu in ((2, None), (3, np.array([0, 1, 3]))):
        q = np.broadcast_to(q1, (rows, 4, 16))
        want = ref.attention_paged(q, kc, vc, table, lens, cu_seqlens_q=cu)
        for _ in range(2):  # checked, then planned
            assert_close(fastattn.attention_paged(q, kc, vc, table, lens, cu_seqlens_q=cu), want)


def test_planned_paged_mixed_batches_keep_their_checks(rng):
    """Query offsets and lengths a planned layout's cheap check refuses go
    through the full checks, which name what is wrong; one query row (a
    stride of 0) and each total_q of a call returning the lse are layouts
    of their own."""
    h, g, d, bs, n_blocks = 4, 2, 16, 8, 30
    kc, vc = paged_cache(rng, np.float32, n_blocks, bs, g, d, d)
    lens = np.array([20, 9])
    _, table = decoding_step(rng, kc, lens, bs, h, 5, -1)
    q = randn(rng, (6, h, d), np.float32)
    fastattn.attention_paged(q, kc, vc, table, lens, cu_seqlens_q=np.array([0, 3, 6]))
    for cu, lk, message in [([0, 7, 6], lens, "cu_seqlens_q must start at 0"),
                            ([0, 1, 6], np.array([20, 4]), "sequence 1 has 5 queries but seq_lens\\[1\\] = 4"),
                            ([0, 3, 6], np.array([20, 41]), "seq_lens must be in")]:
        with pytest.raises(ValueError, match=message):
            fastattn.attention_paged(q, kc, vc, table, lk, cu_seqlens_q=np.array(cu))
    for rows in (1, 4, 2):  # one sequence of `rows` queries
        q1 = randn(rng, (rows, h, d), np.float32)
        call = (q1, kc, vc, table[:1], lens[:1])
        assert_close(fastattn.attention_paged(*call, cu_seqlens_q=np.array([0, rows])),
                     ref.attention_paged(*call, cu_seqlens_q=np.array([0, rows])))
    for n_q in ([1, 1], [3, 2]):
        cu = np.concatenate([[0], np.cumsum(n_q)])
        qn = randn(rng, (cu[-1], h, d), np.float32)
        for got, want in zip(fastattn.attention_paged(qn, kc, vc, table, lens, cu_seqlens_q=cu, return_lse=True),
                             ref.attention_paged(qn, kc, vc, table, lens, cu_seqlens_q=cu, return_lse=True)):
            assert_close(got, want)


@pytest.mark.parametrize("options", [dict(causal=True), dict(causal=False), dict(causal=True, window=(150, 0)),
                                     dict(causal=True, alibi_slopes=0.3, softcap=20.0)],
                         ids=["causal", "full", "window", "alibi-softcap"])
def test_gathered_prefill_tiles_equal_contiguous_keys_bitwise(isa, rng, options):
    """Prefill chunks over a paged cache, and packed sequences (rows of all
    heads side by side), have their key tiles gathered once for a group of
    query tiles: every query tile computes exactly what it computes on the
    same keys stored contiguously per head, the group's last (shorter,
    causal-bounded) tiles included; a few-row remainder runs alone."""
    h, g, d, bs = 8, 2, 32, 16
    lens = np.array([1000, 300, 77])  # keys; queries: the last n_q of each, 4 rows each per kv head:
    n_q = np.array([333, 290, 5])     # 20 tiles of 64 and one of 52; 18 and a few-row one of 8; one of 20
    cu_q = np.concatenate([[0], np.cumsum(n_q)])
    cu_k = np.concatenate([[0], np.cumsum(lens)])
    n_blocks = int(((lens + bs - 1) // bs).sum()) + 3
    kc, vc = paged_cache(rng, np.float32, n_blocks, bs, g, d, d)
    table = block_table(rng, lens, bs, n_blocks)
    q = randn(rng, (int(cu_q[-1]), h, d), np.float32)
    # one thread: groups as large as they get (they leave two items per thread)
    got = fastattn.attention_paged(q, kc, vc, table, lens, cu_seqlens_q=cu_q, num_threads=1, **options)
    kp, vp = packed_kv(kc, vc, table, lens, bs)
    packed = fastattn.attention_varlen(q, kp, vp, cu_q, cu_k, num_threads=1, **options)
    # sequence 1's few-row tile (on paths of 8 or more few rows) is not gathered: decoding tiles end at
    # page ends, so its rows are checked against the reference only
    for b in (0, 2):
        rows = slice(cu_q[b], cu_q[b + 1])
        np.testing.assert_array_equal(packed[rows], got[rows])
        qb = np.ascontiguousarray(q[rows].transpose(1, 0, 2))  # the sequence alone, keys contiguous per head
        kb, vb = (np.ascontiguousarray(x[cu_k[b]: cu_k[b + 1]].transpose(1, 0, 2)) for x in (kp, vp))
        want = fastattn.attention(qb, kb, vb, align="bottom-right", **options)
        np.testing.assert_array_equal(got[rows], want.transpose(1, 0, 2))
    want = ref.attention_paged(q, kc, vc, table, lens, cu_seqlens_q=cu_q, **options)
    assert_close(got, want)
    assert_close(packed, want)


@pytest.mark.parametrize("kind", [np.bool_, np.float32])
def test_gathered_tile_groups_read_each_tiles_mask(isa, rng, kind):
    """Keys whose rows lie further apart than their length (a (B, L, G, D)
    buffer viewed per head) are gathered per tile for a group of query
    tiles, each of which classifies and reads its own mask tiles: the
    result is that of contiguous keys, bit for bit."""
    b, h, g, lq, lk, d = 1, 4, 2, 300, 700, 16
    q = randn(rng, (b, h, lq, d), np.float32)
    kt, vt = randn(rng, (b, lk, g, d), np.float32), randn(rng, (b, lk, g, d), np.float32)
    k, v = kt.transpose(0, 2, 1, 3), vt.transpose(0, 2, 1, 3)
    visible = rng.random((h, lq, lk)) < 0.7
    visible[:, :, 64:256] = False  # hidden tiles
    visible[:, :130, 320:448] = True  # visible tiles for the group's first tiles only
    mask = visible if kind is np.bool_ else np.where(visible, 0.0, -np.inf).astype(np.float32)
    got = fastattn.attention(q, k, v, mask=mask, causal=True, num_threads=1)
    want = fastattn.attention(q, np.ascontiguousarray(k), np.ascontiguousarray(v), mask=mask, causal=True)
    np.testing.assert_array_equal(got, want)
    assert_close(got, ref.attention(q, k, v, mask=mask, causal=True))


def test_paged_reads_strided_caches_in_place(rng):
    """A cache that is a view (every other block, a head slice of a bigger
    buffer) is read through its strides, never copied."""
    big_k = randn(rng, (20, 16, 4, 32), np.float32)
    big_v = randn(rng, (20, 16, 4, 32), np.float32)
    kc, vc = big_k[::2, :, 1:3], big_v[::2, :, 1:3]
    lens = [100, 37]
    table = block_table(rng, lens, 16, 10)
    q = randn(rng, (2, 4, 32), np.float32)
    assert_close(fastattn.attention_paged(q, kc, vc, table, lens), ref.attention_paged(q, kc, vc, table, lens))


def test_cache_write_then_attend(dtype, rng):
    """Tokens written by cache_write (with -1 slots skipped) are read back by
    attention_paged as the contiguous keys they came from."""
    g, d, bs, n_blocks = 2, 8, 4, 12
    kc, vc = np.zeros((n_blocks, bs, g, d), dtype), np.zeros((n_blocks, bs, g, d), dtype)
    table = np.array([[5, 0, 9], [3, 11, 2]], dtype=np.int32)
    k, v = randn(rng, (2, 10, g, d), dtype), randn(rng, (2, 10, g, d), dtype)
    # write the first 7 tokens of each sequence in one call, with padding
    slots = [table[b, j // bs] * bs + j % bs for b in range(2) for j in range(7)] + [-1, -1]
    fastattn.cache_write(np.concatenate([k[0, :7], k[1, :7], k[0, :2]]),
                         np.concatenate([v[0, :7], v[1, :7], v[0, :2]]), kc, vc, slots)
    for b in range(2):
        got_k, got_v = contiguous_kv(kc, vc, table[b], 7, bs)
        np.testing.assert_array_equal(got_k, k[b, :7])
        np.testing.assert_array_equal(got_v, v[b, :7])
    assert np.count_nonzero(kc) == 2 * 7 * g * d  # nothing else was written
    q = randn(rng, (2, 4, d), dtype)
    out = fastattn.attention_paged(q, kc, vc, table, [7, 7])
    for b in range(2):
        want = ref.attention(q[b][:, None], np.swapaxes(k[b, :7], 0, 1), np.swapaxes(v[b, :7], 0, 1))[:, 0]
        assert_close(out[b], want)


def test_cache_write_rounds_to_a_16_bit_cache(rng):
    bf16 = np.dtype(pytest.importorskip("ml_dtypes").bfloat16)
    kc = np.zeros((2, 4, 1, 8), bf16)
    k = randn(rng, (3, 1, 8), np.float32)
    fastattn.cache_write(k, k, kc, kc.copy(), [0, 5, 6])
    np.testing.assert_array_equal(kc[1, 1:3], k[1:].astype(bf16))
    np.testing.assert_array_equal(kc[0, 0], k[0].astype(bf16))


# ---- 8-bit caches -----------------------------------------------------------------

ml_dtypes = pytest.importorskip("ml_dtypes")
KV8 = [np.dtype(np.int8), np.dtype(ml_dtypes.float8_e4m3fn), np.dtype(ml_dtypes.float8_e5m2)]


@pytest.mark.parametrize("kv", KV8, ids=lambda t: t.name)
@pytest.mark.parametrize("qdt", ["float32", "float16", "bfloat16", "float64"])
@pytest.mark.parametrize("dims", [(40, 24), (64, 32)], ids=lambda t: f"d{t[0]}-dv{t[1]}")
def test_8bit_cache_matches_reference_on_the_dequantized_cache(isa, rng, kv, qdt, dims):
    """Queries stay in their float type; the 8-bit keys and values are
    dequantised exactly (scale times an integer or an 8-bit float), so the
    result is within the query type's rounding of the float64 reference on
    the dequantised cache.  Decoding reads rows of whole vectors in place
    (converted in registers: D and Dv multiples of 8 on AVX2, of 16 on
    AVX-512) and others tile by tile (40 and 24 on AVX-512)."""
    qdt = np.dtype(ml_dtypes.bfloat16) if qdt == "bfloat16" else np.dtype(qdt)
    h, g, bs = 8, 2, 16
    d, dv = dims
    lens = np.array([2200, 33, 1, 90])
    n_q = np.array([1, 20, 1, 3])
    cu = np.concatenate([[0], np.cumsum(n_q)])
    n_blocks = int(sum((n + bs - 1) // bs for n in lens)) + 1
    _, _, kq, vq, ks, vs = quantized_cache(rng, kv, n_blocks, bs, g, d, dv)
    table = block_table(rng, lens, bs, n_blocks)
    q = randn(rng, (cu[-1], h, d), qdt)
    opts = dict(cu_seqlens_q=cu, k_scale=ks, v_scale=vs, sinks=sink_values(rng, h), window=(500, 0))
    out, lse = fastattn.attention_paged(q, kq, vq, table, lens, return_lse=True, **opts)
    assert out.dtype == qdt
    rout, rlse = ref.attention_paged(q, kq, vq, table, lens, return_lse=True, **opts)
    assert_close(out, rout)
    assert_close(lse, rlse, dtype=np.float64 if qdt == np.float64 else np.float32)


@pytest.mark.parametrize("kv", ["float32"] + KV8, ids=str)
@pytest.mark.parametrize("dims, bs", [((1, 1), 16), ((8, 1), 16), ((1, 8), 16), ((20, 20), 1), ((1, 1), 1)],
                         ids=lambda t: str(t))
def test_paged_rows_of_one_element_and_pages_of_one_row(isa, rng, kv, dims, bs):
    """D or Dv of 1 (a division by zero in the decode's segment sizing; an
    8-bit cache's rows taken for strided ones) and pages of one token whose
    stride is no multiple of 64 bytes (refused, although any contiguous
    cache is accepted): against the reference."""
    d, dv = dims
    h, g, lens = 4, 2, np.array([7, 1, 12])
    n_blocks = int(sum((n + bs - 1) // bs for n in lens)) + 1
    if kv == "float32":
        kq, vq = paged_cache(rng, np.float32, n_blocks, bs, g, d, dv)
        ks = vs = None
    else:
        _, _, kq, vq, ks, vs = quantized_cache(rng, kv, n_blocks, bs, g, d, dv)
    table = block_table(rng, lens, bs, n_blocks)
    for n_q in (np.array([1, 1, 1]), np.array([3, 1, 5])):  # decodes, then a mixed batch
        cu = np.concatenate([[0], np.cumsum(n_q)])
        q = randn(rng, (cu[-1], h, d), np.float32)
        opts = dict(cu_seqlens_q=cu, k_scale=ks, v_scale=vs)
        assert_close(fastattn.attention_paged(q, kq, vq, table, lens, **opts),
                     ref.attention_paged(q, kq, vq, table, lens, **opts))


@pytest.mark.parametrize("kv", KV8, ids=lambda t: t.name)
def test_8bit_cache_error_against_the_float_cache_is_bounded_by_its_step(rng, kv):
    """Against attention on the unquantised cache, the error of a row is at
    most what the quantisation steps allow: each key moves by at most half
    a step per element (int8: scale / 2; float8: half a unit in the last
    place, relative 2^-4 (e4m3) or 2^-3 (e5m2)), which moves a score by at
    most |q| . |dk| and the output by at most max|dv| + the weights' change."""
    h, g, d, bs = 4, 2, 32, 16
    lens = np.array([700, 300])
    n_blocks = int(sum((n + bs - 1) // bs for n in lens))
    kf, vf, kq, vq, ks, vs = quantized_cache(rng, kv, n_blocks, bs, g, d, d, tensor_scale=1 / 64)
    table = block_table(rng, lens, bs, n_blocks)
    q = randn(rng, (2, h, d), np.float32)
    got = fastattn.attention_paged(q, kq, vq, table, lens, k_scale=ks, v_scale=vs)
    want = ref.attention_paged(q, kf, vf, table, lens)
    dk = np.abs(ref.dequantize(kq, ks) - kf).max()
    dv = np.abs(ref.dequantize(vq, vs) - vf).max()
    rel = {np.dtype(np.int8): 0.0}.get(kv, 2.0**-4 if kv == KV8[1] else 2.0**-3)
    assert dk <= (np.abs(ks).max() / 2 if kv == np.int8 else rel * np.abs(kf).max() + 2.0**-9) + 1e-7
    # a score moves by at most eps = scale |q|_1 dk, plus, against an int8 cache (whose queries are
    # quantised), half the query's step times |k|_1; softmax weights by a factor within exp(+-2 eps)
    eps = np.abs(q).sum(axis=-1).max() / np.sqrt(d) * dk
    if kv == np.int8:
        step = np.abs(q / np.sqrt(d)).max(axis=-1) / 127
        eps += step.max() / 2 * np.abs(ref.dequantize(kq, ks)).sum(axis=-1).max()
    vmax = np.abs(vf).max()
    bound = dv + 2 * vmax * (np.exp(2 * eps) - 1)
    err = np.abs(got - want).max()
    assert err <= bound, (err, bound)
    assert err > 0  # the cache was quantised


@pytest.mark.parametrize("d", [64, 40], ids=["d64", "d40"])
def test_int8_cache_queries_are_quantised_per_row(isa, rng, d):
    """Against an int8 key cache each query row (times the scale) is
    quantised to int8 with its own step, max|x| / 127, on every path and
    item shape: decoding (integer dot products where the path has them: D a
    multiple of 32 on AVX2, of 64 with AVX512-VNNI) and prefill chunks
    alike.  The result is the float64 reference on the quantised queries
    within float32 rounding, measurably not the one on float queries (within
    the bound the step allows), and a row's result does not depend on
    whether it was decoded alone or in a chunk."""
    h, g, bs = 8, 2, 16
    lens = np.array([300, 130])
    n_q = np.array([1, 20])
    cu = np.concatenate([[0], np.cumsum(n_q)])
    n_blocks = int(sum((n + bs - 1) // bs for n in lens)) + 1
    _, _, kq, vq, ks, vs = quantized_cache(rng, np.int8, n_blocks, bs, g, d, 24)
    table = block_table(rng, lens, bs, n_blocks)
    q = randn(rng, (cu[-1], h, d), np.float32) * 3
    out = fastattn.attention_paged(q, kq, vq, table, lens, cu_seqlens_q=cu, k_scale=ks, v_scale=vs)
    want = ref.attention_paged(q, kq, vq, table, lens, cu_seqlens_q=cu, k_scale=ks, v_scale=vs)
    assert_close(out, want)
    k64, v64 = ref.dequantize(kq, ks), ref.dequantize(vq, vs)  # float64 caches: queries stay float
    unquantised = ref.attention_paged(q, k64, v64, table, lens, cu_seqlens_q=cu)
    err = np.abs(out - unquantised).max()
    step = np.abs(q / np.sqrt(d)).max(axis=-1) / 127
    eps = step.max() / 2 * np.abs(k64).sum(axis=-1).max()
    assert 1e-4 < err <= 2 * np.abs(v64).max() * (np.exp(2 * eps) - 1)
    # the chunk's last row, decoded alone
    alone = fastattn.attention_paged(q[-1:], kq, vq, table[1:], lens[1:], k_scale=ks, v_scale=vs)
    assert_close(alone[0], out[-1], dtype=np.float32)


@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 6, 8])
def test_int8_decode_by_rows_per_head(isa, rng, rows):
    """The integer K.Q kernels of each row count a decoding item has (query
    heads per key head; with AVX512-VNNI, three to eight rows run four to a
    vector, a row per 128-bit lane, the last group partly empty for 3, 5
    and 6): against the float64 reference on the quantised queries, over
    pages of 16 and 5 keys (a tile's segments) and a tail of keys that is
    not a multiple of four."""
    g, d = 2, 128
    h = g * rows
    for bs, n in ((16, 403), (5, 130)):
        n_blocks = (n + bs - 1) // bs + 2
        _, _, kq, vq, ks, vs = quantized_cache(rng, np.int8, n_blocks, bs, g, d, 32)
        table = block_table(rng, [n], bs, n_blocks)
        q = randn(rng, (1, h, d), np.float32) * 3
        out = fastattn.attention_paged(q, kq, vq, table, [n], k_scale=ks, v_scale=vs)
        want = ref.attention_paged(q, kq, vq, table, [n], k_scale=ks, v_scale=vs)
        assert_close(out, want)


def test_int8_queries_reference():
    """fastattn.reference.int8_queries: codes in -127..127 reaching 127 on
    each nonzero row, step max / 127, zeros kept, NaN rows NaN, ties to even."""
    q = np.array([[0.5, -1.0, 0.25, 0.0], [0, 0, 0, 0], [1.0, np.nan, 0, 0], [127.0, 0.5, 1.5, -2.5]], np.float32)
    x = ref.int8_queries(q, scale=2.0)
    step = np.abs(2 * q[0]).max() / 127
    codes = x[0] / np.float32(step)
    np.testing.assert_allclose(codes, np.rint(codes), atol=1e-9)
    assert np.abs(codes).max() == 127 and (np.abs(codes) <= 127).all()
    assert (x[1] == 0).all() and np.isnan(x[2]).all()
    np.testing.assert_array_equal(ref.int8_queries(q[3:], scale=1.0) / 1.0, [[127, 0, 2, -2]])


def test_int8_cache_write_quantizes_per_token_and_head(rng):
    k = randn(rng, (5, 3, 16), np.float32)
    k[2, 1] = 0  # an all-zero row: scale 0, codes 0
    kc, vc = np.zeros((2, 4, 3, 16), np.int8), np.zeros((2, 4, 3, 16), np.int8)
    ks, vs = np.full((2, 4, 3), -1, np.float32), np.full((2, 4, 3), -1, np.float32)
    fastattn.cache_write(k, k, kc, vc, [0, 1, 2, 5, -1], k_scale=ks, v_scale=vs)
    amax = np.abs(k[:4]).max(axis=-1)
    np.testing.assert_allclose(ks.reshape(8, 3)[[0, 1, 2, 5]], amax / 127, rtol=1e-6)
    codes = kc.reshape(8, 3, 16)[[0, 1, 2, 5]]
    assert np.abs(codes).max() == 127
    assert not codes[2, 1].any()
    np.testing.assert_array_equal(codes, np.rint(k[:4] / np.maximum(amax, 1e-30)[..., None] * 127))
    assert (ks.reshape(8, 3)[[3, 4, 6, 7]] == -1).all()  # slots not written keep their scales


def test_float8_cache_write_clips_to_the_largest_finite(rng):
    kc, vc = np.zeros((1, 4, 1, 2), KV8[1]), np.zeros((1, 4, 1, 2), KV8[1])
    k = np.array([[[1e6, -1e6]], [[0.3, -0.3]]], np.float32)
    fastattn.cache_write(k, k, kc, vc, [0, 1], k_scale=2.0, v_scale=2.0)
    np.testing.assert_array_equal(kc[0, 0, 0].astype(np.float32), [448, -448])
    np.testing.assert_array_equal(kc[0, 1, 0], np.array([0.15, -0.15], np.float32).astype(KV8[1]))


def test_paged_generation_example_matches_contiguous_attention():
    """examples/paged_generation.py: the serving loop on a paged float32 cache
    generates the tokens of the same loop on contiguous per-sequence K/V,
    reusing the blocks of finished requests; bfloat16 and int8 caches run."""
    import os
    import runpy

    ex = runpy.run_path(os.path.join(os.path.dirname(__file__), "..", "examples", "paged_generation.py"))
    model = ex["TinyModel"]()
    cache = ex["PagedCache"]("float32")
    paged, n = ex["run"](model, 40, ex["paged_attention"](cache), 2)
    contiguous, m = ex["run"](model, 40, ex["contiguous_attention"](), 2)
    assert n == m and sum(map(len, paged)) > 50
    assert paged == contiguous
    assert cache.handed_out > ex["NUM_BLOCKS"]  # blocks of finished requests were handed out again
    for kind in ("bfloat16", "int8"):
        c = ex["PagedCache"](ex["BF16"] if kind == "bfloat16" else kind)
        assert sum(map(len, ex["run"](model, 12, ex["paged_attention"](c), 2)[0])) > 0


@pytest.mark.parametrize("kv", ["float16", "bfloat16"])
@pytest.mark.parametrize("d", [40, 64])
def test_float32_queries_over_a_16_bit_cache(isa, rng, kv, d):
    """float32 queries and results over a float16 or bfloat16 cache: within
    float32 rounding of the reference on the cache's values (rows read in
    place where they fill whole vectors, as for 8-bit caches)."""
    kv = np.dtype(ml_dtypes.bfloat16) if kv == "bfloat16" else np.dtype(kv)
    h, g, bs = 8, 2, 16
    lens = np.array([2100, 50, 1])
    n_q = np.array([1, 30, 1])
    cu = np.concatenate([[0], np.cumsum(n_q)])
    n_blocks = int(sum((n + bs - 1) // bs for n in lens))
    kc, vc = (x.astype(kv) for x in paged_cache(rng, np.float32, n_blocks, bs, g, d, d))
    table = block_table(rng, lens, bs, n_blocks)
    q = randn(rng, (cu[-1], h, d), np.float32)
    out, lse = fastattn.attention_paged(q, kc, vc, table, lens, cu_seqlens_q=cu, return_lse=True)
    assert out.dtype == np.float32
    rout, rlse = ref.attention_paged(q, kc, vc, table, lens, cu_seqlens_q=cu, return_lse=True)
    assert_close(out, rout)
    assert_close(lse, rlse)
