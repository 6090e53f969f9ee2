"""Argument checks shared by every public function and by fastattn.torch.

One place for each rule: what an array argument may be and its dtype,
numpy's promotion of the inputs' dtypes (and the dtype kernels compute in),
broadcasting of leading dimensions, the grouped-query head rule, ALiBi
slopes and sinks, the score options, `out=`, packed-sequence offsets and
paged KV caches.  Errors name
the argument, its shape and dtype: TypeError for types, ValueError for
shapes and values.  Nothing here touches the kernels.
"""
import copy
import math
import numbers
import operator

import numpy as np

from fastattn import _core

try:  # numpy's standard bfloat16 (as used by JAX)
    import ml_dtypes

    BFLOAT16 = np.dtype(ml_dtypes.bfloat16)
except ImportError:  # pragma: no cover - ml_dtypes is a dependency
    BFLOAT16 = None

# Element types the kernels take, with their kernel codes.
DTYPES = {
    np.dtype(np.float32): _core.DTYPE_F32,
    np.dtype(np.float64): _core.DTYPE_F64,
    np.dtype(np.float16): _core.DTYPE_F16,
}
if BFLOAT16 is not None:
    DTYPES[BFLOAT16] = _core.DTYPE_BF16
FLOAT_KINDS = "float16, bfloat16, float32 or float64"
HALF_DTYPES = tuple(dt for dt in DTYPES if dt.itemsize == 2)

# 8-bit storage types of a paged KV cache, with their kernel codes: int8
# (a scale per token and head), float8 e4m3 and e5m2 (a scale per tensor).
KV8_DTYPES = {np.dtype(np.int8): _core.DTYPE_I8}
if BFLOAT16 is not None:
    KV8_DTYPES[np.dtype(ml_dtypes.float8_e4m3fn)] = _core.DTYPE_E4M3
    KV8_DTYPES[np.dtype(ml_dtypes.float8_e5m2)] = _core.DTYPE_E5M2
CACHE_DTYPES = {**DTYPES, **KV8_DTYPES}
CACHE_KINDS = FLOAT_KINDS + ", int8, float8_e4m3fn or float8_e5m2"

MASK_KINDS = {
    np.dtype(np.bool_): _core.MASK_BOOL,
    np.dtype(np.float32): _core.MASK_F32,
    np.dtype(np.float64): _core.MASK_F64,
    np.dtype(np.float16): _core.MASK_F16,
}
if BFLOAT16 is not None:
    MASK_KINDS[BFLOAT16] = _core.MASK_BF16
MASK_NAMES = "bool or float (float16, bfloat16, float32 or float64)"
WEIGHTS = {"softmax": _core.WEIGHTS_SOFTMAX, "dot": _core.WEIGHTS_DOT}
ALIGNS = ("bottom-right", "top-left")


# ---- dtypes --------------------------------------------------------------------


def compute_dtype(dtype):
    """The dtype kernels compute in (and return lse and scores in)."""
    return np.dtype(np.float32) if dtype.itemsize == 2 else dtype


def kv_stored(dtype, k, v):
    """The dtype attention reads k and v in, in place, under queries and a
    result of `dtype`: float16 or bfloat16 k and v of one dtype under
    float32 (the kernels widen their rows in registers, as they do for a
    16-bit cache), else `dtype` (k and v converted to it)."""
    if dtype == np.float32 and v is not None and k.dtype == v.dtype and k.dtype in HALF_DTYPES:
        return k.dtype
    return dtype


def result_dtype(named):
    """numpy's promotion of the named arrays' dtypes, as a TypeError naming them if none."""
    try:
        return np.result_type(*(a for _, a in named))
    except TypeError:
        desc = ", ".join(f"{n} ({a.dtype})" for n, a in named)
        raise TypeError(f"no common dtype for {desc}; convert them to one dtype") from None


# ---- arrays and scalars --------------------------------------------------------


def as_array(x, name, kinds=FLOAT_KINDS, allowed=DTYPES):
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


def check_ndim(a, name, core="(..., L, D)"):
    if a.ndim < 2:
        raise ValueError(f"{name} must have at least 2 dimensions {core}, got shape {a.shape}")


def real(x, name):
    if isinstance(x, (bool, np.bool_)) or not isinstance(x, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(x).__name__}")
    return float(x)


