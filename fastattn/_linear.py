"""Linear attention: the plain dot-product weighting computed as Q (K^T V).

``R(i) = sum_j <Q(i), K(j)> V(j) = Q(i) (K^T V)``, so computed right to left
it costs O(L D Dv) instead of O(L^2 D).  Every product here runs on
fastattn's own kernels (weighted_sum for the matrix products, the fused
kernel for the small causal blocks); numpy only adds prefix sums of the
D x Dv states.
"""
import numpy as np

from fastattn import _api, _config
from fastattn import _validate as _v

# Rows per block of the causal (chunked) form: within a block the masked
# product runs on the fused kernel, across blocks a running K^T V state.
CHUNK = 256


def _elu_plus_one(x):
    """elu(x) + 1: x + 1 for x > 0, exp(x) otherwise (positive features)."""
    return np.where(x > 0, x + 1, np.exp(np.minimum(x, 0))).astype(x.dtype, copy=False)


FEATURE_MAPS = {"elu+1": _elu_plus_one}


def _feature(x, feature_map, name):
    if feature_map is None:
        return x
    if isinstance(feature_map, str):
        if feature_map not in FEATURE_MAPS:
            raise ValueError(f"feature_map must be one of {sorted(FEATURE_MAPS)} or a callable, "
                             f"got {feature_map!r}")
        return FEATURE_MAPS[feature_map](x)
    if not callable(feature_map):
        raise TypeError(f"feature_map must be a str, a callable or None, got {type(feature_map).__name__}")
    y = _v.as_array(feature_map(x), f"feature_map({name})")
    if y.ndim != x.ndim or y.shape[:-1] != x.shape[:-1]:
        raise ValueError(f"feature_map({name}) must keep every dimension but the last: "
                         f"{x.shape} became {y.shape}")
    return y


