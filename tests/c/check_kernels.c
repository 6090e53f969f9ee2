/*
 * check_kernels.c - checks every kernel path of a build, without Python,
 * against a scalar float64 reference written out here.
 *
 * For each path this CPU runs (fa_path_supported) and each element type it
 * runs every operation of the C interface on shapes and options chosen so
 * that every tile operation of the path's tables runs: prefill items
 * (S^T tiles, online softmax, P.V, stored rows), few-row items (the
 * decoding kernels), split-KV items (partial slots and their merge), dot
 * weights, fa_scores, fa_weighted_sum and fa_attention_backward (its
 * key-block and query-tile walks, given the reference's lse and delta); with
 * causal in both alignments, windows, soft-cap, ALiBi, bool and float
 * masks, dropout, grouped query heads and two entries per problem, at
 * awkward sizes that leave tails everywhere.
 * The x86 paths run natively; the NEON path runs under qemu-aarch64
 * (tools/check_kernels.sh).  Exit status 0 when every check passes.
 *
 * Each fa_attention and fa_attention_backward call runs first with its
 * allocations failing one by one (with_failures): FA_ERR_NOMEM or the same
 * outputs, never a crash, a hang or a leak.
 *
 * It also checks the thread pool (csrc/fa_pool.c): teams claim every item
 * once, concurrent callers, offers withdrawn from workers that do not start
 * in time, OpenBLAS-style jobs that wait for each other, teams run on a
 * host's OpenMP runtime.
 *
 *   cc -O2 -pthread -Icsrc tests/c/check_kernels.c csrc/fa_*.c -lm -Wl,--wrap=malloc,--wrap=aligned_alloc
 */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <pthread.h>
#include <time.h>

#include "fa_half.h"
#include "fa_pool.h"
#include "fastattn.h"

static const char *const DTYPE_NAMES[FA_DTYPE_COUNT] = {"f32", "f64", "f16", "bf16"};
static const int DTYPE_BYTES[FA_DTYPE_COUNT] = {4, 8, 2, 2};

/* ---- random numbers and storage ------------------------------------------ */

static uint64_t rng_state = 0x9e3779b97f4a7c15ull;

static double uniform(void) /* in [-1, 1) */
{
    rng_state = rng_state * 6364136223846793005ull + 1442695040888963407ull;
    return (double)(rng_state >> 11) / 4503599627370496.0 - 1.0;
}

/* Store x as dtype at p, and return the stored value as a double. */
static double store(int dtype, void *p, double x)
{
    switch (dtype) {
    case FA_F32: *(float *)p = (float)x; return *(float *)p;
    case FA_F64: *(double *)p = x; return x;
    case FA_F16: *(uint16_t *)p = fa_f32_to_f16((float)x); return fa_f16_to_f32(*(uint16_t *)p);
    default: *(uint16_t *)p = fa_f32_to_bf16((float)x); return fa_bf16_to_f32(*(uint16_t *)p);
    }
}

static double load(int dtype, const void *p)
{
    switch (dtype) {
    case FA_F32: return *(const float *)p;
    case FA_F64: return *(const double *)p;
    case FA_F16: return fa_f16_to_f32(*(const uint16_t *)p);
    default: return fa_bf16_to_f32(*(const uint16_t *)p);
    }
}

/* An array of n values of dtype, random, with its values as doubles. */
typedef struct {
    char *data;
    double *val;
    int64_t n;
} array;

static array make_array(int dtype, int64_t n, double scale)
{
    array a = {malloc((size_t)(n ? n : 1) * 8), malloc((size_t)(n ? n : 1) * sizeof(double)), n};
    for (int64_t i = 0; i < n; i++) a.val[i] = store(dtype, a.data + i * DTYPE_BYTES[dtype], scale * uniform());
    return a;
}

static void free_array(array *a)
{
    free(a->data);
    free(a->val);
}

/* ---- a case --------------------------------------------------------------- */

typedef struct {
    const char *what;
    int64_t entries, group, lq, lk, d, dv;
    int causal, top_left;
    int64_t window_left, window_right;
    double softcap;
    int alibi, mask_kind, dot;
    int64_t shift; /* q_shift: added to every query's key position */
    int64_t page;  /* > 0: k and v in shuffled pages of this many rows (fa_attention only); < 0: packed */
    int sinks;     /* an attention sink per query head */
    int kv;        /* k and v stored as another type (fa_attention only): FA_I8, FA_E4M3, FA_E5M2 (8 bits,
                    * with scales), or FA_F16, FA_BF16 under float32 queries; 0: q's type */
    int tiles;     /* a mask of hidden, visible and mixed 64 x 64 blocks, with its table of block kinds */
    double dropout; /* > 0: dropout on the weights (fa_attention and its backward; drop_factor) */
    int kv_gap;     /* 16-bit k and v (unpaged): their elements 4 bytes apart (every other one of wider rows) */
} spec;

/* The value of an 8-bit float, decoded from its fields. */
static double f8_value(int kv, unsigned x)
{
    const double sign = x & 0x80 ? -1 : 1;
    if (kv == FA_E4M3) {
        const int e = (x >> 3) & 15, m = x & 7;
        return sign * (e ? ldexp(1 + m / 8.0, e - 7) : ldexp(m / 8.0, -6));
    }
    const int e = (x >> 2) & 31, m = x & 3;
    return sign * (e ? ldexp(1 + m / 4.0, e - 15) : ldexp(m / 4.0, -14));
}

/* A random 8-bit code of kind kv (int8 in [-127, 127]; floats of moderate
 * exponent, a few subnormal) and its value times scale. */
static uint8_t random_code(int kv, double scale, double *value)
{
    const double u = (uniform() + 1) * 0.5;
    unsigned x;
    if (kv == FA_I8) {
        const int i = (int)(u * 255) - 127;
        *value = scale * i;
        return (uint8_t)(int8_t)i;
    }
    const unsigned sign = uniform() < 0 ? 0x80u : 0;
    if (kv == FA_E4M3) /* exponents 0 (subnormal) .. 9 */
        x = sign | ((unsigned)(u * 10) << 3) | (unsigned)(((uniform() + 1) * 0.5) * 8) % 8;
    else /* exponents 0, 12 .. 17 */
        x = sign | ((u < 0.1 ? 0u : 12u + (unsigned)(u * 6)) << 2) | (unsigned)(((uniform() + 1) * 0.5) * 4) % 4;
    *value = scale * f8_value(kv, x);
    return (uint8_t)x;
}

/* Dropout: the seed and where an entry's rows and keys begin in the mask
 * (fastattn.h's coordinates: stream e * group + h, row DROP_ROW0 + i, key
 * DROP_KEY0 + j), and the factor of one weight, from the hash as fastattn.h
 * describes it, written out here. */
#define DROP_SEED 0xFEDCBA9876543210ull
#define DROP_ROW0 5
#define DROP_KEY0 3

static uint64_t splitmix_step(uint64_t x)
{
    x += 0x9E3779B97F4A7C15ull;
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
    x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
    return x ^ (x >> 31);
}

static uint32_t murmur_final(uint32_t h)
{
    h = (h ^ (h >> 16)) * 0x85EBCA6Bu;
    h = (h ^ (h >> 13)) * 0xC2B2AE35u;
    return h ^ (h >> 16);
}

static double drop_factor(const spec *c, int64_t stream, int64_t i, int64_t j)
{
    if (c->dropout <= 0) return 1;
    const uint64_t r = splitmix_step(DROP_SEED ^ splitmix_step((uint64_t)stream ^ splitmix_step((uint64_t)(DROP_ROW0 + i))));
    const uint32_t key = (uint32_t)(DROP_KEY0 + j);
    const uint32_t t = murmur_final(((key >> 1) ^ (uint32_t)(r >> 32)) * 0x9E3779B1u + (uint32_t)r);
    return ((t >> (16 * (key & 1))) & 0xFFFFu) >= (uint32_t)floor(c->dropout * 65536.0 + 0.5) ? 1 / (1 - c->dropout)
                                                                                                : 0;
}

/* The sink of query head t (a spread around the scores' range, some above it). */
static double sink_of(int64_t t) { return 1.5 - 0.6 * (double)t; }

static int failures = 0, checks = 0;

/* ---- allocation failures on demand -------------------------------------- */

/* The library's malloc and aligned_alloc calls reach these (the check is
 * linked with -Wl,--wrap=malloc,--wrap=aligned_alloc: tools/check_kernels.sh).
 * While armed (fail_at >= 0), the allocation numbered fail_at, counted from
 * 0 across threads, returns NULL, and with fail_rest every later one too. */
void *__real_malloc(size_t n);
void *__real_aligned_alloc(size_t align, size_t n);
static int64_t alloc_seen, alloc_fail_at = -1;
static int alloc_fail_rest;
static int64_t injected_calls, nomem_calls; /* totals, for the summary */

static int alloc_fails(void)
{
    const int64_t at = __atomic_load_n(&alloc_fail_at, __ATOMIC_ACQUIRE);
    if (at < 0) return 0;
    const int64_t i = __atomic_fetch_add(&alloc_seen, 1, __ATOMIC_RELAXED);
    return i == at || (alloc_fail_rest && i > at);
}

void *__wrap_malloc(size_t n) { return alloc_fails() ? NULL : __real_malloc(n); }
void *__wrap_aligned_alloc(size_t align, size_t n) { return alloc_fails() ? NULL : __real_aligned_alloc(align, n); }

/* fn(p), first as it is, then with its k-th allocation failing (k = 0, 1,
 * ... while the call makes a k-th), alone and with every later one: each
 * call must return FA_OK or FA_ERR_NOMEM (and not crash, hang, or leak:
 * LeakSanitizer in tools/sanitize.sh), FA_ERR_NOMEM only when an
 * allocation failed, and a call that returns FA_OK despite a failure
 * (a thread of the team got no scratch, and the others ran every item:
 * a few percent of the calls) must write the same bytes to the
 * outputs (bufs: n_bufs buffers of sizes[i] bytes, set to 0xff before each
 * call, but the last n_added, which the call adds to, set to 0) as the call
 * without failures.  Returns that first call's status,
 * its outputs left in bufs for the caller's checks; a failure of the
 * sweep is counted and reported here. */