def integer(x, name, what="an int"):
    """x as a Python int (anything with __index__ but a bool), or a TypeError
    saying that `name` must be `what`."""
    if isinstance(x, (bool, np.bool_)):
        raise TypeError(f"{name} must be {what}, got {type(x).__name__}")
    try:
        return operator.index(x)
    except TypeError:
        raise TypeError(f"{name} must be {what}, got {type(x).__name__}") from None


def count(x, name, minimum=1):
    """An int of at least `minimum` (a TypeError or ValueError naming `name`)."""
    n = integer(x, name)
    if n < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {n}")
    return n


def flag(x, name):
    if not isinstance(x, (bool, np.bool_)):
        raise TypeError(f"{name} must be a bool, got {type(x).__name__}")
    return bool(x)


# ---- score options -------------------------------------------------------------


def window(window):
    """(left, right) with -1 for unbounded; None means no window."""
    if window is None:
        return -1, -1
    if not isinstance(window, (tuple, list)) or len(window) != 2:
        raise TypeError(f"window must be a (left, right) pair of ints, got {window!r}")
    out = []
    for side, w in zip(("left", "right"), window):
        w = -1 if w is None else integer(w, f"window {side}")
        if w < -1:
            raise ValueError(f"window {side} must be >= 0, or -1 for unbounded, got {w}")
        out.append(min(w, 2**62))
    return tuple(out)


# the largest |align| given as a key position: positions and window bounds stay in int64
ALIGN_MAX = 2**60


def alignment(align):
    """(top_left, shift) in the kernels' terms: query i sits at key position
    ``(i if top_left else i + Lk - Lq) + shift``.  align is "bottom-right",
    "top-left", or an int: the key position of query 0."""
    if isinstance(align, str):
        if align not in ALIGNS:
            raise ValueError(f"align must be 'bottom-right', 'top-left' or an int, got {align!r}")
        return align == "top-left", 0
    shift = integer(align, "align", "'bottom-right', 'top-left' or an int")
    if abs(shift) > ALIGN_MAX:
        raise ValueError(f"align must be within +-2**60, got {shift}")
    return True, shift


def softcap(softcap):
    if softcap is None:
        return 0.0
    cap = real(softcap, "softcap")
    if not (cap >= 0.0 and math.isfinite(cap)):
        raise ValueError(f"softcap must be a finite number >= 0 (0 = off), got {softcap!r}")
    return cap


def dropout(p, seed):
    """(dropout_p, dropout_seed) in the kernels' terms: p in [0, 1) and, for
    p > 0, the seed as an int in [0, 2**64) (required: the backward drops
    the same weights only given the forward's seed); (0.0, 0) for p = 0."""
    p = real(p, "dropout_p")
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {p!r}")
    if seed is not None:
        seed = integer(seed, "dropout_seed")
        if not 0 <= seed < 2**64:
            raise ValueError(f"dropout_seed must be in [0, 2**64), got {seed}")
    if p == 0.0:
        return 0.0, 0
    if seed is None:
        raise ValueError("dropout_seed is required with dropout_p > 0 (the backward needs the forward's seed "
                         "to drop the same weights)")
    return p, seed


def weights_and_lse(weights, return_lse):
    """The kernel's weighting code, and return_lse checked against it."""
    if not isinstance(weights, str) or weights not in WEIGHTS:
        raise ValueError(f"weights must be 'softmax' or 'dot', got {weights!r}")
    return_lse = flag(return_lse, "return_lse")
    if return_lse and weights != "softmax":
        raise ValueError("return_lse=True needs weights='softmax'")
    return WEIGHTS[weights], return_lse


def scale(scale, wmode, d):
    """scale, defaulting to 1/sqrt(D) for softmax and 1 for dot weights."""
    if scale is None:
        return 1.0 if wmode == _core.WEIGHTS_DOT or d == 0 else 1.0 / math.sqrt(d)
    return real(scale, "scale")


def mask_operand(mask, lq, lk):
    """Mask as (array viewed with >= 2 dims, kind), checking dtype and core dims."""
    m = as_array(mask, "mask", MASK_NAMES + " (or a fastattn.BlockMask)", MASK_KINDS)
    if m.ndim < 2:
        m = m.reshape((1,) * (2 - m.ndim) + m.shape)
    if m.shape[-2] not in (1, lq) or m.shape[-1] not in (1, lk):
        raise ValueError(
            f"mask of shape {m.shape} does not broadcast to (..., Lq, Lk) = (..., {lq}, {lk})"
        )
    return m, MASK_KINDS[m.dtype]


