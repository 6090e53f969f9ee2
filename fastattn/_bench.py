"""Benchmark helpers shared by ``python -m fastattn`` and the bench/ suite.

Times are medians of repeated calls on the same inputs.  Everything that is
compared (fastattn, a plain numpy float32 implementation, PyTorch's
scaled_dot_product_attention, numpy's float32 matmul as the machine's
practical throughput ceiling) is timed in the same run, since absolute times
on a shared machine drift.
"""
import contextlib
import math
import time

import numpy as np

import fastattn

# (B, H, L, D) prefill shapes, each run non-causal and causal.
PREFILL_SHAPES = [
    (1, 8, 1024, 64),
    (1, 8, 4096, 64),
    (1, 8, 4096, 128),
    (4, 16, 512, 64),
    (1, 32, 2048, 128),
]
QUICK_SHAPES = [(1, 8, 1024, 64), (4, 16, 512, 64)]
MATMUL_N = 2048


def attention_flops(b, h, lq, lk, d, causal):
    """4 B H Lq Lk D multiply-add flops; half of that for causal with Lq == Lk."""
    flops = 4.0 * b * h * lq * lk * d
    return flops / 2 if causal and lq == lk else flops


def numpy_attention(q, k, v, causal=False):
    """Plain numpy attention: matmul, softmax, matmul (materialises Lq x Lk)."""
    d = q.shape[-1]
    s = q @ np.swapaxes(k, -1, -2)
    s *= s.dtype.type(1.0 / math.sqrt(d))
    if causal:
        lq, lk = s.shape[-2:]
        hidden = np.arange(lk)[None, :] > np.arange(lq)[:, None] + (lk - lq)
        s[..., hidden] = -np.inf
    s -= s.max(axis=-1, keepdims=True)
    np.exp(s, out=s)
    s /= s.sum(axis=-1, keepdims=True)
    return s @ v


# Seconds to pause before timing something new: thread pools of the code
# timed before (OpenBLAS, PyTorch's OpenMP) spin for a while after their last
# call, and would otherwise steal the cores from the next measurement.
SETTLE_SECONDS = 0.25


def median_time(fn, repeat=5, min_time=0.0, settle=SETTLE_SECONDS):
    """Median wall time of fn() over `repeat` calls (after a pause and one
    warm-up call), repeating further until `min_time` seconds have passed."""
    time.sleep(settle)
    fn()
    times = []
    start = time.perf_counter()
    while len(times) < repeat or time.perf_counter() - start < min_time:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
        if len(times) >= 1000:
            break
    return float(np.median(times))


def interleaved_medians(fns, repeat, settle=SETTLE_SECONDS):
    """Median wall time of each function, timed in alternation (one call of
    each per round) so that drift in the machine's speed hits all alike.
    Only for functions that share one thread pool (fastattn against itself)."""
    time.sleep(settle)
    for fn in fns:
        fn()
    times = [[] for _ in fns]
    for _ in range(repeat):
        for fn, ts in zip(fns, times):
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
    return [float(np.median(ts)) for ts in times]


def alternating_blocks(fns, repeat, rounds=5, settle=SETTLE_SECONDS):
    """Median wall time of each function over `rounds` rounds, each round one
    block of `repeat` calls per function (after a pause and a warm-up call).
    Drift in the machine's speed during the measurement hits all functions
    alike, while the calls of different libraries, whose thread pools keep
    spinning after a call, never alternate call by call."""
    times = [[] for _ in fns]
    for _ in range(rounds):
        for fn, ts in zip(fns, times):
            time.sleep(settle)
            fn()
            for _ in range(repeat):
                t0 = time.perf_counter()
                fn()
                ts.append(time.perf_counter() - t0)
    return [float(np.median(ts)) for ts in times]


@contextlib.contextmanager
def blas_threads(n):
    """Limit numpy's BLAS to n threads when threadpoolctl is available."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        yield
        return
    with threadpool_limits(limits=n, user_api="blas"):
        yield


def blas_info():
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        return "unknown (threadpoolctl not installed)"
    for lib in threadpool_info():
        if lib.get("user_api") == "blas":
            return f"{lib.get('internal_api')} {lib.get('version')} ({lib.get('architecture')})"
    return "unknown"


def matmul_gflops(threads, repeat=10):
    """numpy float32 matmul throughput (median) on a MATMUL_N^2 product."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((MATMUL_N, MATMUL_N), dtype=np.float32)
    b = rng.standard_normal((MATMUL_N, MATMUL_N), dtype=np.float32)
    with blas_threads(threads):
        t = median_time(lambda: a @ b, repeat=repeat)
    return 2.0 * MATMUL_N**3 / t / 1e9


def torch_sdpa():
    """torch.nn.functional.scaled_dot_product_attention, or None without torch."""
    try:
        import torch
        import torch.nn.functional as F
    except ImportError:
        return None
    return torch, F.scaled_dot_product_attention


def torch_median_ms(torch_mod, threads, arrays, call, repeat):
    """Median ms of call(*tensors) on torch views of `arrays`, torch using
    `threads` threads (restored afterwards), in inference mode."""
    torch, sdpa = torch_mod
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        tensors = [torch.from_numpy(a) for a in arrays]
        with torch.inference_mode():
            return median_time(lambda: call(sdpa, *tensors), repeat) * 1e3
    finally:
        torch.set_num_threads(saved)


def make_inputs(b, h, l, d, dtype=np.float32, seed=0):
    rng = np.random.default_rng(seed)
    return tuple(rng.standard_normal((b, h, l, d), dtype=np.float32).astype(dtype) for _ in range(3))


def run_prefill(shapes, threads, repeat=5, with_torch=True, with_numpy=True, progress=None):
    """Time each shape, non-causal and causal; return one dict per row."""
    torch_mod = torch_sdpa() if with_torch else None
    rows = []
    cases = [(shape, causal) for shape in shapes for causal in (False, True)]
    for n, (shape, causal) in enumerate(cases, 1):
        b, h, l, d = shape
        if progress:
            progress(f"[{n}/{len(cases)}] (B,H,L,D)={shape} causal={causal}")
        q, k, v = make_inputs(b, h, l, d)
        out = np.empty_like(q)
        flops = attention_flops(b, h, l, l, d, causal)
        row = dict(shape=list(shape), causal=causal, dtype="float32", threads=threads, flops=flops)
        t = median_time(lambda: fastattn.attention(q, k, v, causal=causal, out=out,
                                                   num_threads=threads), repeat)
        row["fastattn_ms"] = t * 1e3
        if with_numpy:
            with blas_threads(threads):
                row["numpy_ms"] = median_time(lambda: numpy_attention(q, k, v, causal), repeat) * 1e3
        if torch_mod is not None:
            row["torch_ms"] = torch_median_ms(torch_mod, threads, (q, k, v),
                                              lambda f, *t: f(*t, is_causal=causal), repeat)
        rows.append(row)
    return rows


def format_prefill(rows, matmul):
    """A text table: ms and GFLOP/s per implementation, % of matmul, speedups."""
    header = (f"{'shape (B,H,L,D)':<20} {'causal':<6} {'fastattn ms':>11} {'GFLOP/s':>8} "
              f"{'% matmul':>8} {'numpy ms':>9} {'x numpy':>8} {'torch ms':>9} {'x torch':>8}")
    lines = [header, "-" * len(header)]
    for r in rows:
        gf = r["flops"] / (r["fastattn_ms"] * 1e-3) / 1e9
        np_ms = r.get("numpy_ms")
        th_ms = r.get("torch_ms")
        lines.append(
            f"{str(tuple(r['shape'])):<20} {str(r['causal']):<6} {r['fastattn_ms']:>11.2f} {gf:>8.1f} "
            f"{100 * gf / matmul:>7.0f}% "
            + (f"{np_ms:>9.2f} {np_ms / r['fastattn_ms']:>7.2f}x " if np_ms else f"{'-':>9} {'-':>8} ")
            + (f"{th_ms:>9.2f} {th_ms / r['fastattn_ms']:>7.2f}x" if th_ms else f"{'-':>9} {'-':>8}")
        )
    return "\n".join(lines)