static int with_failures(int (*fn)(const fa_problem *), const fa_problem *p, char *const *bufs,
                         const size_t *sizes, int n_bufs, int n_added, const char *what)
{
    size_t total = 0;
    for (int b = 0; b < n_bufs; b++) total += sizes[b];
    char *want = malloc(total + 1);
    for (int b = 0; b < n_bufs; b++) memset(bufs[b], b < n_bufs - n_added ? 0xff : 0, sizes[b]);
    const int status = fn(p);
    if (status != FA_OK) {
        free(want);
        return status;
    }
    for (size_t b = 0, o = 0; b < (size_t)n_bufs; o += sizes[b], b++) memcpy(want + o, bufs[b], sizes[b]);
    int bad = 0;
    for (int64_t k = 0; k < 10000 && !bad; k++) {
        int fired = 0;
        for (int rest = 0; rest < 2 && !bad; rest++) {
            for (int b = 0; b < n_bufs; b++) memset(bufs[b], b < n_bufs - n_added ? 0xff : 0, sizes[b]);
            __atomic_store_n(&alloc_seen, 0, __ATOMIC_RELAXED);
            alloc_fail_rest = rest;
            __atomic_store_n(&alloc_fail_at, k, __ATOMIC_RELEASE);
            const int got = fn(p);
            __atomic_store_n(&alloc_fail_at, -1, __ATOMIC_RELEASE);
            fired = __atomic_load_n(&alloc_seen, __ATOMIC_RELAXED) > k;
            injected_calls += fired;
            nomem_calls += got == FA_ERR_NOMEM;
            int same = got == FA_OK;
            for (size_t b = 0, o = 0; b < (size_t)n_bufs && same; o += sizes[b], b++)
                same = memcmp(want + o, bufs[b], sizes[b]) == 0;
            if (!(got == FA_ERR_NOMEM && fired) && !same) {
                printf("FAIL %s: allocation %lld failing%s: status %d%s\n", what, (long long)k,
                       rest ? " (and every later one)" : "", got,
                       got == FA_OK ? ", outputs differ from the call without failures"
                                    : fired ? "" : " although no allocation failed");
                bad = 1;
            }
        }
        if (!fired) break;
    }
    checks++;
    failures += bad;
    for (size_t b = 0, o = 0; b < (size_t)n_bufs; o += sizes[b], b++) memcpy(bufs[b], want + o, sizes[b]);
    free(want);
    return status;
}

/* Compare got with want (relative to the row's magnitude mag, plus an
 * allowance of its own); report the first failure of a case. */
static int close_enough(double got, double want, double tol_abs, double tol_rel, double extra)
{
    if (isinf(want) || isnan(want)) return got == want || (isnan(got) && isnan(want));
    return fabs(got - want) <= tol_abs + tol_rel * fabs(want) + extra;
}

/* Is a mask of this kind added to the scores (a float mask of 16 to 64 bits)? */
static int float_mask(int kind)
{
    return kind == FA_MASK_F32 || kind == FA_MASK_F64 || kind == FA_MASK_F16 || kind == FA_MASK_BF16;
}

/* The scores of virtual row v = (head h, query i) of an entry: s[j], -inf where hidden. */
static void ref_scores(const spec *c, double scale, const double *q, const double *k, const double *mask,
                       const unsigned char *bmask, double slope, int64_t i, double *s, double *z)
{
    const int64_t pos = (c->top_left ? i : i + c->lk - c->lq) + c->shift;
    for (int64_t j = 0; j < c->lk; j++) {
        double x = 0;
        for (int64_t t = 0; t < c->d; t++) x += q[t] * k[j * c->d + t];
        x *= scale;
        if (c->softcap > 0) x = c->softcap * tanh(x / c->softcap);
        if (z) z[j] = x;
        if (c->alibi) x -= slope * (double)llabs(pos - j);
        if (float_mask(c->mask_kind)) x += mask[i * c->lk + j];
        int visible = 1;
        if (c->causal && j > pos) visible = 0;
        if (c->window_left >= 0 && j < pos - c->window_left) visible = 0;
        if (c->window_right >= 0 && j > pos + c->window_right) visible = 0;
        if (c->mask_kind == FA_MASK_BOOL && !bmask[i * c->lk + j]) visible = 0;
        s[j] = visible ? x : -INFINITY;
    }
}

/* A query row as the kernels compute it against an int8 cache: scale * q
 * in the compute type (float, or double for float64 queries), quantised to
 * int8 with the step max|x| / 127 (codes rounded to nearest even), as
 * step * code; a NaN step for a row with a NaN or an infinity. */
static void int8_query(const double *q, int64_t d, double scale, int ct_double, double *out)
{
    double amax = 0;
    for (int64_t t = 0; t < d; t++) {
        out[t] = ct_double ? scale * q[t] : (double)((float)scale * (float)q[t]);
        amax = fabs(out[t]) > amax || isnan(out[t]) ? fabs(out[t]) : amax;
    }
    const int finite = isfinite(amax);
    const double step = !finite ? NAN : ct_double ? amax / 127.0 : (double)(float)(amax / 127.0);
    const double inv = finite && amax > 0 ? 127.0 / amax : 0;
    for (int64_t t = 0; t < d; t++) out[t] = step * nearbyint(finite ? out[t] * inv : 0);
}

/* fa_attention_backward on the problem p of fa_attention: the reference's
 * lse and delta given, gradients against the reference's in float64. */
/* What the backward's reference reads of a case, and its buffers. */
typedef struct {
    const spec *c;
    double scale;
    const array *q, *k, *v, *dout;
    const double *maskv, *slopes;
    const unsigned char *bmask;
    double *P, *dS, *s, *z, *f; /* rows x lk (P dropped), rows x lk, lk, lk, lk (dropout's factors) */
    double *dM;                 /* rows x lk: dS before the soft-cap's factor, a float mask's gradient */
} bwd_ref;

/* The reference's weights P and dS (rows x lk) of entry e; stores the
 * entry's lse and delta (compute type, cs bytes) for the kernel to read. */
static void ref_backward_entry(const bwd_ref *b, int64_t e, char *lse, char *delta, int cs)
{
    const spec *c = b->c;
    const int64_t g = c->group, lq = c->lq, lk = c->lk, d = c->d, dv = c->dv, rows = g * lq;
    const int ct = cs == 8 ? FA_F64 : FA_F32;
    for (int64_t h = 0; h < g; h++)
        for (int64_t i = 0; i < lq; i++) {
            const int64_t r = h * lq + i;
            double *P = b->P + r * lk, *s = b->s, *z = b->z;
            ref_scores(c, b->scale, b->q->val + ((e * g + h) * lq + i) * d, b->k->val + e * lk * d, b->maskv,
                       b->bmask, b->slopes[e * g + h], i, s, z);
            double m = c->sinks ? sink_of(e * g + h) : -INFINITY, sum = 0;
            for (int64_t j = 0; j < lk; j++) m = s[j] > m ? s[j] : m;
            for (int64_t j = 0; j < lk; j++) sum += isinf(m) ? 0 : exp(s[j] - m);
            if (c->sinks) sum += exp(sink_of(e * g + h) - m);
            const double l = sum > 0 ? m + log(sum) : -INFINITY;
            for (int64_t j = 0; j < lk; j++) P[j] = c->dot ? (isinf(s[j]) ? 0 : s[j]) : (isinf(l) ? 0 : exp(s[j] - l));
            const double *dor = b->dout->val + (e * rows + r) * dv, *vv = b->v->val + e * lk * dv;
            double dl = 0, *f = b->f;
            for (int64_t j = 0; j < lk; j++) f[j] = drop_factor(c, e * g + h, i, j);
            for (int64_t x = 0; x < dv; x++) {
                double o = 0;
                for (int64_t j = 0; j < lk; j++) o += P[j] * f[j] * vv[j * dv + x];
                dl += dor[x] * o;
            }
            store(ct, lse + (e * rows + r) * cs, l);
            dl = store(ct, delta + (e * rows + r) * cs, dl); /* as the kernel will read it */
            for (int64_t j = 0; j < lk; j++) { /* dropout: dP of the kept weights, and P dropped for gv */
                double dp = 0;
                for (int64_t x = 0; x < dv; x++) dp += dor[x] * vv[j * dv + x];
                dp *= f[j];
                double ds = c->dot ? (isinf(s[j]) ? 0 : dp) : P[j] * (dp - dl);
                b->dM[r * lk + j] = ds;
                if (c->softcap > 0) ds *= 1 - (z[j] / c->softcap) * (z[j] / c->softcap);
                b->dS[r * lk + j] = ds;
                P[j] *= f[j];
            }
        }
}

