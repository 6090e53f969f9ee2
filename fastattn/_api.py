"""The numpy-facing API: validation, broadcasting, dtype dispatch.

Every public function here turns its arguments into one kernel problem: the
base address of each array, its byte strides along the two core dimensions,
and an entry table with one row per leading index (batch, head, ...) giving
byte offsets into every array.  Broadcast dimensions get offset 0 and
grouped-query heads map onto their shared key/value head, so nothing is ever
expanded or copied beyond a dtype conversion of q, k or v.
"""
import functools
import math
import numbers
import operator

import numpy as np

from fastattn import _config, _core

try:  # numpy's standard bfloat16 (as used by JAX)
    import ml_dtypes

    BFLOAT16 = np.dtype(ml_dtypes.bfloat16)
except ImportError:  # pragma: no cover - ml_dtypes is a dependency
    BFLOAT16 = None

_DTYPES = {
    np.dtype(np.float32): _core.DTYPE_F32,
    np.dtype(np.float64): _core.DTYPE_F64,
    np.dtype(np.float16): _core.DTYPE_F16,
}
if BFLOAT16 is not None:
    _DTYPES[BFLOAT16] = _core.DTYPE_BF16
_FLOAT_KINDS = "float16, bfloat16, float32 or float64"
HALF_DTYPES = tuple(dt for dt in _DTYPES if dt.itemsize == 2)


def _compute_dtype(dtype):
    """The dtype kernels compute in (and return lse and scores in)."""
    return np.dtype(np.float32) if dtype.itemsize == 2 else dtype


def _result_dtype(named):
    """numpy's promotion of the named arrays' dtypes, as a TypeError naming them if none."""
    try:
        return np.result_type(*(a for _, a in named))
    except TypeError:
        desc = ", ".join(f"{n} ({a.dtype})" for n, a in named)
        raise TypeError(f"no common dtype for {desc}; convert them to one dtype") from None
_MASK_KINDS = {
    np.dtype(np.bool_): _core.MASK_BOOL,
    np.dtype(np.float32): _core.MASK_F32,
    np.dtype(np.float64): _core.MASK_F64,
}
_WEIGHTS = {"softmax": _core.WEIGHTS_SOFTMAX, "dot": _core.WEIGHTS_DOT}


# ---- argument checks ---------------------------------------------------------


def _as_array(x, name, kinds=_FLOAT_KINDS, allowed=_DTYPES):
    """View x as an ndarray (no copy where numpy can view it) and check its dtype."""
    if isinstance(x, np.ndarray):
        a = x
    else:
        try:
            if hasattr(x, "__dlpack__") and not hasattr(x, "__array__") and not hasattr(x, "__array_interface__"):
                a = np.from_dlpack(x)  # zero-copy where the producer's memory is CPU memory
            else:
                a = np.asarray(x)  # buffer protocol, __array__, __array_interface__: views when possible
        except Exception as exc:
            raise TypeError(f"{name} must be an array of {kinds}, got {type(x).__name__}") from exc
    if a.dtype not in allowed:
        raise TypeError(f"{name} must have dtype {kinds}, got {a.dtype} (shape {a.shape})")
    return a


def _check_ndim(a, name, core="(..., L, D)"):
    if a.ndim < 2:
        raise ValueError(f"{name} must have at least 2 dimensions {core}, got shape {a.shape}")


def _real(x, name):
    if isinstance(x, (bool, np.bool_)) or not isinstance(x, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(x).__name__}")
    return float(x)


def _flag(x, name):
    if not isinstance(x, (bool, np.bool_)):
        raise TypeError(f"{name} must be a bool, got {type(x).__name__}")
    return bool(x)


def _window(window):
    """(left, right) with -1 for unbounded; None means no window."""
    if window is None:
        return -1, -1
    if not isinstance(window, (tuple, list)) or len(window) != 2:
        raise TypeError(f"window must be a (left, right) pair of ints, got {window!r}")
    out = []
    for side, w in zip(("left", "right"), window):
        if w is None:
            w = -1
        if isinstance(w, (bool, np.bool_)):
            raise TypeError(f"window {side} must be an int, got {type(w).__name__}")
        try:
            w = operator.index(w)
        except TypeError:
            raise TypeError(f"window {side} must be an int, got {type(w).__name__}") from None
        if w < -1:
            raise ValueError(f"window {side} must be >= 0, or -1 for unbounded, got {w}")
        out.append(min(w, 2**62))
    return tuple(out)


