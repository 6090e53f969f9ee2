/*
 * fa_kernel_impl.h - the blocked attention kernels, written once.
 *
 * Included by fa_path_instances.h once per element type and path, after
 * fa_vec.h has defined the vector vocabulary, with:
 *   FA_T        float or double
 *   FA_SUFFIX   name suffix of this instance, e.g. f32_avx512
 *
 * Layout.  A work item is up to FA_BQ query rows of one entry.  Its queries
 * are packed once, transposed and pre-scaled (qt: D x FA_BQ), so the score
 * tile is computed as S^T = K . Q^T: the micro-kernel broadcasts elements of
 * K rows, read in place, against vectors of FA_W queries.  With queries
 * along the vector lanes, the online softmax needs no horizontal reductions:
 * the row max, the exponentials, the row sum and the rescale factor of
 * FA_W queries are each one vector operation per key.  P.V then broadcasts
 * weights (contiguous in P^T) against vectors of V rows, again read in place.
 * K and V are copied into scratch only when their layout requires it.
 *
 * Nothing of size Lq x Lk is ever allocated: scratch is per thread,
 * O(FA_BQ x (D + Dv) + FA_BK x (FA_BQ + D + Dv)).
 */

#include <math.h>
#include <stdlib.h>
#include <string.h>

#define FN(name) FA_CAT(name, FA_SUFFIX)

#ifndef FA_INLINE
#define FA_INLINE static inline __attribute__((always_inline))
#endif

#ifndef FA_UNROLL
#define FA_UNROLL _Pragma("GCC unroll 8")
#endif

/* Width, in elements, of one micro-kernel column block. */
#define FA_NVW (FA_NV * FA_W)

typedef struct {
    FA_T *qt;    /* d x FA_BQ: scale * Q^T of the item, zero past its rows */
    FA_T *kp;    /* FA_BK x d: K rows, when they cannot be read in place */
    FA_T *vp;    /* FA_BK x dvp: V rows, when they cannot be read in place */
    FA_T *st;    /* FA_BK x FA_BQ: scores S^T, then weights P^T */
    FA_T *o;     /* FA_BQ x dvp: output accumulator */
    FA_T *rmax;  /* FA_BQ: running row max */
    FA_T *rsum;  /* FA_BQ: running row sum of exp */
    FA_T *alpha; /* FA_BQ: per-tile rescale of the accumulator */
    int64_t dvp; /* dv rounded up to the vector width */
    void *block; /* the one allocation behind all of the above */
} FN(scratch);

static int FN(scratch_alloc)(FN(scratch) *w, const fa_problem *p)
{
    const int64_t d = p->d > 0 ? p->d : 0;
    const int64_t dvp = fa_roundup64(p->dv > 0 ? p->dv : 0, FA_W);
    /* element counts, each rounded to 64 bytes so every buffer is aligned */
    const int64_t al = 64 / (int64_t)sizeof(FA_T);
    const int64_t limit = (INT64_MAX / 4) / (int64_t)sizeof(FA_T) / (FA_BQ + FA_BK);
    if (d > limit || dvp > limit) return -1;
    const int64_t n_qt = fa_roundup64(d * FA_BQ, al), n_kp = fa_roundup64(FA_BK * d, al);
    const int64_t n_vp = fa_roundup64(FA_BK * dvp, al), n_st = FA_BK * FA_BQ;
    const int64_t n_o = fa_roundup64(FA_BQ * dvp, al), n_r = fa_roundup64(FA_BQ, al);
    const int64_t total = n_qt + n_kp + n_vp + n_st + n_o + 3 * n_r;
    if ((uint64_t)total > (uint64_t)SIZE_MAX / sizeof(FA_T)) return -1;
    FA_T *b = (FA_T *)aligned_alloc(64, (size_t)total * sizeof(FA_T));
    if (!b) return -1;
    w->block = b;
    w->qt = b;
    w->kp = w->qt + n_qt;
    w->vp = w->kp + n_kp;
    w->st = w->vp + n_vp;
    w->o = w->st + n_st;
    w->rmax = w->o + n_o;
    w->rsum = w->rmax + n_r;
    w->alpha = w->rsum + n_r;
    w->dvp = dvp;
    return 0;
}