static int check_backward(int path, int dtype, const spec *c, const fa_problem *fwd, int64_t (*entries)[FA_ENTRY_FIELDS],
                          const array *q, const array *k, const array *v, const double *maskv,
                          const unsigned char *bmask, const double *slopes, double scale)
{
    const int es = DTYPE_BYTES[dtype], cs = dtype == FA_F64 ? 8 : 4;
    const int64_t n = c->entries, g = c->group, lq = c->lq, lk = c->lk, d = c->d, dv = c->dv, rows = g * lq;
    array dout = make_array(dtype, n * rows * dv, 1.0);
    char *lse = calloc((size_t)(n * rows + 1), 8), *delta = calloc((size_t)(n * rows + 1), 8);
    char *gq = calloc((size_t)(n * rows * d + 1), 8), *gk = calloc((size_t)(n * lk * d + 1), 8);
    char *gv = calloc((size_t)(n * lk * dv + 1), 8);
    double *P = malloc((size_t)(rows * lk + 1) * sizeof(double)), *dS = malloc((size_t)(rows * lk + 1) * sizeof(double));
    double *z = malloc((size_t)(lk + 1) * sizeof(double)), *s = malloc((size_t)(lk + 1) * sizeof(double));
    double *f = malloc((size_t)(lk + 1) * sizeof(double)), *dM = malloc((size_t)(rows * lk + 1) * sizeof(double));
    /* a float mask's gradient (fa_problem.gmask), [n][g][lq][lk] in the compute type */
    const int fmask = float_mask(c->mask_kind);
    char *gm = fmask ? calloc((size_t)(n * rows * lk + 1), 8) : NULL;
    double *want = malloc((size_t)((rows > lk ? rows : lk) * (d > dv ? d : dv) + 1) * sizeof(double));
    double *mag = malloc((size_t)((rows > lk ? rows : lk) * (d > dv ? d : dv) + 1) * sizeof(double));
    fa_problem p = *fwd;
    for (int64_t e = 0; e < n; e++) {
        entries[e][FA_E_DOUT] = e * rows * dv * es;
        entries[e][FA_E_DELTA] = entries[e][FA_E_LSE];
        entries[e][FA_E_GQ] = entries[e][FA_E_Q];
        entries[e][FA_E_GK] = entries[e][FA_E_K];
        entries[e][FA_E_GV] = entries[e][FA_E_V];
        entries[e][FA_E_GMASK] = e * rows * lk * cs;
    }
    p.gmask = gm, p.gmask_rs = lk * cs, p.gmask_cs = cs, p.gmask_hs = lq * lk * cs;
    p.dout = dout.data, p.dout_rs = dv * es, p.dout_cs = es, p.dout_hs = lq * dv * es;
    p.lse = c->dot ? NULL : lse, p.lse_rs = cs, p.lse_hs = lq * cs;
    p.delta = c->dot ? NULL : delta, p.delta_rs = cs, p.delta_hs = lq * cs;
    p.gq = gq, p.gq_rs = d * es, p.gq_cs = es, p.gq_hs = lq * d * es;
    p.gk = gk, p.gk_rs = d * es, p.gk_cs = es;
    p.gv = gv, p.gv_rs = dv * es, p.gv_cs = es;
    int bad = 0;
    const bwd_ref ref = {c, scale, q, k, v, &dout, maskv, slopes, bmask, P, dS, s, z, f, dM};
    /* the reference's lse and delta of every entry first: the kernel reads them */
    for (int64_t e = 0; e < n; e++) ref_backward_entry(&ref, e, lse, delta, cs);
    /* pass 1 (float32 and float64 softmax): delta left to the kernel, which
     * computes it from the forward's out (16-bit outputs, rounded, are
     * left to the Python tests' allowances) */
    const int passes = !c->dot && (dtype == FA_F32 || dtype == FA_F64) ? 2 : 1;
    for (int pass = 0; pass < passes && !bad; pass++) {
        if (pass == 1) { /* and the gradients NaN, so that a row left unwritten fails */
            p.delta = NULL;
            memset(gq, 0xff, (size_t)(n * rows * d * es));
            memset(gk, 0xff, (size_t)(n * lk * d * es));
            memset(gv, 0xff, (size_t)(n * lk * dv * es));
        }
        char what[200];
        snprintf(what, sizeof what, "%s %s %s: fa_attention_backward%s", fa_path_name(path), DTYPE_NAMES[dtype],
                 c->what, pass ? " (delta from out)" : "");
        /* the mask's gradient zeroed (with_failures): the kernel adds to it */
        char *const grads[4] = {gq, gk, gv, gm};
        const size_t grad_sizes[4] = {(size_t)(n * rows * d * es), (size_t)(n * lk * d * es), (size_t)(n * lk * dv * es),
                                      (size_t)(n * rows * lk * cs)};
        const int status = with_failures(fa_attention_backward, &p, grads, grad_sizes, gm ? 4 : 3, gm ? 1 : 0, what);
        checks++;
        if (status != FA_OK) {
            printf("FAIL %s %s %s: fa_attention_backward status %d%s\n", fa_path_name(path), DTYPE_NAMES[dtype],
                   c->what, status, pass ? " (delta from out)" : "");
            bad = 1;
        }
        for (int64_t e = 0; e < n && !bad; e++) {
            ref_backward_entry(&ref, e, lse, delta, cs);
            const double tol = dtype == FA_F64 ? 1e-12 : 2e-5;
            const double rel = dtype == FA_F16 ? 1.0 / 2048 : dtype == FA_BF16 ? 1.0 / 256 : tol;
            /* gq = scale dS K, gk = scale dS^T Q, gv = P^T dout */
            for (int which = 0; which < 3 && !bad; which++) {
                const int64_t nr = which == 0 ? rows : lk, nc = which == 2 ? dv : d;
                for (int64_t a = 0; a < nr; a++)
                    for (int64_t b = 0; b < nc; b++) {
                        double t = 0, m = 0;
                        for (int64_t o = 0; o < (which == 0 ? lk : rows); o++) {
                            double term;
                            if (which == 0) term = scale * dS[a * lk + o] * k->val[(e * lk + o) * d + b];
                            else if (which == 1) term = scale * dS[o * lk + a] * q->val[(e * rows + o) * d + b];
                            else term = P[o * lk + a] * dout.val[(e * rows + o) * dv + b];
                            t += term;
                            m += fabs(term);
                        }
                        want[a * nc + b] = t;
                        mag[a * nc + b] = m;
                    }
                const char *base = which == 0 ? gq + entries[e][FA_E_GQ] : which == 1 ? gk + entries[e][FA_E_GK]
                                                                                        : gv + entries[e][FA_E_GV];
                for (int64_t t = 0; t < nr * nc && !bad; t++) {
                    const double got = load(dtype, base + t * es);
                    if (!close_enough(got, want[t], tol * (mag[t] + 1), rel, 0)) {
                        printf("FAIL %s %s %s: %s[%lld][%lld] = %.9g, reference %.9g%s\n", fa_path_name(path),
                               DTYPE_NAMES[dtype], c->what, which == 0 ? "gq" : which == 1 ? "gk" : "gv", (long long)e,
                               (long long)t, got, want[t], pass ? " (delta from out)" : "");
                        bad = 1;
                    }
                }
            }
            for (int64_t t = 0; gm && t < rows * lk && !bad; t++) { /* dS, in the compute type */
                const double got = load(cs == 8 ? FA_F64 : FA_F32, gm + (e * rows * lk + t) * cs);
                if (!close_enough(got, dM[t], dtype == FA_F64 ? 1e-12 : 2e-5, dtype == FA_F64 ? 1e-12 : 1e-3, 0)) {
                    printf("FAIL %s %s %s: gmask[%lld][%lld] = %.9g, reference %.9g%s\n", fa_path_name(path),
                           DTYPE_NAMES[dtype], c->what, (long long)e, (long long)t, got, dM[t],
                           pass ? " (delta from out)" : "");
                    bad = 1;
                }
            }
        }
    }
    /* a mask gradient that every entry and head shares (entries at one
     * offset, heads 0 bytes apart; then every query row too, rows 0 bytes
     * apart): each element the sum of their dS, added in a fixed order */
    for (int shared_rows = 0; gm && n * g > 1 && shared_rows < 2 && !bad; shared_rows++) {
        const int64_t nr = shared_rows ? 1 : lq;
        int64_t saved[4];
        for (int64_t e = 0; e < n; e++) {
            saved[e] = entries[e][FA_E_GMASK];
            entries[e][FA_E_GMASK] = 0;
        }
        fa_problem sp = p;
        sp.gmask_hs = 0;
        sp.gmask_rs = shared_rows ? 0 : lk * cs;
        char what[200];
        snprintf(what, sizeof what, "%s %s %s: fa_attention_backward, a mask gradient shared by %s", fa_path_name(path),
                 DTYPE_NAMES[dtype], c->what, shared_rows ? "every row" : "entries and heads");
        char *const grads[4] = {gq, gk, gv, gm};
        const size_t grad_sizes[4] = {(size_t)(n * rows * d * es), (size_t)(n * lk * d * es), (size_t)(n * lk * dv * es),
                                      (size_t)(nr * lk * cs)};
        const int status = with_failures(fa_attention_backward, &sp, grads, grad_sizes, 4, 1, what);
        checks++;
        double *sum = calloc((size_t)(lq * lk + 1), sizeof(double)), *amag = calloc((size_t)(lq * lk + 1), sizeof(double));
        for (int64_t e = 0; e < n; e++) {
            ref_backward_entry(&ref, e, lse, delta, cs);
            for (int64_t r = 0; r < rows; r++)
                for (int64_t j = 0; j < lk; j++) {
                    const int64_t t = (shared_rows ? 0 : r % lq) * lk + j;
                    sum[t] += dM[r * lk + j];
                    amag[t] += fabs(dM[r * lk + j]);
                }
        }
        if (status != FA_OK) {
            printf("FAIL %s: status %d\n", what, status);
            bad = 1;
        }
        for (int64_t t = 0; t < nr * lk && !bad; t++) {
            const double got = load(cs == 8 ? FA_F64 : FA_F32, gm + t * cs);
            const double tol = dtype == FA_F64 ? 1e-12 : 2e-5;
            if (!close_enough(got, sum[t], tol * (amag[t] + 1), dtype == FA_F64 ? 1e-12 : 1e-3, 0)) {
                printf("FAIL %s: gmask[%lld] = %.9g, reference %.9g\n", what, (long long)t, got, sum[t]);
                bad = 1;
            }
        }
        free(sum);
        free(amag);
        for (int64_t e = 0; e < n; e++) entries[e][FA_E_GMASK] = saved[e];
    }
    failures += bad;
    free_array(&dout);
    free(lse);
    free(delta);
    free(gq);
    free(gk);
    free(gv);
    free(P);
    free(dS);
    free(z);
    free(s);
    free(f);
    free(dM);
    free(gm);
    free(want);
    free(mag);
    return bad;
}