# (B, H, G, Lq, D, Lk): one decode step against a KV cache, grouped heads.
DECODE_SHAPES = [(1, 32, 8, 1, 128, 4096), (1, 32, 8, 1, 128, 16384), (1, 32, 8, 1, 128, 32768)]


def decode_inputs(b, h, g, lq, d, lk, seed=0):
    """q (B, H, Lq, D) and a grouped cache k, v (B, G, Lk, D), float32, fixed seed."""
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((b, h, lq, d), dtype=np.float32),
            rng.standard_normal((b, g, lk, d), dtype=np.float32),
            rng.standard_normal((b, g, lk, d), dtype=np.float32))


def run_decode(shapes, threads, repeat=10, with_torch=True, progress=None):
    """Time decode steps; bandwidth = bytes of K and V read / time, compared
    with numpy's float32 matrix-vector product over an array of that size
    (alternating blocks of `repeat` calls: see alternating_blocks)."""
    torch_mod = torch_sdpa() if with_torch else None
    rows = []
    for n, (b, h, g, lq, d, lk) in enumerate(shapes, 1):
        if progress:
            progress(f"[decode {n}/{len(shapes)}] (B,H,G,Lq,D)={(b, h, g, lq, d)} Lk={lk}")
        q, k, v = decode_inputs(b, h, g, lq, d, lk, seed=n)
        out = np.empty_like(q)
        nbytes = k.nbytes + v.nbytes
        row = dict(shape=[b, h, g, lq, d], lk=lk, bytes=nbytes, threads=threads, dtype="float32")
        mat = np.concatenate([k.reshape(-1, d), v.reshape(-1, d)])
        x = np.random.default_rng(n).standard_normal(d, dtype=np.float32)
        with blas_threads(threads):
            fa, mv = alternating_blocks(
                [lambda: fastattn.attention(q, k, v, causal=True, out=out, num_threads=threads),
                 lambda: mat @ x], repeat)
        row["fastattn_ms"], row["matvec_ms"] = fa * 1e3, mv * 1e3
        del mat
        if torch_mod is not None:  # Lq = 1: every key is visible, causal or not
            row["torch_ms"] = torch_median_ms(torch_mod, threads, (q, k, v),
                                              lambda f, *t: f(*t, enable_gqa=True), repeat)
        rows.append(row)
    return rows


def format_decode(rows):
    header = (f"{'(B,H,G,Lq,D)':<20} {'Lk':>6} {'fastattn ms':>11} {'GB/s':>7} {'matvec GB/s':>11} "
              f"{'% matvec':>8} {'torch ms':>9} {'x torch':>8}")
    lines = [header, "-" * len(header)]
    for r in rows:
        gbs = r["bytes"] / (r["fastattn_ms"] * 1e-3) / 1e9
        mv = r["bytes"] / (r["matvec_ms"] * 1e-3) / 1e9
        th = r.get("torch_ms")
        lines.append(
            f"{str(tuple(r['shape'])):<20} {r['lk']:>6} {r['fastattn_ms']:>11.3f} {gbs:>7.1f} {mv:>11.1f} "
            f"{100 * gbs / mv:>7.0f}% "
            + (f"{th:>9.3f} {th / r['fastattn_ms']:>7.2f}x" if th else f"{'-':>9} {'-':>8}")
        )
    return "\n".join(lines)


# ((B, H, G, L, D), causal): the backward rows (H query heads over G kv heads)
BACKWARD_SHAPES = [
    ((1, 8, 8, 1024, 64), False),
    ((1, 8, 8, 4096, 64), True),
    ((4, 16, 16, 512, 64), False),
    ((1, 32, 32, 2048, 128), True),
    ((1, 32, 8, 2048, 128), True),
]


def run_backward(threads, repeat=3, shapes=None, dtypes=("float32", "bfloat16"), with_torch=True, progress=None,
                 rounds=3):
    """Training step of attention: fastattn's forward + backward and its
    backward alone, against torch's SDPA forward + backward (autograd) on
    the same data, and numpy's float32 matmul, timed in `rounds` rounds of
    alternating blocks of `repeat` calls (see alternating_blocks), so that
    each row's ratios and its share of the matmul rate come from the same
    stretch of time.  The backward's flops are counted as 2.5 x the
    forward's."""
    from fastattn._api import BFLOAT16

    torch_mod = torch_sdpa() if with_torch else None
    shapes = BACKWARD_SHAPES if shapes is None else shapes
    rng = np.random.default_rng(0)
    a, b_ = (rng.standard_normal((MATMUL_N, MATMUL_N), dtype=np.float32) for _ in range(2))
    rows = []
    for n, ((b, h, g, l, d), causal) in enumerate(shapes, 1):
        rng = np.random.default_rng(n)
        base = [rng.standard_normal(s, dtype=np.float32) for s in ((b, h, l, d), (b, g, l, d), (b, g, l, d),
                                                                     (b, h, l, d))]
        for name in dtypes:
            if progress:
                progress(f"[backward {n}/{len(shapes)}] (B,H,G,L,D)={(b, h, g, l, d)} causal={causal} {name}")
            dt = BFLOAT16 if name == "bfloat16" else np.dtype(name)
            q, k, v, dout = (x.astype(dt) for x in base)
            opts = dict(causal=causal, num_threads=threads)
            out, lse = fastattn.attention(q, k, v, return_lse=True, **opts)

            def step():
                o, s = fastattn.attention(q, k, v, return_lse=True, **opts)
                fastattn.attention_backward(dout, q, k, v, o, s, **opts)

            fns = [step, lambda: fastattn.attention_backward(dout, q, k, v, out, lse, **opts), lambda: a @ b_]
            with blas_threads(threads), _torch_threads(torch_mod, threads):
                if torch_mod is not None:
                    fns.append(_torch_train_step(torch_mod, base, name, causal, g != h))
                times = alternating_blocks(fns, repeat, rounds)
            row = dict(shape=[b, h, g, l, d], causal=causal, dtype=name, threads=threads,
                       flops=2.5 * attention_flops(b, h, l, l, d, causal), fastattn_ms=times[0] * 1e3,
                       backward_ms=times[1] * 1e3, matmul_gflops=2.0 * MATMUL_N**3 / times[2] / 1e9)
            if torch_mod is not None:
                row["torch_ms"] = times[3] * 1e3
            rows.append(row)
    return rows


@contextlib.contextmanager
def _torch_threads(torch_mod, threads):
    """torch using `threads` threads inside the block (restored after)."""
    if torch_mod is None:
        yield
        return
    torch = torch_mod[0]
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(saved)


def _torch_train_step(torch_mod, arrays, dtype, causal, gqa):
    """torch's SDPA forward + backward on `arrays` (q, k, v, dout), as a call."""
    torch, sdpa = torch_mod
    tdt = getattr(torch, dtype)
    q, k, v = (torch.from_numpy(x).to(tdt).requires_grad_() for x in arrays[:3])
    dout = torch.from_numpy(arrays[3]).to(tdt)

    def step():
        sdpa(q, k, v, is_causal=causal, enable_gqa=gqa).backward(dout)

    return step


def format_backward(rows, matmul_gflops=None):
    """The rows of run_backward; % matmul against each row's own matmul rate
    (matmul_gflops for rows without one)."""
    header = (f"{'(B,H,G,L,D)':<22} {'causal':>6} {'dtype':>8} {'fwd+bwd ms':>10} {'torch ms':>9} {'x torch':>8} "
              f"{'bwd ms':>9} {'bwd GFLOP/s':>11} {'% matmul':>8}")
    lines = [header, "-" * len(header)]
    for r in rows:
        gflops = r["flops"] / (r["backward_ms"] * 1e-3) / 1e9
        th = r.get("torch_ms")
        lines.append(
            f"{str(tuple(r['shape'])):<22} {str(r['causal']):>6} {r['dtype']:>8} {r['fastattn_ms']:>10.1f} "
            + (f"{th:>9.1f} {th / r['fastattn_ms']:>7.2f}x" if th else f"{'-':>9} {'-':>8}")
            + f" {r['backward_ms']:>9.1f} {gflops:>11.1f} "
            + f"{100 * gflops / r.get('matmul_gflops', matmul_gflops):>7.0f}%"
        )
    return "\n".join(lines)