/* ---- micro-kernels ------------------------------------------------------ */

/* c[r][x] = sum_k a[r][k] * b[k][x] for r < mr, x < nv * FA_W
 * (a: rows of K, b: Q^T; c: rows of S^T). */
FA_INLINE void FN(qk_mk)(const int mr, const int nv, int64_t d, const FA_T *a, int64_t lda,
                         const FA_T *b, int64_t ldb, FA_T *c, int64_t ldc)
{
    fa_vec acc[FA_MR_MAX][FA_NV_MAX];
    FA_UNROLL for (int r = 0; r < mr; r++) FA_UNROLL for (int v = 0; v < nv; v++) acc[r][v] = VZERO();
    for (int64_t k = 0; k < d; k++) {
        fa_vec bv[FA_NV_MAX];
        FA_UNROLL for (int v = 0; v < nv; v++) bv[v] = VLOAD(b + k * ldb + v * FA_W);
        FA_UNROLL for (int r = 0; r < mr; r++)
        {
            const fa_vec av = VBCAST(a[r * lda + k]);
            FA_UNROLL for (int v = 0; v < nv; v++) acc[r][v] = VFMA(av, bv[v], acc[r][v]);
        }
    }
    FA_UNROLL for (int r = 0; r < mr; r++) FA_UNROLL for (int v = 0; v < nv; v++)
        VSTORE(c + r * ldc + v * FA_W, acc[r][v]);
}

/* o[r][x] = alpha[r] * o[r][x] + sum_j pt[j][r] * v[j][x] for r < mr,
 * x < nv * FA_W (pt: weights transposed, P^T). */
FA_INLINE void FN(pv_mk)(const int mr, const int nv, int64_t bk, const FA_T *pt, int64_t ldp,
                         const FA_T *v, int64_t ldv, FA_T *o, int64_t ldo, const FA_T *alpha)
{
    fa_vec acc[FA_MR_MAX][FA_NV_MAX];
    FA_UNROLL for (int r = 0; r < mr; r++)
    {
        const fa_vec a = VBCAST(alpha[r]);
        FA_UNROLL for (int x = 0; x < nv; x++) acc[r][x] = VMUL(a, VLOAD(o + r * ldo + x * FA_W));
    }
    for (int64_t j = 0; j < bk; j++) {
        fa_vec bv[FA_NV_MAX];
        FA_UNROLL for (int x = 0; x < nv; x++) bv[x] = VLOAD(v + j * ldv + x * FA_W);
        FA_UNROLL for (int r = 0; r < mr; r++)
        {
            const fa_vec a = VBCAST(pt[j * ldp + r]);
            FA_UNROLL for (int x = 0; x < nv; x++) acc[r][x] = VFMA(a, bv[x], acc[r][x]);
        }
    }
    FA_UNROLL for (int r = 0; r < mr; r++) FA_UNROLL for (int x = 0; x < nv; x++)
        VSTORE(o + r * ldo + x * FA_W, acc[r][x]);
}

/* Run a micro-kernel with compile-time tile sizes: (mr, nv) selects one of
 * the FA_MR x FA_NV instances (sizes beyond this path's tile are dead code). */
