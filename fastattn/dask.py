"""Attention over Dask arrays: sequence-parallel by log-sum-exp merging.

``fastattn.dask.attention`` takes q, k and v as dask arrays (numpy arrays
are wrapped) and returns a dask array.  Its task graph:

* one task per (block of leading dimensions, chunk of queries, chunk of
  keys) that can see anything: with ``causal`` or ``window`` a pair of
  chunks that is entirely hidden makes no task (n(n+1)/2 tasks, not n², for
  causal attention over n × n equal chunks).  Each task calls
  :func:`fastattn.attention` on its blocks with the key positions of the
  whole sequence (an int ``align``), with the GIL released;
* per query chunk, a tree reduction of the partial results over its key
  chunks: softmax partials ``(out, lse)`` are combined by
  :func:`fastattn.merge`, dot-weight partials are added.  ``split_every``
  partials are combined per task, as in ``dask.array.reduction``.

Only q's, k's and v's own chunks travel to the tasks, and only partial
outputs and their log-sum-exps travel from them: a persisted K/V cache stays
on its workers (``examples/dask_sharded_decode.py``).

Chunking.  Chunks of q's leading dimensions and of Lq become the output's;
k and v follow q's chunks along shared leading dimensions (v and the mask
follow k's chunks along Lk), and each operand is rechunked to match where it
differs.  Grouped-query heads: q's head chunks are widened to whole groups
of H / G query heads and k's and v's head chunks follow them.  The head
dimensions D and Dv are never split: chunked D or Dv is rechunked to one
chunk (a partial dot product is not an attention score).

Threads.  Each task runs fastattn with ``num_threads`` threads.  By default
a task takes an equal share of the CPUs it may use between the tasks that
can run at once: ``usable CPUs // min(worker threads, attention tasks)``,
where worker threads are the dask.distributed worker's (``nthreads``) or the
local threaded scheduler's pool (``num_workers`` in dask's config, else the
CPU count).  Where several worker processes share one machine, pass
``num_threads`` (cores / worker threads on that machine) to avoid
oversubscription.
"""
import itertools
import math
import operator

import numpy as np

try:
    import dask
    import dask.array as da
    from dask.highlevelgraph import HighLevelGraph
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError("fastattn.dask needs dask: pip install 'fastattn[dask]'") from exc

import fastattn
from fastattn import _validate as _v

SPLIT_EVERY = 8


def attention(q, k, v, *, scale=None, causal=False, mask=None, weights="softmax", window=None, softcap=None,
              alibi_slopes=None, align="bottom-right", return_lse=False, split_every=None, num_threads=None):
    """:func:`fastattn.attention` over dask arrays, chunk by chunk.

    Parameters
    ----------
    q, k, v : dask arrays or array_like, shapes (..., Lq, D), (..., Lk, D), (..., Lk, Dv)
        As for :func:`fastattn.attention` (float32, float64, float16 or
        bfloat16; leading dimensions broadcast; grouped-query heads).
        Shapes and chunk sizes must be known.
    scale, causal, mask, weights, window, softcap, alibi_slopes, align, return_lse
        As for :func:`fastattn.attention`.  ``mask`` may be a dask array;
        it is rechunked to q's and k's chunks.  ``alibi_slopes`` is small
        and read at once.
    split_every : int, optional
        Partial results combined per merge task (default 8, at least 2).
    num_threads : int, optional
        Threads of each task's fastattn call (default: see the module's
        notes on threads).

    Returns
    -------
    dask array, shape (broadcast(...), Lq, Dv), chunked as q along the
    leading dimensions and Lq; with ``return_lse`` also the log-sum-exp as a
    dask array of shape (broadcast(...), Lq).
    """
    wmode, return_lse = _v.weights_and_lse(weights, return_lse)
    if num_threads is not None:
        num_threads = _v.count(num_threads, "num_threads")
    split_every = SPLIT_EVERY if split_every is None else _v.count(split_every, "split_every", 2)
    q, k, v = (_dask_array(x, name) for x, name in ((q, "q"), (k, "k"), (v, "v")))
    mask = None if mask is None else _dask_array(mask, "mask")

    # every rule of fastattn.attention, checked now on stand-ins of the
    # right shapes and dtypes that hold no data
    dtype = _v.result_dtype([(n, _v.as_array(_stand_in(x), n)) for n, x in (("q", q), ("k", k), ("v", v))])
    args = _v.ScoreArgs(_stand_in(q, dtype), _stand_in(k, dtype), _stand_in(v, dtype), scale, causal,
                        None if mask is None else _stand_in(mask), window, softcap, alibi_slopes, wmode, align)
    slopes = None
    if alibi_slopes is not None:
        slopes = np.broadcast_to(np.asarray(alibi_slopes, dtype=np.float64), args.lead)
    plan = _Plan(q, k, v, mask, args)
    return plan.graph(dict(scale=scale, weights=weights, softcap=softcap), slopes, return_lse, split_every,
                      num_threads)


