"""Command line: ``python -m fastattn`` (check and time) and ``python -m fastattn bench``.

``python -m fastattn`` prints the configuration, checks attention against the
float64 reference on a few shapes on every kernel path, and times fastattn
against a plain numpy float32 implementation on one shape.
``python -m fastattn bench`` runs the benchmark shapes and prints a table.
"""
import argparse
import json
import sys

import numpy as np

import fastattn
import fastattn.reference as ref
from fastattn import _bench

# (shape of q, k, v as (B, H, Lq, Lk, D), causal) checked by the main job
CHECK_CASES = [
    ((1, 2, 1, 257, 64), True),
    ((2, 3, 100, 130, 17), False),
    ((1, 4, 193, 193, 80), True),
    ((1, 1, 97, 61, 128), False),
]
CHECK_TOLERANCE = 2e-5  # float32, largest |error| against float64 with O(1) values


def check(out=sys.stdout):
    """Compare fastattn with the reference; returns True when every case passes."""
    ok = True
    rng = np.random.default_rng(0)
    for isa in fastattn.available_isas():
        with fastattn.use_isa(isa):
            worst = 0.0
            for (b, h, lq, lk, d), causal in CHECK_CASES:
                q = rng.standard_normal((b, h, lq, d), dtype=np.float32)
                k = rng.standard_normal((b, h, lk, d), dtype=np.float32)
                v = rng.standard_normal((b, h, lk, d), dtype=np.float32)
                got = fastattn.attention(q, k, v, causal=causal)
                err = float(np.max(np.abs(got - ref.attention(q, k, v, causal=causal))))
                worst = max(worst, err)
            status = "ok" if worst <= CHECK_TOLERANCE else "FAILED"
            ok &= worst <= CHECK_TOLERANCE
            print(f"  {isa:<8} {len(CHECK_CASES)} shapes, max |error| {worst:.2e} "
                  f"(tolerance {CHECK_TOLERANCE:.0e}): {status}", file=out)
    return ok


def main_job(args):
    fastattn.show_config()
    print("\nchecking float32 attention against the float64 reference:")
    ok = check()
    b, h, l, d = args.shape
    threads = args.threads or fastattn.get_num_threads()
    print(f"\ntiming (B,H,L,D)=({b},{h},{l},{d}) float32, {threads} threads, "
          f"median of {args.repeat}:")
    q, k, v = _bench.make_inputs(b, h, l, d)
    print(f"  {'':<28} {'fastattn':>12} {'numpy':>12} {'speedup':>8}")
    for causal in (False, True):
        flops = _bench.attention_flops(b, h, l, l, d, causal)
        t_fa = _bench.median_time(lambda: fastattn.attention(q, k, v, causal=causal,
                                                             num_threads=threads), args.repeat)
        with _bench.blas_threads(threads):
            t_np = _bench.median_time(lambda: _bench.numpy_attention(q, k, v, causal), args.repeat)
        label = "causal" if causal else "non-causal"
        print(f"  {label + ' ms':<28} {t_fa * 1e3:>12.2f} {t_np * 1e3:>12.2f} {t_np / t_fa:>7.2f}x")
        print(f"  {label + ' GFLOP/s':<28} {flops / t_fa / 1e9:>12.1f} {flops / t_np / 1e9:>12.1f}")
    return 0 if ok else 1


def report(args, threads, title, table, **results):
    """Print a benchmark table under a header line, and save it with --json."""
    print(f"fastattn {fastattn.__version__}, kernel path {fastattn.get_isa()}, {threads} threads")
    print(title + "\n")
    print(table)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(version=fastattn.__version__, isa=fastattn.get_isa(), threads=threads, **results),
                      f, indent=2)
        print(f"\nsaved {args.json}")
    return 0


def linear_job(args, threads, progress):
    rows = _bench.run_linear(_bench.LINEAR_LENGTHS, _bench.LINEAR_DIMS, threads,
                             repeat=args.repeat, progress=progress)
    return report(args, threads, "linear_attention vs attention(weights='dot'), (1, 1, L, D) float32, "
                  f"non-causal, median of {args.repeat}", _bench.format_linear(rows), linear=rows)