#define FA_TILE_SWITCH(mr, nv, CALL)                                                                \
    switch ((mr) * 8 + (nv)) {                                                                      \
    case 1 * 8 + 1: CALL(1, 1); break;                                                              \
    case 1 * 8 + 2: CALL(1, 2); break;                                                              \
    case 1 * 8 + 3: CALL(1, 3); break;                                                              \
    case 1 * 8 + 4: CALL(1, 4); break;                                                              \
    case 2 * 8 + 1: CALL(2, 1); break;                                                              \
    case 2 * 8 + 2: CALL(2, 2); break;                                                              \
    case 2 * 8 + 3: CALL(2, 3); break;                                                              \
    case 2 * 8 + 4: CALL(2, 4); break;                                                              \
    case 3 * 8 + 1: CALL(3, 1); break;                                                              \
    case 3 * 8 + 2: CALL(3, 2); break;                                                              \
    case 3 * 8 + 3: CALL(3, 3); break;                                                              \
    case 3 * 8 + 4: CALL(3, 4); break;                                                              \
    case 4 * 8 + 1: CALL(4, 1); break;                                                              \
    case 4 * 8 + 2: CALL(4, 2); break;                                                              \
    case 4 * 8 + 3: CALL(4, 3); break;                                                              \
    case 4 * 8 + 4: CALL(4, 4); break;                                                              \
    case 5 * 8 + 1: CALL(5, 1); break;                                                              \
    case 5 * 8 + 2: CALL(5, 2); break;                                                              \
    case 5 * 8 + 3: CALL(5, 3); break;                                                              \
    case 5 * 8 + 4: CALL(5, 4); break;                                                              \
    case 6 * 8 + 1: CALL(6, 1); break;                                                              \
    case 6 * 8 + 2: CALL(6, 2); break;                                                              \
    case 6 * 8 + 3: CALL(6, 3); break;                                                              \
    case 6 * 8 + 4: CALL(6, 4); break;                                                              \
    default: break;                                                                                 \
    }

static void FN(qk_block)(int mr, int nv, int64_t d, const FA_T *a, int64_t lda, const FA_T *b,
                         int64_t ldb, FA_T *c, int64_t ldc)
{
#define FA_QK_CALL(m, n)                                                                            \
    if ((m) <= FA_MR && (n) <= FA_NV) FN(qk_mk)((m), (n), d, a, lda, b, ldb, c, ldc)
    FA_TILE_SWITCH(mr, nv, FA_QK_CALL)
#undef FA_QK_CALL
}

static void FN(pv_block)(int mr, int nv, int64_t bk, const FA_T *pt, int64_t ldp, const FA_T *v,
                         int64_t ldv, FA_T *o, int64_t ldo, const FA_T *alpha)
{
#define FA_PV_CALL(m, n)                                                                            \
    if ((m) <= FA_MR && (n) <= FA_NV) FN(pv_mk)((m), (n), bk, pt, ldp, v, ldv, o, ldo, alpha)
    FA_TILE_SWITCH(mr, nv, FA_PV_CALL)
#undef FA_PV_CALL
}

/* ---- operands ----------------------------------------------------------- */

#define FA_AT(base, off) (*(const FA_T *)((const char *)(base) + (off)))

/* Can rows of this array be read in place as contiguous vectors of FA_T? */
static inline int FN(rows_in_place)(int64_t rs, int64_t cs)
{
    return cs == (int64_t)sizeof(FA_T) && rs % (int64_t)sizeof(FA_T) == 0;
}

/* dst[j][c] = src[r0 + j][c] for c < nc, zero for nc <= c < ld. */
static void FN(pack_rows)(const void *base, int64_t off, int64_t rs, int64_t cs, int64_t r0, int64_t nr,
                          int64_t nc, FA_T *dst, int64_t ld)
{
    for (int64_t j = 0; j < nr; j++) {
        const char *row = (const char *)base + off + (r0 + j) * rs;
        FA_T *out = dst + j * ld;
        if (cs == (int64_t)sizeof(FA_T)) {
            memcpy(out, row, (size_t)nc * sizeof(FA_T));
        } else {
            for (int64_t c = 0; c < nc; c++) out[c] = FA_AT(row, c * cs);
        }
        for (int64_t c = nc; c < ld; c++) out[c] = 0;
    }
}

