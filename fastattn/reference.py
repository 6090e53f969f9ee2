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


def visible(lq, lk, causal=False, window=None):
    """Boolean (Lq, Lk) matrix: may query i see key j (causal/window only)?

    Query i sits at key position i' = i + Lk - Lq (bottom-right alignment).
    """
    pos = np.arange(lq)[:, None] + (lk - lq)
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
           alibi_slopes=None):
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
        pos = np.arange(lq)[:, None] + (lk - lq)
        dist = np.abs(pos - np.arange(lk)[None, :]).astype(np.float64)
        slopes = _f64(alibi_slopes)[..., None, None]
        s = s - slopes * dist
    ok = visible(lq, lk, causal, window)
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


def weighted_sum(w, v):
    """out[..., i, :] = sum_j w[..., i, j] v[..., j, :]."""
    return _f64(w) @ _f64(v)


def attention(q, k, v, *, scale=None, causal=False, mask=None, weights="softmax", window=None,
              softcap=None, alibi_slopes=None, return_lse=False):
    """Attention in float64: softmax (or plain dot) weights of the scores, times v."""
    if weights == "dot" and scale is None:
        scale = 1.0
    s = scores(q, k, scale=scale, causal=causal, mask=mask, window=window, softcap=softcap,
               alibi_slopes=alibi_slopes)
    v = _repeat_kv_heads(_f64(q), _f64(v))
    if weights == "dot":
        w = np.where(np.isneginf(s), 0.0, s)
    else:
        w = softmax(s)
    out = w @ v
    if return_lse:
        return out, logsumexp(s)
    return out