static void run_case(int path, int dtype, const spec *c)
{
    if (c->kv && c->kv < FA_I8 && dtype != FA_F32) return; /* 16-bit k and v: under float32 queries */
    const int es = DTYPE_BYTES[dtype], cs = dtype == FA_F64 ? 8 : 4; /* storage, compute bytes */
    const int64_t n = c->entries, g = c->group, lq = c->lq, lk = c->lk, d = c->d, dv = c->dv;
    if (n > 4 || n * g > 64) { /* the entry table and the per-head slopes and sinks below */
        printf("FAIL %s: a case has at most 4 entries and 64 query heads\n", c->what);
        failures++;
        return;
    }
    const int half = dtype == FA_F16 || dtype == FA_BF16;
    const double scale = c->dot ? 0.5 : 1.0 / sqrt((double)(d ? d : 1));
    /* inputs: q [n][g][lq][d], k [n][lk][d], v [n][lk][dv]; one mask for all */
    array q = make_array(dtype, n * g * lq * d, 1.0), k = make_array(dtype, n * lk * d, 1.0);
    array v = make_array(dtype, n * lk * dv, 1.0);
    array w = make_array(dtype, n * lq * lk, 1.0); /* weights for fa_weighted_sum */
    double *maskv = malloc((size_t)(lq * lk + 1) * sizeof(double));
    unsigned char *bmask = malloc((size_t)(lq * lk + 1));
    float *fmask = malloc((size_t)(lq * lk + 1) * sizeof(float));
    uint16_t *hmask = malloc((size_t)(lq * lk + 1) * sizeof(uint16_t)); /* a 16-bit float mask */
    const int mask16 = c->mask_kind == FA_MASK_F16 ? FA_F16 : c->mask_kind == FA_MASK_BF16 ? FA_BF16 : -1;
    const int64_t nqb = (lq + FA_TILE_BLOCK - 1) / FA_TILE_BLOCK, nkb = (lk + FA_TILE_BLOCK - 1) / FA_TILE_BLOCK;
    uint8_t *tiles = malloc((size_t)(nqb * nkb + 1));
    for (int64_t t = 0; t < lq * lk; t++) {
        bmask[t] = uniform() > -0.6; /* 80% visible */
        fmask[t] = uniform() < -0.9 ? -INFINITY : (float)(0.5 * uniform());
        if (c->tiles) { /* block (rb, kb) is hidden, visible or mixed by (rb + 2 kb) % 3 */
            const int kind = (int)((t / lk / FA_TILE_BLOCK + 2 * (t % lk / FA_TILE_BLOCK)) % 3);
            tiles[t / lk / FA_TILE_BLOCK * nkb + t % lk / FA_TILE_BLOCK] = (uint8_t)kind;
            if (kind == FA_BLOCK_HIDDEN) bmask[t] = 0, fmask[t] = -INFINITY;
            if (kind == FA_BLOCK_VISIBLE) bmask[t] = 1, fmask[t] = 0;
        }
        maskv[t] = mask16 >= 0 ? store(mask16, &hmask[t], fmask[t]) : fmask[t]; /* what the kernels read */
    }
    double slopes[64], sinks[64];
    for (int t = 0; t < 64; t++) {
        slopes[t] = 0.05 + 0.01 * t;
        sinks[t] = sink_of(t);
    }
    char *out = calloc((size_t)(n * g * lq * (dv > lk ? dv : lk) + 1), 8);
    char *lse = calloc((size_t)(n * g * lq + 1), 8);
    double *s = malloc((size_t)(lk + 1) * sizeof(double)), *qi8 = malloc((size_t)(d + 1) * sizeof(double));

    int64_t entries[4][FA_ENTRY_FIELDS];
    for (int64_t e = 0; e < n; e++) {
        entries[e][FA_E_Q] = e * g * lq * d * es;
        entries[e][FA_E_K] = e * lk * d * es;
        entries[e][FA_E_V] = e * lk * dv * es;
        entries[e][FA_E_OUT] = e * g * lq * dv * es;
        entries[e][FA_E_MASK] = 0;
        entries[e][FA_E_LSE] = e * g * lq * cs;
        entries[e][FA_E_LQ] = lq;
        entries[e][FA_E_LK] = lk;
        entries[e][FA_E_HEAD] = e * g;
        entries[e][FA_E_DROP] = e * g;
        entries[e][FA_E_DROP_ROW] = DROP_ROW0;
        entries[e][FA_E_DROP_KEY] = DROP_KEY0;
    }
    /* 8-bit k and v: codes (entry-major like k and v) with their scales,
     * one per row for int8, one per tensor for the floats; 16-bit k and v:
     * the values rounded to that type; the reference reads the values the
     * kernels see */
    uint8_t *k8 = NULL, *v8 = NULL;
    float *ksc = NULL, *vsc = NULL;
    const int kv8 = c->kv >= FA_I8, kv16 = c->kv && !kv8;
    const int64_t gap = kv16 && c->kv_gap ? 2 : 1; /* stored elements per element */
    if (kv16) {
        k8 = calloc((size_t)(n * lk * d * 2 * gap + 2), 1);
        v8 = calloc((size_t)(n * lk * dv * 2 * gap + 2), 1);
        for (int64_t t = 0; t < n * lk * d; t++) k.val[t] = store(c->kv, k8 + 2 * gap * t, k.val[t]);
        for (int64_t t = 0; t < n * lk * dv; t++) v.val[t] = store(c->kv, v8 + 2 * gap * t, v.val[t]);
    }
    if (kv8) {
        k8 = malloc((size_t)(n * lk * d + 1));
        v8 = malloc((size_t)(n * lk * dv + 1));
        ksc = malloc((size_t)(n * lk + 1) * sizeof(float));
        vsc = malloc((size_t)(n * lk + 1) * sizeof(float));
        for (int64_t r = 0; r < n * lk; r++) {
            ksc[r] = c->kv == FA_I8 ? (float)(0.01 + 0.005 * uniform()) : 0.25f;
            vsc[r] = c->kv == FA_I8 ? (float)(0.01 + 0.005 * uniform()) : 0.5f;
            for (int64_t t = 0; t < d; t++) k8[r * d + t] = random_code(c->kv, ksc[r], &k.val[r * d + t]);
            for (int64_t t = 0; t < dv; t++) v8[r * dv + t] = random_code(c->kv, vsc[r], &v.val[r * dv + t]);
        }
    }
    const int kes = kv8 ? 1 : kv16 ? 2 : es; /* bytes of a stored k or v element */
    const int64_t srs = c->kv == FA_I8 ? 4 : 0; /* between the scales of rows */

    fa_problem p;
    memset(&p, 0, sizeof p);
    p.dtype = p.kv_dtype = dtype;
    p.path = path;
    p.num_threads = 2;
    p.n_entries = n;
    p.entries = &entries[0][0];
    p.d = d;
    p.dv = dv;
    p.group = g;
    p.q = q.data;
    p.q_rs = d * es, p.q_cs = es, p.q_hs = lq * d * es;
    p.k = k.data;
    p.k_rs = d * es, p.k_cs = es;
    p.v = v.data;
    p.v_rs = dv * es, p.v_cs = es;
    p.out = out;
    p.out_rs = dv * es, p.out_cs = es, p.out_hs = lq * dv * es;
    p.lse = c->dot ? NULL : lse;
    p.lse_rs = cs, p.lse_hs = lq * cs;
    p.mask_kind = c->mask_kind;
    p.mask = c->mask_kind == FA_MASK_BOOL  ? (const void *)bmask
             : c->mask_kind == FA_MASK_F32 ? (const void *)fmask
             : mask16 >= 0                 ? (const void *)hmask
                                           : (const void *)maskv;
    p.mask_cs = c->mask_kind == FA_MASK_BOOL ? 1 : c->mask_kind == FA_MASK_F32 ? 4 : mask16 >= 0 ? 2 : 8;
    p.mask_rs = lk * p.mask_cs;
    p.weights = c->dot ? FA_WEIGHTS_DOT : FA_WEIGHTS_SOFTMAX;
    p.scale = scale;
    p.causal = c->causal;
    p.top_left = c->top_left;
    p.q_shift = c->shift;
    p.window_left = c->window_left;
    p.window_right = c->window_right;
    p.softcap = c->softcap;
    p.alibi_slopes = c->alibi ? slopes : NULL;
    p.sinks = c->sinks ? sinks : NULL;
    p.dropout_p = c->dropout;
    p.dropout_seed = DROP_SEED;
    if (c->tiles) {
        p.mask_tiles = tiles;
        p.tiles_rs = nkb, p.tiles_cs = 1, p.tiles_hs = 0;
        for (int64_t e = 0; e < n; e++) entries[e][FA_E_TILES] = 0;
    }
    if (c->kv) {
        p.kv_dtype = c->kv;
        p.k = k8, p.k_rs = d * kes * gap, p.k_cs = kes * gap;
        p.v = v8, p.v_rs = dv * kes * gap, p.v_cs = kes * gap;
        if (kv8) p.k_scales = ksc, p.v_scales = vsc, p.ks_rs = p.vs_rs = srs;
        for (int64_t e = 0; e < n; e++) {
            entries[e][FA_E_K] = e * lk * d * kes * gap;
            entries[e][FA_E_V] = e * lk * dv * kes * gap;
            entries[e][FA_E_KS] = entries[e][FA_E_VS] = e * lk * srs;
        }
    }

    /* paged: the entries are the heads of one sequence, side by side in
     * each row of its pages (as in a (blocks, page, heads, dim) cache), the
     * pages of c->page rows in shuffled order among two spare ones, a row's
     * gap between pages; packed (c->page < 0): the same rows, unpaged, in
     * one run of lk (as attention_varlen's packed sequences) */
    const int64_t pg = c->page > 0 ? c->page : lk;
    const int64_t n_used = c->page != 0 ? (lk + pg - 1) / pg : 0, n_pages = n_used + 2;
    char *kpaged = NULL, *vpaged = NULL, *kspaged = NULL, *vspaged = NULL;
    int32_t *pages = NULL;
    if (c->page != 0) {
        const int64_t krs = n * d * kes, vrs = n * dv * kes, kps = (pg + 1) * krs, vps = (pg + 1) * vrs;
        const int64_t sps = (pg + 1) * n * srs; /* scales: (page, row, entry) */
        kpaged = calloc((size_t)(n_pages * kps + 1), 1);
        vpaged = calloc((size_t)(n_pages * vps + 1), 1);
        kspaged = calloc((size_t)(n_pages * sps + 4), 1);
        vspaged = calloc((size_t)(n_pages * sps + 4), 1);
        pages = malloc((size_t)(n_pages + 1) * sizeof(int32_t));
        for (int64_t t = 0; t < n_pages; t++) pages[t] = (int32_t)t;
        for (int64_t t = n_pages - 1; t > 0; t--) { /* shuffle */
            const int64_t u = (int64_t)((uniform() + 1) * 0.5 * (double)(t + 1)) % (t + 1);
            const int32_t x = pages[t];
            pages[t] = pages[u];
            pages[u] = x;
        }
        for (int64_t e = 0; e < n; e++) {
            for (int64_t j = 0; j < lk; j++) {
                const int64_t page = pages[j / pg], row = j % pg;
                memcpy(kpaged + page * kps + row * krs + e * d * kes,
                       (const char *)p.k + entries[e][FA_E_K] + j * p.k_rs, (size_t)(d * kes));
                memcpy(vpaged + page * vps + row * vrs + e * dv * kes,
                       (const char *)p.v + entries[e][FA_E_V] + j * p.v_rs, (size_t)(dv * kes));
                if (kv8) {
                    memcpy(kspaged + page * sps + (row * n + e) * srs, ksc + e * lk + j, 4);
                    memcpy(vspaged + page * sps + (row * n + e) * srs, vsc + e * lk + j, 4);
                }
            }
            entries[e][FA_E_K] = e * d * kes;
            entries[e][FA_E_V] = e * dv * kes;
            entries[e][FA_E_KS] = entries[e][FA_E_VS] = e * srs;
            entries[e][FA_E_PAGES] = 0;
        }
        p.k = kpaged, p.v = vpaged;
        p.k_rs = krs, p.v_rs = vrs;
        p.pages = pages, p.page_size = c->page, p.n_pages = n_pages, p.k_ps = kps, p.v_ps = vps;
        if (kv8) {
            p.k_scales = (const float *)kspaged, p.v_scales = (const float *)vspaged;
            p.ks_rs = p.vs_rs = n * srs, p.ks_ps = p.vs_ps = sps;
        }
        if (c->page < 0) { /* packed: the one page's rows, unpaged */
            p.k = kpaged + pages[0] * kps, p.v = vpaged + pages[0] * vps;
            p.pages = NULL, p.page_size = 0, p.n_pages = 0, p.k_ps = p.v_ps = 0;
            if (kv8) {
                p.k_scales = (const float *)(const void *)(kspaged + pages[0] * sps);
                p.v_scales = (const float *)(const void *)(vspaged + pages[0] * sps);
                p.ks_ps = p.vs_ps = 0;
            }
        }
    }

    /* tolerances: float64 1e-12, float32 2e-5 of the magnitude; 16-bit
     * results are rounded once to their type (2^-11 / 2^-8 relative), and
     * bfloat16 on vdpbf16ps rounds the weights to bfloat16 (2^-8 sum|w||v|) */
    const double tol = dtype == FA_F64 ? 1e-12 : 2e-5;
    const double rel = dtype == FA_F16 ? 1.0 / 2048 : dtype == FA_BF16 ? 1.0 / 256 : tol;
    int bad = 0;

    /* fused attention (first under allocation failures) */
    char what[200];
    snprintf(what, sizeof what, "%s %s %s: fa_attention", fa_path_name(path), DTYPE_NAMES[dtype], c->what);
    char *const outs[2] = {out, lse};
    const size_t out_sizes[2] = {(size_t)(n * g * lq * dv * es), (size_t)(n * g * lq * cs)};
    int status = with_failures(fa_attention, &p, outs, out_sizes, c->dot ? 1 : 2, 0, what);
    checks++;
    if (status != FA_OK) {
        printf("FAIL %s %s %s: fa_attention status %d\n", fa_path_name(path), DTYPE_NAMES[dtype], c->what, status);
        failures++;
        bad = 1;
    }
    for (int64_t e = 0; e < n && !bad; e++)
        for (int64_t h = 0; h < g && !bad; h++)
            for (int64_t i = 0; i < lq && !bad; i++) {
                const double *qr = q.val + ((e * g + h) * lq + i) * d;
                if (c->kv == FA_I8) int8_query(qr, d, scale, cs == 8, qi8);
                ref_scores(c, c->kv == FA_I8 ? 1.0 : scale, c->kv == FA_I8 ? qi8 : qr, k.val + e * lk * d, maskv,
                           bmask, slopes[e * g + h], i, s, NULL);
                double m = c->sinks ? sink_of(e * g + h) : -INFINITY, sum = 0, mag = 1;
                for (int64_t j = 0; j < lk; j++) m = s[j] > m ? s[j] : m;
                for (int64_t j = 0; j < lk; j++) {
                    const double wj = c->dot ? (isinf(s[j]) ? 0 : s[j]) : (isinf(m) ? 0 : exp(s[j] - m));
                    s[j] = wj;
                    sum += wj;
                }
                if (c->sinks) sum += exp(sink_of(e * g + h) - m);
                const double norm = c->dot ? 1 : (sum > 0 ? 1 / sum : 0);
                for (int64_t x = 0; x < dv && !bad; x++) {
                    double want = 0, absw = 0;
                    for (int64_t j = 0; j < lk; j++) {
                        const double t = s[j] * norm * drop_factor(c, e * g + h, i, j) * v.val[(e * lk + j) * dv + x];
                        want += t;
                        absw += fabs(t);
                    }
                    mag = absw > mag ? absw : mag;
                    const double got = load(dtype, out + entries[e][FA_E_OUT] + ((h * lq + i) * dv + x) * es);
                    if (!close_enough(got, want, tol * mag, rel, half ? absw / 256 : 0)) {
                        printf("FAIL %s %s %s: out[%lld][%lld][%lld][%lld] = %.9g, reference %.9g\n", fa_path_name(path),
                               DTYPE_NAMES[dtype], c->what, (long long)e, (long long)h, (long long)i, (long long)x, got,
                               want);
                        failures++;
                        bad = 1;
                    }
                }
                if (!c->dot && !bad) {
                    const double want = sum > 0 ? m + log(sum) : -INFINITY;
                    const double got = load(cs == 8 ? FA_F64 : FA_F32, lse + entries[e][FA_E_LSE] + (h * lq + i) * cs);
                    if (!close_enough(got, want, 2e-5 * (fabs(want) > 1 ? fabs(want) : 1), 0, 0)) {
                        printf("FAIL %s %s %s: lse[%lld][%lld][%lld] = %.9g, reference %.9g\n", fa_path_name(path),
                               DTYPE_NAMES[dtype], c->what, (long long)e, (long long)h, (long long)i, got, want);
                        failures++;
                        bad = 1;
                    }
                }
            }

    if (!bad) { /* a mask kind outside the enum: rejected, as the call's only fault */
        checks++;
        fa_problem odd = p;
        for (int kind = -1; kind <= FA_MASK_KIND_COUNT; kind += FA_MASK_KIND_COUNT + 1) {
            odd.mask_kind = kind;
            if (fa_attention(&odd) != FA_ERR_INVALID) {
                printf("FAIL %s %s %s: mask kind %d accepted\n", fa_path_name(path), DTYPE_NAMES[dtype], c->what, kind);
                failures++;
                bad = 1;
            }
        }
    }
    if (c->page > 0 || c->kv) { /* the backward and the other operations take no pages, no 8-bit k and v */
        checks++;
        if (!bad && (fa_attention_backward(&p) != FA_ERR_INVALID || fa_scores(&p) != FA_ERR_INVALID)) {
            printf("FAIL %s %s %s: paged or 8-bit k and v accepted by the backward or scores\n", fa_path_name(path),
                   DTYPE_NAMES[dtype], c->what);
            failures++;
        }
        bad = 1;
    }
    if (c->page < 0) bad = 1; /* packed: the forward only (the other checks assume k and v per entry) */
    if (!bad) bad = check_backward(path, dtype, c, &p, entries, &q, &k, &v, maskv, bmask, slopes, scale);
    if (!bad && c->dropout > 0) { /* scores and weighted sums take no dropout; check them without it */
        checks++;
        if (fa_scores(&p) != FA_ERR_INVALID || fa_weighted_sum(&p) != FA_ERR_INVALID) {
            printf("FAIL %s %s %s: dropout accepted by fa_scores or fa_weighted_sum\n", fa_path_name(path),
                   DTYPE_NAMES[dtype], c->what);
            failures++;
            bad = 1;
        }
        p.dropout_p = 0;
    }

    /* scores (one head per entry: fa_scores takes no groups), written in the compute type */
    if (!bad && g == 1 && !c->dot) {
        for (int64_t e = 0; e < n; e++) {
            entries[e][FA_E_OUT] = e * lq * lk * cs;
        }
        p.out_rs = lk * cs, p.out_cs = cs, p.out_hs = 0;
        snprintf(what, sizeof what, "%s %s %s: fa_scores", fa_path_name(path), DTYPE_NAMES[dtype], c->what);
        const size_t score_bytes = (size_t)(n * lq * lk * cs);
        status = with_failures(fa_scores, &p, &out, &score_bytes, 1, 0, what);
        checks++;
        for (int64_t e = 0; e < n && !bad; e++)
            for (int64_t i = 0; i < lq && !bad; i++) {
                ref_scores(c, scale, q.val + (e * lq + i) * d, k.val + e * lk * d, maskv, bmask, slopes[e], i, s, NULL);
                for (int64_t j = 0; j < lk && !bad; j++) {
                    const double got = load(cs == 8 ? FA_F64 : FA_F32, out + entries[e][FA_E_OUT] + (i * lk + j) * cs);
                    double mag = 0;
                    for (int64_t t = 0; t < d; t++) mag += fabs(q.val[(e * lq + i) * d + t] * k.val[(e * lk + j) * d + t]);
                    if (status != FA_OK || !close_enough(got, s[j], tol * (scale * mag + 1), 0, 0)) {
                        printf("FAIL %s %s %s: scores[%lld][%lld][%lld] = %.9g, reference %.9g (status %d)\n",
                               fa_path_name(path), DTYPE_NAMES[dtype], c->what, (long long)e, (long long)i,
                               (long long)j, got, s[j], status);
                        failures++;
                        bad = 1;
                    }
                }
            }
    }

    /* weighted sum: w (lq x lk per entry) through q */
    if (!bad && g == 1) {
        fa_problem ws = p;
        for (int64_t e = 0; e < n; e++) {
            entries[e][FA_E_Q] = e * lq * lk * es;
            entries[e][FA_E_OUT] = e * lq * dv * es;
        }
        ws.q = w.data;
        ws.q_rs = lk * es, ws.q_cs = es, ws.q_hs = 0;
        ws.out_rs = dv * es, ws.out_cs = es, ws.out_hs = 0;
        ws.d = 0;
        ws.mask_kind = FA_MASK_NONE;
        ws.lse = NULL;
        snprintf(what, sizeof what, "%s %s %s: fa_weighted_sum", fa_path_name(path), DTYPE_NAMES[dtype], c->what);
        const size_t sum_bytes = (size_t)(n * lq * dv * es);
        status = with_failures(fa_weighted_sum, &ws, &out, &sum_bytes, 1, 0, what);
        checks++;
        for (int64_t e = 0; e < n && !bad; e++)
            for (int64_t i = 0; i < lq && !bad; i++)
                for (int64_t x = 0; x < dv && !bad; x++) {
                    double want = 0, mag = 1;
                    for (int64_t j = 0; j < lk; j++) {
                        const double t = w.val[(e * lq + i) * lk + j] * v.val[(e * lk + j) * dv + x];
                        want += t;
                        mag += fabs(t);
                    }
                    const double got = load(dtype, out + entries[e][FA_E_OUT] + (i * dv + x) * es);
                    if (status != FA_OK || !close_enough(got, want, tol * mag, rel, 0)) {
                        printf("FAIL %s %s %s: weighted_sum[%lld][%lld][%lld] = %.9g, reference %.9g (status %d)\n",
                               fa_path_name(path), DTYPE_NAMES[dtype], c->what, (long long)e, (long long)i,
                               (long long)x, got, want, status);
                        failures++;
                        bad = 1;
                    }
                }
    }

    free_array(&q);
    free_array(&k);
    free_array(&v);
    free_array(&w);
    free(maskv);
    free(bmask);
    free(fmask);
    free(hmask);
    free(out);
    free(lse);
    free(s);
    free(qi8);
    free(kpaged);
    free(vpaged);
    free(kspaged);
    free(vspaged);
    free(pages);
    free(tiles);
    free(k8);
    free(v8);
    free(ksc);
    free(vsc);
}