/* dst[c][r] = scale * src[r0 + r][c] for r < nr, c < nc; zero for nr <= r < nrp.
 * Packs Q^T (and, for fa_weighted_sum, W^T). */
static void FN(pack_transposed)(const void *base, int64_t off, int64_t rs, int64_t cs, int64_t r0,
                                int64_t nr, int64_t nrp, int64_t nc, FA_T scale, FA_T *dst, int64_t ld)
{
    for (int64_t r = 0; r < nr; r++) {
        const char *row = (const char *)base + off + (r0 + r) * rs;
        for (int64_t c = 0; c < nc; c++) dst[c * ld + r] = scale * FA_AT(row, c * cs);
    }
    for (int64_t c = 0; c < nc; c++)
        for (int64_t r = nr; r < nrp; r++) dst[c * ld + r] = 0;
}

/* Rows k0 .. k0 + bk of K (or V) as a pointer to FA_T rows and their
 * leading dimension: in place when possible, else packed into buf. */
static const FA_T *FN(key_rows)(const void *base, int64_t off, int64_t rs, int64_t cs, int64_t k0,
                                int64_t bk, int64_t n, int64_t np, FA_T *buf, int64_t *ld)
{
    if (n == np && FN(rows_in_place)(rs, cs)) {
        *ld = rs / (int64_t)sizeof(FA_T);
        return (const FA_T *)((const char *)base + off + k0 * rs);
    }
    FN(pack_rows)(base, off, rs, cs, k0, bk, n, buf, np);
    *ld = np;
    return buf;
}

/* ---- score tile --------------------------------------------------------- */

/* Options that act on query row i's scores s[j * ld], j < bk (keys k0 + j):
 * soft-cap, ALiBi, the mask; then causal/window bounds (-inf). */
static void FN(score_options)(const fa_problem *p, const int64_t *e, int64_t i, int64_t k0, int64_t bk,
                              FA_T *s, int64_t ld, int bounds)
{
    const int64_t lq = e[FA_E_LQ], lk = e[FA_E_LK];
    if (p->softcap > 0) {
        const FA_T cap = (FA_T)p->softcap, inv = (FA_T)(1.0 / p->softcap);
        for (int64_t j = 0; j < bk; j++) s[j * ld] = cap * (FA_T)tanh((double)(s[j * ld] * inv));
    }
    if (p->alibi_slopes) {
        const FA_T slope = (FA_T)p->alibi_slopes[e[FA_E_HEAD]];
        const int64_t pos = i + lk - lq;
        for (int64_t j = 0; j < bk; j++) {
            const int64_t dist = pos - (k0 + j);
            s[j * ld] -= slope * (FA_T)(dist < 0 ? -dist : dist);
        }
    }
    if (p->mask_kind != FA_MASK_NONE) {
        const char *m = (const char *)p->mask + e[FA_E_MASK] + i * p->mask_rs + k0 * p->mask_cs;
        const int64_t cs = p->mask_cs;
        switch (p->mask_kind) {
        case FA_MASK_BOOL:
            for (int64_t j = 0; j < bk; j++)
                if (!m[j * cs]) s[j * ld] = (FA_T)-INFINITY;
            break;
        case FA_MASK_F32:
            for (int64_t j = 0; j < bk; j++) s[j * ld] += (FA_T) * (const float *)(m + j * cs);
            break;
        case FA_MASK_F64:
            for (int64_t j = 0; j < bk; j++) s[j * ld] += (FA_T) * (const double *)(m + j * cs);
            break;
        default: break;
        }
    }
    if (bounds) {
        int64_t lo, hi;
        fa_row_range(p, i, lq, lk, &lo, &hi);
        const int64_t a = fa_min64(fa_max64(lo - k0, 0), bk), b = fa_max64(fa_min64(hi - k0, bk), a);
        for (int64_t j = 0; j < a; j++) s[j * ld] = (FA_T)-INFINITY;
        for (int64_t j = b; j < bk; j++) s[j * ld] = (FA_T)-INFINITY;
    }
}