# ---- arguments -------------------------------------------------------------------


def _dask_array(x, name):
    if not isinstance(x, da.Array):
        try:
            x = da.asarray(np.asarray(x))
        except Exception as exc:
            raise TypeError(f"{name} must be a dask array or an array, got {type(x).__name__}") from exc
    if any(math.isnan(n) for n in x.shape) or any(math.isnan(c) for cs in x.chunks for c in cs):
        raise ValueError(f"{name} has unknown chunk sizes {x.chunks}: call compute_chunk_sizes() first")
    return x


def _stand_in(x, dtype=None):
    """A numpy array of x's shape and dtype (or `dtype`) that holds no data."""
    return np.broadcast_to(np.zeros((), dtype=x.dtype if dtype is None else dtype), x.shape)


def _bounds(chunks):
    """Start offsets of chunks, with the total at the end."""
    return np.concatenate([[0], np.cumsum(chunks)]).astype(np.int64)


def _widen(chunks, r):
    """Chunks whose boundaries are those of `chunks` rounded up to multiples of r."""
    ends = sorted({min(-(-int(e) // r) * r, int(sum(chunks))) for e in np.cumsum(chunks)})
    return tuple(int(b - a) for a, b in zip([0] + ends[:-1], ends))


class _Plan:
    """The operands viewed with one rank, rechunked to common chunks, and the
    block index of each operand for each output block."""

    def __init__(self, q, k, v, mask, args):
        self.args = args
        lead = args.lead
        nl = len(lead)
        ops = {"q": q, "k": k, "v": v}
        if mask is not None:
            m = mask if mask.ndim >= 2 else mask.reshape((1,) * (2 - mask.ndim) + mask.shape)
            ops["mask"] = m
        # one rank for all: leading axes of size 1 in front
        for name, x in ops.items():
            if x.ndim - 2 < nl:
                ops[name] = x[(None,) * (nl + 2 - x.ndim)]
        group = args.group
        # the chunks of each leading axis of the output: q's where q has the
        # axis, else those of the first operand that has it; on the head axis
        # of grouped-query heads, q's widened to whole groups of query heads
        lead_chunks = []
        for a in range(nl):
            if group > 1 and a == nl - 1:
                lead_chunks.append(_widen(ops["q"].chunks[a], group))
                continue
            src = next((x for x in ops.values() if x.shape[a] == lead[a]), None)
            lead_chunks.append(src.chunks[a] if lead[a] > 1 else (lead[a],))
        self.lead_chunks = lead_chunks
        q_chunks = ops["q"].chunks[-2]
        k_chunks = ops["k"].chunks[-2]
        self.q_bounds, self.k_bounds = _bounds(q_chunks), _bounds(k_chunks)
        for name, x in ops.items():
            want = []
            for a in range(nl):
                if x.shape[a] == 1:
                    want.append((1,))
                elif group > 1 and a == nl - 1 and name in ("k", "v"):
                    want.append(tuple(c // group for c in lead_chunks[a]))
                else:
                    want.append(lead_chunks[a])
            if name == "mask":
                want += [q_chunks if x.shape[-2] > 1 else (1,), k_chunks if x.shape[-1] > 1 else (1,)]
            elif name == "q":
                want += [q_chunks, (x.shape[-1],)]
            else:
                want += [k_chunks, (x.shape[-1],)]
            ops[name] = x.rechunk(tuple(want))
        self.ops = ops
        self.nl = nl

    def block(self, name, lead_idx, i, j):
        """Key of operand `name`'s block for output block lead_idx, query chunk i, key chunk j."""
        x = self.ops[name]
        idx = tuple(0 if x.shape[a] == 1 else lead_idx[a] for a in range(self.nl))
        if name == "q":
            return (x.name,) + idx + (i, 0)
        if name == "mask":
            return (x.name,) + idx + (i if x.shape[-2] > 1 else 0, j if x.shape[-1] > 1 else 0)
        return (x.name,) + idx + (j, 0)

    def visible_keys(self, a0, a1):
        """Keys that rows [a0, a1) of the whole problem may see (causal, window): [lo, hi)."""
        args = self.args
        off = (0 if args.top_left else args.lk - args.lq) + args.q_shift
        first, last = a0 + off, a1 - 1 + off
        lo, hi = 0, args.lk
        left, right = args.window
        if args.causal:
            hi = min(hi, last + 1)
        if right >= 0:
            hi = min(hi, last + right + 1)
        if left >= 0:
            lo = max(lo, first - left)
        return lo, hi, off

    def graph(self, options, slopes, return_lse, split_every, num_threads):
        """The result arrays: `options` are fastattn.attention's keywords
        every task passes unchanged (causal, window and align are the
        validated ones, aligned per task)."""
        args = self.args
        dot = args.weights == fastattn._core.WEIGHTS_DOT
        token = dask.base.tokenize(*(x.name for x in self.ops.values()), options, args.causal, args.window,
                                   args.q_shift, args.top_left, slopes, return_lse, split_every, num_threads)
        part_name = f"fastattn-attention-{token}"
        merge_name = f"fastattn-merge-{token}"
        empty_name = f"fastattn-empty-{token}"
        out_name = f"fastattn-out-{token}"
        lse_name = f"fastattn-lse-{token}"
        cdt = _v.compute_dtype(args.dtype)
        lead_bounds = [_bounds(c) for c in self.lead_chunks]
        blocks = []  # (lead index, query chunk, its rows [a0, a1), their position offset, visible key chunks)
        for lead_idx in itertools.product(*(range(len(c)) for c in self.lead_chunks)):
            for i in range(len(self.q_bounds) - 1):
                a0, a1 = int(self.q_bounds[i]), int(self.q_bounds[i + 1])
                lo, hi, off = self.visible_keys(a0, a1)
                js = [j for j in range(len(self.k_bounds) - 1)
                      if a1 > a0 and self.k_bounds[j] < hi and self.k_bounds[j + 1] > lo]
                blocks.append((lead_idx, i, a0, a1, off, js))
        n_tasks = sum(len(b[-1]) for b in blocks)
        dsk, out_dsk, lse_dsk = {}, {}, {}  # attention, zero and merge tasks; the two results
        for lead_idx, i, a0, a1, off, js in blocks:
            lead_sel = tuple(slice(int(b[t]), int(b[t + 1])) for b, t in zip(lead_bounds, lead_idx))
            block_slopes = None if slopes is None else np.ascontiguousarray(slopes[lead_sel])
            parts = []
            for j in js:
                c0 = int(self.k_bounds[j])
                task = _BlockTask(options, args.causal, args.window, a0 + off - c0, block_slopes,
                                  need_lse=not dot, num_threads=num_threads, n_tasks=n_tasks)
                key = (part_name,) + lead_idx + (i, j)
                dsk[key] = (task, self.block("q", lead_idx, i, j), self.block("k", lead_idx, i, j),
                            self.block("v", lead_idx, i, j),
                            self.block("mask", lead_idx, i, j) if "mask" in self.ops else None)
                parts.append(key)
            if not parts:  # no key visible to any row of this chunk: zeros, lse -inf
                shape = tuple(len(range(s.start, s.stop)) for s in lead_sel) + (a1 - a0, args.dv)
                key = (empty_name,) + lead_idx + (i,)
                dsk[key] = (_empty_block, shape, args.dtype, cdt)
                parts.append(key)
            level = 0
            while len(parts) > 1:  # the tree: split_every partials per merge
                groups = [parts[s:s + split_every] for s in range(0, len(parts), split_every)]
                final = len(groups) == 1
                parts = []
                for n, group in enumerate(groups):
                    key = (merge_name,) + lead_idx + (i, level, n)
                    dsk[key] = (_merge_parts, dot, args.dtype if final else cdt) + tuple(group)
                    parts.append(key)
                level += 1
            out_dsk[(out_name,) + lead_idx + (i, 0)] = (operator.getitem, parts[0], 0)
            if return_lse:
                lse_dsk[(lse_name,) + lead_idx + (i,)] = (operator.getitem, parts[0], 1)

        graph = HighLevelGraph.from_collections(part_name, dsk, dependencies=list(self.ops.values()))
        layers, dependencies = dict(graph.layers), dict(graph.dependencies)
        rows = tuple(self.lead_chunks) + (tuple(np.diff(self.q_bounds).tolist()),)
        outs = [(out_name, out_dsk, rows + ((args.dv,),), args.dtype)]
        if return_lse:
            outs.append((lse_name, lse_dsk, rows, cdt))
        for name, layer, _, _ in outs:
            layers[name] = layer
            dependencies[name] = {part_name}
        hlg = HighLevelGraph(layers, dependencies)
        arrays = [da.Array(hlg, name, chunks, meta=np.empty((0,) * len(chunks), dtype=dt))
                  for name, _, chunks, dt in outs]
        return tuple(arrays) if return_lse else arrays[0]


# ---- tasks --------------------------------------------------------------------------


def task_threads(num_threads, n_tasks):
    """Threads for one task's fastattn call: num_threads if given, else an
    equal share of the usable CPUs between the tasks that can run at once
    (min of the worker's threads and the graph's attention tasks)."""
    if num_threads is not None:
        return num_threads
    cpus = fastattn.get_num_threads()
    try:
        from distributed import get_worker

        slots = get_worker().state.nthreads
    except (ImportError, ValueError, AttributeError):
        slots = dask.config.get("num_workers", None) or dask.system.CPU_COUNT
    return max(1, cpus // max(1, min(int(slots), n_tasks)))


class _BlockTask:
    """Attention of one query chunk over one key chunk, at the chunks' key
    positions in the whole sequence; returns (out, lse or None)."""

    def __init__(self, options, causal, window, align, slopes, need_lse, num_threads, n_tasks):
        self.options = options
        self.causal = causal
        self.window = None if window == (-1, -1) else window
        self.align = align
        self.slopes = slopes
        self.need_lse = need_lse
        self.num_threads = num_threads
        self.n_tasks = n_tasks

    def __call__(self, q, k, v, mask):
        threads = task_threads(self.num_threads, self.n_tasks)
        res = fastattn.attention(q, k, v, causal=self.causal, window=self.window, align=self.align, mask=mask,
                                 alibi_slopes=self.slopes, return_lse=self.need_lse, num_threads=threads,
                                 **self.options)
        return res if self.need_lse else (res, None)


def _empty_block(shape, dtype, lse_dtype):
    return np.zeros(shape, dtype=dtype), np.full(shape[:-1], -np.inf, dtype=lse_dtype)


def _merge_parts(dot, dtype, *parts):
    """Combine partial results over disjoint key sets: added (dot weights) or
    merged by their log-sum-exps (fastattn.merge), in the compute dtype; the
    output is cast to `dtype` (the result dtype at the tree's root)."""
    outs = [np.asarray(o, dtype=_v.compute_dtype(o.dtype)) for o, _ in parts]
    if dot:
        total = outs[0].copy()
        for o in outs[1:]:
            total += o
        return total.astype(dtype, copy=False), None
    out, lse = fastattn.merge(outs, [s for _, s in parts])
    return out.astype(dtype, copy=False), lse
