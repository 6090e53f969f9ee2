"""The problem builder: validated arrays in, one typed kernel problem out.

A kernel problem (``_core.Problem``, fastattn.h's ``fa_problem`` filled by
name) holds the address of element 0 of each operand, its byte strides
along rows, columns and (for grouped-query heads) heads, and an entry
table with one row per independent unit of work (a batch x head, or a
packed sequence x head) giving byte offsets into every operand and the
unit's lengths.  Broadcast dimensions get offset 0 and grouped query heads
share their key/value head's offsets, so nothing is expanded or copied.

Every call into the compiled kernels goes through this module: the public
functions in fastattn._api validate, call one builder here, and the
builder runs the problem on the kernel path chosen in fastattn._config.
"""
import copy
import functools
import math

import numpy as np

from fastattn import _config, _core
from fastattn._validate import CACHE_DTYPES, DTYPES, compute_dtype, page_row_stride


# ---- operands ------------------------------------------------------------------


def _stride(a, axis):
    """Byte stride of a along `axis`; 0 where a lacks that axis or it has length 1."""
    if a is None or not -a.ndim <= axis < a.ndim or a.shape[axis] == 1:
        return 0
    return a.strides[axis]


def _operand(name, a, rows, cols=None, heads=None):
    """The problem fields of one operand: its address and the byte strides
    between rows, between elements of a row and between heads of a group."""
    if a is None:
        return {}
    fields = {name: _core.address(a), f"{name}_rs": _stride(a, rows)}
    if cols is not None:
        fields[f"{name}_cs"] = _stride(a, cols)
    if heads is not None:
        fields[f"{name}_hs"] = _stride(a, heads)
    return fields


def _problem(dtype, num_threads, entries=None, *, keep, kv_dtype=None, **fields):
    """A _core.Problem of q/out dtype `dtype` (k and v stored alike, or as
    kv_dtype, a cache dtype) on the current kernel path.  `keep` lists the
    arrays the addresses point into."""
    code = DTYPES[dtype]
    kv_code = code if kv_dtype is None else CACHE_DTYPES[kv_dtype]
    if entries is not None:
        fields["entries"] = entries
    return _core.Problem(dtype=code, kv_dtype=kv_code, path=_config.path_index(), num_threads=num_threads,
                         keep=tuple(keep), **fields)


# ---- entry tables ----------------------------------------------------------------


def _layout(a, core):
    """Shape and byte strides of a's leading dims (before the last `core`),
    or None: all the entry table needs of an operand."""
    return None if a is None else (a.shape[: a.ndim - core], a.strides[: a.ndim - core])


def _lead_offsets(layout, lead, group=1):
    """Byte offset of each leading index of an operand of this `layout`,
    broadcast to `lead` and flattened in C order.  With group > 1, the last
    leading axis of the operand is indexed by lead_index // group (grouped
    query heads sharing one key/value head), unless it has one head, which
    every query head reads (broadcast)."""
    shape, strides = layout
    n_lead = len(lead)
    offsets = np.zeros(lead, dtype=np.int64)
    first = n_lead - len(shape)
    for ax, (n, st) in enumerate(zip(shape, strides)):
        pos = first + ax
        index_shape = [1] * n_lead
        if group > 1 and pos == n_lead - 1 and n != 1:
            index_shape[pos] = lead[pos]
            idx = np.arange(lead[pos], dtype=np.int64) // group
        elif n != 1:
            index_shape[pos] = n
            idx = np.arange(n, dtype=np.int64)
        else:
            continue
        offsets = offsets + (idx * st).reshape(index_shape)
    return offsets.reshape(-1)


def _entry_table(n, group, columns):
    """The kernel's entry table (read-only) of n entries: columns maps a
    column to one value for every entry or to an array over the query heads;
    with group > 1 each entry covers `group` consecutive query heads and
    takes the first one's values."""
    entries = np.zeros((n, _core.ENTRY_FIELDS), dtype=np.int64)
    for col, val in columns.items():
        if group > 1 and isinstance(val, np.ndarray):
            val = val[::group]
        entries[:, col] = val
    entries.flags.writeable = False
    return entries


# Entry tables of at most this many entries are cached (64 of them, LRU).
_CACHED_ENTRIES_MAX = 4096