/* st (bk x FA_BQ) = K[k0 : k0 + bk] . qt, with every score option applied. */
static void FN(score_tile)(const fa_problem *p, const int64_t *e, FN(scratch) *w, int64_t row0,
                           int64_t bq, int64_t k0, int64_t bk)
{
    const int64_t d = p->d, bqp = fa_roundup64(bq, FA_W);
    int64_t ldk;
    const FA_T *k = FN(key_rows)(p->k, e[FA_E_K], p->k_rs, p->k_cs, k0, bk, d, d, w->kp, &ldk);
    for (int64_t cb = 0; cb < bqp; cb += FA_NVW) {
        const int nv = (int)fa_min64(FA_NV, (bqp - cb) / FA_W);
        for (int64_t j = 0; j < bk; j += FA_MR)
            FN(qk_block)((int)fa_min64(FA_MR, bk - j), nv, d, k + j * ldk, ldk, w->qt + cb, FA_BQ,
                         w->st + j * FA_BQ + cb, FA_BQ);
    }
    /* The causal/window bounds matter only where the tile is not visible to
     * every row: bounds grow with the row, so check the first and last row. */
    const int64_t lq = e[FA_E_LQ], lk = e[FA_E_LK];
    int64_t lo_last, hi_first, unused;
    fa_row_range(p, row0, lq, lk, &unused, &hi_first);
    fa_row_range(p, row0 + bq - 1, lq, lk, &lo_last, &unused);
    const int bounds = k0 < lo_last || k0 + bk > hi_first;
    if (bounds || p->mask_kind != FA_MASK_NONE || p->softcap > 0 || p->alibi_slopes)
        for (int64_t r = 0; r < bq; r++) FN(score_options)(p, e, row0 + r, k0, bk, w->st + r, FA_BQ, bounds);
}

/* o = alpha * o + P . V[k0 : k0 + bk] for the item's rows, P^T in st. */
static void FN(pv_tile)(const fa_problem *p, const int64_t *e, FN(scratch) *w, int64_t bq, int64_t k0,
                        int64_t bk)
{
    const int64_t dvp = w->dvp;
    int64_t ldv;
    const FA_T *v = FN(key_rows)(p->v, e[FA_E_V], p->v_rs, p->v_cs, k0, bk, p->dv, dvp, w->vp, &ldv);
    for (int64_t cb = 0; cb < dvp; cb += FA_NVW) {
        const int nv = (int)fa_min64(FA_NV, (dvp - cb) / FA_W);
        for (int64_t r = 0; r < bq; r += FA_MR)
            FN(pv_block)((int)fa_min64(FA_MR, bq - r), nv, bk, w->st + r, FA_BQ, v + cb, ldv,
                         w->o + r * dvp + cb, dvp, w->alpha + r);
    }
}

/* ---- online softmax ----------------------------------------------------- */

/* Fold the score tile st[0..bk) into the running state of the item's rows,
 * FA_W rows at a time: new max, rescale factor alpha = exp(old max - new
 * max), weights exp(s - new max) in place, and the running sum.  A row that
 * has seen only -inf keeps max -inf; using 0 in its place makes its weights
 * exp(-inf) = 0 and its alpha 0 without a branch. */
static void FN(softmax_tile)(FN(scratch) *w, int64_t bqp, int64_t bk)
{
    for (int64_t c = 0; c < bqp; c += FA_W) {
        FA_T *col = w->st + c;
        fa_vec tmax = VBCAST((FA_T)-INFINITY);
        for (int64_t j = 0; j < bk; j++) tmax = VMAX(tmax, VLOAD(col + j * FA_BQ));
        const fa_vec mold = VLOAD(w->rmax + c);
        const fa_vec mnew = VMAX(tmax, mold);
        const fa_vec muse = VNEGINF0(mnew);
        fa_vec sum = VZERO();
        for (int64_t j = 0; j < bk; j++) {
            const fa_vec x = VEXP(VSUB(VLOAD(col + j * FA_BQ), muse));
            VSTORE(col + j * FA_BQ, x);
            sum = VADD(sum, x);
        }
        const fa_vec alpha = VEXP(VSUB(mold, muse));
        VSTORE(w->alpha + c, alpha);
        VSTORE(w->rsum + c, VFMA(VLOAD(w->rsum + c), alpha, sum));
        VSTORE(w->rmax + c, mnew);
    }
}