# ((sequences, length), H, G, D): packed training rows, causal, the sequences of one row side by side
PACKED_BACKWARD = [((8, 512), 16, 4, 64), ((4, 1024), 16, 4, 64)]


def run_packed_backward(threads, repeat=2, cases=None, with_torch=True, progress=None, rounds=3):
    """Training step of attention over sequences packed in one row (padding-
    free training), float32, causal: fastattn.attention_varlen forward +
    attention_varlen_backward, against torch's SDPA forward + backward with
    the row's dense block-diagonal causal mask (what transformers' "sdpa"
    attention runs on packed rows; the mask built once, not timed) and with
    one SDPA call per sequence, timed as run_backward does."""
    torch_mod = torch_sdpa() if with_torch else None
    rows = []
    for n, ((count, length), h, g, d) in enumerate(PACKED_BACKWARD if cases is None else cases, 1):
        if progress:
            progress(f"[packed {n}] {count} sequences of {length}, H={h} G={g} D={d}")
        total = count * length
        rng = np.random.default_rng(n)
        q, k, v, dout = (rng.standard_normal(sh, dtype=np.float32) for sh in ((total, h, d), (total, g, d),
                                                                              (total, g, d), (total, h, d)))
        cu = np.arange(0, total + 1, length, dtype=np.int32)
        opts = dict(causal=True, num_threads=threads)

        def step():
            o, s = fastattn.attention_varlen(q, k, v, cu, cu, return_lse=True, **opts)
            fastattn.attention_varlen_backward(dout, q, k, v, o, s, cu, cu, **opts)

        fns = [step]
        if torch_mod is not None:
            fns += _torch_packed_steps(torch_mod, (q, k, v, dout), count, length)
        with _torch_threads(torch_mod, threads):
            times = alternating_blocks(fns, repeat, rounds)
        row = dict(sequences=count, length=length, heads=h, kv_heads=g, d=d, threads=threads,
                   fastattn_ms=times[0] * 1e3)
        if torch_mod is not None:
            row.update(torch_mask_ms=times[1] * 1e3, torch_loop_ms=times[2] * 1e3)
        rows.append(row)
    return rows


def _torch_packed_steps(torch_mod, arrays, count, length):
    """torch's SDPA forward + backward on packed rows (q, k, v, dout as
    (total, heads, D)): one call with the block-diagonal causal mask, and one
    call per sequence."""
    torch, sdpa = torch_mod
    q, k, v = (torch.from_numpy(x).transpose(0, 1).requires_grad_() for x in arrays[:3])
    dout = torch.from_numpy(arrays[3]).transpose(0, 1)
    seq = torch.arange(count * length) // length
    pos = torch.arange(count * length)
    mask = (seq[:, None] == seq[None, :]) & (pos[:, None] >= pos[None, :])

    def masked():
        sdpa(q, k, v, attn_mask=mask, enable_gqa=True).backward(dout)

    def per_sequence():
        for i in range(count):
            s = slice(i * length, (i + 1) * length)
            sdpa(q[:, s], k[:, s], v[:, s], is_causal=True, enable_gqa=True).backward(dout[:, s])

    return [masked, per_sequence]


def format_packed_backward(rows):
    header = (f"{'sequences x length':<19} {'H/G':>5} {'D':>4} {'fastattn ms':>11} {'torch mask ms':>13} "
              f"{'x torch':>8} {'torch loop ms':>13} {'x torch':>8}")
    lines = [header, "-" * len(header)]
    for r in rows:
        tm, tl = r.get("torch_mask_ms"), r.get("torch_loop_ms")
        lines.append(
            f"{r['sequences']:>6} x {r['length']:<10} {r['heads']:>2}/{r['kv_heads']:<2} {r['d']:>4} "
            f"{r['fastattn_ms']:>11.1f} "
            + (f"{tm:>13.1f} {tm / r['fastattn_ms']:>7.2f}x {tl:>13.1f} {tl / r['fastattn_ms']:>7.2f}x" if tm
               else f"{'-':>13} {'-':>8} {'-':>13} {'-':>8}"))
    return "\n".join(lines)


# (option, (B, H, L, D), causal): training steps with an option torch's fast
# CPU path lacks: dropout on the weights (p = 0.1), a learned additive bias
# per head (T5's relative positions: a float mask that requires grad)
TRAINING_OPTIONS = [("dropout", (1, 8, 1024, 64), True), ("dropout", (4, 16, 512, 64), False),
                    ("dropout", (1, 16, 2048, 128), True), ("learned bias", (4, 8, 512, 64), False),
                    ("learned bias", (1, 16, 1024, 64), False)]
DROPOUT_P = 0.1


def run_training_options(threads, repeat=2, cases=None, with_torch=True, progress=None, rounds=3):
    """Training step with dropout (p = DROPOUT_P) or a learned bias (a
    float mask (1, H, L, L) whose gradient is wanted), float32: fastattn's
    forward + backward with the option, the same without it (what the
    option costs), and torch's SDPA forward + backward with it (on the CPU
    torch runs dropout on its math path, which forms every weight), timed
    as run_backward does."""
    torch_mod = torch_sdpa() if with_torch else None
    rows = []
    for n, (option, shape, causal) in enumerate(TRAINING_OPTIONS if cases is None else cases, 1):
        if progress:
            progress(f"[{option} {n}] {shape} causal={causal}")
        rng = np.random.default_rng(n)
        q, k, v, dout = (rng.standard_normal(shape, dtype=np.float32) for _ in range(4))
        dropout = option == "dropout"
        # a bias only for its rows: (1, 16, 2048, 2048) floats are 256 MiB
        bias = None if dropout else rng.standard_normal((1, shape[1], shape[2], shape[2]), dtype=np.float32)

        def step(on):
            opts = dict(causal=causal, num_threads=threads)
            if on and dropout:
                opts.update(dropout_p=DROPOUT_P, dropout_seed=n)
            elif on:
                opts["mask"] = bias
            o, s = fastattn.attention(q, k, v, return_lse=True, **opts)
            fastattn.attention_backward(dout, q, k, v, o, s, return_dmask=on and not dropout, **opts)

        fns = [lambda: step(True), lambda: step(False)]
        if torch_mod is not None:
            torch, sdpa = torch_mod
            tq, tk, tv = (torch.from_numpy(x).requires_grad_() for x in (q, k, v))
            tdout = torch.from_numpy(dout)
            if dropout:
                fns.append(lambda: sdpa(tq, tk, tv, is_causal=causal, dropout_p=DROPOUT_P).backward(tdout))
            else:
                tb = torch.from_numpy(bias).requires_grad_()
                fns.append(lambda: sdpa(tq, tk, tv, attn_mask=tb).backward(tdout))
        with _torch_threads(torch_mod, threads):
            times = alternating_blocks(fns, repeat, rounds)
        row = dict(option=option, shape=shape, causal=causal, threads=threads, fastattn_ms=times[0] * 1e3,
                   without_ms=times[1] * 1e3)
        if torch_mod is not None:
            row["torch_ms"] = times[2] * 1e3
        rows.append(row)
    return rows


def format_training_options(rows):
    header = (f"{'option':<13} {'(B,H,L,D)':<20} {'causal':>6} {'fastattn ms':>11} {'torch ms':>9} {'x torch':>8} "
              f"{'without ms':>10} {'cost':>6}")
    lines = [header, "-" * len(header)]
    for r in rows:
        th = r.get("torch_ms")
        lines.append(
            f"{r['option']:<13} {str(tuple(r['shape'])):<20} {str(r['causal']):>6} {r['fastattn_ms']:>11.1f} "
            + (f"{th:>9.1f} {th / r['fastattn_ms']:>7.2f}x" if th else f"{'-':>9} {'-':>8}")
            + f" {r['without_ms']:>10.1f} {r['fastattn_ms'] / r['without_ms']:>5.2f}x")
    return "\n".join(lines)


LINEAR_LENGTHS = [256, 512, 1024, 2048, 4096, 8192, 16384, 32768]
LINEAR_DIMS = [64, 128]