def per_head(values, lead, name):
    """One float64 value per query head: values broadcast to the query
    heads' leading dimensions `lead`, flattened in C order; None stays None."""
    if values is None:
        return None
    s = as_array(values, name)
    try:
        s = np.broadcast_to(s, lead)
    except ValueError:
        raise ValueError(
            f"{name} of shape {s.shape} must broadcast to the leading "
            f"dimensions {lead} (one value per query head)"
        ) from None
    return np.ascontiguousarray(s, dtype=np.float64).reshape(-1)


def alibi_slopes(slopes, lead):
    """One float64 ALiBi slope per query head (per_head)."""
    return per_head(slopes, lead, "alibi_slopes")


def sinks_gradient_wanted(return_dsinks, sinks):
    """return_dsinks checked: a bool, True only with sinks."""
    wanted = flag(return_dsinks, "return_dsinks")
    if wanted and sinks is None:
        raise ValueError("return_dsinks=True needs sinks (there is no sink to differentiate)")
    return wanted


def mask_shape(mask):
    """The shape a mask was given in (a BlockMask's, its mask's)."""
    from fastattn._masks import BlockMask

    return np.shape(mask.mask if isinstance(mask, BlockMask) else mask)


def mask_gradient_wanted(return_dmask, mask, mask_kind):
    """return_dmask checked: a bool, True only with a float mask (added to
    the scores; a bool mask has no gradient)."""
    wanted = flag(return_dmask, "return_dmask")
    if wanted and mask_kind in (_core.MASK_NONE, _core.MASK_BOOL):
        raise ValueError("return_dmask=True needs a float mask (added to the scores); "
                         + ("a bool mask has no gradient" if mask is not None else "there is no mask"))
    return wanted


def sinks(values, lead, wmode):
    """One float64 sink logit per query head (per_head): finite, or -inf
    for a head without one; softmax weights only."""
    s = per_head(values, lead, "sinks")
    if s is None:
        return None
    if wmode != _core.WEIGHTS_SOFTMAX:
        raise ValueError("sinks need weights='softmax' (they add to the softmax's denominator)")
    if np.any(np.isnan(s) | (s == np.inf)):
        raise ValueError(f"sinks must be finite (or -inf for none), got {values!r}")
    return s


# ---- shapes ----------------------------------------------------------------------


def broadcast(named_shapes, what="leading dimensions"):
    """numpy's broadcasting rule, with an error naming every argument, and a
    ValueError (not an overflow) when the result has 2**63 entries or more."""
    def desc():  # only for an error: a call that passes builds no strings
        return ", ".join(f"{n} {s}" for n, s in named_shapes)

    ndim = max((len(s) for _, s in named_shapes), default=0)
    out = [1] * ndim
    for _, shape in named_shapes:
        for ax, n in enumerate(shape, ndim - len(shape)):
            if n != 1:
                if out[ax] not in (1, n):
                    raise ValueError(f"{what} do not broadcast: {desc()}")
                out[ax] = n
    if math.prod(out) >= 2**63:
        raise ValueError(f"{what} are too big: {tuple(out)} has 2**63 entries or more ({desc()})")
    return tuple(out)


def kv_group(h, g, names=()):
    """The grouped-query rule: with q's h heads over k/v's g heads, query
    head i uses key/value head i // (h // g), so h must be a multiple of g.
    Returns h // g (1 when the counts are equal)."""
    if g == h:
        return 1
    if g == 0 or h % g != 0:
        desc = ", ".join(f"{n} {s}" for n, s in names)
        raise ValueError(
            f"head counts do not match: q has {h} heads, k/v have {g}; grouped-query "
            f"attention needs a multiple" + (f" ({desc})" if desc else "")
        )
    return h // g


def lead_group(q_lead, kv_leads, names):
    """Grouped-query heads for operands with leading dimensions: the factor
    by which q's head axis (its last leading axis) exceeds the head axis k and
    v share, or 1 where that axis broadcasts instead (k/v heads of 1, or q
    without one).  Any other mismatch is left to broadcast() to report."""
    if not q_lead:
        return 1
    h = q_lead[-1]
    gs = {lead[-1] for lead in kv_leads if lead}
    gs.discard(1)
    if len(gs) != 1 or h <= 1:
        return 1
    g = gs.pop()
    group = kv_group(h, g, names)
    if group > 1 and any(lead and lead[-1] not in (1, g) for lead in kv_leads):
        raise ValueError("k and v must have the same number of heads")
    return group