_ALIGNS = ("bottom-right", "top-left")


def _align(align):
    if not isinstance(align, str) or align not in _ALIGNS:
        raise ValueError(f"align must be 'bottom-right' or 'top-left', got {align!r}")
    return align


def _softcap(softcap):
    if softcap is None:
        return 0.0
    cap = _real(softcap, "softcap")
    if not (cap >= 0.0 and math.isfinite(cap)):
        raise ValueError(f"softcap must be a finite number >= 0 (0 = off), got {softcap!r}")
    return cap


def _weights_and_lse(weights, return_lse):
    """The kernel's weighting code, and return_lse checked against it."""
    if not isinstance(weights, str) or weights not in _WEIGHTS:
        raise ValueError(f"weights must be 'softmax' or 'dot', got {weights!r}")
    return_lse = _flag(return_lse, "return_lse")
    if return_lse and weights != "softmax":
        raise ValueError("return_lse=True needs weights='softmax'")
    return _WEIGHTS[weights], return_lse


def _scale(scale, wmode, d):
    """scale, defaulting to 1/sqrt(D) for softmax and 1 for dot weights."""
    if scale is None:
        return 1.0 if wmode == _core.WEIGHTS_DOT or d == 0 else 1.0 / math.sqrt(d)
    return _real(scale, "scale")


def _broadcast(named_shapes, what="leading dimensions"):
    """numpy's broadcasting rule, with an error naming every argument, and a
    ValueError (not an overflow) when the result has 2**63 entries or more."""
    desc = ", ".join(f"{n} {s}" for n, s in named_shapes)
    ndim = max((len(s) for _, s in named_shapes), default=0)
    out = [1] * ndim
    for _, shape in named_shapes:
        for ax, n in enumerate(shape, ndim - len(shape)):
            if n != 1:
                if out[ax] not in (1, n):
                    raise ValueError(f"{what} do not broadcast: {desc}")
                out[ax] = n
    if math.prod(out) >= 2**63:
        raise ValueError(f"{what} are too big: {tuple(out)} has 2**63 entries or more ({desc})")
    return tuple(out)


def _check_out(out, shape, dtype, inputs, name="out"):
    if out is None:
        return np.empty(shape, dtype=dtype)
    if not isinstance(out, np.ndarray):
        raise TypeError(f"{name} must be a numpy.ndarray, got {type(out).__name__}")
    if out.dtype != dtype:
        raise TypeError(f"{name} must have dtype {dtype}, got {out.dtype}")
    if out.shape != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {out.shape}")
    if not out.flags.writeable:
        raise ValueError(f"{name} is read-only")
    if any(st == 0 and n > 1 for n, st in zip(out.shape, out.strides)):
        raise ValueError(f"{name} has overlapping elements (a zero stride), strides {out.strides}")
    for other, a in inputs:
        if a is not None and np.may_share_memory(out, a):
            raise ValueError(f"{name} overlaps the input {other}")
    return out


# ---- the problem table -------------------------------------------------------


def _address(a):
    return a.__array_interface__["data"][0]


def _layout(a, core):
    """Shape and byte strides of a's leading dims (before the last `core`),
    or None: all the entry table needs of an operand."""
    return None if a is None else (a.shape[: a.ndim - core], a.strides[: a.ndim - core])


def _lead_offsets(layout, lead, group=1):
    """Byte offset of each leading index of an operand of this `layout`,
    broadcast to `lead` and flattened in C order.  With group > 1, the last
    leading axis of the operand is indexed by lead_index // group (grouped
    query heads sharing one key/value head)."""
    shape, strides = layout
    n_lead = len(lead)
    offsets = np.zeros(lead, dtype=np.int64)
    first = n_lead - len(shape)
    for ax, (n, st) in enumerate(zip(shape, strides)):
        pos = first + ax
        index_shape = [1] * n_lead
        if group > 1 and pos == n_lead - 1:
            index_shape[pos] = lead[pos]
            idx = np.arange(lead[pos], dtype=np.int64) // group
        elif n != 1:
            index_shape[pos] = n
            idx = np.arange(n, dtype=np.int64)
        else:
            continue
        offsets = offsets + (idx * st).reshape(index_shape)
    return offsets.reshape(-1)


