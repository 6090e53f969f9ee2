"""The numpy-facing API: each public function validates its arguments
(fastattn._validate), builds one kernel problem and runs it
(fastattn._problem).  Nothing of size Lq x Lk is ever made; inputs are only
copied when their dtypes differ (converted to the result dtype; not
attention's 16-bit k and v under float32 q, read in place).
"""
import numpy as np

from fastattn import _config, _core, _problem
from fastattn import _validate as _v

BFLOAT16 = _v.BFLOAT16
HALF_DTYPES = _v.HALF_DTYPES


def attention(q, k, v, *, scale=None, causal=False, mask=None, weights="softmax", window=None,
              softcap=None, alibi_slopes=None, sinks=None, return_lse=False, align="bottom-right", out=None,
              dropout_p=0.0, dropout_seed=None, num_threads=None):
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
        float32, float64, float16 or bfloat16 (mixed dtypes are converted to
        their result type, except float16 or bfloat16 k and v under float32
        q: read in place).  Leading dimensions broadcast by numpy rules.
        When q's head axis (third from last) has H entries and k/v's has G,
        with H a multiple of G, query head h uses key/value head h // (H/G)
        (grouped-query attention); k and v are not copied.
    scale : float, optional
        Multiplies ``q.k``.  Default ``1/sqrt(D)`` for softmax, ``1.0`` for dot.
    causal : bool
        Query i may see key j iff ``j <= i'``, its key position: by default
        ``i' = i + Lk - Lq`` (bottom-right aligned, so the last query sees
        every key, as in KV-cache decoding; see ``align``).
    mask : array_like, optional
        Broadcastable to ``(..., Lq, Lk)``.  bool: True = may attend.
        float (float32, float64, float16 or bfloat16, whatever q's dtype):
        added to the scores in the compute type (``-inf`` masks).  Read in
        place.
    weights : {"softmax", "dot"}
    window : (int, int), optional
        ``(left, right)``: query i (at key position ``i' = i + Lk - Lq``) sees
        keys ``i' - left <= j <= i' + right``; -1 = unbounded on that side.
    softcap : float, optional
        If > 0, scores become ``softcap * tanh(s / softcap)`` (after scaling).
    alibi_slopes : array_like, optional
        One slope per query head (broadcast to the leading dims); adds
        ``-slope * |i' - j|`` to the scores.
    sinks : array_like, optional
        Attention sinks: one logit per query head (broadcast to the leading
        dims), added to every row's softmax denominator as ``exp(sink)``, a
        key with no value (as in gpt-oss), so a row may give little weight
        to every key.  Finite, or ``-inf`` for a head without one.  Softmax
        only; the lse includes them.
    return_lse : bool
        Also return the natural-log log-sum-exp of each row's scores, shape
        ``(..., Lq)`` (-inf for a row with no visible key). Softmax only.
    align : {"bottom-right", "top-left"} or int
        Where query i sits among the keys (its key position ``i'``) for
        causal, window and ALiBi: ``i' = i + Lk - Lq`` (default), ``i' = i``
        (PyTorch's ``is_causal``), or ``i' = i + align`` for an int, the key
        position of query 0.  An int aligns a block of a longer sequence:
        queries from row ``a`` against keys from key ``c`` of a sequence of
        ``Lq_all`` queries and ``Lk_all`` keys take
        ``align = a - c + Lk_all - Lq_all`` (bottom-right) or ``a - c``
        (top-left).  Rows that see no key give zeros (and lse ``-inf``).
    out : ndarray, optional
        Written in place; must have the exact result shape and dtype.
    dropout_p : float
        Dropout on the weights, for training: each weight (after the
        softmax) is zeroed with probability ``dropout_p`` and the others are
        multiplied by ``1 / (1 - dropout_p)``; the lse counts every weight.
        In ``[0, 1)``; 0 (the default) is off.  The probability is that of a
        16-bit draw, ``round(dropout_p * 2**16) / 2**16``.
    dropout_seed : int, optional
        Required with ``dropout_p > 0``: which weights are dropped depends
        only on the seed and the weight's head, query row and key (a
        counter-based hash, so not on threads or tiles), and
        :func:`attention_backward` drops the same ones given the same seed.
        :func:`fastattn.reference.dropout_keep` gives the mask.  In
        ``[0, 2**64)``.
    num_threads : int, optional
        Threads for this call (default: ``fastattn.get_num_threads()``).

    Returns
    -------
    ndarray, shape (broadcast(...), Lq, Dv), dtype result_type(q, k, v)
        A query row with no visible key gives zeros.  With return_lse,
        the pair ``(out, lse)``.
    """
    return attention_planned(q, k, v, scale, causal, mask, weights, window, softcap, alibi_slopes, sinks, return_lse,
                             align, out, num_threads, dropout_p, dropout_seed)[0]


# Calls of plain arrays (no mask, slopes, sinks or out; q, k and v each of
# the dtype the kernels read it in) by their layouts and options: the
# problem the first such call ran (validated and built by it), on no
# arrays, and its results' shapes and dtypes.  A model calls attention with
# the same layouts every layer and every decoding step; rerunning the
# problem on the call's arrays takes a fraction of the checks' time, which
# is most of a small call's.
_PLANNED_MAX = 256
_planned = {}


def attention_planned(q, k, v, scale, causal, mask, weights, window, softcap, alibi_slopes, sinks, return_lse, align,
                      out, num_threads, dropout_p=0.0, dropout_seed=None):
    """attention() (its arguments in order), and the problem it ran, on no
    arrays, if it is one a later call of the same layouts and options may
    rerun on its own arrays (Problem.rebased; see _problem.attention), else
    None: (result, template)."""
    key = None
    if (mask is None and alibi_slopes is None and sinks is None and out is None and _no_dropout(dropout_p, dropout_seed)
            and type(q) is np.ndarray and type(k) is np.ndarray and type(v) is np.ndarray):
        # each option with its type, so that one refused for its type is never served from an accepted one
        key = (q.shape, q.strides, q.dtype, k.shape, k.strides, k.dtype, v.shape, v.strides, v.dtype,
               *((type(o), o) for o in (scale, causal, weights, window, softcap, return_lse, align)),
               _config.path_index())
        hit, key = _plan_of(_planned, key)
        if hit is not None:
            template, out_shape, out_dtype, lse_shape, lse_dtype = hit
            out = np.empty(out_shape, out_dtype)
            lse = np.empty(lse_shape, lse_dtype) if return_lse else None
            _problem.rerun(template, _config.resolve_threads(num_threads), q, k, v, out, lse)
            return ((out, lse) if return_lse else out), template
    wmode, return_lse = _v.weights_and_lse(weights, return_lse)
    num_threads = _config.resolve_threads(num_threads)
    args = _v.score_args(q, k, v, scale, causal, mask, window, softcap, alibi_slopes, wmode, align, sinks)
    args.set_dropout(dropout_p, dropout_seed)
    out = _v.check_out(out, args.lead + (args.lq, args.dv), args.dtype, args.originals)
    lse = np.empty(args.lead + (args.lq,), dtype=_v.compute_dtype(args.dtype)) if return_lse else None
    template = _problem.attention(args, out, lse, num_threads)
    if key is not None and template is not None:
        _keep_plan(_planned, key, (template, out.shape, out.dtype, None if lse is None else lse.shape,
                                   None if lse is None else lse.dtype), _PLANNED_MAX)
    return ((out, lse) if return_lse else out), template


def _no_dropout(p, seed):
    """Is dropout off (p a plain 0 and no seed)?  Calls with dropout are
    never planned: their seeds differ from call to call."""
    return seed is None and type(p) in (float, int) and p == 0


def _plan_of(plans, key):
    """The plan kept under `key` in `plans` (None for no key or none kept),
    and the key a new plan is to be kept under: None where an option is
    unhashable (a window given as a list: such calls are checked every
    time)."""
    if key is None:
        return None, None
    try:
        return plans.get(key), key
    except TypeError:
        return None, None


def _keep_plan(plans, key, plan, limit):
    """Keep `plan` under `key`, forgetting every plan first when `limit` are kept."""
    if len(plans) >= limit:
        plans.clear()
    plans[key] = plan


def _last_entries(last, tag, build):
    """The entry table of a planned layout's last call, last[0] = (tag,
    entries), where `tag` (what it was built from) is this call's; else
    build() (None where this call's offsets or lengths fail the checks),
    kept as the last call's.  A model's layers call one after the other
    with the same offsets and lengths."""
    seen = last[0]
    if seen is not None and seen[0] == tag:
        return seen[1]
    entries = build()
    if entries is not None:
        last[0] = (tag, entries)
    return entries


def _rows_layout(a):
    """What a packed call's plan key knows of an operand of rows (rows,
    ...): its layout but for its number of rows, except whether that is 1
    (a stride along one row is 0)."""
    return a.shape[1:], min(a.shape[0], 2), a.strides, a.dtype


def _lse_rows(q, return_lse):
    """What a packed call's plan key knows of its lse (H, total_q): total_q
    (its stride along heads), or None without one."""
    return None if return_lse is False or return_lse is np.False_ else q.shape[0]


def attention_backward(dout, q, k, v, out, lse, *, scale=None, causal=False, mask=None, weights="softmax",
                       window=None, softcap=None, alibi_slopes=None, sinks=None, align="bottom-right", dq=None,
                       dk=None, dv=None, return_dsinks=False, return_dmask=False, dropout_p=0.0, dropout_seed=None,
                       num_threads=None):
    """Gradients of :func:`attention`: ``(dq, dk, dv)`` of ``sum(dout * out)``.

    FlashAttention-2's backward: the weights are recomputed tile by tile
    from the saved log-sum-exp, once per tile, so nothing of size
    ``(Lq, Lk)`` is made, and every gradient row is summed in an order fixed
    by the problem, so the result is bitwise the same for any thread count.

    Parameters
    ----------
    dout : array_like, shape (..., Lq, Dv)
        The gradient of the loss with respect to attention's output.
    q, k, v
        The forward's inputs.
    out, lse
        What ``attention(q, k, v, return_lse=True, ...)`` returned for the
        same arguments.  With ``weights="dot"``, which has no log-sum-exp,
        pass ``lse=None``.
    scale, causal, mask, weights, window, softcap, alibi_slopes, sinks, align, dropout_p, dropout_seed
        The forward's options, all supported.  Slopes and bool masks get no
        gradient; sinks get one with return_dsinks, a float mask with
        return_dmask.  With dropout, the forward's seed drops the same
        weights again.
    dq, dk, dv : ndarray, optional
        Written in place; each must have the shape and dtype of the gradient.
    return_dsinks : bool
        Also return the sinks' gradient (needs sinks): a sink is a key whose
        value is zero, so with its weight ``p = exp(sink - lse)`` in a row,
        the row adds ``-p * rowsum(dout * out)`` to it.
    return_dmask : bool
        Also return the gradient of a float mask (a learned additive bias,
        such as T5's relative positions): the gradient of the scores it is
        added to, summed over everything that shared each of its elements
        (in the kernel, in a fixed order, into an array of the mask's size
        in the compute type: a bias shared by the batch takes no memory per
        batch entry).
    num_threads : int, optional

    Returns
    -------
    (dq, dk, dv) : ndarrays with the shapes of q, k and v
        In the result dtype of q, k and v (16-bit inputs: 16-bit gradients,
        computed in float32).  Where k or v were broadcast (grouped-query
        heads, leading dimensions of 1), their gradients are summed over
        everything that shared them.  With return_dsinks, a fourth: the
        sinks' gradient in the shape they were given, float32 (float64 for
        float64 inputs), summed over every row that shared each sink.  With
        return_dmask, last: the mask's gradient in its shape and dtype.
    """
    wmode, _ = _v.weights_and_lse(weights, False)
    num_threads = _config.resolve_threads(num_threads)
    return_dsinks = _v.sinks_gradient_wanted(return_dsinks, sinks)
    args = _v.ScoreArgs(q, k, v, scale, causal, mask, window, softcap, alibi_slopes, wmode, align, sinks)
    args.set_dropout(dropout_p, dropout_seed)
    return_dmask = _v.mask_gradient_wanted(return_dmask, mask, args.mask_kind)
    dout, out, lse = _v.backward_operands(args, dout, out, lse)
    dests = _v.gradient_outs(args, (dq, dk, dv), [("dout", dout), ("out", out), ("lse", lse)])
    grads = _problem.attention_backward(args, dout, out, lse, num_threads, dests,
                                        _v.mask_shape(mask) if return_dmask else None)
    grads, dmask = grads[:3], grads[3:]
    if return_dsinks:
        delta = _problem.rowsum_products(dout, out, lse.dtype)
        grads += (_problem.sinks_gradient(args.sinks, lse, delta, args.lead, np.shape(sinks)),)
    return grads + dmask


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
    wmode, _ = _v.weights_and_lse("softmax", False)
    args = _v.ScoreArgs(q, k, None, scale, causal, mask, window, softcap, alibi_slopes, wmode, align)
    out = _v.check_out(out, args.lead + (args.lq, args.lk), _v.compute_dtype(args.dtype), args.originals)
    _problem.scores(args, out, num_threads)
    return out


def weighted_sum(w, v, *, out=None, num_threads=None):
    """Weighted sum of value rows: ``out[..., i, :] = sum_j w[..., i, j] * v[..., j, :]``.

    Parameters
    ----------
    w : array_like, shape (..., Lq, Lk)
    v : array_like, shape (..., Lk, Dv)
        float32, float64, float16 or bfloat16; leading dimensions broadcast.
    out : ndarray, optional
    num_threads : int, optional

    Returns
    -------
    ndarray, shape (broadcast(...), Lq, Dv), dtype result_type(w, v)
    """
    num_threads = _config.resolve_threads(num_threads)
    w = _v.as_array(w, "w")
    v = _v.as_array(v, "v")
    _v.check_ndim(w, "w", "(..., Lq, Lk)")
    _v.check_ndim(v, "v", "(..., Lk, Dv)")
    if w.shape[-1] != v.shape[-2]:
        raise ValueError(f"w's last dim (Lk) must equal v's second to last: w {w.shape}, v {v.shape}")
    lead = _v.broadcast([("w", w.shape[:-2]), ("v", v.shape[:-2])])
    dtype = _v.result_dtype([("w", w), ("v", v)])
    out = _v.check_out(out, lead + (w.shape[-2], v.shape[-1]), dtype, [("w", w), ("v", v)])
    _problem.weighted_sum(np.asarray(w, dtype=dtype), np.asarray(v, dtype=dtype), out, lead, num_threads)
    return out


def attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, *, scale=None, causal=False,
                     weights="softmax", window=None, softcap=None, alibi_slopes=None, sinks=None,
                     return_lse=False, align="bottom-right", out=None, dropout_p=0.0, dropout_seed=None,
                     num_threads=None):
    """Attention over a packed batch of variable-length sequences (no padding).

    Sequence ``b`` is rows ``cu_seqlens_q[b] : cu_seqlens_q[b+1]`` of q and
    ``cu_seqlens_k[b] : cu_seqlens_k[b+1]`` of k and v; it attends only
    within itself.  Options are those of :func:`attention` (causal, window
    and ALiBi are aligned per sequence: by default bottom-right, and an int
    ``align`` is the key position of each sequence's first query).  With
    dropout, the weight of query head h, packed query row i and packed key
    row j is dropped as in :func:`attention` with a leading dimension of H
    (the mask of one long sequence of ``total_q`` queries and ``total_k``
    keys, of which each sequence uses its own block).

    Parameters
    ----------
    q : array_like, shape (total_q, H, D)
    k : array_like, shape (total_k, G, D)
    v : array_like, shape (total_k, G, Dv)
        float32, float64, float16 or bfloat16 (float16 or bfloat16 k and v
        under float32 q are read in place, as in :func:`attention`); H a
        multiple of G (grouped-query heads).  alibi_slopes and sinks
        broadcast to (H,).
    cu_seqlens_q, cu_seqlens_k : array_like of int, shape (batch + 1,)
        Cumulative sequence lengths, starting at 0.

    Returns
    -------
    ndarray, shape (total_q, H, Dv)
        With return_lse, also the log-sum-exp, shape (H, total_q).
    """
    key = None
    if alibi_slopes is None and sinks is None and out is None and _no_dropout(dropout_p, dropout_seed):
        hit, key = _plan_of(_varlen_planned, _varlen_key(q, k, v, cu_seqlens_q, cu_seqlens_k, return_lse, (
            scale, causal, weights, window, softcap, return_lse, align)))
        if hit is not None:
            result = _varlen_rerun(hit, q, k, v, cu_seqlens_q, cu_seqlens_k, num_threads)
            if result is not None:
                return result
    wmode, return_lse = _v.weights_and_lse(weights, return_lse)
    num_threads = _config.resolve_threads(num_threads)
    args = _v.VarlenArgs(q, k, v, cu_seqlens_q, cu_seqlens_k, scale, causal, window, softcap,
                         alibi_slopes, wmode, align, sinks, kv_in_place=True)
    args.set_dropout(dropout_p, dropout_seed)
    total_q, h = args.q.shape[:2]
    out = _v.check_out(out, (total_q, h, args.dv), args.dtype, args.originals)
    lse = np.empty((h, total_q), dtype=_v.compute_dtype(args.dtype)) if return_lse else None
    problem, layout = _problem.attention_varlen(args, args.cu_q, args.cu_k, out, lse, num_threads)
    if key is not None and all(a is o for a, (_, o) in zip((args.q, args.k, args.v), args.originals)):
        _keep_plan(_varlen_planned, key, (problem.rebased(num_threads=1, q=0, k=0, v=0, out=0, lse=0), layout,
                                          out.shape[1:], out.dtype, None if lse is None else lse.dtype, [None]),
                   _VARLEN_MAX)
    return (out, lse) if return_lse else out


# Calls of attention_varlen (no slopes, sinks or out; q, k and v each read
# in place) by their layouts and options: the problem the first such call
# ran, on no arrays, with its entries' layout.  A serving loop calls it
# every step with the same layouts over new offsets and packed lengths;
# once the offsets pass the checks (the same rule as the full checks', on
# integer arrays of the planned kind), the problem is rerun with the entries
# of these offsets, which takes a fraction of the full checks' time (the
# layers of a model, called one after the other with the same offsets, reuse
# the last call's checked entries).  Any other call (and one whose offsets
# fail) goes through the checks, which name what is wrong.
_VARLEN_MAX = 64
_varlen_planned = {}


def _varlen_key(q, k, v, cu_q, cu_k, return_lse, options):
    """The planned-call key of an attention_varlen call, or None for a call
    the plan does not serve.  The problem depends on the operands' layouts
    but for their packed lengths, except whether each is 1 (a stride along
    one row is 0) and, for the lse (H, total_q), total_q itself."""
    arrays = (q, k, v)
    if any(type(a) is not np.ndarray for a in (*arrays, cu_q, cu_k)) or any(a.ndim != 3 for a in arrays) or \
            cu_q.ndim != 1 or cu_k.ndim != 1 or cu_q.dtype.kind not in "iu" or cu_k.dtype.kind not in "iu":
        return None
    return (*(_rows_layout(a) for a in arrays), _lse_rows(q, return_lse), cu_q.shape, cu_q.dtype, cu_k.shape,
            cu_k.dtype, *((type(o), o) for o in options), _config.path_index())


def _varlen_rerun(hit, q, k, v, cu_q, cu_k, num_threads):
    """A planned attention_varlen call on this call's arrays, or None where
    its offsets or packed lengths fail the checks (the full checks then run)."""
    template, layout, out_tail, out_dtype, lse_dtype, last = hit
    total_q, total_k = q.shape[0], k.shape[0]
    if v.shape[0] != total_k:
        return None

    def build():
        cq, ck = cu_q.astype(np.int64), cu_k.astype(np.int64)
        if not (_v.offsets_ok(cq, total_q) and _v.offsets_ok(ck, total_k)):
            return None
        return _problem._varlen_entries(layout, cq, ck)

    entries = _last_entries(last, (cu_q.tobytes(), cu_k.tobytes(), total_q, total_k), build)
    if entries is None:
        return None
    out = np.empty((total_q,) + out_tail, out_dtype)
    lse = np.empty((out_tail[0], total_q), lse_dtype) if lse_dtype is not None else None
    address = _core.address
    _core.attention(template.rebased(
        num_threads=_config.resolve_threads(num_threads), q=address(q), k=address(k), v=address(v),
        out=address(out), lse=0 if lse is None else address(lse), entries=entries, keep=(q, k, v, out, lse)))
    return (out, lse) if lse is not None else out


def attention_varlen_backward(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, *, scale=None, causal=False,
                              weights="softmax", window=None, softcap=None, alibi_slopes=None, sinks=None,
                              align="bottom-right", dq=None, dk=None, dv=None, return_dsinks=False,
                              dropout_p=0.0, dropout_seed=None, num_threads=None):
    """Gradients of :func:`attention_varlen`: ``(dq, dk, dv)`` of ``sum(dout * out)``.

    As :func:`attention_backward`, for a packed batch: dout and out have
    the shape ``(total_q, H, Dv)`` and lse ``(H, total_q)``, as
    ``attention_varlen(..., return_lse=True)`` returned them (``lse=None``
    with ``weights="dot"``); the options are the forward's.  Each sequence's
    keys belong to it alone, so dk and dv sum only over its query heads.
    With return_dsinks, the sinks' gradient too (summed over every
    sequence).

    Returns
    -------
    (dq, dk, dv) : ndarrays with the shapes of q, k and v
        With return_dsinks, ``(dq, dk, dv, dsinks)``.
    """
    wmode, _ = _v.weights_and_lse(weights, False)
    num_threads = _config.resolve_threads(num_threads)
    return_dsinks = _v.sinks_gradient_wanted(return_dsinks, sinks)
    args = _v.VarlenArgs(q, k, v, cu_seqlens_q, cu_seqlens_k, scale, causal, window, softcap, alibi_slopes,
                         wmode, align, sinks)
    args.set_dropout(dropout_p, dropout_seed)
    total_q, h = args.q.shape[:2]
    dout, out, lse = _v.backward_operands(args, dout, out, lse, (total_q, h, args.dv), (h, total_q))
    dests = _v.gradient_outs(args, (dq, dk, dv), [("dout", dout), ("out", out), ("lse", lse)])
    grads = _problem.attention_varlen_backward(args, args.cu_q, args.cu_k, dout, out, lse, num_threads, dests)
    if return_dsinks:
        delta = _problem.rowsum_products(dout, out, lse.dtype).T
        grads += (_problem.sinks_gradient(args.sinks, lse, delta, (h,), np.shape(sinks)),)
    return grads


def attention_paged(q, k_cache, v_cache, block_table, seq_lens, *, cu_seqlens_q=None, scale=None, causal=True,
                    window=None, softcap=None, alibi_slopes=None, sinks=None, k_scale=None, v_scale=None,
                    return_lse=False, out=None, num_threads=None):
    """Attention over a paged KV cache, for a batch that mixes decoding and prefill.

    The keys and values of sequence ``b`` are its first ``seq_lens[b]``
    tokens, stored in blocks (pages) of ``block_size`` tokens: token ``j``
    is slot ``j % block_size`` of block ``block_table[b, j // block_size]``
    (FlashAttention's and vLLM's paged layout).  Its queries are its last
    ``n_b`` tokens (already written to the cache, see :func:`cache_write`),
    so causal, window and ALiBi are aligned bottom-right per sequence.  One
    call serves a continuous batch: some sequences decoding one token,
    others prefilling a chunk of many; long decodes are split over the keys
    so that every core has work.  The cache is read in place.

    Parameters
    ----------
    q : array_like, shape (total_q, H, D), or (batch, H, D)
        Sequence ``b``'s queries are rows ``cu_seqlens_q[b] : cu_seqlens_q[b+1]``;
        without ``cu_seqlens_q``, one query per sequence (decoding).
    k_cache : ndarray, shape (num_blocks, block_size, G, D)
    v_cache : ndarray, shape (num_blocks, block_size, G, Dv)
        The dtype of q; float16 or bfloat16 under float32 queries; or 8
        bits: int8, ``ml_dtypes.float8_e4m3fn`` or ``float8_e5m2``,
        dequantised as the kernel reads them (the queries and the result
        keep q's dtype).  H a multiple of G (grouped-query
        heads).  A block stride must be a multiple of 64 bytes or of the row
        stride (true of any contiguous cache).
    block_table : array_like of int, shape (batch, max_blocks_per_seq)
        The blocks of each sequence, in order; entries past a sequence's
        last block are not read.  Every block a sequence uses must exist.
    seq_lens : array_like of int, shape (batch,)
        Keys of each sequence, this step's tokens included.
    cu_seqlens_q : array_like of int, shape (batch + 1,), optional
    scale, causal, window, softcap, alibi_slopes, sinks
        As in :func:`attention` (causal by default; slopes and sinks
        broadcast to (H,)).
    k_scale, v_scale : optional
        The scales of an 8-bit cache (required then, else None): for int8,
        float32 arrays of shape (num_blocks, block_size, G), the stored
        value of a token and head times its scale being its key (symmetric,
        filled by :func:`cache_write`); for float8, one float each (per
        tensor).
    return_lse : bool
        Also return the log-sum-exp, shape (H, total_q).
    out : ndarray, optional
    num_threads : int, optional

    Returns
    -------
    ndarray, shape (total_q, H, Dv)
        With return_lse, the pair ``(out, lse)``.
    """
    key = None
    if alibi_slopes is None and sinks is None and out is None:
        hit, key = _plan_of(_paged_planned, _paged_key(q, k_cache, v_cache, block_table, seq_lens, cu_seqlens_q,
                                                       scale, causal, window, softcap, k_scale, v_scale, return_lse))
        if hit is not None:
            result = _paged_rerun(hit, q, k_cache, v_cache, block_table, seq_lens, cu_seqlens_q, k_scale, v_scale,
                                  num_threads)
            if result is not None:
                return result
    return_lse = _v.flag(return_lse, "return_lse")
    num_threads = _config.resolve_threads(num_threads)
    args = _v.PagedArgs(q, k_cache, v_cache, block_table, seq_lens, cu_seqlens_q, scale, causal, window, softcap,
                        alibi_slopes, sinks, k_scale, v_scale)
    total_q, h = args.q.shape[:2]
    out = _v.check_out(out, (total_q, h, args.dv), args.dtype, args.originals)
    lse = np.empty((h, total_q), dtype=_v.compute_dtype(args.dtype)) if return_lse else None
    problem, entries, queries = _problem.attention_paged(args, out, lse, num_threads)
    if key is not None:
        _keep_plan(_paged_planned, key, (problem.rebased(num_threads=1, q=0, k=0, v=0, out=0, lse=0), entries, queries,
                                         args.block_size, out.shape[1:], out.dtype,
                                         None if lse is None else lse.dtype, [None]), _PAGED_MAX)
    return (out, lse) if return_lse else out


# Calls of attention_paged (no slopes, sinks or out) by their layouts and
# options: the problem the first such call ran, on no arrays, with its entry
# table and the layout of its query columns.  A serving loop calls it every
# step with the same layouts and new sequence lengths, block tables and
# (with cu_seqlens_q) query offsets; once those pass a cheap check (every
# length in [1, the table's keys] for one query per sequence, else the
# offsets as the full checks' rule has them and every length in [its
# queries, the table's keys]; every block id in use in range: the kernel's
# own check, which reads only the ids in use and rejects the call before
# touching memory), the problem is rerun with them in its entry table,
# which takes a fraction of the full checks' time (the layers of a model,
# called one after the other with the same lengths and offsets, reuse the
# last call's checked entries; block ids are checked every call).  Any
# other call (and one that fails the cheap check) goes through the checks,
# which name what is wrong.
_PAGED_MAX = 64
_paged_planned = {}


def _paged_key(q, k_cache, v_cache, block_table, seq_lens, cu_q, scale, causal, window, softcap, k_scale, v_scale,
               return_lse):
    """The planned-call key of an attention_paged call, or None for a call
    the plan does not serve.  With query offsets, the problem depends on q's
    layout but for its number of rows, except whether it is 1 (a stride
    along one row is 0) and, for the lse (H, total_q), the number itself."""
    arrays = (q, k_cache, v_cache, block_table, seq_lens)
    if any(type(a) is not np.ndarray for a in arrays) or block_table.dtype != np.int32 or \
            not block_table.flags.c_contiguous or seq_lens.ndim != 1 or seq_lens.dtype.kind not in "iu" or \
            seq_lens.shape[0] == 0 or q.ndim != 3:
        return None
    layouts = [(a.shape, a.strides, a.dtype) for a in arrays]
    queries = None  # one query per sequence: q's shape is the batch's
    if cu_q is not None:
        if type(cu_q) is not np.ndarray or cu_q.ndim != 1 or cu_q.dtype.kind not in "iu":
            return None
        queries = (cu_q.shape, cu_q.dtype, _lse_rows(q, return_lse))
        layouts[0] = _rows_layout(q)
    scales = []
    for s in (k_scale, v_scale):
        if s is None or type(s) is float:  # a float cache's, or a float8 cache's per-tensor scale
            scales.append((type(s), s))
        elif type(s) is np.ndarray and s.dtype == np.float32 and s.ndim == 3:  # an int8 cache's
            scales.append((s.shape, s.strides))
        else:
            return None
    # each option with its type, so that one refused for its type is never served from an accepted one
    return (*layouts, queries, *scales,
            *((type(o), o) for o in (scale, causal, window, softcap, return_lse)), _config.path_index())


def _paged_rerun(hit, q, k_cache, v_cache, block_table, seq_lens, cu_q, k_scale, v_scale, num_threads):
    """A planned attention_paged call on this call's arrays, or None where its
    lengths, query offsets or block ids fail the cheap check (the full checks
    then run)."""
    template, entries, queries, block_size, out_tail, out_dtype, lse_dtype, last = hit
    total_q, most = q.shape[0], block_table.shape[1] * block_size

    def build():
        if cu_q is None:
            if seq_lens.min() < 1 or seq_lens.max() > most:
                return None
            return _problem._sequence_columns(entries, queries, lk=seq_lens)
        cq = cu_q.astype(np.int64)
        if not _v.offsets_ok(cq, total_q) or seq_lens.max() > most or \
                ((cq[1:] - cq[:-1]) > seq_lens).any():  # a sequence's keys count its queries (so >= 0)
            return None
        return _problem._sequence_columns(entries, queries, cq, seq_lens)

    tag = (seq_lens.tobytes(), None if cu_q is None else cu_q.tobytes(), total_q)
    checked = _last_entries(last, tag, build)
    if checked is None:
        return None
    scales = [np.array([s], np.float32) if type(s) is float else s for s in (k_scale, v_scale)]
    address = _core.address
    out = np.empty((total_q,) + out_tail, out_dtype)
    lse = np.empty((out_tail[0], total_q), lse_dtype) if lse_dtype is not None else None
    try:
        _core.attention(template.rebased(
            num_threads=_config.resolve_threads(num_threads), q=address(q), k=address(k_cache), v=address(v_cache),
            out=address(out), lse=0 if lse is None else address(lse), entries=checked, pages=block_table.reshape(-1),
            k_scales=0 if scales[0] is None else address(scales[0]),
            v_scales=0 if scales[1] is None else address(scales[1]),
            keep=(q, k_cache, v_cache, block_table, out, lse, *scales)))
    except _core.Rejected:  # a block id in use out of range
        return None
    return (out, lse) if lse is not None else out


def cache_write(k, v, k_cache, v_cache, slot_mapping, *, k_scale=None, v_scale=None):
    """Write new tokens' keys and values into a paged KV cache, in place.

    Token ``t`` goes to slot ``slot_mapping[t]`` = ``block * block_size +
    offset``: ``k_cache[block, offset] = k[t]``, converted to the cache's
    dtype; a slot of -1 skips the token (padding).  Float caches round to
    nearest.  An int8 cache stores each token and head symmetrically
    quantised, ``round(k / s)`` with ``s = max|k| / 127``, and writes ``s``
    to ``k_scale[block, offset, head]``; a float8 cache stores
    ``k / k_scale`` (its per-tensor scale, given), rounded to nearest and
    clipped to the type's largest finite value.

    Parameters
    ----------
    k : array_like, shape (T, G, D)
    v : array_like, shape (T, G, Dv)
    k_cache, v_cache : ndarray, shapes (num_blocks, block_size, G, D|Dv)
        As :func:`attention_paged` reads them; written in place.
    slot_mapping : array_like of int, shape (T,)
        Distinct slots in ``[0, num_blocks * block_size)``, or -1.
    k_scale, v_scale : optional
        An 8-bit cache's scales, as :func:`attention_paged` takes them
        (int8: written here).
    """
    k, v, k_cache, v_cache, keep, slots = _v.cache_slots(k, v, k_cache, v_cache, slot_mapping)
    scales = _v.cache_scales(k_cache, k_scale, v_scale)
    bs = k_cache.shape[1]
    blocks, offsets = slots // bs, slots % bs
    for x, cache, sc in ((k[keep], k_cache, scales[0]), (v[keep], v_cache, scales[1])):
        if cache.dtype == np.int8:
            x = x.astype(np.float32)
            s = np.max(np.abs(x), axis=-1) / np.float32(127)  # (tokens, G)
            with np.errstate(divide="ignore", invalid="ignore"):
                codes = np.where(s[..., None] > 0, np.rint(x / s[..., None]), 0)
            cache[blocks, offsets] = np.clip(codes, -127, 127).astype(np.int8)
            sc[blocks, offsets] = s
        elif cache.dtype in _v.KV8_DTYPES:
            top = float(_v.ml_dtypes.finfo(cache.dtype).max)
            cache[blocks, offsets] = np.clip(x.astype(np.float32) / sc[0], -top, top).astype(cache.dtype)
        else:
            cache[blocks, offsets] = x


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
    outputs = [_v.as_array(o, f"outputs[{i}]") for i, o in enumerate(outputs)]
    lses = [_v.as_array(s, f"lses[{i}]") for i, s in enumerate(lses)]
    if not outputs or len(outputs) != len(lses):
        raise ValueError(f"merge needs as many outputs as lses, at least one; got "
                         f"{len(outputs)} and {len(lses)}")
    for i, (o, s) in enumerate(zip(outputs, lses)):
        if o.ndim < 1 or o.shape[:-1] != s.shape:
            raise ValueError(f"outputs[{i}] of shape {o.shape} does not match lses[{i}] of shape {s.shape}")
        if o.shape != outputs[0].shape:
            raise ValueError(f"outputs[{i}] has shape {o.shape}, outputs[0] has {outputs[0].shape}")
    out_dtype = _v.result_dtype([(f"outputs[{i}]", o) for i, o in enumerate(outputs)])
    lse_dtype = _v.result_dtype([(f"lses[{i}]", s) for i, s in enumerate(lses)])
    dtype = np.result_type(_v.compute_dtype(out_dtype), _v.compute_dtype(lse_dtype))
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