def run_linear(lengths, dims, threads, repeat=3, heads=1, progress=None):
    """linear_attention vs quadratic attention(weights="dot") (non-causal),
    (1, heads, L, D) float32 with Dv = D."""
    rows = []
    for d in dims:
        for n, l in enumerate(lengths, 1):
            if progress:
                progress(f"[linear D={d} {n}/{len(lengths)}] L={l}")
            q, k, v = make_inputs(1, heads, l, d, seed=n)
            out = np.empty_like(q)
            t_lin = median_time(lambda: fastattn.linear_attention(q, k, v, num_threads=threads), repeat)
            t_quad = median_time(lambda: fastattn.attention(q, k, v, weights="dot", out=out,
                                                            num_threads=threads), repeat)
            rows.append(dict(L=l, D=d, heads=heads, threads=threads, linear_ms=t_lin * 1e3,
                             quadratic_ms=t_quad * 1e3))
    return rows


def linear_crossover(rows, d):
    """Smallest measured L at which linear attention is faster, or None."""
    for r in sorted((r for r in rows if r["D"] == d), key=lambda r: r["L"]):
        if r["linear_ms"] < r["quadratic_ms"]:
            return r["L"]
    return None


def format_linear(rows):
    header = f"{'D':>4} {'L':>6} {'linear ms':>10} {'quadratic ms':>13} {'speedup':>8}"
    lines = [header, "-" * len(header)]
    for r in rows:
        lines.append(f"{r['D']:>4} {r['L']:>6} {r['linear_ms']:>10.3f} {r['quadratic_ms']:>13.3f} "
                     f"{r['quadratic_ms'] / r['linear_ms']:>7.2f}x")
    for d in sorted({r["D"] for r in rows}):
        print_l = linear_crossover(rows, d)
        lines.append(f"D={d}: linear is faster from L = {print_l}" if print_l
                     else f"D={d}: quadratic faster at every measured L")
    return "\n".join(lines)


PLOT_LENGTHS = [256, 512, 1024, 2048, 4096, 8192]