def _entry_table(lead, group, columns):
    """The kernel's entry table (read-only): columns maps a column to one
    value for every entry or to an array over `lead`; with group > 1 each
    entry covers `group` consecutive query heads (the last lead axis)."""
    n = math.prod(lead) // group
    entries = np.zeros((n, _core.ENTRY_FIELDS), dtype=np.int64)
    for col, val in columns.items():
        if group > 1 and isinstance(val, np.ndarray):
            val = val[::group]  # the first head of each group
        entries[:, col] = val
    entries.flags.writeable = False
    return entries


# Entry tables of at most this many entries are cached (64 of them, LRU).
_CACHED_ENTRIES_MAX = 4096


@functools.lru_cache(maxsize=64)
def _scores_entries(lead, kv_group, group, lq, lk, q, k, v, mask, out, lse):
    """The entry table of a _Scores run, from the operands' layouts (see
    _layout).  Cached for small tables (see _Scores.run): a decoding loop
    asks for the same one at every step, and building it costs more than a
    small kernel call."""
    cols = {
        _core.E_Q: _lead_offsets(q, lead),
        _core.E_K: _lead_offsets(k, lead, kv_group),
        _core.E_OUT: _lead_offsets(out, lead),
        _core.E_LQ: lq,
        _core.E_LK: lk,
        _core.E_HEAD: np.arange(math.prod(lead), dtype=np.int64),
    }
    if v is not None:
        cols[_core.E_V] = _lead_offsets(v, lead, kv_group)
    if mask is not None:
        cols[_core.E_MASK] = _lead_offsets(mask, lead)
    if lse is not None:
        cols[_core.E_LSE] = _lead_offsets(lse, lead)
    return _entry_table(lead, group, cols)


def _core_strides(a):
    """Byte strides of the last two dims; 0 along a dim of length 1 (broadcast)."""
    rs = a.strides[-2] if a.shape[-2] != 1 else 0
    cs = a.strides[-1] if a.shape[-1] != 1 else 0
    return rs, cs


def _heads(q_lead, kv_leads, names):
    """Grouped-query heads: the factor H / G by which q's head axis (the last
    leading axis) exceeds the shared head axis of k and v, or 1."""
    if not q_lead:
        return 1
    h = q_lead[-1]
    gs = {lead[-1] for lead in kv_leads if lead}
    gs.discard(1)
    if len(gs) != 1:
        return 1
    g = gs.pop()
    if g == h or h <= 1:
        return 1
    if g == 0 or h % g != 0:
        desc = ", ".join(f"{n} {s}" for n, s in names)
        raise ValueError(
            f"head counts do not match: q has {h} heads, k/v have {g}; grouped-query "
            f"attention needs a multiple ({desc})"
        )
    if any(lead and lead[-1] not in (1, g) for lead in kv_leads):
        raise ValueError("k and v must have the same number of heads")
    return h // g


def _mask_operand(mask, lq, lk):
    """Mask as (array viewed with >= 2 dims, kind), checking dtype and core dims."""
    m = _as_array(mask, "mask", "bool, float32 or float64", _MASK_KINDS)
    if m.ndim < 2:
        m = m.reshape((1,) * (2 - m.ndim) + m.shape)
    if m.shape[-2] not in (1, lq) or m.shape[-1] not in (1, lk):
        raise ValueError(
            f"mask of shape {m.shape} does not broadcast to (..., Lq, Lk) = (..., {lq}, {lk})"
        )
    return m, _MASK_KINDS[m.dtype]


def _head_stride(a, core):
    """Byte stride of a's head axis (the one before its `core` dims), 0 if broadcast."""
    if a is None or a.ndim <= core or a.shape[-core - 1] == 1:
        return 0
    return a.strides[-core - 1]