/* Plain dot weights: masked (-inf) scores weigh nothing. */
static void FN(dot_tile)(FN(scratch) *w, int64_t bqp, int64_t bk)
{
    for (int64_t j = 0; j < bk; j++)
        for (int64_t c = 0; c < bqp; c += FA_W) {
            FA_T *s = w->st + j * FA_BQ + c;
            VSTORE(s, VNEGINF0(VLOAD(s)));
        }
}

/* ---- work items --------------------------------------------------------- */

static void FN(store_rows)(const fa_problem *p, const int64_t *e, const FN(scratch) *w, int64_t row0,
                           int64_t bq, int normalise)
{
    const int64_t dv = p->dv;
    for (int64_t r = 0; r < bq; r++) {
        const int64_t i = row0 + r;
        const FA_T *src = w->o + r * w->dvp;
        FA_T inv = 1;
        if (normalise) inv = w->rsum[r] == 0 ? (FA_T)0 : (FA_T)1 / w->rsum[r];
        char *row = (char *)p->out + e[FA_E_OUT] + i * p->out_rs;
        if (p->out_cs == (int64_t)sizeof(FA_T)) {
            FA_T *dst = (FA_T *)row;
            for (int64_t c = 0; c < dv; c++) dst[c] = src[c] * inv;
        } else {
            for (int64_t c = 0; c < dv; c++) *(FA_T *)(row + c * p->out_cs) = src[c] * inv;
        }
        if (normalise && p->lse) {
            FA_T *l = (FA_T *)((char *)p->lse + e[FA_E_LSE] + i * p->lse_rs);
            *l = w->rsum[r] == 0 ? (FA_T)-INFINITY : w->rmax[r] + (FA_T)log((double)w->rsum[r]);
        }
    }
}

static void FN(start_rows)(FN(scratch) *w, int64_t bq)
{
    memset(w->o, 0, (size_t)(bq * w->dvp) * sizeof(FA_T));
    for (int64_t r = 0; r < FA_BQ; r++) {
        w->rmax[r] = (FA_T)-INFINITY;
        w->rsum[r] = 0;
        w->alpha[r] = 1;
    }
}

static void FN(attention_item)(const fa_problem *p, const int64_t *e, FN(scratch) *w, int64_t row0,
                               int64_t bq)
{
    const int64_t lq = e[FA_E_LQ], lk = e[FA_E_LK], bqp = fa_roundup64(bq, FA_W);
    const int softmax = p->weights == FA_WEIGHTS_SOFTMAX;
    FN(pack_transposed)(p->q, e[FA_E_Q], p->q_rs, p->q_cs, row0, bq, bqp, p->d, (FA_T)p->scale, w->qt,
                        FA_BQ);
    FN(start_rows)(w, bq);
    int64_t klo, khi, unused;
    fa_row_range(p, row0, lq, lk, &klo, &unused);
    fa_row_range(p, row0 + bq - 1, lq, lk, &unused, &khi);
    for (int64_t k0 = klo; k0 < khi; k0 += FA_BK) {
        const int64_t bk = fa_min64(FA_BK, khi - k0);
        FN(score_tile)(p, e, w, row0, bq, k0, bk);
        if (softmax)
            FN(softmax_tile)(w, bqp, bk);
        else
            FN(dot_tile)(w, bqp, bk);
        FN(pv_tile)(p, e, w, bq, k0, bk);
    }
    FN(store_rows)(p, e, w, row0, bq, softmax);
}

