"""Time two builds of fastattn against each other, in one process.

    python tools/ab_bench.py OLD_TREE NEW_TREE [--rounds 15] [--block 0.1] [--quick] [--threads N] [--isa NAME]
                             [--shape B H L D ...]

Each tree is a checkout with the extension built in place
(``python setup.py build_ext --inplace``).  OLD_TREE's package is copied
under the name ``fastattn_old`` (its compiled module keeps its file; only
the package name changes), so both builds live in this process (each with
its own thread pool).  Every row of ``python -m fastattn bench`` (prefill,
decode) and of ``bench --half`` (bfloat16 and float16) is timed with the
two builds alternating call by call, on the same inputs, so the machine's
drift hits both alike: the table gives each side's median and the ratio
new / old (above 1: the new build is slower).  With ``--backward``, the
rows of ``bench --backward`` instead: each build's attention_backward on
the same forward results (float32 and bfloat16, or ``--shape``'s shapes).
"""
import argparse
import importlib
import os
import re
import shutil
import statistics
import sys
import tempfile
import time

import numpy as np


def import_old(tree):
    """OLD_TREE's fastattn package, imported as fastattn_old."""
    tmp = tempfile.mkdtemp(prefix="fastattn-ab-")
    dst = os.path.join(tmp, "fastattn_old")
    shutil.copytree(os.path.join(tree, "fastattn"), dst)
    for name in os.listdir(dst):
        if name.endswith(".py"):
            path = os.path.join(dst, name)
            with open(path) as f:
                text = f.read()
            text = re.sub(r"\bfrom fastattn\b", "from fastattn_old", text)
            text = re.sub(r"^import fastattn$", "import fastattn_old as fastattn", text, flags=re.M)
            with open(path, "w") as f:
                f.write(text)
    sys.path.insert(0, tmp)
    module = importlib.import_module("fastattn_old")
    # the compiled module also registers itself under the name it was built
    # with (fastattn._core); that entry must not shadow the new build's
    for name in [n for n in sys.modules if n == "fastattn" or n.startswith("fastattn.")]:
        del sys.modules[name]
    return module


def import_new(tree):
    sys.path.insert(0, os.path.abspath(tree))
    return importlib.import_module("fastattn")