def _run(kind, dtype, num_threads, entries, d, dv, q, k, v, out, lse, mask, mask_kind,
         weights=_core.WEIGHTS_SOFTMAX, scale=1.0, causal=False, window=(-1, -1), softcap=0.0,
         slopes=None, group=1, top_left=False):
    """Run a kernel over the entries of an entry table (see _entry_table)."""
    none = (0, 0)
    q_rs, q_cs = _core_strides(q) if q is not None else none
    k_rs, k_cs = _core_strides(k) if k is not None else none
    v_rs, v_cs = _core_strides(v) if v is not None else none
    o_rs, o_cs = _core_strides(out)
    lse_rs = (lse.strides[-1] if lse.shape[-1] != 1 else 0) if lse is not None else 0
    m_rs, m_cs = _core_strides(mask) if mask is not None else none
    _core.run(
        kind, _DTYPES[dtype], _config.isa_index(), num_threads, entries, d, dv,
        _address(q) if q is not None else 0,
        _address(k) if k is not None else 0,
        _address(v) if v is not None else 0,
        _address(out),
        _address(lse) if lse is not None else 0,
        (q_rs, q_cs, k_rs, k_cs, v_rs, v_cs, o_rs, o_cs, lse_rs),
        group,
        (_head_stride(q, 2), _head_stride(out, 2), _head_stride(lse, 1), _head_stride(mask, 2))
        if group > 1 else (0, 0, 0, 0),
        mask_kind, _address(mask) if mask is not None else 0, m_rs, m_cs,
        weights, scale, causal, top_left, window[0], window[1], softcap, slopes,
    )


class _Scores:
    """The validated score inputs shared by attention() and scores()."""

    def __init__(self, q, k, v, scale, causal, mask, window, softcap, alibi_slopes, weights,
                 align="bottom-right"):
        q = _as_array(q, "q")
        k = _as_array(k, "k")
        _check_ndim(q, "q")
        _check_ndim(k, "k")
        arrays = [("q", q), ("k", k)]
        if v is not None:
            v = _as_array(v, "v")
            _check_ndim(v, "v", "(..., Lk, Dv)")
            arrays.append(("v", v))
        self.originals = list(arrays)
        self.dtype = _result_dtype(arrays)
        if q.shape[-1] != k.shape[-1]:
            raise ValueError(f"q and k must have the same head dim D: q {q.shape}, k {k.shape}")
        if v is not None and v.shape[-2] != k.shape[-2]:
            raise ValueError(f"k and v must have the same length Lk: k {k.shape}, v {v.shape}")
        self.lq, self.d = q.shape[-2:]
        self.lk = k.shape[-2]
        self.dv = v.shape[-1] if v is not None else 0

        self.weights = weights
        self.scale = _scale(scale, weights, self.d)
        self.causal = _flag(causal, "causal")
        self.top_left = _align(align) == "top-left"
        self.window = _window(window)
        self.softcap = _softcap(softcap)

        self.mask, self.mask_kind = None, _core.MASK_NONE
        if mask is not None:
            self.mask, self.mask_kind = _mask_operand(mask, self.lq, self.lk)
            self.originals.append(("mask", self.mask))

        leads = [(n, a.shape[:-2]) for n, a in arrays]
        if self.mask is not None:
            leads.append(("mask", self.mask.shape[:-2]))
        kv_leads = [a.shape[:-2] for n, a in arrays if n in ("k", "v")]
        self.group = _heads(q.shape[:-2], kv_leads, leads)
        if self.group > 1:  # broadcast the kv head axis as if it had q's length
            h = q.shape[-3]
            leads = [(n, s[:-1] + (h,)) if n in ("k", "v") else (n, s) for n, s in leads]
        self.lead = _broadcast(leads)

        self.slopes = None
        if alibi_slopes is not None:
            s = _as_array(alibi_slopes, "alibi_slopes")
            try:
                s = np.broadcast_to(s, self.lead)
            except ValueError:
                raise ValueError(
                    f"alibi_slopes of shape {s.shape} must broadcast to the leading "
                    f"dimensions {self.lead} (one slope per query head)"
                ) from None
            self.slopes = np.ascontiguousarray(s, dtype=np.float64).reshape(-1)

        # kernels compute in the result dtype: convert (copies only q, k, v)
        self.q = np.asarray(q, dtype=self.dtype)
        self.k = np.asarray(k, dtype=self.dtype)
        self.v = np.asarray(v, dtype=self.dtype) if v is not None else None

    def run(self, kind, out, lse, num_threads):
        group = self.group if kind == _core.KIND_ATTENTION else 1
        small = math.prod(self.lead) <= _CACHED_ENTRIES_MAX
        entries = (_scores_entries if small else _scores_entries.__wrapped__)(
            self.lead, self.group, group, self.lq, self.lk, _layout(self.q, 2), _layout(self.k, 2),
            _layout(self.v, 2), _layout(self.mask, 2), _layout(out, 2), _layout(lse, 1))
        _run(
            kind, self.dtype, num_threads, entries, self.d, self.dv,
            self.q, self.k, self.v, out, lse, self.mask, self.mask_kind,
            weights=self.weights, scale=self.scale, causal=self.causal, window=self.window,
            softcap=self.softcap, slopes=self.slopes, top_left=self.top_left, group=group,
        )