/* The path's softmax exponential: relative error <= 1e-7 where exp(x) is a
 * normal float (x in [-87, 0]); -inf gives 0, NaN stays NaN. */
static void check_exp(int path)
{
    enum { N = 200003 };
    static float x[N + 3], y[N + 3];
    for (int i = 0; i < N; i++) x[i] = -87.0f * (float)i / (N - 1);
    x[N] = -INFINITY, x[N + 1] = NAN, x[N + 2] = -200.0f;
    checks++;
    if (fa_exp_f32(path, x, y, N + 3) != FA_OK) {
        printf("FAIL %s: fa_exp_f32 refused\n", fa_path_name(path));
        failures++;
        return;
    }
    double worst = 0;
    for (int i = 0; i < N; i++) {
        const double want = exp((double)x[i]), err = fabs(y[i] - want) / want;
        worst = err > worst ? err : worst;
    }
    if (worst > 1e-7 || y[N] != 0 || !isnan(y[N + 1]) || y[N + 2] != 0) {
        printf("FAIL %s: exp max relative error %.3g, exp(-inf) %g, exp(nan) %g, exp(-200) %g\n", fa_path_name(path),
               worst, y[N], y[N + 1], y[N + 2]);
        failures++;
    }
}


/* ---- the thread pool ---------------------------------------------------- */