def check_out(out, shape, dtype, inputs, name="out"):
    """`out` checked against the result's shape and dtype and the inputs, or a new array."""
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
    if out.size and any(st == 0 and n > 1 for n, st in zip(out.shape, out.strides)):
        raise ValueError(f"{name} has overlapping elements (a zero stride), strides {out.strides}")
    for other, a in inputs:
        if a is not None and np.may_share_memory(out, a):
            raise ValueError(f"{name} overlaps the input {other}")
    return out


def gradient_outs(args, given, inputs):
    """The dq, dk, dv= arguments of a backward, each checked (check_out)
    against its operand's shape and the result dtype, the inputs and the
    gradients before it (they may not overlap one another), or None."""
    others = args.originals + list(inputs)
    dests = []
    for name, a, x in zip(("dq", "dk", "dv"), given, (args.q, args.k, args.v)):
        dests.append(None if a is None else check_out(a, x.shape, args.dtype, others, name))
        others.append((name, a))
    return tuple(dests)


def offsets_ok(cu, total):
    """Whether cu (1-D int64, not empty) starts at 0, never decreases and
    ends at `total`.  Compared, not subtracted: a difference of offsets
    could wrap around (9e18 - -9e18 to a positive length)."""
    return cu[0] == 0 and cu[-1] == total and not (cu[1:] < cu[:-1]).any()


def cu_seqlens(cu, name, total):
    """Cumulative sequence lengths (int64): from 0, never decreasing, ending at `total`."""
    cu = np.asarray(cu)
    if cu.dtype.kind not in "iu":
        raise TypeError(f"{name} must be an integer array, got dtype {cu.dtype}")
    if cu.ndim != 1 or cu.shape[0] < 1:
        raise ValueError(f"{name} must be 1-D with batch + 1 entries, got shape {cu.shape}")
    cu = cu.astype(np.int64)
    if not offsets_ok(cu, total):
        raise ValueError(
            f"{name} must start at 0, never decrease and end at the packed length {total}, got {cu}"
        )
    return cu


# ---- whole argument sets ------------------------------------------------------


class _Options:
    """Score options in the kernels' terms (shared by the argument sets)."""

    def _options(self, wmode, scale_, causal, align, window_, softcap_):
        self.weights = wmode
        self.sinks = None
        self.dropout_p, self.dropout_seed = 0.0, 0  # set_dropout
        self.scale = scale(scale_, wmode, self.d)
        self.causal = flag(causal, "causal")
        self.top_left, self.q_shift = alignment(align)
        self.window = window(window_)
        self.softcap = softcap(softcap_)


    def set_dropout(self, p, seed):
        """Dropout on the weights (checked by dropout(); attention and its
        backward only)."""
        self.dropout_p, self.dropout_seed = dropout(p, seed)
        return self


class ScoreArgs(_Options):
    """The validated arguments of attention() and scores(): arrays in the
    result dtype, the leading dimensions they broadcast to, the grouped-query
    factor and every score option in the kernels' terms."""

    cache_key = None  # set by score_args: what its cache knows these arguments by

    def __init__(self, q, k, v, scale_, causal, mask, window_, softcap_, slopes, wmode,
                 align="bottom-right", sinks_=None, kv_in_place=False):
        q = as_array(q, "q")
        k = as_array(k, "k")
        check_ndim(q, "q")
        check_ndim(k, "k")
        arrays = [("q", q), ("k", k)]
        if v is not None:
            v = as_array(v, "v")
            check_ndim(v, "v", "(..., Lk, Dv)")
            arrays.append(("v", v))
        self.originals = list(arrays)
        self.dtype = result_dtype(arrays)
        if q.shape[-1] != k.shape[-1]:
            raise ValueError(f"q and k must have the same head dim D: q {q.shape}, k {k.shape}")
        if v is not None and v.shape[-2] != k.shape[-2]:
            raise ValueError(f"k and v must have the same length Lk: k {k.shape}, v {v.shape}")
        self.lq, self.d = q.shape[-2:]
        self.lk = k.shape[-2]
        self.dv = v.shape[-1] if v is not None else 0
        self._options(wmode, scale_, causal, align, window_, softcap_)

        self.mask, self.mask_kind, self.tiles = None, _core.MASK_NONE, None
        if mask is not None:
            from fastattn._masks import BlockMask

            if isinstance(mask, BlockMask):  # its table of block kinds goes along
                mask, self.tiles = mask.mask, mask.kinds
            self.mask, self.mask_kind = mask_operand(mask, self.lq, self.lk)
            self.originals.append(("mask", self.mask))

        leads = [(n, a.shape[:-2]) for n, a in arrays]
        if self.mask is not None:
            leads.append(("mask", self.mask.shape[:-2]))
        kv_leads = [a.shape[:-2] for n, a in arrays if n in ("k", "v")]
        self.group = lead_group(q.shape[:-2], kv_leads, leads)
        if self.group > 1:  # broadcast the kv head axis as if it had q's length
            h = q.shape[-3]
            leads = [(n, s[:-1] + (h,)) if n in ("k", "v") else (n, s) for n, s in leads]
        self.lead = broadcast(leads)
        self.slopes = alibi_slopes(slopes, self.lead)
        self.sinks = sinks(sinks_, self.lead, wmode)

        # kernels compute in the result dtype: convert (copies only q, k, v),
        # but for the forward's k and v where it reads them as they are
        self.kv_dtype = kv_stored(self.dtype, k, v) if kv_in_place else self.dtype
        self.q = np.asarray(q, dtype=self.dtype)
        self.k = np.asarray(k, dtype=self.kv_dtype)
        self.v = np.asarray(v, dtype=self.kv_dtype) if v is not None else None


