"""Plain numpy float64 reference implementations, written for clarity.

Each function mirrors the fastattn function of the same name (same
arguments and conventions) and returns float64.  They materialise the full
score matrix, so use them on small problems.
"""
import math

import numpy as np


def _f64(x):
    return np.asarray(x, dtype=np.float64)


def _repeat_kv_heads(q, kv):
    """Grouped-query attention: repeat kv's head axis to q's head count."""
    if q.ndim >= 3 and kv.ndim >= 3:
        h, g = q.shape[-3], kv.shape[-3]
        if g not in (1, h) and h % g == 0:
            return np.repeat(kv, h // g, axis=-3)
    return kv


def positions(lq, lk, align="bottom-right"):
    """Key position i' of each query row: i + Lk - Lq (bottom-right), i
    (top-left), or i + align for an int align."""
    if isinstance(align, str):
        return np.arange(lq)[:, None] + (lk - lq if align == "bottom-right" else 0)
    return np.arange(lq)[:, None] + int(align)


def visible(lq, lk, causal=False, window=None, align="bottom-right"):
    """Boolean (Lq, Lk) matrix: may query i see key j (causal/window only)?"""
    pos = positions(lq, lk, align)
    j = np.arange(lk)[None, :]
    ok = np.ones((lq, lk), dtype=bool)
    if causal:
        ok &= j <= pos
    if window is not None:
        left, right = (-1 if w is None else w for w in window)
        if left >= 0:
            ok &= j >= pos - left
        if right >= 0:
            ok &= j <= pos + right
    return ok


def scores(q, k, *, scale=None, causal=False, mask=None, window=None, softcap=None,
           alibi_slopes=None, align="bottom-right"):
    """scale * q k^T, soft-capped, ALiBi-biased and masked (-inf where masked)."""
    q, k = _f64(q), _f64(k)
    k = _repeat_kv_heads(q, k)
    d = q.shape[-1]
    if scale is None:
        scale = 1.0 / math.sqrt(d) if d > 0 else 1.0
    s = scale * (q @ np.swapaxes(k, -1, -2))
    lq, lk = s.shape[-2:]
    if softcap:
        s = softcap * np.tanh(s / softcap)
    if alibi_slopes is not None:
        pos = positions(lq, lk, align)
        dist = np.abs(pos - np.arange(lk)[None, :]).astype(np.float64)
        slopes = _f64(alibi_slopes)[..., None, None]
        s = s - slopes * dist
    ok = visible(lq, lk, causal, window, align)
    if mask is not None:
        mask = np.asarray(mask)
        if mask.dtype == bool:
            ok = ok & mask
        else:
            s = s + mask.astype(np.float64)
    s, ok = np.broadcast_arrays(s, ok)
    return np.where(ok, s, -np.inf)


def softmax(s):
    """Row softmax of scores with -inf entries; a row of only -inf gives zeros."""
    m = np.max(s, axis=-1, keepdims=True, initial=-np.inf)
    m = np.where(np.isneginf(m), 0.0, m)
    p = np.exp(s - m)
    total = np.sum(p, axis=-1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total == 0, 0.0, p / total)


def logsumexp(s):
    """Natural-log log-sum-exp of each row (-inf for a row of only -inf)."""
    m = np.max(s, axis=-1, keepdims=True, initial=-np.inf)
    m = np.where(np.isneginf(m), 0.0, m)
    with np.errstate(divide="ignore"):
        return (np.log(np.sum(np.exp(s - m), axis=-1, keepdims=True)) + m)[..., 0]


def _sink_weights(s, sinks):
    """Softmax weights, log-sum-exp and the sinks' own weights (None
    without sinks) of scores s whose rows' denominators also count
    exp(sink) (a key with no value; one sink per query head, broadcast like
    ALiBi slopes)."""
    if sinks is None:
        return softmax(s), logsumexp(s), None
    col = np.broadcast_to(_f64(sinks)[..., None, None], s.shape[:-1] + (1,))
    ext = np.concatenate([s, col], axis=-1)
    w = softmax(ext)
    return w[..., :-1], logsumexp(ext), w[..., -1]


def _mix64(x):
    """SplitMix64's step on uint64 (wrapping) arrays."""
    x = x + np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def _fmix32(h):
    """MurmurHash3's 32-bit finaliser on uint32 (wrapping) arrays."""
    h = h ^ (h >> np.uint32(16))
    h = h * np.uint32(0x85EBCA6B)
    h = h ^ (h >> np.uint32(13))
    h = h * np.uint32(0xC2B2AE35)
    return h ^ (h >> np.uint32(16))


def dropout_keep(seed, p, streams, rows, keys):
    """The dropout mask: True where the weight of (stream, query row, key)
    is kept, for coordinates that broadcast together (int arrays).

    fastattn's dropout (fastattn.h) with seed and probability p: row word
    ``r = mix64(seed ^ mix64(stream ^ mix64(row)))`` (SplitMix64's step,
    modulo 2**64), ``a, b`` its low and high 32 bits, and for key c (modulo
    2**32) the hash of its pair ``t = fmix32(((c >> 1) ^ b) * 0x9E3779B1 +
    a)`` (MurmurHash3's finaliser, modulo 2**32), whose low 16 bits decide
    even keys and high 16 bits odd ones: kept iff ``(t >> 16 * (c & 1)) &
    0xFFFF >= round(p * 2**16)``.  In
    :func:`fastattn.attention`, the stream of a weight is the flat (C-order)
    index of its output row's leading dimensions, its row and key their
    indices; in :func:`fastattn.attention_varlen`, the stream is the query
    head, the row and key the packed rows."""
    with np.errstate(over="ignore"):
        u64 = [np.asarray(x, dtype=np.int64).astype(np.uint64) for x in (streams, rows)]
        r = _mix64(np.uint64(seed) ^ _mix64(u64[0] ^ _mix64(u64[1])))
        a = (r & np.uint64(0xFFFFFFFF)).astype(np.uint32)
        b = (r >> np.uint64(32)).astype(np.uint32)
        c = (np.asarray(keys, dtype=np.int64) & 0xFFFFFFFF).astype(np.uint32)
        t = _fmix32(((c >> np.uint32(1)) ^ b) * np.uint32(0x9E3779B1) + a)
        bits = (t >> (np.uint32(16) * (c & np.uint32(1)))) & np.uint32(0xFFFF)
    return bits >= np.uint32(math.floor(p * 2.0**16 + 0.5))


def _dropout_factors(lead, lq, lk, dropout_p, dropout_seed, at):
    """The factor of each weight under dropout, broadcast over `lead`: 1 /
    (1 - p) where kept, 0 where dropped (1 everywhere without dropout).
    Streams are the flat indices of `lead`; rows and keys count from at =
    (row of q's row 0, key of k's row 0)."""
    if not dropout_p:
        return np.ones((1, 1))
    streams = np.arange(math.prod(lead), dtype=np.int64).reshape(tuple(lead) + (1, 1))
    keep = dropout_keep(dropout_seed, dropout_p, streams, at[0] + np.arange(lq)[:, None], at[1] + np.arange(lk))
    return np.where(keep, 1.0 / (1.0 - dropout_p), 0.0)


def weighted_sum(w, v):
    """out[..., i, :] = sum_j w[..., i, j] v[..., j, :]."""
    return _f64(w) @ _f64(v)


def attention(q, k, v, *, scale=None, causal=False, mask=None, weights="softmax", window=None,
              softcap=None, alibi_slopes=None, sinks=None, return_lse=False, align="bottom-right", dropout_p=0.0,
              dropout_seed=None, dropout_at=(0, 0)):
    """Attention in float64: softmax (or plain dot) weights of the scores, times v.
    Sinks add exp(sink) to each row's softmax denominator.  With dropout,
    the weights are multiplied by _dropout_factors (dropout_keep's mask;
    dropout_at: the mask's row and key of q's and k's row 0) before v."""
    if weights == "dot" and scale is None:
        scale = 1.0
    s = scores(q, k, scale=scale, causal=causal, mask=mask, window=window, softcap=softcap,
               alibi_slopes=alibi_slopes, align=align)
    v = _repeat_kv_heads(_f64(q), _f64(v))
    if weights == "dot":
        w, lse = np.where(np.isneginf(s), 0.0, s), None
    else:
        w, lse, _ = _sink_weights(s, sinks)
    if dropout_p:
        lead = np.broadcast_shapes(w.shape[:-2], v.shape[:-2])
        w = w * _dropout_factors(lead, *w.shape[-2:], dropout_p, dropout_seed, dropout_at)
    out = w @ v
    if return_lse:
        return out, lse
    return out


def _sum_to_shape(g, shape):
    """Sum a gradient over the axes numpy broadcast to reach g's shape, and
    over grouped query heads that shared one key/value head, so that it has
    `shape` (the shape of the operand it belongs to)."""
    shape = tuple(shape)
    if len(shape) >= 3 and g.ndim >= 3 and g.shape[-3] != shape[-3] and shape[-3] not in (0, 1):
        h, gk = g.shape[-3], shape[-3]
        g = g.reshape(g.shape[:-3] + (gk, h // gk) + g.shape[-2:]).sum(axis=-3)
    while g.ndim > len(shape):
        g = g.sum(axis=0)
    for ax, n in enumerate(shape):
        if n == 1 and g.shape[ax] != 1:
            g = g.sum(axis=ax, keepdims=True)
    return g


def attention_backward(dout, q, k, v, *, scale=None, causal=False, mask=None, weights="softmax",
                       window=None, softcap=None, alibi_slopes=None, sinks=None, align="bottom-right",
                       return_dsinks=False, return_dmask=False, dropout_p=0.0, dropout_seed=None, dropout_at=(0, 0)):
    """Gradients (dq, dk, dv) of sum(dout * attention(q, k, v, ...)), in float64.

    Written out from the forward's formulas, without the saved lse: with
    raw = scale q k^T, z = softcap tanh(raw / softcap) (or raw), the scores
    s = z - ALiBi bias + float mask (-inf where hidden), weights P = softmax(s)
    (or s itself on visible keys for weights="dot") and out = P v::

      dv = P^T dout;  dP = dout v^T;
      dS = P (dP - rowsum(dout * out)) for softmax, dP on visible keys for dot;
      dRaw = dS (1 - (z / softcap)^2) with a soft-cap, else dS;
      dq = scale dRaw k;  dk = scale dRaw^T q.

    Sinks only enlarge the softmax's denominators (P = softmax over the
    keys and the sink, the sink's column dropped); the formulas stand.  The
    sink is a key whose value is zero: its column of dP is 0, so its column
    of dS is -P_sink rowsum(dout * out), and a sink's gradient (with
    return_dsinks, a fourth result of the sinks' shape) is that column
    summed over the rows that share the sink.  Slopes and bool masks get
    no gradient.  Gradients broadcast over shared operands (grouped heads,
    leading dimensions of 1) are summed, so each has the shape of its
    operand.

    Dropout multiplies each weight by a fixed factor Z (0, or 1 / (1 - p)
    where kept; see attention): out = (P Z) v, so dv = (P Z)^T dout and the
    weights' own gradient is dP = (dout v^T) Z, the formulas above then
    holding with that dP (rowsum(dout * out) still sums P dP).

    A float mask is added to the scores (after the soft-cap): with
    return_dmask, its gradient is dS (before the soft-cap's factor) summed
    to the mask's shape, the last result."""
    if return_dsinks and (sinks is None or weights == "dot"):
        raise ValueError("return_dsinks needs sinks (and softmax weights)")
    q64, k64, v64, do = _f64(q), _f64(k), _f64(v), _f64(dout)
    if weights == "dot" and scale is None:
        scale = 1.0
    d = q64.shape[-1]
    if scale is None:
        scale = 1.0 / math.sqrt(d) if d > 0 else 1.0
    kr, vr = _repeat_kv_heads(q64, k64), _repeat_kv_heads(q64, v64)
    raw = scale * (q64 @ np.swapaxes(kr, -1, -2))
    s = scores(q64, k64, scale=scale, causal=causal, mask=mask, window=window, softcap=softcap,
               alibi_slopes=alibi_slopes, align=align)
    hidden = np.isneginf(s)
    p, _, p_sink = (np.where(hidden, 0.0, s), None, None) if weights == "dot" else _sink_weights(s, sinks)
    lead = np.broadcast_shapes(p.shape[:-2], vr.shape[:-2], do.shape[:-2])
    z = _dropout_factors(lead, *p.shape[-2:], dropout_p, dropout_seed, dropout_at)
    out = (p * z) @ vr
    dout_b = np.broadcast_to(do, out.shape)
    dv = np.swapaxes(p * z, -1, -2) @ dout_b
    dp = (dout_b @ np.swapaxes(vr, -1, -2)) * z
    dsinks = None
    if weights == "dot":
        ds = np.where(hidden, 0.0, dp)
    else:
        delta = np.sum(dout_b * out, axis=-1, keepdims=True)
        ds = p * (dp - delta)
        if return_dsinks:
            dsinks = _sum_to_shape(-(p_sink * delta[..., 0]).sum(axis=-1), np.shape(sinks))
    dmask = _sum_to_shape(ds, np.shape(mask)) if return_dmask else None
    if softcap:
        z = softcap * np.tanh(np.broadcast_to(raw, ds.shape) / softcap)
        ds = ds * (1.0 - (z / softcap) ** 2)
    dq = scale * (ds @ kr)
    dk = scale * (np.swapaxes(ds, -1, -2) @ q64)
    grads = _sum_to_shape(dq, q64.shape), _sum_to_shape(dk, k64.shape), _sum_to_shape(dv, v64.shape)
    return grads + ((dsinks,) if return_dsinks else ()) + ((dmask,) if return_dmask else ())


def attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, *, return_lse=False, alibi_slopes=None, sinks=None,
                     dropout_p=0.0, dropout_seed=None, **options):
    """Packed variable-length attention, one sequence at a time.

    q (total_q, H, D), k and v (total_k, G, D); returns (total_q, H, Dv) and,
    with return_lse, the log-sum-exp of shape (H, total_q)."""
    q, k, v = _f64(q), _f64(k), _f64(v)
    h, dv = q.shape[1], v.shape[2]
    out = np.zeros((q.shape[0], h, dv))
    lse = np.full((h, q.shape[0]), -np.inf)
    for b in range(len(cu_seqlens_q) - 1):
        qs = slice(cu_seqlens_q[b], cu_seqlens_q[b + 1])
        ks = slice(cu_seqlens_k[b], cu_seqlens_k[b + 1])
        qb = np.swapaxes(q[qs], 0, 1)  # (H, Lq, D)
        kb = np.swapaxes(k[ks], 0, 1)
        vb = np.swapaxes(v[ks], 0, 1)
        o, l = attention(qb, kb, vb, return_lse=True, alibi_slopes=alibi_slopes, sinks=sinks, dropout_p=dropout_p,
                         dropout_seed=dropout_seed, dropout_at=(cu_seqlens_q[b], cu_seqlens_k[b]), **options)
        out[qs] = np.swapaxes(o, 0, 1)
        lse[:, qs] = l
    return (out, lse) if return_lse else out


def dequantize(cache, scale):
    """An 8-bit cache's values in float64: int8 codes times their per-token
    and head scales (num_blocks, block_size, G), float8 times the per-tensor
    scale; a float cache as it is (scale None)."""
    cache = _f64(cache)
    if scale is None:
        return cache
    scale = np.asarray(scale, dtype=np.float32).astype(np.float64)  # scales are stored as float32
    return cache * (scale[..., None] if scale.ndim == 3 else scale.reshape(()))


def int8_queries(q, scale=None):
    """The queries as fastattn computes them against an int8 key cache:
    each row of ``scale * q`` (in q's compute type: float32 for float32 and
    16-bit q, float64 for float64) quantised to int8 with its own step,
    ``step = max|row| / 127`` and ``code = round(row * (127 / max))`` to
    nearest even (in float64), returned as ``step * code`` in float64, so
    that scores are ``int8_queries(q, scale) . k`` (scale included).  A row
    of zeros stays zero; a row with a NaN or an infinity becomes NaN."""
    q = np.asarray(q)
    d = q.shape[-1]
    scale = (1.0 / math.sqrt(d) if d > 0 else 1.0) if scale is None else float(scale)
    ct = np.float64 if q.dtype == np.float64 else np.float32
    x = (ct(scale) * q.astype(ct)).astype(np.float64)
    amax = np.abs(x).max(axis=-1, keepdims=True) if d else np.zeros(q.shape[:-1] + (1,))
    finite = np.isfinite(amax)
    step = np.where(finite, (amax / 127.0).astype(ct), np.nan).astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        inv = np.where(finite & (amax > 0), 127.0 / np.where(amax > 0, amax, 1.0), 0.0)
        codes = np.rint(np.where(finite, x, 0.0) * inv)
    return step * codes


def attention_paged(q, k_cache, v_cache, block_table, seq_lens, *, cu_seqlens_q=None, causal=True,
                    return_lse=False, alibi_slopes=None, sinks=None, k_scale=None, v_scale=None, **options):
    """Attention over a paged KV cache, one sequence at a time: sequence b's
    keys are rows 0 .. seq_lens[b] - 1 of the pages block_table[b] (row j in
    page block_table[b, j // block_size], slot j % block_size), gathered
    into contiguous arrays; its queries are its last tokens (bottom-right).
    q (total_q, H, D) with cu_seqlens_q, or (B, H, D): one query per
    sequence.  8-bit caches are dequantised first (dequantize); against an
    int8 key cache the queries are quantised as fastattn does
    (int8_queries)."""
    if np.asarray(k_cache).dtype == np.int8:
        q = int8_queries(q, options.pop("scale", None))
        options["scale"] = 1.0
    q = _f64(q)
    k_cache, v_cache = dequantize(k_cache, k_scale), dequantize(v_cache, v_scale)
    bs = k_cache.shape[1]
    cu = np.arange(q.shape[0] + 1) if cu_seqlens_q is None else np.asarray(cu_seqlens_q)
    out = np.zeros(q.shape[:2] + (v_cache.shape[-1],))
    lse = np.full((q.shape[1], q.shape[0]), -np.inf)
    for b, n in enumerate(np.asarray(seq_lens)):
        j = np.arange(n)
        pages = np.asarray(block_table)[b, j // bs]
        kb, vb = k_cache[pages, j % bs], v_cache[pages, j % bs]  # (n, G, D)
        qs = slice(cu[b], cu[b + 1])
        o, l = attention(np.swapaxes(q[qs], 0, 1), np.swapaxes(kb, 0, 1), np.swapaxes(vb, 0, 1), causal=causal,
                         return_lse=True, alibi_slopes=alibi_slopes, sinks=sinks, **options)
        out[qs] = np.swapaxes(o, 0, 1)
        lse[:, qs] = l
    return (out, lse) if return_lse else out


def attention_varlen_backward(dout, q, k, v, cu_seqlens_q, cu_seqlens_k, *, alibi_slopes=None, sinks=None,
                              return_dsinks=False, dropout_p=0.0, dropout_seed=None, **options):
    """Gradients of attention_varlen, one sequence at a time (attention_backward)."""
    dout, q, k, v = _f64(dout), _f64(q), _f64(k), _f64(v)
    dq, dk, dv = np.zeros_like(q), np.zeros_like(k), np.zeros_like(v)
    dsinks = np.zeros(np.shape(sinks)) if return_dsinks else None
    for b in range(len(cu_seqlens_q) - 1):
        qs = slice(cu_seqlens_q[b], cu_seqlens_q[b + 1])
        ks = slice(cu_seqlens_k[b], cu_seqlens_k[b + 1])
        grads = attention_backward(*(np.swapaxes(a, 0, 1) for a in (dout[qs], q[qs], k[ks], v[ks])),
                                   alibi_slopes=alibi_slopes, sinks=sinks, return_dsinks=return_dsinks,
                                   dropout_p=dropout_p, dropout_seed=dropout_seed,
                                   dropout_at=(cu_seqlens_q[b], cu_seqlens_k[b]), **options)
        for full, rows, grad in zip((dq, dk, dv), (qs, ks, ks), grads):
            full[rows] = np.swapaxes(grad, 0, 1)
        if return_dsinks:
            dsinks = dsinks + grads[3]
    return (dq, dk, dv, dsinks) if return_dsinks else (dq, dk, dv)


def merge(outputs, lses):
    """Attention over the union of disjoint key sets from per-set results."""
    lse = np.stack([_f64(s) for s in lses])
    m = np.max(lse, axis=0)
    m_safe = np.where(np.isneginf(m), 0.0, m)
    w = np.exp(lse - m_safe)
    total = w.sum(axis=0)
    out = sum(wi[..., None] * _f64(o) for wi, o in zip(w, outputs))
    with np.errstate(divide="ignore", invalid="ignore"):
        out = np.where(total[..., None] > 0, out / total[..., None], 0.0)
        merged = np.where(total > 0, m_safe + np.log(total), -np.inf)
    return out, merged


def elu_plus_one(x):
    x = _f64(x)
    return np.where(x > 0, x + 1, np.exp(np.minimum(x, 0)))


def linear_attention(q, k, v, *, causal=False, feature_map=None, normalize=False, eps=1e-6):
    """Linear attention computed quadratically: sum_j <phi(q_i), phi(k_j)> v_j,
    optionally divided by sum_j <phi(q_i), phi(k_j)> + eps, over visible keys."""
    phi = {None: _f64, "elu+1": elu_plus_one}.get(feature_map, feature_map)
    q, k, v = _f64(phi(_f64(q))), _f64(phi(_f64(k))), _f64(v)
    k = _repeat_kv_heads(q, k)
    v = _repeat_kv_heads(q, v)
    s = q @ np.swapaxes(k, -1, -2)
    lq, lk = s.shape[-2:]
    s = np.where(visible(lq, lk, causal), s, 0.0)
    out = s @ v
    if normalize:
        out = out / (s.sum(axis=-1, keepdims=True) + eps)
    return out