def _group_heads(q, k, v):
    """Grouped-query heads: view q (..., H, L, D) as (..., G, H/G, L, D) and
    k, v as (..., G, 1, L, D), so broadcasting pairs each query head with
    its key/value head.  Returns the views and a function restoring q's shape."""
    if q.ndim < 3 or k.ndim < 3 or v.ndim < 3:
        return q, k, v, lambda out: out
    h, g = q.shape[-3], k.shape[-3]
    if g in (1, h) or h == 1:
        return q, k, v, lambda out: out
    if v.shape[-3] != g:
        raise ValueError("k and v must have the same number of heads")
    _v.kv_group(h, g, [("q", q.shape), ("k", k.shape), ("v", v.shape)])
    qg = q.reshape(q.shape[:-3] + (g, h // g) + q.shape[-2:])
    kg, vg = k[..., None, :, :], v[..., None, :, :]
    return qg, kg, vg, lambda out: out.reshape(out.shape[:-4] + (h,) + out.shape[-2:])


def linear_attention(q, k, v, *, causal=False, feature_map=None, normalize=False, eps=1e-6,
                     num_threads=None):
    """Linear attention, ``R(i) = sum_j <phi(Q(i)), phi(K(j))> V(j)`` in O(L D Dv).

    Without options this is ``Q (K^T V)``, equal to
    ``attention(q, k, v, weights="dot")`` up to rounding.

    Parameters
    ----------
    q : array_like, shape (..., Lq, D)
    k : array_like, shape (..., Lk, D)
    v : array_like, shape (..., Lk, Dv)
        float32 or float64; leading dimensions broadcast, and grouped-query
        heads (H a multiple of G) pair as in :func:`fastattn.attention`.
    causal : bool
        Query i sums over keys ``j <= i + Lk - Lq`` (bottom-right aligned),
        computed in blocks: a running ``phi(K)^T V`` state across blocks and a
        small masked product within each.
    feature_map : None, "elu+1" or callable
        phi, applied to q and k (a callable gets and returns arrays; it may
        change the last dimension).
    normalize : bool
        Divide each row by ``phi(Q(i)) . sum_j phi(K(j)) + eps`` (the sum
        over the keys the row sees): with ``feature_map="elu+1"`` this is the
        linear transformer of Katharopoulos et al. (2020).
    eps : float
        Added to the normaliser.
    num_threads : int, optional

    Returns
    -------
    ndarray, shape (broadcast(...), Lq, Dv)
    """
    num_threads = _config.resolve_threads(num_threads)
    causal = _v.flag(causal, "causal")
    normalize = _v.flag(normalize, "normalize")
    eps = _v.real(eps, "eps")
    q = _v.as_array(q, "q")
    k = _v.as_array(k, "k")
    v = _v.as_array(v, "v")
    for name, a, core in (("q", q, "(..., Lq, D)"), ("k", k, "(..., Lk, D)"), ("v", v, "(..., Lk, Dv)")):
        _v.check_ndim(a, name, core)
    if v.shape[-2] != k.shape[-2]:
        raise ValueError(f"k and v must have the same length Lk: k {k.shape}, v {v.shape}")
    out_dtype = _v.result_dtype([("q", q), ("k", k), ("v", v)])
    dtype = _v.compute_dtype(out_dtype)  # half precision runs in float32 here
    q, k, v = (np.asarray(a, dtype=dtype) for a in (q, k, v))
    q = np.asarray(_feature(q, feature_map, "q"), dtype=dtype)
    k = np.asarray(_feature(k, feature_map, "k"), dtype=dtype)
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(f"q and k must have the same head dim D: q {q.shape}, k {k.shape}")
    q, k, v, restore = _group_heads(q, k, v)
    lead = _v.broadcast([("q", q.shape[:-2]), ("k", k.shape[:-2]), ("v", v.shape[:-2])])
    lq, lk = q.shape[-2], k.shape[-2]
    if lq == 0:
        return restore(np.zeros(lead + (0, v.shape[-1]), dtype=out_dtype))
    if causal:
        num, den = _causal(q, k, v, normalize, num_threads, dtype)
    else:
        num, den = _full(q, k, v, normalize, num_threads, dtype)
    out = np.broadcast_to(num, lead + (lq, v.shape[-1]))
    if normalize:
        out = out / (den + dtype.type(eps))
    return restore(np.ascontiguousarray(out, dtype=out_dtype))


def _kv_state(k, v, num_threads):
    """phi(K)^T V over the rows of k and v: (..., D, Dv)."""
    return _api.weighted_sum(np.swapaxes(k, -1, -2), v, num_threads=num_threads)


def _ones_column(k):
    return np.broadcast_to(np.ones((), k.dtype), k.shape[:-1] + (1,))


def _full(q, k, v, normalize, num_threads, dtype):
    num = _api.weighted_sum(q, _kv_state(k, v, num_threads), num_threads=num_threads)
    den = None
    if normalize:
        ksum = np.sum(k, axis=-2, dtype=np.float64).astype(dtype)[..., None]  # (..., D, 1)
        den = _api.weighted_sum(q, ksum, num_threads=num_threads)
    return num, den


def _causal(q, k, v, normalize, num_threads, dtype):
    """Chunked causal form.  Keys before the first query's position (Lk > Lq)
    are seen by every row and fold into the starting state."""
    lq, lk = q.shape[-2], k.shape[-2]
    if lk == 0:  # no key: every row sums nothing
        lead = _v.broadcast([("q", q.shape[:-2]), ("k", k.shape[:-2]), ("v", v.shape[:-2])])
        return np.zeros(lead + (lq, v.shape[-1]), dtype), (np.zeros(lead + (lq, 1), dtype) if normalize else None)
    if lq > lk:  # the first lq - lk rows see no key: zeros, then the aligned case
        head_rows = lq - lk
        num, den = _causal(q[..., head_rows:, :], k, v, normalize, num_threads, dtype)
        pad = [(0, 0)] * (num.ndim - 2) + [(head_rows, 0), (0, 0)]
        return np.pad(num, pad), (np.pad(den, pad) if normalize else None)
    pre = lk - lq
    kp, vp = k[..., :pre, :], v[..., :pre, :]
    k, v = k[..., pre:, :], v[..., pre:, :]
    lead = _v.broadcast([("q", q.shape[:-2]), ("k", k.shape[:-2]), ("v", v.shape[:-2])])
    d, dv = q.shape[-1], v.shape[-1]
    state = np.zeros(lead + (d, dv), np.float64)  # running phi(K)^T V, accumulated in float64
    ksum = np.zeros(lead + (d,), np.float64)
    if pre:
        state += _kv_state(kp, vp, num_threads)
        ksum += np.sum(kp, axis=-2, dtype=np.float64)
    n, tail = divmod(lq, CHUNK)
    nums, dens = [], []
    if n:
        def blocks(a, rows):
            a = np.broadcast_to(a, lead + a.shape[-2:])[..., :rows, :]
            return a.reshape(lead + (n, CHUNK, a.shape[-1]))

        qc, kc, vc = (blocks(a, n * CHUNK) for a in (q, k, v))
        per_block = _kv_state(kc, vc, num_threads).astype(np.float64)  # (..., n, D, Dv)
        before = np.cumsum(per_block, axis=-3) - per_block + state[..., None, :, :]
        inter = _api.weighted_sum(qc, before.astype(dtype), num_threads=num_threads)
        intra = _api.attention(qc, kc, vc, weights="dot", causal=True, scale=1.0, num_threads=num_threads)
        nums.append((inter + intra).reshape(lead + (n * CHUNK, dv)))
        if normalize:
            block_sums = np.sum(kc, axis=-2, dtype=np.float64)  # (..., n, D)
            kbefore = np.cumsum(block_sums, axis=-2) - block_sums + ksum[..., None, :]
            den = _api.weighted_sum(qc, kbefore.astype(dtype)[..., None], num_threads=num_threads)
            den += _api.attention(qc, kc, _ones_column(kc), weights="dot", causal=True, scale=1.0,
                                  num_threads=num_threads)
            dens.append(den.reshape(lead + (n * CHUNK, 1)))
            ksum += block_sums.sum(axis=-2)
        state += per_block.sum(axis=-3)
    if tail:
        qt, kt, vt = (np.broadcast_to(a, lead + a.shape[-2:])[..., n * CHUNK:, :] for a in (q, k, v))
        inter = _api.weighted_sum(qt, state.astype(dtype), num_threads=num_threads)
        intra = _api.attention(qt, kt, vt, weights="dot", causal=True, scale=1.0, num_threads=num_threads)
        nums.append(inter + intra)
        if normalize:
            den = _api.weighted_sum(qt, ksum.astype(dtype)[..., None], num_threads=num_threads)
            den += _api.attention(qt, kt, _ones_column(kt), weights="dot", causal=True, scale=1.0,
                                  num_threads=num_threads)
            dens.append(den)
    num = np.concatenate(nums, axis=-2) if len(nums) > 1 else nums[0]
    den = (np.concatenate(dens, axis=-2) if len(dens) > 1 else dens[0]) if normalize else None
    return num, den