@functools.lru_cache(maxsize=64)
def _lead_entries(lead, kv_group, group, lq, lk, q, k, v, mask, out, lse, tiles=None):
    """The entry table of operands with leading dimensions `lead`, from
    their layouts (see _layout).  Cached for small tables (see _lead_table):
    a decoding loop asks for the same one at every step, and building it
    costs more than a small kernel call."""
    cols = {
        _core.E_Q: _lead_offsets(q, lead),
        _core.E_OUT: _lead_offsets(out, lead),
        _core.E_LQ: lq,
        _core.E_LK: lk,
        _core.E_HEAD: np.arange(math.prod(lead), dtype=np.int64),
        _core.E_DROP: np.arange(math.prod(lead), dtype=np.int64),  # rows and keys from 0
    }
    for col, layout in ((_core.E_K, k), (_core.E_V, v)):
        if layout is not None:
            cols[col] = _lead_offsets(layout, lead, kv_group)
    for col, layout in ((_core.E_MASK, mask), (_core.E_LSE, lse), (_core.E_TILES, tiles)):
        if layout is not None:
            cols[col] = _lead_offsets(layout, lead)
    return _entry_table(math.prod(lead) // group, group, cols)


def _lead_table(lead, kv_group, group, lq, lk, q=None, k=None, v=None, mask=None, out=None, lse=None, tiles=None):
    small = math.prod(lead) <= _CACHED_ENTRIES_MAX
    build = _lead_entries if small else _lead_entries.__wrapped__
    return build(lead, kv_group, group, lq, lk, _layout(q, 2), _layout(k, 2), _layout(v, 2),
                 _layout(mask, 2), _layout(out, 2), _layout(lse, 1), _layout(tiles, 2))


def _tiles(tiles, heads):
    """The problem fields of a mask's table of block kinds (or none)."""
    if tiles is None:
        return {}
    return dict(mask_tiles=_core.address(tiles), tiles_rs=_stride(tiles, -2), tiles_cs=_stride(tiles, -1),
                tiles_hs=_stride(tiles, heads) if heads is not None else 0)


def _score_options(args):
    return dict(mask_kind=args.mask_kind, weights=args.weights, scale=args.scale, causal=args.causal,
                top_left=args.top_left, q_shift=args.q_shift, window_left=args.window[0], window_right=args.window[1],
                softcap=args.softcap, alibi_slopes=args.slopes, sinks=args.sinks, dropout_p=args.dropout_p,
                dropout_seed=args.dropout_seed)


# ---- the operations ----------------------------------------------------------------


def _kernel_group(args):
    """Query heads per entry of an attention problem: args.group (grouped-
    query heads), or, where k and v broadcast along q's head axis (the last
    leading axis: q (..., H, Lq, D) against k (..., 1, Lk, D)), all H heads,
    so that the kernels read each key and value row once for all of them."""
    if args.group > 1 or not args.lead or args.lead[-1] <= 1:
        return args.group
    shared = _stride(args.k, -3) == 0 and _stride(args.v, -3) == 0 and _stride(args.q, -3) != 0
    return args.lead[-1] if shared else 1


def _attention_fields(args, out, lse):
    """Every field of an attention problem of these operands but their
    addresses, as keyword arguments of _core.Problem (with the entry table)."""
    g = _kernel_group(args)
    heads = -3 if g > 1 else None
    entries = _lead_table(args.lead, g, g, args.lq, args.lk, args.q, args.k, args.v, args.mask, out, lse, args.tiles)
    fields = dict(entries=entries, d=args.d, dv=args.dv, group=g, **_score_options(args))
    for name, a, rows, cols, hs in (("q", args.q, -2, -1, heads), ("k", args.k, -2, -1, None),
                                    ("v", args.v, -2, -1, None), ("out", out, -2, -1, heads),
                                    ("lse", lse, -1, None, -2 if g > 1 else None),
                                    ("mask", args.mask, -2, -1, heads)):
        fields.update(_operand(name, a, rows, cols, hs))
    fields.update(_tiles(args.tiles, heads))
    for name in ("q", "k", "v", "out", "lse", "mask", "mask_tiles"):
        fields.pop(name, None)  # the addresses: per call
    return fields


# Fields of attention problems by their operands' layouts and options: a
# model calls attention with the same layouts over and over (every layer,
# every decoding step), and building the fields costs more than a small call.
_FIELDS_CACHE_MAX = 256
_fields_cache = {}
# For arguments _validate.score_args knows by a key (plain arrays, no mask):
# the whole problem, on no arrays, rebased onto each call's (Problem.rebased).
_problems_cache = {}


def rerun(template, num_threads, q, k, v, out, lse):
    """Run a problem _problem.attention returned on arrays (numpy arrays or
    torch tensors) of the layouts it was made for."""
    if isinstance(q, np.ndarray):
        address = _core.address
        q_, k_, v_, out_, lse_ = address(q), address(k), address(v), address(out), 0 if lse is None else address(lse)
    else:
        q_, k_, v_, out_, lse_ = q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr(), 0 if lse is None else \
            lse.data_ptr()
    _core.attention(template.rebased(num_threads=num_threads, q=q_, k=k_, v=v_, out=out_, lse=lse_,
                                     keep=(q, k, v, out, lse)))


def attention(args, out, lse, num_threads):
    """Run fused attention on validated arguments (_validate.ScoreArgs).
    Returns the problem it ran on no arrays (its addresses 0) where the
    arguments are plain q, k and v, none converted, with no mask, slopes,
    sinks or dropout (the problem then depends only on their layouts, out's
    and lse's and the options: the same layouts on other arrays run it
    rebased), else None."""
    address = _core.address
    key = None
    if args.slopes is None and args.sinks is None and not args.dropout_p and \
            math.prod(args.lead) <= _CACHED_ENTRIES_MAX:
        if args.cache_key is not None:  # plain q, k, v, no mask: as _validate.score_args keyed them
            key = (args.cache_key, _config.path_index(), out.shape, out.strides,
                   None if lse is None else (lse.shape, lse.strides))
            template = _problems_cache.get(key)
            if template is None:  # a problem of this layout, on no arrays (never run itself)
                template = _problem(args.dtype, num_threads, keep=(), kv_dtype=args.kv_dtype,
                                    **_attention_fields(args, out, lse))
                if len(_problems_cache) >= _FIELDS_CACHE_MAX:
                    _problems_cache.clear()
                _problems_cache[key] = template
            rerun(template, num_threads, args.q, args.k, args.v, out, lse)
            converted = any(a is not o for a, (_, o) in zip((args.q, args.k, args.v), args.originals))
            return None if converted else template
        key = (args.dtype, _config.path_index(), args.lead, args.group, args.lq, args.lk, args.d, args.dv,
               *(None if a is None else (a.shape, a.strides) for a in (args.q, args.k, args.v, args.mask, out, lse,
                                                                        args.tiles)),
               args.mask_kind, args.weights, args.scale, args.causal, args.top_left, args.q_shift, args.window,
               args.softcap)
    fields = _fields_cache.get(key) if key is not None else None
    if fields is None:
        fields = _attention_fields(args, out, lse)
        if key is not None:
            if len(_fields_cache) >= _FIELDS_CACHE_MAX:
                _fields_cache.clear()
            _fields_cache[key] = fields
    problem = _problem(
        args.dtype, num_threads, keep=(args.q, args.k, args.v, args.mask, out, lse, args.tiles), kv_dtype=args.kv_dtype,
        q=address(args.q), k=address(args.k), v=address(args.v), out=address(out),
        lse=0 if lse is None else address(lse), mask=0 if args.mask is None else address(args.mask),
        mask_tiles=0 if args.tiles is None else address(args.tiles), **fields)
    _core.attention(problem)
    return None


def scores(args, out, num_threads):
    """Write the score matrix of validated arguments (_validate.ScoreArgs) to out."""
    entries = _lead_table(args.lead, args.group, 1, args.lq, args.lk, args.q, args.k, None, args.mask, out)
    problem = _problem(
        args.dtype, num_threads, entries, d=args.d, dv=args.dv, keep=(args.q, args.k, args.mask, out),
        **_operand("q", args.q, -2, -1), **_operand("k", args.k, -2, -1), **_operand("out", out, -2, -1),
        **_operand("mask", args.mask, -2, -1), **_score_options(args))
    _core.scores(problem)


def weighted_sum(w, v, out, lead, num_threads):
    """out = w v over leading dimensions `lead` (w and v in out's dtype)."""
    lq, lk = w.shape[-2:]
    entries = _lead_table(lead, 1, 1, lq, lk, q=w, v=v, out=out)
    problem = _problem(
        out.dtype, num_threads, entries, d=0, dv=v.shape[-1], keep=(w, v, out),
        **_operand("q", w, -2, -1), **_operand("v", v, -2, -1), **_operand("out", out, -2, -1))
    _core.weighted_sum(problem)


def _varlen_layout(g, group, by_query, by_key, by_row):
    """The entry table of packed sequences, one entry per (sequence,
    key/value head), as a function of the sequences' offsets (see
    _varlen_entries): (base, per_q, per_k), base (G, fields) the entries of
    a sequence at offset 0, per_q and per_k what one row of its queries and
    of its keys add to each column.  Operands: q-like arrays (total_q, H,
    ...) and k-like arrays (total_k, G, ...) by their column, and (H,
    total_q) arrays (lse-like) likewise."""
    fields = _core.ENTRY_FIELDS
    kv_head = np.arange(g, dtype=np.int64)
    head = kv_head * group  # the first query head of the entry's group
    base, per_q, per_k = np.zeros((g, fields), np.int64), np.zeros(fields, np.int64), np.zeros(fields, np.int64)
    base[:, _core.E_HEAD] = head
    # dropout: a stream per query head, its rows and keys numbered as packed (a sequence's from its offsets)
    base[:, _core.E_DROP], per_q[_core.E_DROP_ROW], per_k[_core.E_DROP_KEY] = head, 1, 1
    for col, a in by_query.items():
        base[:, col], per_q[col] = head * a.strides[1], a.strides[0]
    for col, a in by_key.items():
        base[:, col], per_k[col] = kv_head * a.strides[1], a.strides[0]
    for col, a in by_row.items():
        if a is not None:
            base[:, col], per_q[col] = head * a.strides[0], a.strides[1]
    return base, per_q, per_k


def _varlen_entries(layout, cu_q, cu_k):
    """The entry table (read-only) of packed sequences at offsets cu_q and
    cu_k (int64, checked), laid out by _varlen_layout."""
    base, per_q, per_k = layout
    first = cu_q[:-1, None] * per_q + cu_k[:-1, None] * per_k
    first[:, _core.E_LQ] = cu_q[1:] - cu_q[:-1]
    first[:, _core.E_LK] = cu_k[1:] - cu_k[:-1]
    entries = (first[:, None, :] + base).reshape(-1, _core.ENTRY_FIELDS)
    entries.flags.writeable = False
    return entries


def attention_varlen(args, cu_q, cu_k, out, lse, num_threads):
    """Fused attention over packed sequences: q (total_q, H, D), k and v
    (total_k, G, D|Dv), out (total_q, H, Dv), lse (H, total_q).  Returns
    the problem it ran and its entries' layout (_varlen_layout)."""
    q, k, v = args.q, args.k, args.v
    layout = _varlen_layout(k.shape[1], args.group, {_core.E_Q: q, _core.E_OUT: out}, {_core.E_K: k, _core.E_V: v},
                            {_core.E_LSE: lse})
    entries = _varlen_entries(layout, cu_q, cu_k)
    problem = _problem(
        args.dtype, num_threads, entries, d=args.d, dv=args.dv, group=args.group, keep=(q, k, v, out, lse),
        kv_dtype=args.kv_dtype, **_operand("q", q, 0, 2, 1), **_operand("k", k, 0, 2), **_operand("v", v, 0, 2),
        **_operand("out", out, 0, 2, 1), **_operand("lse", lse, 1, None, 0), **_score_options(args))
    _core.attention(problem)
    return problem, layout


def _sequence_columns(entries, layout, cu_q=None, lk=None):
    """A copy (read-only) of an entry table of sequences, one entry per
    (sequence, key/value head), with the columns of the sequences' queries
    at offsets cu_q (int64, checked) and their counts set by `layout`
    (_varlen_layout's, of query operands only: every column it sets, a
    head's offset even where a row's is 0, as in a broadcast q), and with
    their key counts lk, each where given."""
    entries = entries.copy()
    rows = entries.reshape(-1, layout[0].shape[0], _core.ENTRY_FIELDS)
    if cu_q is not None:
        base, per_q, _ = layout
        cols = np.flatnonzero((per_q != 0) | base.any(axis=0))
        rows[:, :, cols] = base[:, cols] + cu_q[:-1, None, None] * per_q[cols]
        rows[:, :, _core.E_LQ] = (cu_q[1:] - cu_q[:-1])[:, None]
    if lk is not None:
        rows[:, :, _core.E_LK] = lk[:, None]
    entries.flags.writeable = False
    return entries


def attention_paged(args, out, lse, num_threads):
    """Fused attention over a paged KV cache (_validate.PagedArgs): one entry
    per (sequence, key/value head) over its pages of block_table; q and out
    (total_q, H, D|Dv), lse (H, total_q).  Returns the problem it ran, its
    entry table and the layout of its query columns (_sequence_columns)."""
    q, k, v, g, group = args.q, args.k, args.v, args.k.shape[2], args.group
    nseq = args.seq_lens.shape[0]
    seq = np.repeat(np.arange(nseq), g)
    kv_head = np.tile(np.arange(g), nseq)
    cols = {
        _core.E_K: kv_head * k.strides[2],
        _core.E_V: kv_head * v.strides[2],
        _core.E_LK: args.seq_lens[seq],
        _core.E_HEAD: kv_head * group,  # the first query head of the entry's group
        _core.E_PAGES: seq * args.table.shape[1],
    }
    scales = {}
    for name, sc, col in (("k", args.k_scale, _core.E_KS), ("v", args.v_scale, _core.E_VS)):
        if sc is not None:  # (blocks, block_size, G) per token and head, or one per tensor
            cols[col] = kv_head * _stride(sc, 2)
            scales.update({f"{name}_scales": _core.address(sc), f"{name}s_rs": _stride(sc, 1),
                           f"{name}s_ps": _stride(sc, 0)})
    queries = _varlen_layout(g, group, {_core.E_Q: q, _core.E_OUT: out}, {}, {_core.E_LSE: lse})
    entries = _sequence_columns(_entry_table(nseq * g, 1, cols), queries, args.cu_q)
    table = args.table.reshape(-1)
    kv_rows = {**_operand("k", k, 1, 3), **_operand("v", v, 1, 3)}
    kv_rows.update(k_rs=page_row_stride(k), v_rs=page_row_stride(v))  # pages of one row: the page stride
    problem = _problem(
        args.dtype, num_threads, entries, d=args.d, dv=args.dv, group=group, kv_dtype=args.kv_dtype,
        keep=(q, k, v, out, lse, table, args.k_scale, args.v_scale), **scales,
        pages=table, page_size=args.block_size, n_pages=k.shape[0], k_ps=_stride(k, 0), v_ps=_stride(v, 0),
        **_operand("q", q, 0, 2, 1), **kv_rows, **_operand("out", out, 0, 2, 1),
        **_operand("lse", lse, 1, None, 0), **_score_options(args))
    _core.attention(problem)
    return problem, entries, queries


def attention_varlen_backward(args, cu_q, cu_k, dout, out, lse, num_threads, dests=(None, None, None)):
    """The gradients (gq, gk, gv) of attention over packed sequences: dout
    and out (total_q, H, Dv), lse (H, total_q); each (sequence, key/value
    head) owns its k and v rows, so nothing is summed afterwards."""
    q, k, v = args.q, args.k, args.v
    gq, gk, gv = (np.empty(x.shape, args.dtype) if dest is None else dest for x, dest in zip((q, k, v), dests))
    by_query = {_core.E_Q: q, _core.E_DOUT: dout, _core.E_OUT: out, _core.E_GQ: gq}
    by_key = {_core.E_K: k, _core.E_V: v, _core.E_GK: gk, _core.E_GV: gv}
    layout = _varlen_layout(k.shape[1], args.group, by_query, by_key, {_core.E_LSE: lse})
    entries = _varlen_entries(layout, cu_q, cu_k)
    problem = _problem(
        args.dtype, num_threads, entries, d=args.d, dv=args.dv, group=args.group,
        keep=(q, k, v, dout, out, lse, gq, gk, gv),
        **_operand("q", q, 0, 2, 1), **_operand("k", k, 0, 2), **_operand("v", v, 0, 2),
        **_operand("lse", lse, 1, None, 0), **_operand("dout", dout, 0, 2, 1), **_operand("out", out, 0, 2, 1),
        **_operand("gq", gq, 0, 2, 1), **_operand("gk", gk, 0, 2), **_operand("gv", gv, 0, 2), **_score_options(args))
    _core.attention_backward(problem)
    return gq, gk, gv


def sinks_gradient(sinks, lse, delta, lead, shape):
    """The gradient of sum(dout * out) with respect to the sinks, in their
    own `shape`: sinks (float64, one per query head of `lead`, flat, as
    _validate.sinks gives them), lse and delta = rowsum(dout * out) with one
    row of queries per sink (lse's dtype).  A sink is a key whose value is
    zero: with its weight p_i = exp(sink - lse_i) in row i, d out_i / d sink
    = -p_i out_i, so each row adds -p_i delta_i (0 for a head without a
    sink).  Sums in float64, the result in lse's dtype."""
    col = sinks.reshape(-1, 1)
    with np.errstate(invalid="ignore"):  # -inf - -inf where a head has no sink and a row sees no key
        p = np.where(np.isneginf(col), 0.0, np.exp(col - lse.reshape(col.shape[0], -1)))
    g = -(p * delta.reshape(col.shape[0], -1)).sum(axis=1)
    return np.asarray(_sum_to(g.reshape(lead), shape, None), dtype=lse.dtype)


def rowsum_products(dout, out, dtype):
    """rowsum(dout * out) over the last axis, in `dtype` (the kernels' delta)."""
    return np.einsum("...d,...d->...", dout.astype(dtype, copy=False), out.astype(dtype, copy=False))


def _grad_buffer(shape, natural, dtype, dest):
    """Where the kernel writes an operand's gradient: `dest` (or a new array)
    of the operand's shape, or an array of the unbroadcast `natural` shape
    where the operand was broadcast (entries that shared its rows then write
    rows of their own, summed afterwards by _sum_to)."""
    if tuple(shape[:-2]) != natural[:-2]:
        return np.empty(natural, dtype=dtype)
    return np.empty(shape, dtype=dtype) if dest is None else dest


def _sum_to(g, shape, dest):
    """A gradient written in its unbroadcast shape, summed down to `shape`
    (into dest if given)."""
    if g.shape != tuple(shape):
        total = g.astype(np.float64) if g.dtype.itemsize < 8 else g
        while total.ndim > len(shape):
            total = total.sum(axis=0)
        axes = tuple(ax for ax, n in enumerate(shape) if n == 1 and total.shape[ax] != 1)
        g = (total.sum(axis=axes, keepdims=True) if axes else total).astype(g.dtype)
    if dest is not None and dest is not g:
        dest[...] = g
        return dest
    return g


def _mask_gradient(gm, shape, dtype):
    """The mask's gradient as the kernel summed it (gm: the mask's shape,
    at least 2-d, but for every key) in the mask's own `shape` and `dtype`:
    summed over the keys (in float64) where the mask has one column for all."""
    if math.prod(shape[-1:]) == 1 and gm.shape[-1] != 1:
        gm = gm.sum(axis=-1, keepdims=True, dtype=np.float64)
    return np.asarray(gm.reshape(shape), dtype=dtype)


def _backward_widened(args, dout, out, lse, num_threads, dests, mask_shape):
    """attention_backward of 16-bit operands one of which is broadcast: the
    entries that share its rows write gradient rows of their own, summed
    afterwards (_sum_to), and rows written in 16 bits would be rounded twice
    (sums that cancel lost every digit).  So the operands are widened to
    float32 (exactly), the float32 backward runs, and each gradient is
    rounded to 16 bits once."""
    wide = copy.copy(args)
    wide.q, wide.k, wide.v = (x.astype(np.float32) for x in (args.q, args.k, args.v))
    wide.dtype = wide.kv_dtype = np.dtype(np.float32)
    grads = attention_backward(wide, dout.astype(np.float32), out.astype(np.float32), lse, num_threads,
                               mask_shape=mask_shape)
    rounded = []
    for grad, dest in zip(grads[:3], dests):
        if dest is None:
            rounded.append(grad.astype(args.dtype))
        else:
            dest[...] = grad
            rounded.append(dest)
    return tuple(rounded) + grads[3:]


def attention_backward(args, dout, out, lse, num_threads, dests=(None, None, None), mask_shape=None):
    """The gradients (gq, gk, gv) of fused attention on validated arguments
    (_validate.ScoreArgs, backward_operands), in the shapes of q, k and v,
    written into `dests` where given (checked arrays, or None).  With
    mask_shape, the float mask's gradient too (a fourth result, in that
    shape and the mask's dtype), which the kernel adds up in an array of
    the mask's size (_mask_gradient), not one per head."""
    g, lead = args.group, args.lead
    heads = -3 if g > 1 else None
    kv_lead = lead[:-1] + (lead[-1] // g,) if g > 1 else lead
    natural = (lead + args.q.shape[-2:], kv_lead + args.k.shape[-2:], kv_lead + args.v.shape[-2:])
    if args.dtype.itemsize == 2 and any(x.shape[:-2] != n[:-2] for x, n in zip((args.q, args.k, args.v), natural)):
        return _backward_widened(args, dout, out, lse, num_threads, dests, mask_shape)
    gq = _grad_buffer(args.q.shape, lead + args.q.shape[-2:], args.dtype, dests[0])
    gk = _grad_buffer(args.k.shape, kv_lead + args.k.shape[-2:], args.dtype, dests[1])
    gv = _grad_buffer(args.v.shape, kv_lead + args.v.shape[-2:], args.dtype, dests[2])
    entries = np.array(_lead_table(lead, g, g, args.lq, args.lk, args.q, args.k, args.v, args.mask, out, lse))
    # the mask's gradient: where the mask is broadcast (over the batch, the
    # heads or the query rows), the entries and rows that share its rows
    # add into the same rows, in a fixed order; only a mask broadcast over
    # the keys gets every key's column (its elements are summed afterwards)
    gm = None if mask_shape is None else np.zeros(args.mask.shape[:-1] + (args.lk,), dtype=compute_dtype(args.dtype))
    cols = {
        _core.E_DOUT: _lead_offsets(_layout(dout, 2), lead),
        _core.E_GQ: _lead_offsets(_layout(gq, 2), lead),
        _core.E_GK: _lead_offsets(_layout(gk, 2), lead, g),
        _core.E_GV: _lead_offsets(_layout(gv, 2), lead, g),
    }
    if gm is not None:
        cols[_core.E_GMASK] = _lead_offsets(_layout(gm, 2), lead)
    for col, val in cols.items():
        entries[:, col] = val[::g] if g > 1 else val
    gmask = _operand("gmask", gm, -2, -1, heads)
    if gm is not None:
        gmask["gmask_cs"] = gm.itemsize  # its own stride (fresh, C order), also for one key or none
    problem = _problem(
        args.dtype, num_threads, entries, d=args.d, dv=args.dv, group=g,
        keep=(args.q, args.k, args.v, args.mask, dout, out, lse, gq, gk, gv, gm),
        **_operand("q", args.q, -2, -1, heads), **_operand("k", args.k, -2, -1),
        **_operand("v", args.v, -2, -1), **_operand("lse", lse, -1, None, -2 if g > 1 else None),
        **_operand("mask", args.mask, -2, -1, heads), **_operand("dout", dout, -2, -1, heads),
        **_operand("out", out, -2, -1, heads), **_operand("gq", gq, -2, -1, heads),
        **_operand("gk", gk, -2, -1), **_operand("gv", gv, -2, -1), **gmask,
        **_score_options(args))
    _core.attention_backward(problem)
    grads = tuple(_sum_to(grad, x.shape, dest) for grad, x, dest in zip((gq, gk, gv), (args.q, args.k, args.v), dests))
    if gm is not None:
        grads += (_mask_gradient(gm, mask_shape, args.mask.dtype),)
    return grads
