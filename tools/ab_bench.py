"""Time two builds of fastattn against each other, in the same run.

    python tools/ab_bench.py OLD_TREE NEW_TREE [--rounds 3] [--quick] [--threads N] [--isa NAME]

Each tree is a checkout with the extension built in place
(``python setup.py build_ext --inplace``).  Every round runs the rows of
``python -m fastattn bench`` (prefill, decode) and of ``bench --half``
(float32, bfloat16 and float16 on the same data) once with each tree, in
subprocesses, in alternating order, so that the machine's drift hits both
builds alike; the table gives each row's median over the rounds and the
ratio new / old of the times (above 1: the new build is slower).  Only
fastattn is timed (no numpy or torch reference).
"""
import argparse
import json
import os
import statistics
import subprocess
import sys

ROUND = r"""
import json, sys
import fastattn
from fastattn import _bench
quick, threads, isa = json.loads(sys.argv[1])
if isa:
    fastattn.set_isa(isa)
threads = threads or fastattn.get_num_threads()
shapes = _bench.QUICK_SHAPES if quick else _bench.PREFILL_SHAPES
rows = {}
for r in _bench.run_prefill(shapes, threads, with_torch=False, with_numpy=False):
    rows[f"prefill {tuple(r['shape'])} {'causal' if r['causal'] else 'full'}"] = r["fastattn_ms"]
for r in _bench.run_decode(_bench.DECODE_SHAPES, threads, with_torch=False):
    rows[f"decode f32 {tuple(r['shape'])} Lk={r['lk']}"] = r["fastattn_ms"]
half_prefill = (1, 8, 1024, 128) if quick else (1, 8, 4096, 128)
for r in _bench.run_half(threads, prefill_shape=half_prefill):
    case = (f"half prefill {tuple(r['shape'])} {'causal' if r['causal'] else 'full'}" if r["kind"] == "prefill"
            else f"half decode Lk={r['lk']}")
    for dt in ("float32", "bfloat16", "float16"):
        rows[f"{case} {dt}"] = r[f"{dt}_ms"]
print("RESULT " + json.dumps(dict(isa=fastattn.get_isa(), rows=rows)))
"""


def run_round(tree, args):
    env = dict(os.environ, PYTHONPATH=os.path.abspath(tree))
    res = subprocess.run([sys.executable, "-c", ROUND, json.dumps([args.quick, args.threads, args.isa])],
                         capture_output=True, text=True, env=env, cwd="/", check=True)
    line = [ln for ln in res.stdout.splitlines() if ln.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT "):])


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("old")
    parser.add_argument("new")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="the quick prefill shapes, a smaller half prefill")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--isa", default=None, help="kernel path for both builds (default: each one's best)")
    args = parser.parse_args()
    times = {"old": {}, "new": {}}
    paths = {}
    for r in range(args.rounds):
        order = ("old", "new") if r % 2 == 0 else ("new", "old")
        for which in order:
            print(f"round {r + 1}/{args.rounds}: {which}", file=sys.stderr, flush=True)
            out = run_round(getattr(args, which), args)
            paths[which] = out["isa"]
            for row, ms in out["rows"].items():
                times[which].setdefault(row, []).append(ms)
    print(f"old: {args.old} ({paths['old']}), new: {args.new} ({paths['new']}); "
          f"median of {args.rounds} alternating rounds")
    header = f"{'row':<52} {'old ms':>9} {'new ms':>9} {'new/old':>8}"
    print(header)
    print("-" * len(header))
    worst = 0.0
    for row in times["old"]:
        old, new = statistics.median(times["old"][row]), statistics.median(times["new"][row])
        worst = max(worst, new / old)
        print(f"{row:<52} {old:>9.3f} {new:>9.3f} {new / old:>8.3f}")
    print(f"slowest row: new/old = {worst:.3f}")


if __name__ == "__main__":
    main()