# ---- public functions ----------------------------------------------------------


def attention(q, k, v, *, scale=None, causal=False, mask=None, weights="softmax", window=None,
              softcap=None, alibi_slopes=None, return_lse=False, align="bottom-right", out=None,
              num_threads=None):
    """Fused attention: each output row is a weighted sum of value rows.

    Scores are ``s[i, j] = scale * <q[i], k[j]>``; with ``weights="softmax"``
    the weights are the softmax of each row's scores over the keys it may
    see, with ``weights="dot"`` they are the scores themselves (masked keys
    weigh 0).  No ``(Lq, Lk)`` array is ever created.

    Parameters
    ----------
    q : array_like, shape (..., Lq, D)
    k : array_like, shape (..., Lk, D)
    v : array_like, shape (..., Lk, Dv)
        float32 or float64.  Leading dimensions broadcast by numpy rules.
        When q's head axis (third from last) has H entries and k/v's has G,
        with H a multiple of G, query head h uses key/value head h // (H/G)
        (grouped-query attention); k and v are not copied.
    scale : float, optional
        Multiplies ``q.k``.  Default ``1/sqrt(D)`` for softmax, ``1.0`` for dot.
    causal : bool
        Bottom-right aligned: query i may see key j iff ``j <= i + Lk - Lq``
        (so the last query sees every key, as in KV-cache decoding).
    mask : array_like, optional
        Broadcastable to ``(..., Lq, Lk)``.  bool: True = may attend.
        float32/float64: added to the scores (``-inf`` masks).  Read in place.
    weights : {"softmax", "dot"}
    window : (int, int), optional
        ``(left, right)``: query i (at key position ``i' = i + Lk - Lq``) sees
        keys ``i' - left <= j <= i' + right``; -1 = unbounded on that side.
    softcap : float, optional
        If > 0, scores become ``softcap * tanh(s / softcap)`` (after scaling).
    alibi_slopes : array_like, optional
        One slope per query head (broadcast to the leading dims); adds
        ``-slope * |i' - j|`` to the scores.
    return_lse : bool
        Also return the natural-log log-sum-exp of each row's scores, shape
        ``(..., Lq)`` (-inf for a row with no visible key). Softmax only.
    align : {"bottom-right", "top-left"}
        Where query i sits among the keys for causal, window and ALiBi:
        ``i' = i + Lk - Lq`` (default) or ``i' = i`` (PyTorch's ``is_causal``).
    out : ndarray, optional
        Written in place; must have the exact result shape and dtype.
    num_threads : int, optional
        Threads for this call (default: ``fastattn.get_num_threads()``).

    Returns
    -------
    ndarray, shape (broadcast(...), Lq, Dv), dtype result_type(q, k, v)
        A query row with no visible key gives zeros.  With return_lse,
        the pair ``(out, lse)``.
    """
    wmode, return_lse = _weights_and_lse(weights, return_lse)
    num_threads = _config.resolve_threads(num_threads)
    sc = _Scores(q, k, v, scale, causal, mask, window, softcap, alibi_slopes, wmode, align)
    shape = sc.lead + (sc.lq, sc.dv)
    out = _check_out(out, shape, sc.dtype, sc.originals)
    lse = np.empty(sc.lead + (sc.lq,), dtype=_compute_dtype(sc.dtype)) if return_lse else None
    sc.run(_core.KIND_ATTENTION, out, lse, num_threads)
    return (out, lse) if return_lse else out