def plot_scaling(rows, path, matmul=None):
    """GFLOP/s against sequence length for each implementation, to a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    lengths = [r["shape"][2] for r in rows]
    for key, label in (("fastattn_ms", "fastattn"), ("numpy_ms", "numpy (matmul, softmax, matmul)"),
                       ("torch_ms", "torch scaled_dot_product_attention")):
        pts = [(l, r["flops"] / (r[key] * 1e-3) / 1e9) for l, r in zip(lengths, rows) if r.get(key)]
        if pts:
            ax.plot(*zip(*pts), marker="o", label=label)
    if matmul:
        ax.axhline(matmul, color="grey", linestyle="--", label=f"numpy float32 matmul ({matmul:.0f})")
    b, h, _, d = rows[0]["shape"]
    ax.set_xscale("log", base=2)
    ax.set_xlabel("sequence length L")
    ax.set_ylabel("GFLOP/s")
    ax.set_title(f"float32 attention, (B, H, D) = ({b}, {h}, {d}), {rows[0]['threads']} threads")
    ax.legend()
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run_half(threads, repeat=5, progress=None, prefill_shape=(1, 8, 4096, 128), decode_shapes=None):
    """fastattn in float32, bfloat16 and float16 on the same data, same run:
    a prefill shape, non-causal and causal, and the decode shapes."""
    from fastattn._api import BFLOAT16

    dtypes = [("float32", np.float32), ("bfloat16", BFLOAT16), ("float16", np.float16)]
    decode_shapes = DECODE_SHAPES if decode_shapes is None else decode_shapes
    rows = []
    base = make_inputs(*prefill_shape)
    for causal in (False, True):
        if progress:
            progress(f"[half] prefill {tuple(prefill_shape)} causal={causal}")
        b, h, l, d = prefill_shape
        row = dict(kind="prefill", shape=list(prefill_shape), causal=causal, threads=threads,
                   flops=attention_flops(b, h, l, l, d, causal))
        _time_dtypes(row, dtypes, base, dict(causal=causal, num_threads=threads), repeat)
        rows.append(row)
    for b, h, g, lq, d, lk in decode_shapes:
        if progress:
            progress(f"[half] decode Lk={lk}")
        row = dict(kind="decode", shape=[b, h, g, lq, d], lk=lk, threads=threads)
        _time_dtypes(row, dtypes, decode_inputs(b, h, g, lq, d, lk, seed=lk),
                     dict(causal=True, num_threads=threads), max(repeat, 20))
        rows.append(row)
    return rows


def _time_dtypes(row, dtypes, arrays, options, repeat):
    """row[<dtype>_ms] for attention on `arrays` converted to each dtype, timed in alternation."""
    inputs = [tuple(a.astype(dt) for a in arrays) for _, dt in dtypes]
    calls = [lambda qkv=qkv: fastattn.attention(*qkv, **options) for qkv in inputs]
    for (name, _), t in zip(dtypes, interleaved_medians(calls, repeat)):
        row[f"{name}_ms"] = t * 1e3


def format_half(rows):
    header = (f"{'case':<34} {'float32 ms':>10} {'bfloat16 ms':>11} {'x f32':>6} {'float16 ms':>10} "
              f"{'x f32':>6}")
    lines = [header, "-" * len(header)]
    for r in rows:
        if r["kind"] == "prefill":
            case = f"prefill {tuple(r['shape'])} {'causal' if r['causal'] else 'full'}"
        else:
            case = f"decode {tuple(r['shape'])} Lk={r['lk']}"
        f32, bf, f16 = r["float32_ms"], r["bfloat16_ms"], r["float16_ms"]
        lines.append(f"{case:<34} {f32:>10.2f} {bf:>11.2f} {f32 / bf:>5.2f}x {f16:>10.2f} {f32 / f16:>5.2f}x")
    return "\n".join(lines)


# causal prefill through fastattn.dask: (B, H, L, D), and the query and key chunk length
DASK_SHAPE = (1, 8, 32768, 64)
DASK_CHUNK = 4096


def run_dask(threads, shape=DASK_SHAPE, chunk=DASK_CHUNK, repeat=3, cluster=True, progress=None):
    """Causal attention of `shape` through fastattn.dask (chunks of `chunk`
    queries and keys) against one fastattn.attention call on the same data,
    same run: on dask's threaded scheduler with `threads` workers, and with
    `cluster` on a LocalCluster of `threads` one-thread worker processes, its
    inputs persisted on the workers first (not timed) and the result
    gathered to the client (timed)."""
    import dask
    import dask.array as da

    import fastattn.dask as fdask

    b, h, l, d = shape
    q, k, v = make_inputs(b, h, l, d)
    flops = attention_flops(b, h, l, l, d, True)
    rows = []

    def row(case, seconds, tasks):
        rows.append(dict(case=case, shape=list(shape), chunk=chunk, threads=threads, flops=flops,
                         ms=seconds * 1e3, tasks=tasks))

    if progress:
        progress(f"[dask] single process {shape}")
    out = np.empty_like(q)
    row("fastattn.attention, one process", median_time(
        lambda: fastattn.attention(q, k, v, causal=True, out=out, num_threads=threads), repeat), 1)
    dq, dk, dv = (da.from_array(x, chunks=(b, h, chunk, d)) for x in (q, k, v))
    result = fdask.attention(dq, dk, dv, causal=True)
    tasks = sum(1 for key in dict(result.__dask_graph__())
                if isinstance(key, tuple) and key[0].startswith("fastattn-attention-"))
    if progress:
        progress(f"[dask] threaded scheduler, {tasks} attention tasks")
    with dask.config.set(scheduler="threads", num_workers=threads):
        row(f"fastattn.dask, threaded scheduler, {threads} threads", median_time(result.compute, repeat), tasks)
    if cluster:
        from distributed import Client, LocalCluster, wait

        if progress:
            progress(f"[dask] LocalCluster of {threads} worker processes")
        with LocalCluster(n_workers=threads, threads_per_worker=1, processes=True, dashboard_address=None,
                          worker_dashboard_address=None) as lc, Client(lc) as client:
            pq, pk, pv = client.persist([dq, dk, dv])
            wait([pq, pk, pv])
            result = fdask.attention(pq, pk, pv, causal=True)
            row(f"fastattn.dask, LocalCluster, {threads} x 1-thread workers",
                median_time(lambda: client.compute(result, sync=True), repeat), tasks)
    return rows


def format_dask(rows):
    header = f"{'case':<52} {'ms':>9} {'GFLOP/s':>8} {'vs one process':>14} {'tasks':>6}"
    lines = [header, "-" * len(header)]
    base = rows[0]["ms"]
    for r in rows:
        gf = r["flops"] / (r["ms"] * 1e-3) / 1e9
        lines.append(f"{r['case']:<52} {r['ms']:>9.1f} {gf:>8.1f} {100 * (r['ms'] / base - 1):>+13.1f}% "
                     f"{r['tasks']:>6}")
    return "\n".join(lines)


# a small Llama-style model for the transformers rows: (layers, hidden, heads, kv heads, MLP width, vocabulary)
TRANSFORMERS_MODEL = (4, 1024, 16, 4, 2816, 32000)


def run_transformers(threads, prompt=2048, new_tokens=128, repeat=3, progress=None):
    """Prefill (`prompt` tokens, batch 1) and greedy decoding (`new_tokens`)
    of a randomly initialised Llama-style model (TRANSFORMERS_MODEL), float32,
    with attn_implementation "sdpa" and "fastattn", same run; the time spent
    inside the attention functions is summed by a timing wrapper around each."""
    import torch
    import transformers
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    import fastattn.transformers as fat

    # attention time by implementation and by phase: calls with one query
    # row are decoding steps, the others the prefill that generate() begins with
    spent = {"sdpa": {}, "fastattn": {}}

    def timed(name, fn):
        def attention(module, query, *args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(module, query, *args, **kwargs)
            finally:
                phase = "decode" if query.shape[-2] == 1 else "prefill"
                spent[name][phase] = spent[name].get(phase, 0.0) + time.perf_counter() - t0
        return attention

    # each name's mask function as its untimed twin's, then the timed attention functions
    fat.register("timed-fastattn")
    AttentionMaskInterface.register("timed-sdpa", sdpa_mask)
    for name, fn in (("sdpa", sdpa_attention_forward), ("fastattn", fat.attention_forward)):
        transformers.AttentionInterface.register(f"timed-{name}", timed(name, fn))

    layers, hidden, heads, kv_heads, mlp, vocab = TRANSFORMERS_MODEL
    config = transformers.LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=mlp,
                                      num_hidden_layers=layers, num_attention_heads=heads,
                                      num_key_value_heads=kv_heads, max_position_embeddings=prompt + new_tokens)
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    rows = []
    try:
        torch.manual_seed(0)
        model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="timed-sdpa").eval()
        ids = torch.randint(0, vocab, (1, prompt), generator=torch.Generator().manual_seed(0))
        for phase, n in (("prefill", 1), ("decode", new_tokens)):
            row = dict(phase=phase, prompt=prompt, new_tokens=n, threads=threads, model=list(TRANSFORMERS_MODEL))
            for name in ("sdpa", "fastattn"):
                if progress:
                    progress(f"[transformers] {phase} with {name}")
                model.set_attn_implementation(f"timed-{name}")
                with torch.no_grad():
                    def run():
                        return model.generate(input_ids=ids, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                              pad_token_id=0)
                    run()  # warm-up
                    totals, attn = [], []
                    for _ in range(repeat):
                        spent[name].clear()
                        t0 = time.perf_counter()
                        run()
                        totals.append(time.perf_counter() - t0)
                        attn.append(spent[name].get(phase, 0.0))
                row[f"{name}_ms"] = float(np.median(totals)) * 1e3
                row[f"{name}_attention_ms"] = float(np.median(attn)) * 1e3
            rows.append(row)
    finally:
        torch.set_num_threads(saved)
    # decode rows: the prefill's total is taken out (generate() prefills first;
    # their attention times count the decoding steps only)
    pre, dec = rows
    for name in ("sdpa", "fastattn"):
        dec[f"{name}_ms"] -= pre[f"{name}_ms"]
    return rows


def format_transformers(rows):
    header = (f"{'phase':<22} {'sdpa ms':>9} {'attention':>10} {'share':>6} {'fastattn ms':>11} {'attention':>10} "
              f"{'share':>6} {'attention x':>11} {'total x':>8}")
    lines = [header, "-" * len(header)]
    for r in rows:
        case = f"prefill {r['prompt']}" if r["phase"] == "prefill" else f"decode {r['new_tokens']} tokens"
        s, sa, f, fa = r["sdpa_ms"], r["sdpa_attention_ms"], r["fastattn_ms"], r["fastattn_attention_ms"]
        lines.append(f"{case:<22} {s:>9.1f} {sa:>10.1f} {100 * sa / s:>5.0f}% {f:>11.1f} {fa:>10.1f} "
                     f"{100 * fa / f:>5.0f}% {sa / fa:>10.2f}x {s / f:>7.2f}x")
    return "\n".join(lines)


# per-call time rows: (name, q shape, k/v shape)
CALL_CASES = [("one row, one key", (1, 1, 1, 64), (1, 1, 1, 64)),
              ("decode, 16 heads over 4, 128 keys", (1, 16, 1, 64), (1, 4, 128, 64))]


def _per_call_us(fn, repeat, calls=200):
    """Median over `repeat` loops of the time per call of fn() in a loop of
    `calls` calls, in microseconds."""
    fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        times.append((time.perf_counter() - t0) / calls)
    return float(np.median(times)) * 1e6


def run_calls(threads, repeat=5, cases=None, progress=None):
    """Time per call of small attention calls (where the call's overhead is
    most of its time), on 1 thread and on `threads`: fastattn.attention on
    numpy arrays, and the same keys as one packed sequence
    (attention_varlen) and in a paged cache (attention_paged, blocks of 16;
    cases of one query row); with torch, fastattn.torch's SDPA against
    torch's; with transformers, the attention functions of
    attn_implementation "fastattn" and "sdpa" (what a model's layer
    calls)."""
    import fastattn

    torch_mod = torch_sdpa()
    hf = None
    if torch_mod is not None:
        import fastattn.torch as ft
        try:
            from transformers.integrations.sdpa_attention import sdpa_attention_forward

            import fastattn.transformers as fat
            hf = (fat.attention_forward, sdpa_attention_forward)
        except ImportError:
            pass

    class Layer:  # what transformers' attention functions read of a module
        is_causal = False
        training = False

        def __init__(self, groups):
            self.num_key_value_groups = groups

    rows = []
    saved = fastattn.get_num_threads(), torch_mod[0].get_num_threads() if torch_mod else None
    try:
        for name, qs, ks in cases or CALL_CASES:
            rng = np.random.default_rng(0)
            q = rng.standard_normal(qs, dtype=np.float32)
            k, v = (rng.standard_normal(ks, dtype=np.float32) for _ in range(2))
            # the first batch entry as one packed sequence (rows of all heads side by side)
            qp, kp, vp = (np.ascontiguousarray(a[0].swapaxes(0, 1)) for a in (q, k, v))
            cu_q, cu_k = np.array([0, qs[-2]]), np.array([0, ks[-2]])
            paged = None
            if qs[-2] == 1:  # decoding: the same keys in a paged cache
                bs = 16
                blocks = -(-ks[-2] // bs)
                kc, vc = (np.zeros((blocks * bs,) + a.shape[1:], np.float32) for a in (kp, vp))
                kc[: ks[-2]], vc[: ks[-2]] = kp, vp
                kc, vc = (a.reshape((blocks, bs) + a.shape[1:]) for a in (kc, vc))
                paged = (qp, kc, vc, np.arange(blocks, dtype=np.int32)[None], np.array([ks[-2]], np.int32))
            for n in sorted({1, threads}):
                if progress:
                    progress(f"[calls] {name}, {n} threads")
                fastattn.set_num_threads(n)
                row = dict(case=name, q=list(qs), kv=list(ks), threads=n)
                row["numpy_us"] = _per_call_us(lambda: fastattn.attention(q, k, v), repeat)
                row["varlen_us"] = _per_call_us(lambda: fastattn.attention_varlen(qp, kp, vp, cu_q, cu_k), repeat)
                if paged is not None:
                    row["paged_us"] = _per_call_us(lambda: fastattn.attention_paged(*paged), repeat)
                if torch_mod is not None:
                    torch, sdpa = torch_mod
                    torch.set_num_threads(n)
                    tq, tk, tv = (torch.from_numpy(a) for a in (q, k, v))
                    scale = 1 / np.sqrt(qs[-1])
                    with torch.inference_mode():
                        row["fastattn_torch_us"] = _per_call_us(
                            lambda: ft.scaled_dot_product_attention(tq, tk, tv, enable_gqa=True),
                            repeat)
                        row["torch_us"] = _per_call_us(lambda: sdpa(tq, tk, tv, enable_gqa=True), repeat)
                        if hf is not None:
                            for key, fn in zip(("hf_fastattn_us", "hf_sdpa_us"), hf):
                                layer = Layer(qs[-3] // ks[-3])
                                row[key] = _per_call_us(lambda: fn(layer, tq, tk, tv, None, scaling=scale), repeat)
                rows.append(row)
    finally:
        fastattn.set_num_threads(saved[0])
        if torch_mod is not None:
            torch_mod[0].set_num_threads(saved[1])
    return rows


def format_calls(rows):
    cols = [("numpy_us", "numpy"), ("varlen_us", "varlen"), ("paged_us", "paged"),
            ("fastattn_torch_us", "fa.torch sdpa"), ("torch_us", "torch sdpa"),
            ("hf_fastattn_us", "hf fastattn"), ("hf_sdpa_us", "hf sdpa")]
    cols = [(k, t) for k, t in cols if any(k in r for r in rows)]
    header = f"{'case':<36} {'threads':>7} " + " ".join(f"{t + ' us':>16}" for _, t in cols)
    lines = [header, "-" * len(header)]
    for r in rows:
        lines.append(f"{r['case']:<36} {r['threads']:>7} " + " ".join(
            f"{r[k]:>16.1f}" if k in r else f"{'-':>16}" for k, _ in cols))
    return "\n".join(lines)


# masked attention rows: ((B, H, L, D), mask name)
MASK_CASES = [((1, 8, 2048, 64), "random 50%"), ((1, 8, 2048, 64), "random 50% + causal"),
              ((1, 8, 8192, 64), "8 documents")]


def _mask_of(name, l, rng):
    """The (1, 1, l, l) bool mask of a case (True = may attend) and whether it runs causal."""
    if name.startswith("random"):
        return rng.random((1, 1, l, l)) < 0.5, name.endswith("causal")
    doc = np.arange(l) // (l // 8)  # 8 documents of l / 8 tokens: block-diagonal
    return (doc[:, None] == doc[None, :])[None, None], False


def run_masks(threads, cases=None, repeat=3, with_torch=True, progress=None):
    """fastattn with a bool mask, the same mask as an additive float32 mask
    (0 / -inf) and as an additive bfloat16 one (half its bytes), and no
    mask, against torch's SDPA with the same bool mask, same data, same run."""
    from fastattn._api import BFLOAT16

    torch_mod = torch_sdpa() if with_torch else None
    rows = []
    for n, (shape, name) in enumerate(MASK_CASES if cases is None else cases, 1):
        if progress:
            progress(f"[masks {n}] {shape} {name}")
        b, h, l, d = shape
        rng = np.random.default_rng(n)
        q, k, v = make_inputs(b, h, l, d, seed=n)
        mask, causal = _mask_of(name, l, rng)
        additive = np.where(mask, np.float32(0), np.float32(-np.inf))
        out = np.empty_like(q)
        row = dict(shape=list(shape), mask=name, threads=threads)
        block = fastattn.block_mask(mask)  # classified once, outside the timing (as a model reuses it)
        masks = [("bool_ms", mask), ("float_ms", additive), ("block_ms", block), ("none_ms", None)]
        if BFLOAT16 is not None:
            masks.insert(2, ("bf16_ms", additive.astype(BFLOAT16)))
        for key, m in masks:
            row[key] = median_time(lambda: fastattn.attention(q, k, v, mask=m, causal=causal, out=out,
                                                              num_threads=threads), repeat) * 1e3
        if torch_mod is not None:
            tmask = mask & np.tril(np.ones((l, l), dtype=bool)) if causal else mask
            row["torch_ms"] = torch_median_ms(torch_mod, threads, (q, k, v, tmask),
                                              lambda f, *t: f(t[0], t[1], t[2], attn_mask=t[3]), repeat)
        rows.append(row)
    return rows