# Validated arguments of attention() by their operands' layouts and options:
# for plain arrays with no mask, ALiBi slopes or sinks, everything ScoreArgs
# checks and derives depends only on the shapes, strides and dtypes of q, k
# and v and on the options (each keyed with its type, so that an option
# refused for its type is never served from an accepted one), and a model
# calls attention with the same ones over and over.
_ARGS_CACHE_MAX = 256
_args_cache = {}


def score_args(q, k, v, scale_, causal, mask, window_, softcap_, slopes, wmode, align="bottom-right",
               sinks_=None):
    """ScoreArgs(...) of attention() (k and v in place where kv_stored
    allows), from the cache where it can be."""
    def validated():
        return ScoreArgs(q, k, v, scale_, causal, mask, window_, softcap_, slopes, wmode, align, sinks_,
                         kv_in_place=True)

    if mask is not None or slopes is not None or sinks_ is not None or not (
            type(q) is np.ndarray and type(k) is np.ndarray and type(v) is np.ndarray):
        return validated()
    key = (q.shape, q.strides, q.dtype, k.shape, k.strides, k.dtype, v.shape, v.strides, v.dtype, wmode,
           *((type(o), o) for o in (scale_, causal, window_, softcap_, align)))
    try:
        cached = _args_cache.get(key)
    except TypeError:  # an unhashable option (a window given as a list): validated every time
        return validated()
    if cached is None:
        args = validated()
        if len(_args_cache) >= _ARGS_CACHE_MAX:
            _args_cache.clear()
        _args_cache[key] = cached = copy.copy(args)
        cached.q = cached.k = cached.v = cached.originals = None  # keep no array alive
        cached.cache_key = args.cache_key = key
        return args
    args = ScoreArgs.__new__(ScoreArgs)
    args.__dict__.update(cached.__dict__)
    args.originals = [("q", q), ("k", k), ("v", v)]
    args.q = q if q.dtype == args.dtype else np.asarray(q, dtype=args.dtype)
    args.k = k if k.dtype == args.kv_dtype else np.asarray(k, dtype=args.kv_dtype)
    args.v = v if v.dtype == args.kv_dtype else np.asarray(v, dtype=args.kv_dtype)
    return args