static void FN(scores_item)(const fa_problem *p, const int64_t *e, FN(scratch) *w, int64_t row0,
                            int64_t bq)
{
    const int64_t lk = e[FA_E_LK], bqp = fa_roundup64(bq, FA_W);
    FN(pack_transposed)(p->q, e[FA_E_Q], p->q_rs, p->q_cs, row0, bq, bqp, p->d, (FA_T)p->scale, w->qt,
                        FA_BQ);
    for (int64_t k0 = 0; k0 < lk; k0 += FA_BK) {
        const int64_t bk = fa_min64(FA_BK, lk - k0);
        FN(score_tile)(p, e, w, row0, bq, k0, bk);
        for (int64_t r = 0; r < bq; r++) {
            char *row = (char *)p->out + e[FA_E_OUT] + (row0 + r) * p->out_rs + k0 * p->out_cs;
            for (int64_t j = 0; j < bk; j++) *(FA_T *)(row + j * p->out_cs) = w->st[j * FA_BQ + r];
        }
    }
}

static void FN(wsum_item)(const fa_problem *p, const int64_t *e, FN(scratch) *w, int64_t row0,
                          int64_t bq)
{
    const int64_t lk = e[FA_E_LK], bqp = fa_roundup64(bq, FA_W);
    FN(start_rows)(w, bq);
    for (int64_t k0 = 0; k0 < lk; k0 += FA_BK) {
        const int64_t bk = fa_min64(FA_BK, lk - k0);
        /* W^T tile: st[j][r] = w[row0 + r][k0 + j] */
        FN(pack_transposed)(p->q, e[FA_E_Q] + k0 * p->q_cs, p->q_rs, p->q_cs, row0, bq, bqp, bk, 1,
                            w->st, FA_BQ);
        FN(pv_tile)(p, e, w, bq, k0, bk);
    }
    FN(store_rows)(p, e, w, row0, bq, 0);
}

/* ---- parallel driver ---------------------------------------------------- */

int FN(fa_run)(const fa_problem *p, int kind, const fa_item *items, int64_t n_items, int num_threads)
{
    int status = FA_OK;
    if (n_items <= 0) return FA_OK;
#pragma omp parallel num_threads(num_threads) if (num_threads > 1)
    {
        FN(scratch) w;
        const int ok = FN(scratch_alloc)(&w, p) == 0;
        if (!ok) {
#pragma omp atomic write
            status = FA_ERR_NOMEM;
        }
#pragma omp for schedule(dynamic, 1)
        for (int64_t t = 0; t < n_items; t++) {
            if (!ok) continue;
            const int64_t *e = p->entries + items[t].entry * FA_ENTRY_FIELDS;
            const int64_t row0 = items[t].row0, bq = fa_min64(FA_BQ, e[FA_E_LQ] - row0);
            switch (kind) {
            case FA_KIND_ATTENTION: FN(attention_item)(p, e, &w, row0, bq); break;
            case FA_KIND_SCORES: FN(scores_item)(p, e, &w, row0, bq); break;
            default: FN(wsum_item)(p, e, &w, row0, bq); break;
            }
        }
        if (ok) free(w.block);
    }
    return status;
}

/* ---- exp entry point for accuracy tests ---------------------------------- */

#if FA_T_IS_FLOAT
void FA_CAT(fa_exp, FA_SUFFIX)(const float *x, float *y, int64_t n)
{
    for (int64_t i = 0; i < n; i += FA_W) {
        FA_T buf[FA_W];
        const int64_t m = fa_min64(FA_W, n - i);
        for (int64_t j = 0; j < FA_W; j++) buf[j] = j < m ? x[i + j] : (FA_T)-INFINITY;
        VSTORE(buf, VEXP(VLOAD(buf)));
        for (int64_t j = 0; j < m; j++) y[i + j] = buf[j];
    }
}
#endif

#undef FA_NVW
#undef FN