def format_masks(rows):
    header = (f"{'(B,H,L,D)':<18} {'mask':<20} {'bool ms':>9} {'float ms':>9} {'bool/float':>10} {'bf16 ms':>9} "
              f"{'block ms':>9} {'no mask ms':>10} {'torch ms':>9} {'x torch':>8} {'block x torch':>13}")
    lines = [header, "-" * len(header)]
    for r in rows:
        th = r.get("torch_ms")
        bf16 = f"{r['bf16_ms']:>9.1f}" if "bf16_ms" in r else f"{'-':>9}"
        lines.append(f"{str(tuple(r['shape'])):<18} {r['mask']:<20} {r['bool_ms']:>9.1f} {r['float_ms']:>9.1f} "
                     f"{r['bool_ms'] / r['float_ms']:>10.2f} {bf16} {r['block_ms']:>9.1f} {r['none_ms']:>10.1f} "
                     + (f"{th:>9.1f} {th / r['bool_ms']:>7.2f}x {th / r['block_ms']:>12.2f}x" if th
                        else f"{'-':>9} {'-':>8} {'-':>13}"))
    return "\n".join(lines)


# paged KV cache rows: (Lk, batch, block size); a batch of 16 has lengths drawn from [Lk / 4, Lk]
PAGED_HEADS = (32, 8, 128)  # H, G, D
PAGED_CASES = [(4096, 1, 16), (4096, 1, 32), (16384, 1, 16), (16384, 1, 32), (16384, 1, 128), (32768, 1, 16),
               (32768, 1, 32), (4096, 16, 16), (16384, 16, 16), (16384, 16, 32), (16384, 16, 128)]
# mixed batch: 8 sequences decoding (Lk 2048 .. 8192) and one prefill chunk of 512 queries after 8192 cached keys
PAGED_MIXED = (8, 2048, 8192, 512, 8192)


def _filled(shape, rng, dtype=np.float32):
    """An array of `shape` holding random values (a 1 MiB random block,
    repeated: the timing does not depend on the values)."""
    n = int(np.prod(shape))
    block = rng.standard_normal(min(n, 1 << 18), dtype=np.float32).astype(dtype)
    return np.resize(block, n).reshape(shape)