class VarlenArgs(_Options):
    """The validated arguments of attention_varlen(): q (total_q, H, D), k and
    v (total_k, G, D|Dv) in the result dtype (with kv_in_place, the
    forward's, in kv_stored's), the sequence offsets as int64, the
    grouped-query factor H // G and the score options."""

    def __init__(self, q, k, v, cu_seqlens_q, cu_seqlens_k, scale_, causal, window_, softcap_, slopes,
                 wmode, align, sinks_=None, kv_in_place=False):
        q = as_array(q, "q")
        k = as_array(k, "k")
        v = as_array(v, "v")
        for name, a in (("q", q), ("k", k), ("v", v)):
            if a.ndim != 3:
                raise ValueError(f"{name} must have shape (total, heads, dim), got {a.shape}")
        total_q, h, self.d = q.shape
        total_k, g, _ = k.shape
        self.dv = v.shape[2]
        if k.shape[2] != self.d:
            raise ValueError(f"q and k must have the same head dim D: q {q.shape}, k {k.shape}")
        if v.shape[:2] != k.shape[:2]:
            raise ValueError(f"k and v must have the same length and heads: k {k.shape}, v {v.shape}")
        self.group = kv_group(h, g, [("q", q.shape), ("k", k.shape), ("v", v.shape)])
        self.cu_q = cu_seqlens(cu_seqlens_q, "cu_seqlens_q", total_q)
        self.cu_k = cu_seqlens(cu_seqlens_k, "cu_seqlens_k", total_k)
        if self.cu_q.shape != self.cu_k.shape:
            raise ValueError(f"cu_seqlens_q and cu_seqlens_k must have the same length, got "
                             f"{self.cu_q.shape[0]} and {self.cu_k.shape[0]}")
        self._options(wmode, scale_, causal, align, window_, softcap_)
        self.mask, self.mask_kind = None, _core.MASK_NONE
        self.slopes = alibi_slopes(slopes, (h,))
        self.sinks = sinks(sinks_, (h,), wmode)
        self.originals = [("q", q), ("k", k), ("v", v)]
        self.dtype = result_dtype(self.originals)
        self.kv_dtype = kv_stored(self.dtype, k, v) if kv_in_place else self.dtype
        self.q = np.asarray(q, dtype=self.dtype)
        self.k, self.v = (np.asarray(a, dtype=self.kv_dtype) for a in (k, v))


def backward_operands(args, dout, out, lse, out_shape=None, lse_shape=None):
    """dout and out (in the result dtype; the kernel computes delta =
    rowsum(dout * out) from them) and lse in the compute dtype, checked
    against the forward's result shapes (by default those of attention();
    attention_varlen's are given); lse is None for dot weights, which have
    none."""
    out_shape = args.lead + (args.lq, args.dv) if out_shape is None else out_shape
    lse_shape = out_shape[:-1] if lse_shape is None else lse_shape
    named = {}
    for name, a in (("dout", dout), ("out", out)):
        a = as_array(a, name)
        if a.shape != out_shape:
            raise ValueError(f"{name} must have the attention output's shape {out_shape}, got {a.shape}")
        named[name] = np.asarray(a, dtype=args.dtype)
    if args.weights == _core.WEIGHTS_DOT:
        if lse is not None:
            raise ValueError("lse must be None with weights='dot' (dot weights have no log-sum-exp)")
        lse = None
    else:
        if lse is None:
            raise ValueError("lse is required with weights='softmax' (attention(..., return_lse=True) gives it)")
        lse = as_array(lse, "lse")
        if lse.shape != lse_shape:
            raise ValueError(f"lse must have shape {lse_shape}, as the forward returned it, got {lse.shape}")
        lse = np.asarray(lse, dtype=compute_dtype(args.dtype))
    return named["dout"], named["out"], lse


def int_array(a, name, ndim, shape_desc):
    """An integer array of `ndim` dimensions, as C-contiguous int64 (a
    TypeError for other dtypes, a ValueError for other shapes)."""
    a = np.asarray(a)
    if a.dtype.kind not in "iu":
        raise TypeError(f"{name} must be an integer array, got dtype {a.dtype}")
    if a.ndim != ndim:
        raise ValueError(f"{name} must have shape {shape_desc}, got {a.shape}")
    return np.ascontiguousarray(a, dtype=np.int64)


def page_row_stride(c):
    """The row stride of a paged cache (num_blocks, block_size, ...) as the
    kernels take it: a page of one row has the page stride (the pages are
    the rows), so that the block-stride rule holds for every contiguous cache."""
    if c.shape[1] > 1:
        return c.strides[1]
    return c.strides[0] if c.shape[0] > 1 else 0


