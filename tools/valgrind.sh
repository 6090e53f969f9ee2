#!/usr/bin/env bash
# Run a short fastattn workload under valgrind memcheck (an installed
# fastattn, e.g. from `pip install -e .`).  Reports errors in fastattn's own
# code; the interpreter's and numpy's are filtered by the summary check.
# valgrind does not emulate AVX-512, so it checks the generic and AVX2 paths;
# tools/sanitize.sh runs every path natively.
#   tools/valgrind.sh
set -euo pipefail
cd "$(dirname "$0")/.."
log=${VALGRIND_LOG:-$(mktemp)}
echo "valgrind log: $log"
# the interpreter itself, not a wrapper script (valgrind would check the wrapper)
py=$(python3 -c 'import sys; print(sys.executable)')
OMP_NUM_THREADS=2 PYTHONMALLOC=malloc valgrind --tool=memcheck --error-exitcode=0 \
    --track-origins=no --log-file="$log" "$py" - <<'PY'
import ml_dtypes, numpy as np, fastattn
rng = np.random.default_rng(0)
# valgrind's virtual CPU has no AVX-512, so this covers the paths it reports
print("kernel paths under valgrind:", fastattn.available_isas())
for isa in fastattn.available_isas():
    with fastattn.use_isa(isa):
        for dt in (np.float32, np.float64, np.float16, ml_dtypes.bfloat16):
            q = rng.standard_normal((2, 4, 37, 19)).astype(dt)
            k = rng.standard_normal((2, 2, 53, 19)).astype(dt)
            v = rng.standard_normal((2, 2, 53, 7)).astype(dt)
            m = rng.random((37, 53)) < 0.8
            opts = dict(causal=True, mask=m, window=(20, 3), softcap=2.0, alibi_slopes=np.ones(4))
            out, lse = fastattn.attention(q, k, v, return_lse=True, **opts)
            fastattn.attention_backward(np.ones_like(out), q, k, v, out, lse, **opts)
            drop = dict(opts, dropout_p=0.3, dropout_seed=7)  # dropout: the forward's tiles and the backward's
            out, lse = fastattn.attention(q, k, v, return_lse=True, **drop)
            fastattn.attention_backward(np.ones_like(out), q, k, v, out, lse, **drop)
            fastattn.attention(q[:, :, :3], k.repeat(20, axis=2), v.repeat(20, axis=2), causal=True, dropout_p=0.3,
                               dropout_seed=7)  # few rows
            for shape, mdt in (((4, 37, 53), np.float64), ((37, 53), np.float16), ((4, 1, 53), ml_dtypes.bfloat16),
                               ((4, 37, 53), np.float32), ((4, 37, 53), ml_dtypes.bfloat16)):
                # a float mask's gradient, shared by the batch, also by the heads, or by the batch and the rows
                bias = rng.standard_normal(shape).astype(mdt)
                out, lse = fastattn.attention(q, k, v, return_lse=True, causal=True, mask=bias)
                fastattn.attention_backward(np.ones_like(out), q, k, v, out, lse, causal=True, mask=bias,
                                            return_dmask=True)
            fastattn.attention(q[:, :, :1], k.repeat(20, axis=2), v.repeat(20, axis=2), causal=True)
            fastattn.scores(q, k.repeat(2, axis=1))
            fastattn.weighted_sum(m.astype(dt), v.repeat(2, axis=1))
            fastattn.linear_attention(q, k, v, causal=True, feature_map="elu+1", normalize=True)
            cu = np.array([0, 10, 37])
            fastattn.attention_varlen(q[0].swapaxes(0, 1).copy(), k[0].swapaxes(0, 1).copy()[:37],
                                      v[0].swapaxes(0, 1).copy()[:37], cu, cu, causal=True)
            # prefill in tile groups (gathered key tiles shared by 4 query tiles)
            qg, kg = rng.standard_normal((300, 4, 19)).astype(dt), rng.standard_normal((300, 2, 19)).astype(dt)
            cg = np.array([0, 300])
            fastattn.attention_varlen(qg, kg, kg, cg, cg, causal=True, num_threads=1)
    # serving: float32 and int8 paged caches filled by cache_write, read by a
    # decode call and by a mixed call (one decoding row, a prefill chunk) with sinks
    G, D, bs, nb = 2, 19, 16, 12
    lens = np.array([40, 70], np.int32)
    table = np.array([[3, 0, 7, -1, -1], [1, 2, 4, 5, 6]], np.int32)
    slots = np.concatenate([table[b, np.arange(n) // bs] * bs + np.arange(n) % bs for b, n in enumerate(lens)])
    for cdt in (np.float32, np.int8):
        with fastattn.use_isa(isa):
            kc, vc = np.zeros((nb, bs, G, D), cdt), np.zeros((nb, bs, G, 7), cdt)
            sc = {} if cdt == np.float32 else dict(k_scale=np.zeros((nb, bs, G), np.float32),
                                                  v_scale=np.zeros((nb, bs, G), np.float32))
            kn = rng.standard_normal((len(slots), G, D)).astype(np.float32)
            vn = rng.standard_normal((len(slots), G, 7)).astype(np.float32)
            fastattn.cache_write(kn, vn, kc, vc, slots.astype(np.int64), **sc)
            qp = rng.standard_normal((31, 4, D)).astype(np.float32)
            fastattn.attention_paged(qp, kc, vc, table, lens, cu_seqlens_q=np.array([0, 1, 31], np.int32),
                                     sinks=np.ones(4, np.float32), **sc)
            fastattn.attention_paged(qp[:2], kc, vc, table, lens, **sc)
    with fastattn.use_isa(isa):  # a decoding bundle of K and V rows over 4 KiB: segments of 16 keys
        kw, vw = rng.standard_normal((2, 8, 32, 8, 80)).astype(np.float32)
        fastattn.attention_paged(rng.standard_normal((1, 8, 80)).astype(np.float32), kw, vw,
                                 np.array([[5, 2, 7, 0]], np.int32), np.array([100], np.int32))
        # the same rows packed (attention_varlen's decoding bundles, in segments of 16 keys)
        kd = rng.standard_normal((150, 8, 80)).astype(np.float32)
        fastattn.attention_varlen(rng.standard_normal((2, 8, 80)).astype(np.float32), kd, kd,
                                  np.array([0, 1, 2]), np.array([0, 70, 150]))
        # pages of 64 keys of 3 KB each: segments of 21 keys (64 KiB)
        kq = rng.standard_normal((3, 64, 4, 96)).astype(np.float32)
        fastattn.attention_paged(rng.standard_normal((1, 8, 96)).astype(np.float32), kq, kq,
                                 np.array([[2, 0]], np.int32), np.array([120], np.int32))
print("workload done")
PY
# errors whose stack passes through fastattn's extension
python3 - "$log" <<'PY'
import re, sys
text = open(sys.argv[1]).read()
blocks = re.split(r"\n==\d+== \n", text)
# a frame in fastattn's extension: its functions are fa_* (and the Cython wrappers __pyx_*)
frame = re.compile(r"(at|by) 0x[0-9A-F]+: (fa_|__pyx_)|_core\.cpython")
ours = [b for b in blocks if frame.search(b) and re.search(r"(Invalid|uninitialised|Mismatched|overlap)", b)]
print(re.findall(r"ERROR SUMMARY: .*", text)[-1])
print(f"errors in fastattn's code: {len(ours)}")
for b in ours[:5]:
    print(b)
sys.exit(1 if ours else 0)
PY