enum { POOL_ITEMS = 20000 };

typedef struct {
    int64_t next[2];
    int claimed[POOL_ITEMS];
    int64_t sum; /* of the claims */
    int ran;     /* members that ran */
    int bad;
} pool_work;

static void pool_member(void *arg, fa_team *team, int member)
{
    pool_work *w = (pool_work *)arg;
    if (member < 0 || member >= fa_team_size(team)) __atomic_store_n(&w->bad, 1, __ATOMIC_RELAXED);
    __atomic_add_fetch(&w->ran, 1, __ATOMIC_RELAXED);
    for (int64_t i; (i = fa_team_next(&w->next[0], 7, POOL_ITEMS)) >= 0;)
        for (int64_t j = i; j < i + 7 && j < POOL_ITEMS; j++) {
            __atomic_add_fetch(&w->claimed[j], 1, __ATOMIC_RELAXED);
            __atomic_add_fetch(&w->sum, j, __ATOMIC_RELAXED);
        }
    for (int64_t i; (i = fa_team_next(&w->next[1], 1, POOL_ITEMS)) >= 0;)
        __atomic_add_fetch(&w->claimed[i], 1, __ATOMIC_RELAXED);
}

/* One team of up to `want`: 1 if every item was claimed once per loop and
 * every member that ran had returned when fa_parallel did. */
static int pool_run_once(int want)
{
    pool_work *w = (pool_work *)calloc(1, sizeof *w);
    if (!w) return 0;
    const int size = fa_parallel(want, pool_member, w);
    const int ran = w->ran, sum_ok = w->sum == (int64_t)POOL_ITEMS * (POOL_ITEMS - 1) / 2;
    int ok = !w->bad && sum_ok && size >= 1 && size <= (want < 1 ? 1 : want) && ran >= 1 && ran <= size;
    for (int i = 0; i < POOL_ITEMS; i++) ok &= w->claimed[i] == 2;
    /* a member still running after the return would change these now */
    struct timespec pause = {0, 200000};
    nanosleep(&pause, NULL);
    ok &= __atomic_load_n(&w->ran, __ATOMIC_RELAXED) == ran && w->sum == (int64_t)POOL_ITEMS * (POOL_ITEMS - 1) / 2;
    free(w);
    return ok;
}

/* A team whose caller has nothing to do: workers offered it, asleep, are
 * withdrawn rather than waited for (1 if some offer was withdrawn within
 * 1000 teams, and the rest ran). */
static void pool_nothing(void *arg, fa_team *team, int member)
{
    (void)team, (void)member;
    __atomic_add_fetch((int *)arg, 1, __ATOMIC_RELAXED);
}

static int pool_withdraws(void)
{
    const int64_t before = fa_pool_withdrawn();
    for (int r = 0; r < 1000; r++) {
        int ran = 0;
        const int size = fa_parallel(4, pool_nothing, &ran);
        const int64_t withdrawn = fa_pool_withdrawn() - before;
        if (ran < 1 || ran > size) return 0;
        if (withdrawn > 0) return 1;
    }
    return 0;
}

static void *pool_caller(void *arg)
{
    int *ok = (int *)arg;
    for (int r = 0; r < 40; r++) *ok &= pool_run_once(1 + r % 4);
    return NULL;
}

/* OpenBLAS-style jobs: each waits (up to 10 s) until every job has started,
 * so they can only finish if all run at once. */
typedef struct {
    int started, numjobs, bad;
    int thread[8];
} blas_jobs;

static void blas_job(int thread, void *data, int dojob_data)
{
    blas_jobs *j = *(blas_jobs **)data;
    if (dojob_data != 7) __atomic_store_n(&j->bad, 1, __ATOMIC_RELAXED);
    const int me = __atomic_fetch_add(&j->started, 1, __ATOMIC_ACQ_REL);
    j->thread[me] = thread;
    struct timespec t0, t;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    while (__atomic_load_n(&j->started, __ATOMIC_ACQUIRE) < j->numjobs) {
        clock_gettime(CLOCK_MONOTONIC, &t);
        if (t.tv_sec - t0.tv_sec > 10) {
            __atomic_store_n(&j->bad, 1, __ATOMIC_RELAXED);
            return;
        }
    }
}

/* The callback numbers jobs from server_threads - 1 when they fit under
 * max_threads, from 0 otherwise. */
static int blas_run(int numjobs, int servers, int max_threads, int first)
{
    blas_jobs j = {0, numjobs, 0, {0}};
    blas_jobs *data[8];
    for (int i = 0; i < numjobs; i++) data[i] = &j;
    fa_blas_callback cb = fa_pool_blas_callback(1, &servers, max_threads);
    if (!cb) return 0;
    cb(1, blas_job, numjobs, sizeof data[0], data, 7);
    int seen = 0;
    for (int i = 0; i < numjobs; i++) seen |= 1 << (j.thread[i] - first);
    return !j.bad && j.started == numjobs && seen == (1 << numjobs) - 1;
}

/* A stand-in for an OpenMP runtime's GOMP_parallel: n threads (the caller
 * one of them), each knowing its number. */
static _Thread_local int fake_omp_num;
static int fake_omp_regions;
static unsigned fake_omp_last; /* threads of the last region */
typedef struct {
    void (*fn)(void *);
    void *data;
    int num;
} fake_omp_member;

static void *fake_omp_thread(void *arg)
{
    fake_omp_member *m = (fake_omp_member *)arg;
    fake_omp_num = m->num;
    m->fn(m->data);
    return NULL;
}

static void fake_gomp_parallel(void (*fn)(void *), void *data, unsigned n, unsigned flags)
{
    (void)flags;
    __atomic_add_fetch(&fake_omp_regions, 1, __ATOMIC_RELAXED);
    fake_omp_last = n;
    pthread_t threads[8];
    fake_omp_member members[8];
    if (n > 8) n = 8;
    for (unsigned i = 1; i < n; i++) {
        members[i] = (fake_omp_member){fn, data, (int)i};
        pthread_create(&threads[i], NULL, fake_omp_thread, &members[i]);
    }
    fake_omp_num = 0;
    fn(data);
    for (unsigned i = 1; i < n; i++) pthread_join(threads[i], NULL);
}

static int fake_omp_thread_num(void) { return fake_omp_num; }

/* Teams routed to a host's OpenMP runtime: only while the calling thread
 * asks for it, at most the thread count it gives, every item claimed once. */
static int pool_on_host(void)
{
    int ok = 1;
    fa_pool_set_host_openmp(fake_gomp_parallel, fake_omp_thread_num);
    const int64_t runs = fa_pool_host_runs();
    const int regions = fake_omp_regions;
    ok &= pool_run_once(4) && fa_pool_host_runs() == runs && fake_omp_regions == regions; /* not asked for */
    ok &= fa_pool_host_calls(3) == 0;
    ok &= pool_run_once(4) && pool_run_once(2) && pool_run_once(1);
    ok &= fa_pool_host_runs() == runs + 2 && fake_omp_regions == regions + 2; /* teams of 1 stay home */
    ok &= fake_omp_last == 3; /* a team of 2 in a region of all 3 host threads */
    pool_work *w = (pool_work *)calloc(1, sizeof *w);
    ok &= w && fa_parallel(6, pool_member, w) == 3 && w->ran == 3; /* capped at 3, all of them run */
    free(w);
    ok &= fa_pool_host_calls(0) == 3;
    ok &= pool_run_once(4) && fa_pool_host_runs() == runs + 3;
    fa_pool_set_host_openmp(NULL, NULL);
    return ok;
}

/* Items that take turns (fa_team_wait): item i of ORDER_ITEMS appends i to
 * a log once the turn counter reaches i and passes the turn on; with
 * `skip`, item skip is left undone and flags the abort instead.  1 if the
 * log is in order (up to the skipped item) and, with a skip, every later
 * item gave up rather than waiting for ever. */
#define ORDER_ITEMS 300
typedef struct {
    int64_t next, turn, log[ORDER_ITEMS], logged, skip;
    int abort, gave_up;
} order_work;

static void order_member(void *arg, fa_team *team, int member)
{
    (void)team, (void)member;
    order_work *w = (order_work *)arg;
    for (int64_t i; (i = fa_team_next(&w->next, 1, ORDER_ITEMS)) >= 0;) {
        if (i == w->skip) {
            __atomic_store_n(&w->abort, 1, __ATOMIC_RELAXED);
            continue;
        }
        if (!fa_team_wait(&w->turn, i, &w->abort)) {
            __atomic_add_fetch(&w->gave_up, 1, __ATOMIC_RELAXED);
            continue;
        }
        w->log[w->logged++] = i;
        __atomic_store_n(&w->turn, i + 1, __ATOMIC_RELEASE);
    }
}