def scores(q, k, *, scale=None, causal=False, mask=None, window=None, softcap=None,
           alibi_slopes=None, align="bottom-right", out=None, num_threads=None):
    """The score matrix ``scale * q k^T`` with every option of :func:`attention` applied.

    Parameters
    ----------
    q : array_like, shape (..., Lq, D)
    k : array_like, shape (..., Lk, D)
    scale, causal, mask, window, softcap, alibi_slopes, align, num_threads
        As in :func:`attention` (scale defaults to ``1/sqrt(D)``).
    out : ndarray, optional

    Returns
    -------
    ndarray, shape (broadcast(...), Lq, Lk)
        Masked entries (mask, causal, window) are ``-inf``.
    """
    num_threads = _config.resolve_threads(num_threads)
    sc = _Scores(q, k, None, scale, causal, mask, window, softcap, alibi_slopes,
                 _core.WEIGHTS_SOFTMAX, align)
    out = _check_out(out, sc.lead + (sc.lq, sc.lk), _compute_dtype(sc.dtype), sc.originals)
    sc.run(_core.KIND_SCORES, out, None, num_threads)
    return out


def weighted_sum(w, v, *, out=None, num_threads=None):
    """Weighted sum of value rows: ``out[..., i, :] = sum_j w[..., i, j] * v[..., j, :]``.

    Parameters
    ----------
    w : array_like, shape (..., Lq, Lk)
    v : array_like, shape (..., Lk, Dv)
        float32 or float64; leading dimensions broadcast.
    out : ndarray, optional
    num_threads : int, optional

    Returns
    -------
    ndarray, shape (broadcast(...), Lq, Dv), dtype result_type(w, v)
    """
    num_threads = _config.resolve_threads(num_threads)
    w = _as_array(w, "w")
    v = _as_array(v, "v")
    _check_ndim(w, "w", "(..., Lq, Lk)")
    _check_ndim(v, "v", "(..., Lk, Dv)")
    if w.shape[-1] != v.shape[-2]:
        raise ValueError(f"w's last dim (Lk) must equal v's second to last: w {w.shape}, v {v.shape}")
    lead = _broadcast([("w", w.shape[:-2]), ("v", v.shape[:-2])])
    dtype = _result_dtype([("w", w), ("v", v)])
    lq, lk = w.shape[-2:]
    dv = v.shape[-1]
    out = _check_out(out, lead + (lq, dv), dtype, [("w", w), ("v", v)])
    w = np.asarray(w, dtype=dtype)
    v = np.asarray(v, dtype=dtype)
    entries = _entry_table(lead, 1, {
        _core.E_Q: _lead_offsets(_layout(w, 2), lead),
        _core.E_V: _lead_offsets(_layout(v, 2), lead),
        _core.E_OUT: _lead_offsets(_layout(out, 2), lead),
        _core.E_LQ: lq,
        _core.E_LK: lk,
    })
    _run(_core.KIND_WSUM, dtype, num_threads, entries, 0, dv, w, None, v, out, None, None,
         _core.MASK_NONE)
    return out


def _cu_seqlens(cu, name, total):
    cu = np.asarray(cu)
    if cu.dtype.kind not in "iu":
        raise TypeError(f"{name} must be an integer array, got dtype {cu.dtype}")
    if cu.ndim != 1 or cu.shape[0] < 1:
        raise ValueError(f"{name} must be 1-D with batch + 1 entries, got shape {cu.shape}")
    cu = cu.astype(np.int64)
    if cu[0] != 0 or np.any(np.diff(cu) < 0) or cu[-1] != total:
        raise ValueError(
            f"{name} must start at 0, never decrease and end at the packed length {total}, got {cu}"
        )
    return cu


def attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, *, scale=None, causal=False,
                     weights="softmax", window=None, softcap=None, alibi_slopes=None,
                     return_lse=False, align="bottom-right", out=None, num_threads=None):
    """Attention over a packed batch of variable-length sequences (no padding).

    Sequence ``b`` is rows ``cu_seqlens_q[b] : cu_seqlens_q[b+1]`` of q and
    ``cu_seqlens_k[b] : cu_seqlens_k[b+1]`` of k and v; it attends only
    within itself.  Options are those of :func:`attention` (causal and window
    are bottom-right aligned per sequence).

    Parameters
    ----------
    q : array_like, shape (total_q, H, D)
    k : array_like, shape (total_k, G, D)
    v : array_like, shape (total_k, G, Dv)
        float32 or float64; H a multiple of G (grouped-query heads).
    cu_seqlens_q, cu_seqlens_k : array_like of int, shape (batch + 1,)
        Cumulative sequence lengths, starting at 0.

    Returns
    -------
    ndarray, shape (total_q, H, Dv)
        With return_lse, also the log-sum-exp, shape (H, total_q).
    """
    wmode, return_lse = _weights_and_lse(weights, return_lse)
    num_threads = _config.resolve_threads(num_threads)
    q = _as_array(q, "q")
    k = _as_array(k, "k")
    v = _as_array(v, "v")
    for name, a in (("q", q), ("k", k), ("v", v)):
        if a.ndim != 3:
            raise ValueError(f"{name} must have shape (total, heads, dim), got {a.shape}")
    total_q, h, d = q.shape
    total_k, g, _ = k.shape
    dv = v.shape[2]
    if k.shape[2] != d:
        raise ValueError(f"q and k must have the same head dim D: q {q.shape}, k {k.shape}")
    if v.shape[:2] != k.shape[:2]:
        raise ValueError(f"k and v must have the same length and heads: k {k.shape}, v {v.shape}")
    if g == 0 or h % g != 0:
        raise ValueError(f"q's {h} heads must be a multiple of k/v's {g} heads")
    cu_q = _cu_seqlens(cu_seqlens_q, "cu_seqlens_q", total_q)
    cu_k = _cu_seqlens(cu_seqlens_k, "cu_seqlens_k", total_k)
    if cu_q.shape != cu_k.shape:
        raise ValueError(f"cu_seqlens_q and cu_seqlens_k must have the same length, got "
                         f"{cu_q.shape[0]} and {cu_k.shape[0]}")
    scale = _scale(scale, wmode, d)
    causal = _flag(causal, "causal")
    align = _align(align)
    window = _window(window)
    softcap = _softcap(softcap)
    slopes = None
    if alibi_slopes is not None:
        s = _as_array(alibi_slopes, "alibi_slopes")
        if s.shape not in ((h,), ()):
            raise ValueError(f"alibi_slopes must have shape ({h},) (one per query head), got {s.shape}")
        slopes = np.ascontiguousarray(np.broadcast_to(s, (h,)), dtype=np.float64)

    originals = [("q", q), ("k", k), ("v", v)]
    dtype = _result_dtype(originals)
    out = _check_out(out, (total_q, h, dv), dtype, originals)
    q, k, v = (np.asarray(a, dtype=dtype) for a in (q, k, v))
    lse = np.empty((h, total_q), dtype=_compute_dtype(dtype)) if return_lse else None

    # one entry per (sequence, kv head); rows of a sequence are the packed axis
    group = h // g
    nseq = cu_q.shape[0] - 1
    seq = np.repeat(np.arange(nseq), g)
    head = np.tile(np.arange(g) * group, nseq)  # first query head of the group
    q_rs, q_hs = q.strides[0], q.strides[1]
    cols = {
        _core.E_Q: cu_q[seq] * q_rs + head * q_hs,
        _core.E_K: cu_k[seq] * k.strides[0] + (head // group) * k.strides[1],
        _core.E_V: cu_k[seq] * v.strides[0] + (head // group) * v.strides[1],
        _core.E_OUT: cu_q[seq] * out.strides[0] + head * out.strides[1],
        _core.E_LQ: (cu_q[1:] - cu_q[:-1])[seq],
        _core.E_LK: (cu_k[1:] - cu_k[:-1])[seq],
        _core.E_HEAD: head,
    }
    if lse is not None:
        cols[_core.E_LSE] = cu_q[seq] * lse.strides[1] + head * lse.strides[0]
    entries = np.zeros((nseq * g, _core.ENTRY_FIELDS), dtype=np.int64)
    for col, val in cols.items():
        entries[:, col] = val
    _core.run(
        _core.KIND_ATTENTION, _DTYPES[dtype], _config.isa_index(), num_threads, entries, d, dv,
        _address(q), _address(k), _address(v), _address(out),
        _address(lse) if lse is not None else 0,
        (q_rs, q.strides[2], k.strides[0], k.strides[2], v.strides[0], v.strides[2],
         out.strides[0], out.strides[2], lse.strides[1] if lse is not None else 0),
        group, (q_hs, out.strides[1], lse.strides[0] if lse is not None else 0, 0),
        _core.MASK_NONE, 0, 0, 0,
        wmode, scale, causal, align == "top-left", window[0], window[1], softcap, slopes,
    )
    return (out, lse) if return_lse else out


def merge(outputs, lses):
    """Combine attention over disjoint key sets into attention over their union.

    If ``outputs[i], lses[i] = attention(q, k_i, v_i, return_lse=True)`` for
    disjoint key/value sets ``i``, the result equals attention over all of
    them: with ``M = max_i lse_i``, ``out = sum_i exp(lse_i - M) outputs[i] /
    sum_i exp(lse_i - M)`` and ``lse = M + log(sum_i exp(lse_i - M))``.  Rows
    whose every lse is -inf (no visible key anywhere) give zeros and -inf.

    Parameters
    ----------
    outputs : sequence of arrays, each shape (..., Lq, Dv)
    lses : sequence of arrays, each shape (..., Lq)

    Returns
    -------
    (out, lse) : arrays of shapes (..., Lq, Dv) and (..., Lq)
    """
    outputs = [_as_array(o, f"outputs[{i}]") for i, o in enumerate(outputs)]
    lses = [_as_array(s, f"lses[{i}]") for i, s in enumerate(lses)]
    if not outputs or len(outputs) != len(lses):
        raise ValueError(f"merge needs as many outputs as lses, at least one; got "
                         f"{len(outputs)} and {len(lses)}")
    for i, (o, s) in enumerate(zip(outputs, lses)):
        if o.ndim < 1 or o.shape[:-1] != s.shape:
            raise ValueError(f"outputs[{i}] of shape {o.shape} does not match lses[{i}] of shape {s.shape}")
        if o.shape != outputs[0].shape:
            raise ValueError(f"outputs[{i}] has shape {o.shape}, outputs[0] has {outputs[0].shape}")
    out_dtype = _result_dtype([(f"outputs[{i}]", o) for i, o in enumerate(outputs)])
    lse_dtype = _result_dtype([(f"lses[{i}]", s) for i, s in enumerate(lses)])
    dtype = np.result_type(_compute_dtype(out_dtype), _compute_dtype(lse_dtype))
    lse = np.stack([np.asarray(s, dtype=dtype) for s in lses])
    m = np.max(lse, axis=0)
    m_safe = np.where(np.isneginf(m), 0.0, m).astype(dtype)
    w = np.exp(lse - m_safe)  # exp(-inf) = 0 for empty parts
    total = np.sum(w, axis=0)
    out = np.zeros(outputs[0].shape, dtype=dtype)
    for wi, o in zip(w, outputs):
        out += wi[..., None] * o.astype(dtype, copy=False)
    with np.errstate(divide="ignore", invalid="ignore"):
        out = np.where(total[..., None] > 0, out / total[..., None], 0.0).astype(out_dtype)
        merged = np.where(total > 0, m_safe + np.log(total), -np.inf).astype(lse_dtype)
    return out, merged