def alternate(calls, rounds, min_block):
    """Median seconds per call of each of `calls`, timed in alternating blocks."""
    for c in calls:  # warm up, and size the blocks to ~min_block seconds
        c()
    t0 = time.perf_counter()
    calls[0]()
    n = max(1, int(min_block / max(time.perf_counter() - t0, 1e-9)))
    times = [[] for _ in calls]
    for r in range(rounds):
        order = range(len(calls)) if r % 2 == 0 else reversed(range(len(calls)))
        for i in order:
            t0 = time.perf_counter()
            for _ in range(n):
                calls[i]()
            times[i].append((time.perf_counter() - t0) / n)
    return [statistics.median(t) for t in times]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("old")
    parser.add_argument("new")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--block", type=float, default=0.1, help="seconds per timed block (default 0.1)")
    parser.add_argument("--quick", action="store_true", help="the quick prefill shapes, a smaller half prefill")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--isa", default=None, help="kernel path for both builds (default: each one's best)")
    parser.add_argument("--shape", type=int, nargs=4, action="append", metavar=("B", "H", "L", "D"),
                        help="time only this float32 prefill shape, full and causal (repeatable)")
    parser.add_argument("--backward", action="store_true", help="the backward's rows instead")
    args = parser.parse_args()
    old, new = import_old(args.old), import_new(args.new)
    from fastattn import _bench

    if args.isa:
        old.set_isa(args.isa)
        new.set_isa(args.isa)
    threads = args.threads or new.get_num_threads()
    if args.backward:
        return backward(old, new, threads, args)
    rows = []
    shapes = _bench.QUICK_SHAPES if args.quick else _bench.PREFILL_SHAPES
    for shape in [tuple(s) for s in args.shape] if args.shape else shapes:
        q, k, v = _bench.make_inputs(*shape)
        for causal in (False, True):
            rows.append((f"prefill {shape} {'causal' if causal else 'full'}", (q, k, v), dict(causal=causal)))
    for b, h, g, lq, d, lk in [] if args.shape else _bench.DECODE_SHAPES:
        qkv = _bench.decode_inputs(b, h, g, lq, d, lk, seed=lk)
        rows.append((f"decode f32 {(b, h, g, lq, d)} Lk={lk}", qkv, dict(causal=True)))
    half_prefill = (1, 8, 1024, 128) if args.quick else (1, 8, 4096, 128)
    base = _bench.make_inputs(*half_prefill)
    decode = [(lk, _bench.decode_inputs(b, h, g, lq, d, lk, seed=lk)) for b, h, g, lq, d, lk in _bench.DECODE_SHAPES]
    for name in () if args.shape else ("bfloat16", "float16"):
        dt = np.dtype(np.float16) if name == "float16" else new._api.BFLOAT16
        for causal in (False, True):
            rows.append((f"{name} prefill {half_prefill} {'causal' if causal else 'full'}",
                         tuple(a.astype(dt) for a in base), dict(causal=causal)))
        for lk, qkv in decode:
            rows.append((f"{name} decode Lk={lk}", tuple(a.astype(dt) for a in qkv), dict(causal=True)))

    def timed():
        for name, (q, k, v), options in rows:
            out = np.empty(q.shape[:-1] + v.shape[-1:], dtype=np.result_type(q, k, v))
            yield name, [lambda m=m: m.attention(q, k, v, out=out, num_threads=threads, **options) for m in (old, new)]

    table(args, old, new, f"{threads} threads; calls", timed())


def table(args, old, new, what, rows):
    """Times each row's two calls (old, new) alternating and prints the table."""
    print(f"old: {args.old} ({old.get_isa()}), new: {args.new} ({new.get_isa()}), {what} alternate between the "
          f"builds, median of {args.rounds} blocks each")
    header = f"{'row':<48} {'old ms':>9} {'new ms':>9} {'new/old':>8}"
    print(header)
    print("-" * len(header))
    worst = 0.0
    for name, calls in rows:
        t_old, t_new = alternate(calls, args.rounds, args.block)
        worst = max(worst, t_new / t_old)
        print(f"{name:<48} {t_old * 1e3:>9.3f} {t_new * 1e3:>9.3f} {t_new / t_old:>8.3f}", flush=True)
    print(f"slowest row: new/old = {worst:.3f}")


def backward(old, new, threads, args):
    """The backward's rows: each build's attention_backward, alternating."""
    from fastattn import _bench

    shapes = ([((b, h, h, l, d), c) for b, h, l, d in args.shape for c in (False, True)] if args.shape
              else _bench.BACKWARD_SHAPES)

    def timed():
        for n, ((b, h, g, l, d), causal) in enumerate(shapes, 1):
            rng = np.random.default_rng(n)
            base = [rng.standard_normal(s, dtype=np.float32) for s in ((b, h, l, d), (b, g, l, d), (b, g, l, d),
                                                                         (b, h, l, d))]
            for name in ("float32",) if args.shape else ("float32", "bfloat16"):
                dt = new._api.BFLOAT16 if name == "bfloat16" else np.dtype(name)
                q, k, v, dout = (a.astype(dt) for a in base)
                opts = dict(causal=causal, num_threads=threads)
                out, lse = new.attention(q, k, v, return_lse=True, **opts)
                yield (f"backward {name} {(b, h, g, l, d)} {'causal' if causal else 'full'}",
                       [lambda m=m: m.attention_backward(dout, q, k, v, out, lse, **opts) for m in (old, new)])

    table(args, old, new, f"{threads} threads; backward calls", timed())


if __name__ == "__main__":
    main()