def paged_problem(lens, bs, n_q=None, dtype=np.float32, seed=0):
    """A paged cache holding sequences of `lens` keys in shuffled blocks, its
    block table, queries (n_q per sequence, default 1) and the same keys
    packed contiguously: (q, k_cache, v_cache, table, cu_q, k_packed, v_packed, cu_k)."""
    h, g, d = PAGED_HEADS
    rng = np.random.default_rng(seed)
    lens = np.asarray(lens)
    n_q = np.ones_like(lens) if n_q is None else np.asarray(n_q)
    need = (lens + bs - 1) // bs
    n_blocks = int(need.sum())
    k_cache, v_cache = _filled((n_blocks, bs, g, d), rng, dtype), _filled((n_blocks, bs, g, d), rng, dtype)
    ids = rng.permutation(n_blocks).astype(np.int32)
    table = np.zeros((len(lens), int(need.max())), dtype=np.int32)
    starts = np.concatenate([[0], np.cumsum(need)])
    for b, n in enumerate(need):
        table[b, :n] = ids[starts[b]: starts[b + 1]]
    j = [np.arange(n) for n in lens]
    k_packed = np.concatenate([k_cache[table[b, jb // bs], jb % bs] for b, jb in enumerate(j)])
    v_packed = np.concatenate([v_cache[table[b, jb // bs], jb % bs] for b, jb in enumerate(j)])
    cu_q, cu_k = (np.concatenate([[0], np.cumsum(x)]) for x in (n_q, lens))
    q = _filled((int(cu_q[-1]), h, d), rng, dtype)
    return q, k_cache, v_cache, table, cu_q, k_packed, v_packed, cu_k


try:
    import ml_dtypes

    E4M3 = np.dtype(ml_dtypes.float8_e4m3fn)
except ImportError:  # pragma: no cover
    E4M3 = None


def quantized_copy(kc, vc, dtype):
    """A paged cache written into an 8-bit cache by fastattn.cache_write:
    (k8, v8, k_scale, v_scale); float8 takes a per-tensor scale of max / 256."""
    n_blocks, bs, g, d = kc.shape
    k8, v8 = np.empty(kc.shape, dtype), np.empty(vc.shape, dtype)
    if dtype == np.int8:
        ks, vs = np.empty(kc.shape[:3], np.float32), np.empty(vc.shape[:3], np.float32)
    else:
        ks, vs = float(np.abs(kc).max()) / 256, float(np.abs(vc).max()) / 256
    step = max(1, (1 << 20) // (g * d))  # tokens per write
    kf, vf = kc.reshape(-1, g, d), vc.reshape(-1, g, vc.shape[-1])
    for t in range(0, kf.shape[0], step):
        fastattn.cache_write(kf[t: t + step], vf[t: t + step], k8, v8, np.arange(t, min(t + step, kf.shape[0])),
                             k_scale=ks, v_scale=vs)
    return k8, v8, ks, vs


def head_major(cache):
    """A copy of a paged cache (or of its per-token scales) whose pages hold
    each head's rows together, (blocks, G, block_size, ...), as the view of
    the (blocks, block_size, G, ...) layout that attention_paged takes."""
    order = (0, 2, 1) + tuple(range(3, cache.ndim))
    return np.ascontiguousarray(cache.transpose(order)).transpose(order)


def run_paged(threads, repeat=10, cases=None, with_torch=True, progress=None):
    """Paged decode (attention_paged) against fastattn's decode over the same
    keys stored contiguously (one sequence: attention on (1, G, Lk, D); a
    batch: attention_varlen on the packed keys), float32, bfloat16, int8 and
    float8 e4m3 caches, the bfloat16 and int8 ones also in head-major pages
    (head_major); and a mixed batch
    (decodes and a prefill chunk in one call) against torch's SDPA per
    sequence after a gather of its blocks.  Same data, same run."""
    from fastattn._api import BFLOAT16

    bf16 = np.dtype(BFLOAT16) if BFLOAT16 is not None else None
    rows = []
    for n, (lk, batch, bs) in enumerate(PAGED_CASES if cases is None else cases, 1):
        if progress:
            progress(f"[paged {n}] Lk={lk} batch={batch} block={bs}")
        rng = np.random.default_rng(n)
        lens = np.full(batch, lk) if batch == 1 else rng.integers(lk // 4, lk + 1, batch)
        q, kc, vc, table, cu_q, kp, vp, cu_k = paged_problem(lens, bs, seed=n)
        h, g, d = PAGED_HEADS
        if batch == 1:
            kt, vt = (np.ascontiguousarray(x.transpose(1, 0, 2))[None] for x in (kp, vp))
            q4 = q[:, :, None]
            contiguous = lambda: fastattn.attention(q4, kt, vt, num_threads=threads)  # noqa: E731
        else:
            contiguous = lambda: fastattn.attention_varlen(q, kp, vp, cu_q, cu_k, num_threads=threads)  # noqa: E731
        fns = {"paged_ms": lambda: fastattn.attention_paged(q, kc, vc, table, lens, num_threads=threads),
               "contiguous_ms": contiguous}
        # the same cache in bfloat16 (queries too), int8 and float8 e4m3 (float32 queries)
        if bf16 is not None:
            qb, kcb, vcb = (x.astype(bf16) for x in (q, kc, vc))
            fns["bf16_ms"] = lambda: fastattn.attention_paged(qb, kcb, vcb, table, lens, num_threads=threads)
            kch, vch = head_major(kcb), head_major(vcb)
            fns["bf16_hm_ms"] = lambda: fastattn.attention_paged(qb, kch, vch, table, lens, num_threads=threads)
        for name, dt in (("int8_ms", np.int8), ("e4m3_ms", E4M3)):
            if dt is None:
                continue
            k8, v8, ks, vs = quantized_copy(kc, vc, dt)
            fns[name] = (lambda k8=k8, v8=v8, ks=ks, vs=vs: fastattn.attention_paged(
                q, k8, v8, table, lens, k_scale=ks, v_scale=vs, num_threads=threads))
            if dt == np.int8:
                k8h, v8h, ksh, vsh = (head_major(x) for x in (k8, v8, ks, vs))
                fns["int8_hm_ms"] = lambda: fastattn.attention_paged(q, k8h, v8h, table, lens, k_scale=ksh,
                                                                     v_scale=vsh, num_threads=threads)
        times = alternating_blocks(list(fns.values()), repeat)
        row = dict(lk=lk, batch=batch, block=bs, keys=int(lens.sum()), threads=threads,
                   bytes=2 * int(lens.sum()) * g * d * 4)
        row.update({name: t * 1e3 for name, t in zip(fns, times)})
        rows.append(row)
    mixed = run_paged_mixed(threads, repeat=max(3, repeat // 3), with_torch=with_torch, progress=progress)
    return rows, mixed


def run_paged_mixed(threads, repeat=3, with_torch=True, progress=None):
    n_dec, lo, hi, chunk, cached = PAGED_MIXED
    if progress:
        progress(f"[paged mixed] {n_dec} decodes (Lk {lo}..{hi}) + a {chunk}-query chunk after {cached} keys")
    rng = np.random.default_rng(99)
    lens = np.concatenate([rng.integers(lo, hi + 1, n_dec), [cached + chunk]])
    n_q = np.concatenate([np.ones(n_dec, dtype=np.int64), [chunk]])
    bs = 16
    q, kc, vc, table, cu_q, _, _, _ = paged_problem(lens, bs, n_q=n_q, seed=99)
    row = dict(decodes=n_dec, lk_range=[lo, hi], chunk=chunk, cached=cached, block=bs, threads=threads)
    row["fastattn_ms"] = median_time(lambda: fastattn.attention_paged(q, kc, vc, table, lens, cu_seqlens_q=cu_q,
                                                                      num_threads=threads), repeat) * 1e3
    torch_mod = torch_sdpa() if with_torch else None
    if torch_mod is not None:
        torch, sdpa = torch_mod
        h, g, d = PAGED_HEADS
        tk, tv, tq = torch.from_numpy(kc), torch.from_numpy(vc), torch.from_numpy(q)
        blocks = [torch.from_numpy(table[b, : (n + bs - 1) // bs].astype(np.int64)) for b, n in enumerate(lens)]
        # bottom-right causal mask of the chunk (built once, outside the timing)
        i = np.arange(chunk)[:, None] + cached
        chunk_mask = torch.from_numpy(np.arange(cached + chunk)[None, :] <= i)

        def torch_step():
            outs = []
            for b, n in enumerate(lens):
                k = tk.index_select(0, blocks[b]).reshape(-1, g, d)[:n].transpose(0, 1)[None]
                v = tv.index_select(0, blocks[b]).reshape(-1, g, d)[:n].transpose(0, 1)[None]
                qb = tq[cu_q[b]: cu_q[b + 1]].transpose(0, 1)[None]
                mask = chunk_mask if n_q[b] > 1 else None
                outs.append(sdpa(qb, k, v, attn_mask=mask, enable_gqa=True))
            return outs

        saved = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            with torch.inference_mode():
                row["torch_ms"] = median_time(torch_step, repeat) * 1e3
        finally:
            torch.set_num_threads(saved)
    return row


PAGED_KINDS = ("bf16", "bf16 hm", "int8", "int8 hm", "e4m3")


def format_paged(rows, mixed):
    header = (f"{'Lk':>6} {'batch':>5} {'block':>5} {'paged ms':>9} {'GB/s':>6} {'contig ms':>9} {'GB/s':>6} "
              f"{'paged/contig':>12}" + "".join(f" {k + ' ms':>10} {'x':>6}" for k in PAGED_KINDS))
    lines = [header, "-" * len(header)]
    for r in rows:
        gb = r["bytes"] / 1e9
        line = (f"{r['lk']:>6} {r['batch']:>5} {r['block']:>5} {r['paged_ms']:>9.2f} "
                f"{gb / (r['paged_ms'] * 1e-3):>6.1f} {r['contiguous_ms']:>9.2f} "
                f"{gb / (r['contiguous_ms'] * 1e-3):>6.1f} {r['contiguous_ms'] / r['paged_ms']:>11.1%} ")
        for k in PAGED_KINDS:
            t = r.get(k.replace(" ", "_") + "_ms")
            line += f" {t:>10.2f} {r['contiguous_ms'] / t:>5.2f}x" if t else f" {'-':>10} {'-':>6}"
        lines.append(line)
    lines.append("(x: speed against the float32 contiguous decode of the same row; hm: the cache in head-major "
                 "pages, (blocks, G, block, D) viewed as (blocks, block, G, D))")
    th = mixed.get("torch_ms")
    lines.append("")
    lines.append(f"mixed batch: {mixed['decodes']} decodes (Lk {mixed['lk_range'][0]}..{mixed['lk_range'][1]}) + "
                 f"a {mixed['chunk']}-query prefill chunk after {mixed['cached']} keys, one call: "
                 f"{mixed['fastattn_ms']:.1f} ms"
                 + (f"; torch (gather + SDPA per sequence) {th:.1f} ms: {th / mixed['fastattn_ms']:.2f}x" if th
                    else ""))
    return "\n".join(lines)


# a transformer block inside a model: (L, d, heads); causal self-attention
# between numpy's (or torch's) matrix products
MODEL_BLOCK = (2048, 1024, 16)


def _layer_norm(x):
    mean = x.mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(x.var(-1, keepdims=True) + np.float32(1e-5))


def _numpy_block(l, d, h, threads):
    """The parts of a pre-norm transformer block in numpy, in order, as
    (name, fn): projections and MLP on numpy's matmul, attention on fastattn."""
    rng = np.random.default_rng(0)
    w = {name: (rng.standard_normal(shape, dtype=np.float32) / np.float32(math.sqrt(shape[0])))
         for name, shape in (("qkv", (d, 3 * d)), ("o", (d, d)), ("up", (d, 4 * d)), ("down", (4 * d, d)))}
    s = {"x": rng.standard_normal((l, d), dtype=np.float32), "o": np.empty((l, h, d // h), np.float32)}

    def heads(i):
        return s["qkv"][:, i * d:(i + 1) * d].reshape(l, h, d // h).transpose(1, 0, 2)

    def attention():
        fastattn.attention(heads(0), heads(1), heads(2), causal=True, out=s["o"].transpose(1, 0, 2),
                           num_threads=threads)

    def residual_norm():
        s["r"] = s["x"] + s["y"]
        s["n2"] = _layer_norm(s["r"])

    return [("layer norm", lambda: s.update(n=_layer_norm(s["x"]))),
            ("qkv matmul", lambda: s.update(qkv=s["n"] @ w["qkv"])),
            ("attention", attention),
            ("out matmul", lambda: s.update(y=s["o"].reshape(l, d) @ w["o"])),
            ("residual, norm", residual_norm),
            ("mlp up matmul", lambda: s.update(u=s["n2"] @ w["up"])),
            ("relu", lambda: s.update(u=np.maximum(s["u"], np.float32(0)))),
            ("mlp down matmul", lambda: s.update(out=s["r"] + s["u"] @ w["down"]))]


def _torch_block(torch, l, d, h):
    """The same block in torch (its matmul and layer norm; attention through
    F.scaled_dot_product_attention, whatever it is routed to)."""
    F = torch.nn.functional
    g = torch.Generator().manual_seed(0)
    w = {name: torch.randn(shape, generator=g) / math.sqrt(shape[0])
         for name, shape in (("qkv", (d, 3 * d)), ("o", (d, d)), ("up", (d, 4 * d)), ("down", (4 * d, d)))}
    s = {"x": torch.randn((l, d), generator=g)}

    def attention():
        qkv = s["qkv"].view(1, l, 3, h, d // h).permute(2, 0, 3, 1, 4)  # 3 x (1, h, l, d / h)
        s["o"] = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2], is_causal=True)

    def residual_norm():
        s["r"] = s["x"] + s["y"]
        s["n2"] = F.layer_norm(s["r"], (d,))

    return [("layer norm", lambda: s.update(n=F.layer_norm(s["x"], (d,)))),
            ("qkv matmul", lambda: s.update(qkv=s["n"] @ w["qkv"])),
            ("attention", attention),
            ("out matmul", lambda: s.update(y=s["o"][0].transpose(0, 1).reshape(l, d) @ w["o"])),
            ("residual, norm", residual_norm),
            ("mlp up matmul", lambda: s.update(u=s["n2"] @ w["up"])),
            ("relu", lambda: s.update(u=F.relu(s["u"]))),
            ("mlp down matmul", lambda: s.update(out=s["r"] + s["u"] @ w["down"]))]


def time_block(parts, repeat):
    """Each part's median time inside the block (the parts run in order, the
    block repeated) and alone (the part repeated by itself, after a pause),
    in ms; and the whole block's median."""
    def block():
        times = []
        for _, fn in parts:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return times

    time.sleep(SETTLE_SECONDS)
    for _ in range(2):
        block()
    runs = np.array([block() for _ in range(repeat)])
    inside = np.median(runs, axis=0) * 1e3
    alone = [median_time(fn, repeat) * 1e3 for _, fn in parts]
    return dict(parts=[dict(name=name, inside_ms=float(i), alone_ms=float(a))
                       for (name, _), i, a in zip(parts, inside, alone)],
                block_ms=float(np.median(runs.sum(axis=1)) * 1e3), alone_sum_ms=float(sum(alone)))


def run_block(threads, repeat=7, with_torch=True, progress=None, shape=MODEL_BLOCK):
    """A transformer block (shape = (L, d, heads)) in numpy with fastattn
    (OpenBLAS on fastattn's pool, and on its own threads), and in torch with
    fastattn.torch.patch() and with torch's SDPA: each part's time inside
    the block against alone."""
    l, d, h = shape
    rows = []
    was_shared = bool(fastattn.thread_pool_info()["blas_shared"])
    shared = fastattn.share_blas_threads(True)
    variants = [("numpy + fastattn, OpenBLAS on fastattn's threads" if shared
                 else "numpy + fastattn (no OpenBLAS to share the threads with)", True)]
    if shared:
        variants.append(("numpy + fastattn, OpenBLAS on its own threads", False))
    try:
        with blas_threads(threads):
            for name, share in variants:
                if progress:
                    progress(f"[block] {name}")
                fastattn.share_blas_threads(share)
                rows.append(dict(variant=name, **time_block(_numpy_block(l, d, h, threads), repeat)))
    finally:
        fastattn.share_blas_threads(was_shared)
    torch_mod = torch_sdpa() if with_torch else None
    if torch_mod is not None:
        torch = torch_mod[0]
        import fastattn.torch as ft

        saved = torch.get_num_threads()
        torch.set_num_threads(threads)
        fastattn.set_num_threads(threads)
        try:
            with torch.inference_mode():
                for name, patched in (("torch + fastattn.torch.patch()", True), ("torch SDPA", False)):
                    if progress:
                        progress(f"[block] {name}")
                    with ft.patch() if patched else contextlib.nullcontext():
                        rows.append(dict(variant=name, **time_block(_torch_block(torch, l, d, h), repeat)))
        finally:
            torch.set_num_threads(saved)
            fastattn.set_num_threads(None)
    return rows


def format_block(rows):
    names = [p["name"] for p in rows[0]["parts"]]
    lines = []
    for r in rows:
        header = f"{r['variant']:<52} {'inside ms':>10} {'alone ms':>10} {'inside/alone':>13}"
        lines += [header, "-" * len(header)]
        for p in r["parts"]:
            lines.append(f"  {p['name']:<50} {p['inside_ms']:>10.2f} {p['alone_ms']:>10.2f} "
                         f"{p['inside_ms'] / p['alone_ms']:>13.2f}")
        lines.append(f"  {'whole block (alone: sum of the parts)':<50} {r['block_ms']:>10.2f} "
                     f"{r['alone_sum_ms']:>10.2f} {r['block_ms'] / r['alone_sum_ms']:>13.2f}")
        lines.append("")
    assert all([p["name"] for p in r["parts"]] == names for r in rows)
    return "\n".join(lines).rstrip()