static int pool_ordered(int want, int64_t skip)
{
    order_work *w = (order_work *)calloc(1, sizeof *w);
    if (!w) return 0;
    w->skip = skip;
    fa_parallel(want, order_member, w);
    const int64_t done = skip < 0 ? ORDER_ITEMS : skip;
    int ok = w->logged == done && (skip < 0 ? w->gave_up == 0 : w->gave_up == ORDER_ITEMS - skip - 1);
    for (int64_t i = 0; i < w->logged; i++) ok &= w->log[i] == i;
    free(w);
    return ok;
}

static void check_pool(void)
{
    int ok = 1;
    for (int want = 0; want <= 5; want++) ok &= pool_run_once(want);
    for (int want = 1; want <= 5; want += 2) ok &= pool_ordered(want, -1) && pool_ordered(want, 40);
    pthread_t callers[3];
    int caller_ok[3] = {1, 1, 1};
    for (int i = 0; i < 3; i++) pthread_create(&callers[i], NULL, pool_caller, &caller_ok[i]);
    for (int i = 0; i < 3; i++) pthread_join(callers[i], NULL);
    ok &= caller_ok[0] && caller_ok[1] && caller_ok[2];
    const int64_t runs = fa_pool_blas_runs();
    ok &= blas_run(4, 3, 64, 2) && blas_run(4, 3, 5, 0) && blas_run(6, 1, 64, 0) && blas_run(1, 2, 64, 1);
    ok &= fa_pool_blas_runs() == runs + 4;
    fa_pool_set_spin(0);
    ok &= pool_run_once(3);
    ok &= pool_withdraws();
    fa_pool_set_spin(FA_POOL_SPIN_DEFAULT_NS);
    ok &= pool_on_host();
    checks++;
    if (!ok) failures++;
    printf("%s thread pool: teams, items taking turns (and giving up), concurrent callers, offers withdrawn from "
           "sleeping workers, jobs that wait for each other, teams on a host's OpenMP threads (%d workers)\n",
           ok ? "ok  " : "FAIL", fa_pool_workers());
}

/* The per-thread cache of scratch blocks, on a new thread (whose cache
 * starts empty): a block given back is taken again by the next request it
 * fits, a bigger request gets a new block, the cache keeps within its slots
 * and bytes, and a thread's cache is freed when it exits. */
static void *scratch_cache_thread(void *arg)
{
    int ok = fa_scratch_cached(NULL) == 0;
    size_t na = 100000;
    char *a = fa_scratch_take(&na);
    ok &= a && (uintptr_t)a % 64 == 0 && na >= 100000;
    if (a) memset(a, 1, na);
    fa_scratch_give(a, na);
    ok &= fa_scratch_cached(NULL) == 1;
    size_t nb = 50000, nc = 200000;
    char *b = fa_scratch_take(&nb);
    ok &= b == a && nb == na && fa_scratch_cached(NULL) == 0;
    char *c = fa_scratch_take(&nc);
    ok &= c && c != b && nc >= 200000;
    fa_scratch_give(b, nb);
    fa_scratch_give(c, nc);
    size_t nbig = FA_SCRATCH_CACHE_BYTES + 64, bytes = 0;
    void *big = fa_scratch_take(&nbig);
    fa_scratch_give(big, nbig); /* more than the cache holds: freed */
    ok &= fa_scratch_cached(&bytes) == 2 && bytes == na + nc;
    enum { N = FA_SCRATCH_CACHE_SLOTS + 6 };
    void *many[N];
    size_t sizes[N];
    for (int i = 0; i < N; i++) {
        sizes[i] = (size_t)64 << (i % 12);
        many[i] = fa_scratch_take(&sizes[i]);
    }
    for (int i = 0; i < N; i++) fa_scratch_give(many[i], sizes[i]);
    ok &= fa_scratch_cached(&bytes) == FA_SCRATCH_CACHE_SLOTS && bytes <= FA_SCRATCH_CACHE_BYTES;
    *(int *)arg = ok;
    return NULL;
}

static void check_scratch_cache(void)
{
    int ok = 0;
    pthread_t t;
    if (pthread_create(&t, NULL, scratch_cache_thread, &ok) == 0) pthread_join(t, NULL);
    checks++;
    if (!ok) failures++;
    printf("%s scratch cache: blocks reused, bounded, freed with their thread\n", ok ? "ok  " : "FAIL");
}