def plot_job(args, threads, progress):
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print("--plot needs matplotlib: pip install 'fastattn[plot]'", file=sys.stderr)
        return 2
    lengths = [s[2] for s in args.shape] if args.shape else _bench.PLOT_LENGTHS
    shapes = [(1, 8, l, 64) for l in lengths]
    matmul = _bench.matmul_gflops(threads)
    rows = [r for r in _bench.run_prefill(shapes, threads, repeat=args.repeat,
                                          with_torch=not args.no_torch, progress=progress)
            if not r["causal"]]
    _bench.plot_scaling(rows, args.plot, matmul)
    print(_bench.format_prefill(rows, matmul))
    print(f"\nsaved {args.plot}")
    return 0


def bench_job(args):
    threads = args.threads or fastattn.get_num_threads()
    shapes = _bench.QUICK_SHAPES if args.quick else _bench.PREFILL_SHAPES
    if args.shape:
        shapes = [tuple(s) for s in args.shape]
    progress = (lambda msg: print(msg, file=sys.stderr, flush=True)) if not args.quiet else None
    if args.linear:
        return linear_job(args, threads, progress)
    if args.plot:
        return plot_job(args, threads, progress)
    if args.backward:
        block = max(1, args.repeat // 2)  # calls per block: 3 rounds of 2 by default
        # --shape or --quick: those shapes, full and causal, and not the packed and option tables
        picked = args.shape or args.quick
        rows = _bench.run_backward(threads, repeat=block, with_torch=not args.no_torch, progress=progress,
                                   shapes=[((s[0], s[1], s[1], s[2], s[3]), c) for s in shapes
                                           for c in (False, True)] if picked else None)
        rates = [r["matmul_gflops"] for r in rows]
        matmul = float(np.median(rates))
        packed = [] if picked else _bench.run_packed_backward(threads, repeat=block, with_torch=not args.no_torch,
                                                              progress=progress)
        options = [] if picked else _bench.run_training_options(threads, repeat=block,
                                                                 with_torch=not args.no_torch, progress=progress)
        table = _bench.format_backward(rows)
        if packed:
            table += ("\n\npacked rows (padding-free training), float32, causal: attention_varlen forward + "
                      "backward against torch's SDPA with the row's block-diagonal causal mask and with one call "
                      "per sequence\n\n" + _bench.format_packed_backward(packed))
        if options:
            table += (f"\n\ndropout (p = {_bench.DROPOUT_P}) and a learned bias (a float mask (1, H, L, L) with its "
                      f"gradient), float32: forward + backward against torch's SDPA with the same option, and "
                      f"fastattn's own without it\n\n" + _bench.format_training_options(options))
        return report(args, threads, f"training step: forward + backward; fastattn, torch and numpy's float32 "
                      f"matmul ({min(rates):.0f}-{max(rates):.0f} GFLOP/s) timed in 3 rounds of alternating blocks "
                      f"of {block} calls per row (medians); backward flops = 2.5 x the forward's",
                      table, backward=rows, packed=packed, options=options, matmul_gflops=matmul)
    if args.dask:
        rows = _bench.run_dask(threads, repeat=args.repeat, cluster=not args.no_cluster, progress=progress,
                               shape=tuple(args.shape[0]) if args.shape else _bench.DASK_SHAPE)
        r0 = rows[0]
        return report(args, threads, f"causal attention {tuple(r0['shape'])} float32 through fastattn.dask, "
                      f"chunks of {r0['chunk']} queries and keys, median of {args.repeat}; vs one process = "
                      "extra time over one fastattn.attention call", _bench.format_dask(rows), dask=rows)
    if args.masks:
        rows = _bench.run_masks(threads, repeat=args.repeat, with_torch=not args.no_torch, progress=progress)
        return report(args, threads, f"bool masks (1 x 1 x L x L, broadcast over heads) against the same mask as "
                      f"an additive float32 mask (bf16: the same in bfloat16), as a fastattn.block_mask (classified "
                      f"once), no mask, and torch's "
                      f"SDPA with the bool mask; median of "
                      f"{args.repeat}", _bench.format_masks(rows), masks=rows)
    if args.block:
        rows = _bench.run_block(threads, repeat=max(args.repeat, 7), with_torch=not args.no_torch,
                                progress=progress)
        l, d, h = _bench.MODEL_BLOCK
        return report(args, threads, f"a pre-norm transformer block (L {l}, d {d}, {h} heads, causal attention), "
                      f"float32: each part's median time inside the block (run in order, block repeated) against "
                      f"the part repeated alone; median of {max(args.repeat, 7)}", _bench.format_block(rows),
                      block=rows)
    if args.paged:
        rows, mixed = _bench.run_paged(threads, repeat=max(args.repeat, 10), with_torch=not args.no_torch,
                                       progress=progress)
        h, g, d = _bench.PAGED_HEADS
        return report(args, threads, f"paged KV cache decode, float32, {h} heads over {g} kv heads, D {d}, one "
                      "query per sequence, shuffled blocks; against fastattn on the same keys stored contiguously "
                      "(one sequence: attention on (1, G, Lk, D); a batch: attention_varlen on packed keys); bf16 = "
                      "the same paged call with a bfloat16 cache and queries, int8 and e4m3 = 8-bit caches with "
                      "float32 queries; GB/s = float32 K and V bytes / time; "
                      f"medians of 5 rounds of alternating blocks", _bench.format_paged(rows, mixed), paged=rows,
                      paged_mixed=mixed)
    if args.transformers:
        rows = _bench.run_transformers(threads, repeat=args.repeat, progress=progress)
        layers, hidden, heads, kv, mlp, vocab = _bench.TRANSFORMERS_MODEL
        return report(args, threads, f"a Llama-style transformers model ({layers} layers, hidden {hidden}, {heads} "
                      f"heads over {kv} kv heads, random weights), float32, batch 1, greedy generate(), median of "
                      f"{args.repeat}; attention = time inside the attention functions; decode = generate(128) "
                      "less the prefill", _bench.format_transformers(rows), transformers=rows)
    if args.calls:
        rows = _bench.run_calls(threads, repeat=args.repeat, progress=progress)
        return report(args, threads, f"time per call of small float32 attention calls (every query sees every key), median of "
                      f"{args.repeat} loops of 200 calls; numpy = fastattn.attention on numpy arrays, varlen and "
                      "paged = the first batch entry through attention_varlen (one packed sequence) and "
                      "attention_paged (blocks of 16), fa.torch sdpa "
                      "= fastattn.torch.scaled_dot_product_attention, hf = the attention function of "
                      "transformers' attn_implementation (q (B, H, L, D) in, (B, L, H, D) out)",
                      _bench.format_calls(rows), calls=rows)
    if args.half:
        rows = _bench.run_half(threads, repeat=args.repeat, progress=progress)
        return report(args, threads, "half-precision storage vs float32, same data, same run, median of "
                      f"{args.repeat} (decode: of {max(args.repeat, 20)})", _bench.format_half(rows), half=rows)
    # the matmul ceiling is timed before and after the table; the better of
    # the two medians is the reference (the machine's clock and load drift)
    matmul_before = _bench.matmul_gflops(threads)
    rows = _bench.run_prefill(shapes, threads, repeat=args.repeat, with_torch=not args.no_torch,
                              progress=progress)
    decode_shapes = [] if args.shape or args.no_decode else _bench.DECODE_SHAPES
    decode = _bench.run_decode(decode_shapes, threads, repeat=max(args.repeat, 10),
                               with_torch=not args.no_torch, progress=progress)
    matmul_after = _bench.matmul_gflops(threads)
    matmul = max(matmul_before, matmul_after)
    print(f"fastattn {fastattn.__version__}, kernel path {fastattn.get_isa()}, {threads} threads")
    print(f"numpy float32 matmul {_bench.MATMUL_N}x{_bench.MATMUL_N}: {matmul:.1f} GFLOP/s "
          f"(before {matmul_before:.1f}, after {matmul_after:.1f}) [{_bench.blas_info()}]")
    torch_mod = _bench.torch_sdpa()
    if torch_mod is None or args.no_torch:
        print("torch: not measured" + (" (not installed)" if torch_mod is None else ""))
    else:
        print(f"torch {torch_mod[0].__version__} scaled_dot_product_attention")
    print(f"float32 attention, median of {args.repeat}; flops = 4 B H L^2 D (half when causal)\n")
    print(_bench.format_prefill(rows, matmul))
    if decode:
        print("\ndecode: one query row per head, causal, grouped heads; GB/s = bytes of K and V / time,"
              "\nmatvec = numpy float32 matrix-vector product over an array of that size, same run,"
              "\ntimed in 5 rounds of alternating blocks with fastattn (medians over all rounds)\n")
        print(_bench.format_decode(decode))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(version=fastattn.__version__, isa=fastattn.get_isa(), threads=threads,
                           matmul_gflops=matmul, matmul_gflops_runs=[matmul_before, matmul_after],
                           blas=_bench.blas_info(), prefill=rows, decode=decode), f, indent=2)
        print(f"\nsaved {args.json}")
    return 0


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m fastattn", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=None, help="threads (default: all usable)")
    parser.add_argument("--repeat", type=int, default=5, help="timed calls per measurement")
    parser.add_argument("--shape", type=int, nargs=4, default=[1, 8, 1024, 64],
                        metavar=("B", "H", "L", "D"), help="shape the main job times")
    sub = parser.add_subparsers(dest="command")
    bench = sub.add_parser("bench", help="run the benchmark table")
    bench.add_argument("--threads", type=int, default=None, help="threads (default: all usable)")
    bench.add_argument("--repeat", type=int, default=5, help="timed calls per measurement")
    bench.add_argument("--json", metavar="FILE", help="also save the results as JSON")
    bench.add_argument("--quick", action="store_true",
                       help="only the two smallest shapes (the prefill table, and --backward without its packed "
                       "and option tables)")
    bench.add_argument("--shape", type=int, nargs=4, action="append", metavar=("B", "H", "L", "D"),
                       help="time this shape instead (repeatable)")
    bench.add_argument("--no-torch", action="store_true", help="do not time PyTorch")
    bench.add_argument("--no-decode", action="store_true", help="skip the decode rows")
    bench.add_argument("--plot", metavar="FILE.png",
                       help="plot GFLOP/s against sequence length (needs matplotlib)")
    bench.add_argument("--backward", action="store_true",
                       help="training step (forward + backward) against torch's SDPA with autograd")
    bench.add_argument("--half", action="store_true",
                       help="bfloat16 and float16 against float32 (prefill and decode)")
    bench.add_argument("--linear", action="store_true",
                       help="linear vs quadratic dot-product attention over L = 256 .. 32768")
    bench.add_argument("--dask", action="store_true",
                       help="causal (1,8,32768,64) through fastattn.dask (threaded scheduler and a LocalCluster) "
                            "against one process; needs dask and distributed")
    bench.add_argument("--masks", action="store_true",
                       help="bool masks (random, causal, 8 documents) against additive masks, no mask and torch")
    bench.add_argument("--block", action="store_true",
                       help="a transformer block in numpy and in torch with fastattn's attention: each part's time "
                            "inside the block against alone (the thread pools as neighbours)")
    bench.add_argument("--paged", action="store_true",
                       help="paged KV cache decode against contiguous decode, and a mixed prefill/decode batch "
                            "against torch")
    bench.add_argument("--calls", action="store_true",
                       help="time per call of small calls (numpy, fastattn.torch, transformers vs torch)")
    bench.add_argument("--transformers", action="store_true",
                       help="prefill (2048 tokens) and decode (128) of a small Llama-style transformers model, "
                            "sdpa vs fastattn; needs transformers")
    bench.add_argument("--no-cluster", action="store_true", help="with --dask: skip the LocalCluster row")
    bench.add_argument("--quiet", action="store_true", help="no progress lines")
    sub.add_parser("config", help="print the configuration")
    args = parser.parse_args(argv)
    if args.threads is not None and args.threads < 1:
        parser.error("--threads must be >= 1")
    if args.repeat < 1:
        parser.error("--repeat must be >= 1")
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.command == "bench":
        return bench_job(args)
    if args.command == "config":
        fastattn.show_config()
        return 0
    return main_job(args)


if __name__ == "__main__":
    sys.exit(main())