def kv_cache(k_cache, v_cache):
    """The paged caches (num_blocks, block_size, G, D) and (..., Dv): same
    blocks, block size and heads; page strides that keep every page at the
    same place within a 64-byte vector as its rows (fastattn.h)."""
    k_cache = as_array(k_cache, "k_cache", CACHE_KINDS, CACHE_DTYPES)
    v_cache = as_array(v_cache, "v_cache", CACHE_KINDS, CACHE_DTYPES)
    for name, c in (("k_cache", k_cache), ("v_cache", v_cache)):
        if c.ndim != 4:
            raise ValueError(f"{name} must have shape (num_blocks, block_size, kv_heads, dim), got {c.shape}")
        if c.dtype in KV8_DTYPES and c.shape[3] > 1 and c.strides[3] != 1:
            raise ValueError(f"an 8-bit {name} must have contiguous rows (last stride 1), got strides {c.strides}")
        ps, rs = c.strides[0] if c.shape[0] > 1 else 0, page_row_stride(c)
        if ps % 64 != 0 and (rs == 0 or ps % rs != 0):
            raise ValueError(f"{name}'s block stride ({ps} bytes) must be a multiple of 64 bytes or of its row "
                             f"stride ({rs} bytes)")
    if k_cache.shape[:3] != v_cache.shape[:3]:
        raise ValueError(f"k_cache and v_cache must have the same blocks, block size and heads: "
                         f"k_cache {k_cache.shape}, v_cache {v_cache.shape}")
    if k_cache.dtype != v_cache.dtype:
        raise TypeError(f"k_cache and v_cache must have one dtype, got {k_cache.dtype} and {v_cache.dtype}")
    if 0 in k_cache.shape[:3]:
        raise ValueError(f"k_cache must have at least one block, row and head, got shape {k_cache.shape}")
    return k_cache, v_cache


def cache_scales(k_cache, k_scale, v_scale):
    """The scales of an 8-bit cache, read (and written by cache_write) in
    place: float32 arrays (num_blocks, block_size, G) for int8, one float32
    each (per tensor, returned as a 1-element array) for float8; None and
    None for a float cache."""
    out = []
    for name, s in (("k_scale", k_scale), ("v_scale", v_scale)):
        if k_cache.dtype not in KV8_DTYPES:
            if s is not None:
                raise ValueError(f"{name} is only for 8-bit caches (this one is {k_cache.dtype})")
            out.append(None)
            continue
        if s is None:
            raise ValueError(f"an {k_cache.dtype} cache needs {name}")
        if k_cache.dtype == np.int8:
            if not isinstance(s, np.ndarray) or s.dtype != np.float32:
                raise TypeError(f"{name} of an int8 cache must be a float32 numpy array (one scale per token and "
                                f"head), got {type(s).__name__} {getattr(s, 'dtype', '')}")
            if s.shape != k_cache.shape[:3]:
                raise ValueError(f"{name} must have shape {k_cache.shape[:3]} (num_blocks, block_size, kv_heads), "
                                 f"got {s.shape}")
        else:
            value = real(s, name) if not isinstance(s, np.ndarray) else None
            if value is None:
                if s.size != 1 or s.dtype.kind != "f":
                    raise ValueError(f"{name} of a float8 cache is one float (per tensor), got shape {s.shape}")
                value = float(s.reshape(-1)[0])
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
            s = np.array([value], dtype=np.float32)
        out.append(s)
    return out