int main(void)
{
    /* entries, group, lq, lk, d, dv, causal, top_left, window l/r, softcap, alibi, mask, dot, shift, page, sinks,
     * kv, tiles, dropout, kv_gap */
    const spec cases[] = {
        {"one element", 1, 1, 1, 1, 1, 1, 0, 0, -1, -1, 0, 0, FA_MASK_NONE, 0, 0, 0, 0, 0, 0, 0, 0},
        {"prefill tails", 2, 1, 70, 97, 19, 7, 0, 0, -1, -1, 0, 0, FA_MASK_NONE, 0, 0, 0, 0, 0, 0, 0, 0},
        {"prefill causal", 2, 1, 130, 130, 33, 40, 1, 0, -1, -1, 0, 0, FA_MASK_NONE, 0, 0, 0, 0, 0, 0, 0, 0},
        {"causal top-left, lq > lk", 1, 1, 90, 61, 16, 16, 1, 1, -1, -1, 0, 0, FA_MASK_NONE, 0, 0, 0, 0, 0, 0, 0, 0},
        {"window + softcap + alibi", 2, 1, 77, 150, 24, 9, 0, 0, 20, 5, 2.0, 1, FA_MASK_NONE, 0, 0, 0, 0, 0, 0, 0, 0},
        {"bool mask", 2, 1, 37, 53, 12, 5, 0, 0, -1, -1, 0, 0, FA_MASK_BOOL, 0, 0, 0, 0, 0, 0, 0, 0},
        {"float32 mask + causal", 1, 1, 41, 66, 8, 8, 1, 0, -1, -1, 0, 0, FA_MASK_F32, 0, 0, 0, 0, 0, 0, 0, 0},
        {"float64 mask", 1, 1, 9, 20, 5, 3, 0, 0, -1, -1, 0, 0, FA_MASK_F64, 0, 0, 0, 0, 0, 0, 0, 0},
        {"float32 mask + soft-cap + alibi, causal, grouped", 2, 2, 70, 97, 16, 8, 1, 0, -1, -1, 1.5, 1, FA_MASK_F32, 0,
         0, 0, 0, 0, 0, 0, 0},
        {"dot weights + causal", 2, 1, 65, 80, 10, 6, 1, 0, -1, -1, 0, 0, FA_MASK_NONE, 1, 0, 0, 0, 0, 0, 0, 0},
        {"grouped heads", 2, 4, 19, 41, 12, 7, 1, 0, -1, -1, 0, 1, FA_MASK_BOOL, 0, 0, 0, 0, 0, 0, 0, 0},
        {"decode, one row", 2, 1, 1, 301, 64, 64, 1, 0, -1, -1, 0, 0, FA_MASK_NONE, 0, 0, 0, 0, 0, 0, 0, 0},
        {"decode, grouped rows, odd D", 1, 4, 1, 517, 133, 129, 1, 0, -1, -1, 0, 0, FA_MASK_NONE, 0, 0, 0, 0, 0, 0, 0,
         0},
        {"decode dot weights", 1, 2, 1, 200, 40, 24, 0, 0, -1, -1, 0, 0, FA_MASK_NONE, 1, 0, 0, 0, 0, 0, 0, 0},
        {"split-KV decode", 2, 2, 1, 4100, 64, 48, 1, 0, -1, -1, 0, 0, FA_MASK_NONE, 0, 0, 0, 0, 0, 0, 0, 0},
        {"split-KV, window and mask", 1, 3, 2, 2300, 17, 9, 1, 0, 700, -1, 0, 1, FA_MASK_BOOL, 0, 0, 0, 0, 0, 0, 0, 0},
        {"split-KV dot weights", 1, 1, 3, 2100, 8, 8, 0, 0, -1, -1, 0, 0, FA_MASK_NONE, 1, 0, 0, 0, 0, 0, 0, 0},
        {"shifted rows: causal, window, alibi", 2, 1, 50, 90, 16, 12, 1, 1, 25, -1, 0, 1, FA_MASK_NONE, 0, 30, 0, 0,
         0, 0, 0, 0},
        {"shifted before the keys: empty rows", 1, 2, 40, 60, 8, 8, 1, 1, -1, -1, 0, 0, FA_MASK_BOOL, 0, -10, 0, 0, 0,
         0, 0, 0},
        {"shifted bottom-right, dot weights", 1, 1, 33, 70, 8, 5, 1, 0, 6, 3, 0, 0, FA_MASK_NONE, 1, -7, 0, 0, 0, 0,
         0, 0},
        {"window past the last key", 2, 1, 150, 60, 8, 8, 0, 1, 9, 4, 0, 1, FA_MASK_NONE, 0, 0, 0, 0, 0, 0, 0, 0},
        {"window past the last key, shifted", 1, 2, 70, 90, 16, 8, 0, 1, 9, 4, 0, 0, FA_MASK_NONE, 0, 60, 0, 0, 0, 0,
         0, 0},
        {"sinks, causal rows with no key", 2, 2, 40, 30, 16, 8, 1, 1, -1, -1, 0, 0, FA_MASK_NONE, 0, -5, 0, 1, 0, 0,
         0, 0},
        {"split-KV decode with sinks", 1, 4, 1, 3000, 32, 16, 1, 0, -1, -1, 0, 0, FA_MASK_NONE, 0, 0, 0, 1, 0, 0, 0, 0},
        {"paged decode, pages of 16", 3, 4, 1, 300, 64, 64, 1, 0, -1, -1, 0, 0, FA_MASK_NONE, 0, 0, 16, 0, 0, 0, 0, 0},
        {"paged split-KV decode, pages of 32, odd D", 2, 2, 1, 2500, 37, 19, 1, 0, -1, -1, 0, 0, FA_MASK_NONE, 0, 0,
         32, 1, 0, 0, 0, 0},
        {"paged decode, K and V rows over 4 KiB (tiles of 16 keys), pages of 40", 4, 2, 1, 300, 160, 136, 1, 0, -1,
         -1, 0, 0,
         FA_MASK_NONE, 0, 0, 40, 0, 0, 0, 0, 0},
        {"paged prefill chunk, pages of 7", 2, 2, 45, 130, 24, 16, 1, 0, 50, -1, 1.5, 1, FA_MASK_NONE, 0, 0, 7, 1, 0,
         0, 0, 0},
        /* 600 rows per entry: tile groups of 4 + 4 + 2 tiles (the last of 24 rows), each gathered page tile
         * read by all of a group's tiles, the causal bound ending them at different keys */
        {"paged prefill in tile groups, pages of 16", 2, 4, 150, 400, 32, 24, 1, 0, -1, -1, 0, 1, FA_MASK_NONE, 0, 0,
         16, 0, 0, 0, 0, 0},
        {"paged prefill in tile groups, bool mask, shifted", 1, 3, 200, 333, 16, 16, 1, 1, -1, -1, 0, 0, FA_MASK_BOOL,
         0, 100, 13, 0, 0, 0, 0, 0},
        {"int8 k and v, prefill", 2, 2, 70, 97, 19, 7, 1, 0, -1, -1, 0, 0, FA_MASK_NONE, 0, 0, 0, 0, FA_I8, 0, 0, 0},
        {"int8 k and v, paged decode", 3, 4, 1, 700, 64, 40, 1, 0, -1, -1, 0, 0, FA_MASK_NONE, 0, 0, 16, 1, FA_I8, 0,
         0, 0},
        {"e4m3 k and v, paged prefill", 2, 2, 40, 150, 24, 16, 1, 0, 60, -1, 2.0, 1, FA_MASK_NONE, 0, 0, 32, 0,
         FA_E4M3, 0, 0, 0},
        {"e5m2 k and v, split-KV decode", 2, 2, 1, 2600, 33, 17, 0, 0, -1, -1, 0, 0, FA_MASK_NONE, 0, 0, 0, 1,
         FA_E5M2, 0, 0, 0},
        {"e4m3 k and v, grouped decode", 1, 6, 1, 300, 128, 128, 1, 0, -1, -1, 0, 0, FA_MASK_NONE, 0, 0, 0, 0,
         FA_E4M3, 0, 0, 0},
        {"bool mask blocks with a table, grouped, windowed", 2, 3, 150, 230, 16, 8, 1, 0, 100, -1, 0, 0, FA_MASK_BOOL,
         0, 0, 0, 0, 0, 1, 0, 0},
        {"float32 mask blocks with a table, split-KV decode", 1, 2, 1, 2200, 16, 8, 0, 0, -1, -1, 0, 0, FA_MASK_F32,
         0, 0, 0, 0, 0, 1, 0, 0},
        {"float64 mask blocks with a table, lq not a block multiple", 2, 2, 70, 200, 8, 8, 0, 0, -1, -1, 0, 1,
         FA_MASK_F64, 0, 0, 0, 0, 0, 1, 0, 0},
        {"float16 mask + causal, grouped", 2, 2, 41, 75, 8, 8, 1, 0, -1, -1, 0, 0, FA_MASK_F16, 0, 0, 0, 0, 0, 0, 0, 0},
        {"bfloat16 mask + soft-cap + alibi, windowed", 1, 1, 70, 97, 16, 8, 0, 0, 30, 10, 1.5, 1, FA_MASK_BF16, 0, 0,
         0, 0, 0, 0, 0, 0},
        {"bfloat16 mask, few rows, dot", 2, 1, 3, 150, 16, 24, 0, 0, -1, -1, 0, 0, FA_MASK_BF16, 1, 0, 0, 0, 0, 0, 0,
         0},
        {"float16 mask blocks with a table, split-KV decode", 1, 2, 1, 2200, 16, 8, 0, 0, -1, -1, 0, 0, FA_MASK_F16,
         0, 0, 0, 0, 0, 1, 0, 0},
        {"bfloat16 mask blocks with a table", 1, 3, 150, 230, 16, 8, 0, 0, -1, -1, 0, 0, FA_MASK_BF16, 0, 0, 0, 0, 0,
         1, 0, 0},
        {"bfloat16 k and v under float32 queries, paged decode", 2, 4, 1, 500, 40, 24, 1, 0, -1, -1, 0, 0,
         FA_MASK_NONE, 0, 0, 16, 1, FA_BF16, 0, 0, 0},
        {"float16 k and v under float32 queries, prefill", 2, 2, 70, 130, 24, 16, 1, 0, -1, -1, 0, 1, FA_MASK_NONE,
         0, 0, 0, 0, FA_F16, 0, 0, 0},
        {"paged, pages of 100 and a mask", 1, 1, 70, 230, 16, 8, 0, 0, -1, -1, 0, 0, FA_MASK_BOOL, 0, 0, 100, 0, 0, 0,
         0, 0},
        /* rows of whole vectors on every path: 8-bit and 16-bit rows read in place, converted in registers */
        {"int8 k and v, grouped paged decode, D 128", 2, 4, 1, 700, 128, 64, 1, 0, -1, -1, 0, 1, FA_MASK_NONE, 0, 0,
         16, 1, FA_I8, 0, 0, 0},
        /* decoding tiles over pages smaller than a tile: a segment per page, the options once per tile */
        {"paged decode, pages of 9, window, soft-cap, ALiBi and sinks", 2, 2, 1, 700, 64, 48, 1, 0, 300, -1, 8.0, 1,
         FA_MASK_NONE, 0, 0, 9, 1, 0, 0, 0, 0},
        {"int8 k and v, paged decode of 6 rows per head, pages of 5, window", 2, 6, 1, 500, 128, 64, 1, 0, 200, -1, 0,
         0, FA_MASK_NONE, 0, 0, 5, 0, FA_I8, 0, 0, 0},
        {"int8 k and v, paged decode of 3 rows per head, D 192", 3, 3, 1, 333, 192, 32, 1, 0, -1, -1, 0, 0,
         FA_MASK_NONE, 0, 0, 16, 1, FA_I8, 0, 0, 0},
        {"e5m2 k and v, one-row split-KV decode", 2, 1, 1, 2300, 64, 32, 1, 0, -1, -1, 1.5, 0, FA_MASK_NONE, 0, 0, 32,
         0, FA_E5M2, 0, 0, 0},
        {"e4m3 k and v, two-row decode with a mask", 1, 2, 1, 333, 32, 48, 0, 0, -1, -1, 0, 0, FA_MASK_BOOL, 0, 0, 0,
         0, FA_E4M3, 0, 0, 0},
        {"float16 k and v under float32 queries, grouped decode", 2, 3, 1, 260, 48, 16, 1, 0, 100, -1, 0, 0,
         FA_MASK_NONE, 0, 0, 0, 0, FA_F16, 0, 0, 0},
        /* 16-bit k and v whose elements lie 4 bytes apart: converted, never read as float32 rows */
        {"column-strided float16 k and v under float32 queries, grouped decode", 2, 3, 1, 130, 32, 48, 1, 0, -1, -1,
         0, 0, FA_MASK_NONE, 0, 0, 0, 0, FA_F16, 0, 0, 1},
        {"column-strided bfloat16 k and v under float32 queries, prefill tails", 2, 1, 70, 90, 16, 32, 0, 0, -1, -1,
         0, 0, FA_MASK_NONE, 0, 0, 0, 0, FA_BF16, 0, 0, 1},
        /* decoding bundles over packed sequences: tiles of 64 in segments of 16 (rows over 4 KiB), 21 */
        {"decode over packed sequences, K and V rows over 4 KiB", 4, 2, 1, 300, 160, 136, 1, 0, -1, -1, 0, 0,
         FA_MASK_NONE, 0, 0, -1, 1, 0, 0, 0, 0},
        {"int8 k and v, decode over packed sequences, window", 4, 3, 1, 500, 384, 384, 1, 0, 300, -1, 3.0, 1,
         FA_MASK_NONE, 0, 0, -1, 0, FA_I8, 0, 0, 0},
        /* 1280 bytes of K and V rows per key: pages of 64 in segments of 51 keys and 13 */
        {"bfloat16 k and v, paged decode, pages of 64 in two segments", 4, 2, 1, 600, 96, 64, 1, 0, -1, -1, 2.5, 1,
         FA_MASK_NONE, 0, 0, 64, 1, FA_BF16, 0, 0, 0},
        /* dropout on S^T tiles, few-row tiles, split keys, dot weights, sinks and masks */
        {"dropout, prefill tails, grouped", 2, 2, 70, 97, 19, 7, 0, 0, -1, -1, 0, 0, FA_MASK_NONE, 0, 0, 0, 0, 0, 0,
         0.3, 0},
        {"dropout, causal, soft-cap, alibi, bool mask", 2, 1, 130, 140, 33, 40, 1, 0, -1, -1, 2.0, 1, FA_MASK_BOOL, 0,
         0, 0, 0, 0, 0, 0.5, 0},
        {"dropout, dot weights, window", 1, 2, 65, 80, 10, 6, 0, 0, 20, 5, 0, 0, FA_MASK_NONE, 1, 0, 0, 0, 0, 0, 0.2,
         0},
        {"dropout, split-KV decode with sinks", 2, 3, 1, 2300, 64, 48, 1, 0, -1, -1, 0, 0, FA_MASK_NONE, 0, 0, 0, 1, 0,
         0, 0.4, 0},
        {"dropout, few rows, float32 mask", 1, 1, 3, 500, 16, 24, 0, 0, -1, -1, 0, 0, FA_MASK_F32, 0, 0, 0, 0, 0, 0,
         0.1, 0},
    };
    const int n_cases = (int)(sizeof cases / sizeof cases[0]);
    int paths = 0;
    for (int path = 0; path < fa_path_count(); path++) {
        if (!fa_path_supported(path)) {
            printf("skip %s (this CPU lacks %s)\n", fa_path_name(path), fa_path_features(path));
            continue;
        }
        paths++;
        const int before = failures;
        check_exp(path);
        for (int dtype = 0; dtype < FA_DTYPE_COUNT; dtype++)
            for (int c = 0; c < n_cases; c++) run_case(path, dtype, &cases[c]);
        printf("%s %s (%s): %d cases x %d element types\n", failures == before ? "ok  " : "FAIL", fa_path_name(path),
               fa_path_arch(path), n_cases, FA_DTYPE_COUNT);
    }
    if (fa_pool_threaded()) check_pool();
    check_scratch_cache();
    checks++;
    if (injected_calls == 0 || nomem_calls == 0) failures++; /* the sweeps must have run */
    printf("%s allocation failures: %lld calls with an allocation failing, %lld of them FA_ERR_NOMEM, the others "
           "FA_OK with the same outputs\n",
           injected_calls && nomem_calls ? "ok  " : "FAIL", (long long)injected_calls, (long long)nomem_calls);
    if (failures)
        printf("check_kernels: %d of %d checks FAILED\n", failures, checks);
    else
        printf("check_kernels: all %d checks ok on %d paths\n", checks, paths);
    return failures || paths == 0 ? 1 : 0;
}