class PagedArgs(_Options):
    """The validated arguments of attention_paged(): q (total_q, H, D), the
    caches (kv_cache), the block table as C-contiguous int32, sequence
    lengths and query offsets as int64, the grouped-query factor and the
    score options.  Every page a sequence's keys use is checked to exist."""

    def __init__(self, q, k_cache, v_cache, block_table, seq_lens, cu_seqlens_q, scale_, causal, window_,
                 softcap_, slopes, sinks_, k_scale=None, v_scale=None):
        q = as_array(q, "q")
        if q.ndim != 3:
            raise ValueError(f"q must have shape (total_q, heads, dim) or (batch, heads, dim), got {q.shape}")
        self.k, self.v = kv_cache(k_cache, v_cache)
        self.k_scale, self.v_scale = cache_scales(self.k, k_scale, v_scale)
        self.kv_dtype = self.k.dtype
        total_q, h, self.d = q.shape
        n_blocks, self.block_size, g, d = self.k.shape
        self.dv = self.v.shape[3]
        if d != self.d:
            raise ValueError(f"q and k_cache must have the same head dim D: q {q.shape}, k_cache {self.k.shape}")
        mixed = self.k.dtype in KV8_DTYPES or (q.dtype == np.float32 and self.k.dtype in HALF_DTYPES)
        if q.dtype != self.k.dtype and not mixed:
            raise TypeError(f"q and the caches must have one dtype (or float32 queries over a float16 or bfloat16 "
                            f"cache, or an 8-bit cache), got q {q.dtype}, k_cache {self.k.dtype}")
        self.group = kv_group(h, g, [("q", q.shape), ("k_cache", self.k.shape), ("v_cache", self.v.shape)])
        table = int_array(block_table, "block_table", 2, "(batch, max_blocks_per_seq)")
        self.seq_lens = int_array(seq_lens, "seq_lens", 1, "(batch,)")
        batch = self.seq_lens.shape[0]
        if table.shape[0] != batch:
            raise ValueError(f"block_table has {table.shape[0]} rows for {batch} sequences (seq_lens {batch})")
        if cu_seqlens_q is None:
            if total_q != batch:
                raise ValueError(f"q of shape {q.shape} has {total_q} queries for {batch} sequences; pass "
                                 f"cu_seqlens_q for several queries per sequence")
            self.cu_q = np.arange(batch + 1, dtype=np.int64)
        else:
            self.cu_q = cu_seqlens(cu_seqlens_q, "cu_seqlens_q", total_q)
            if self.cu_q.shape[0] != batch + 1:
                raise ValueError(f"cu_seqlens_q has {self.cu_q.shape[0]} entries for {batch} sequences "
                                 f"(needs batch + 1)")
        lens, bs = self.seq_lens, self.block_size
        if np.any(lens < 0) or np.any(lens > table.shape[1] * bs):
            raise ValueError(f"seq_lens must be in [0, max_blocks_per_seq * block_size = {table.shape[1] * bs}], "
                             f"got {lens}")
        n_q = np.diff(self.cu_q)
        if np.any(n_q > lens):
            b = int(np.argmax(n_q > lens))
            raise ValueError(f"sequence {b} has {n_q[b]} queries but seq_lens[{b}] = {lens[b]} keys; its queries "
                             f"are its last tokens, so seq_lens counts them too")
        used = np.arange(table.shape[1])[None, :] < ((lens + bs - 1) // bs)[:, None]
        pages = table[used]
        if pages.size and (pages.min() < 0 or pages.max() >= n_blocks):
            b = int(np.nonzero(((table < 0) | (table >= n_blocks)) & used)[0][0])
            raise ValueError(f"block_table row {b} uses block ids outside [0, {n_blocks}): {table[b][used[b]]}")
        self.table = table.astype(np.int32)
        self._options(_core.WEIGHTS_SOFTMAX, scale_, causal, "bottom-right", window_, softcap_)
        self.mask, self.mask_kind = None, _core.MASK_NONE
        self.slopes = alibi_slopes(slopes, (h,))
        self.sinks = sinks(sinks_, (h,), _core.WEIGHTS_SOFTMAX)
        self.q = q
        self.dtype = q.dtype
        self.originals = [("q", q), ("k_cache", self.k), ("v_cache", self.v), ("k_scale", self.k_scale),
                          ("v_scale", self.v_scale)]


def cache_slots(k, v, k_cache, v_cache, slot_mapping):
    """The checked arguments of cache_write(): k (T, G, D) and v (T, G, Dv)
    against the caches, and the tokens that are written with their slots."""
    k_cache, v_cache = kv_cache(k_cache, v_cache)
    k = as_array(k, "k")
    v = as_array(v, "v")
    n_blocks, bs, g = k_cache.shape[:3]
    if k.ndim != 3 or k.shape[1:] != k_cache.shape[2:]:
        raise ValueError(f"k must have shape (tokens, {g}, {k_cache.shape[3]}) for k_cache {k_cache.shape}, "
                         f"got {k.shape}")
    if v.shape != k.shape[:1] + v_cache.shape[2:]:
        raise ValueError(f"v must have shape ({k.shape[0]}, {g}, {v_cache.shape[3]}) for v_cache "
                         f"{v_cache.shape}, got {v.shape}")
    for name, c in (("k_cache", k_cache), ("v_cache", v_cache)):
        if not c.flags.writeable:
            raise ValueError(f"{name} is read-only")
    slots = int_array(slot_mapping, "slot_mapping", 1, f"({k.shape[0]},)")
    if slots.shape[0] != k.shape[0]:
        raise ValueError(f"slot_mapping has {slots.shape[0]} slots for {k.shape[0]} tokens")
    keep = slots >= 0
    if np.any(slots < -1) or np.any(slots >= n_blocks * bs):
        raise ValueError(f"slot_mapping must hold -1 (skip) or slots in [0, {n_blocks * bs}), got {slots}")
    written = slots[keep]
    if np.unique(written).size != written.size:
        raise ValueError("slot_mapping writes one slot twice")
    return k, v, k_cache, v_cache, keep, written
