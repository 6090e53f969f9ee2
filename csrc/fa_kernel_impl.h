/*
 * fa_kernel_impl.h - the blocked attention kernels, written once.
 *
 * Included by each path file (fa_path_*.c) once per element type, after
 * fa_vec.h has defined the vector vocabulary, with:
 *   FA_T        float or double
 *   FA_SUFFIX   name suffix of this instance, e.g. f32_avx512
 *
 * A work item is up to FA_BQ query rows of one entry.  For attention it
 *   packs scale*Q once, then for each FA_BK-key tile the rows may see:
 *   packs K^T and V, computes the score tile with the Q.K^T micro-kernel,
 *   applies soft-cap, ALiBi, mask and causal/window bounds, updates the
 *   running row max and sum (online softmax) and accumulates P.V into a
 *   row-block accumulator that is rescaled as the max grows.
 * Nothing of size Lq x Lk is ever allocated: scratch is per thread and of
 * size O(FA_BQ x (D + Dv) + FA_BK x (D + Dv)).
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
    FA_T *qp;    /* FA_BQ x d: scale * Q rows of the item */
    FA_T *kt;    /* d x FA_BK: K^T of the current key tile */
    FA_T *vp;    /* FA_BK x dvp: V of the current key tile */
    FA_T *s;     /* FA_BQ x FA_BK: scores, then weights */
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
    const int64_t n_qp = fa_roundup64(FA_BQ * d, al), n_kt = fa_roundup64(d * FA_BK, al);
    const int64_t n_vp = fa_roundup64(FA_BK * dvp, al), n_s = FA_BQ * FA_BK;
    const int64_t n_o = fa_roundup64(FA_BQ * dvp, al), n_r = fa_roundup64(FA_BQ, al);
    const int64_t total = n_qp + n_kt + n_vp + n_s + n_o + 3 * n_r;
    if ((uint64_t)total > (uint64_t)SIZE_MAX / sizeof(FA_T)) return -1;
    FA_T *b = (FA_T *)aligned_alloc(64, (size_t)total * sizeof(FA_T));
    if (!b) return -1;
    w->block = b;
    w->qp = b;
    w->kt = w->qp + n_qp;
    w->vp = w->kt + n_kt;
    w->s = w->vp + n_vp;
    w->o = w->s + n_s;
    w->rmax = w->o + n_o;
    w->rsum = w->rmax + n_r;
    w->alpha = w->rsum + n_r;
    w->dvp = dvp;
    return 0;
}

/* ---- micro-kernels ------------------------------------------------------ */

/* s[r][c] = sum_k qp[r][k] * kt[k][c] for r < mr, c < nv * FA_W. */
FA_INLINE void FN(qk_mk)(const int mr, const int nv, int64_t d, const FA_T *qp, int64_t ldq,
                         const FA_T *kt, int64_t ldk, FA_T *s, int64_t lds)
{
    fa_vec acc[FA_MR_MAX][FA_NV_MAX];
    FA_UNROLL for (int r = 0; r < mr; r++) FA_UNROLL for (int v = 0; v < nv; v++) acc[r][v] = VZERO();
    for (int64_t k = 0; k < d; k++) {
        fa_vec b[FA_NV_MAX];
        FA_UNROLL for (int v = 0; v < nv; v++) b[v] = VLOAD(kt + k * ldk + v * FA_W);
        FA_UNROLL for (int r = 0; r < mr; r++)
        {
            const fa_vec a = VBCAST(qp[r * ldq + k]);
            FA_UNROLL for (int v = 0; v < nv; v++) acc[r][v] = VFMA(a, b[v], acc[r][v]);
        }
    }
    FA_UNROLL for (int r = 0; r < mr; r++) FA_UNROLL for (int v = 0; v < nv; v++)
        VSTORE(s + r * lds + v * FA_W, acc[r][v]);
}

/* o[r][c] = alpha[r] * o[r][c] + sum_j p[r][j] * vp[j][c] for r < mr, c < nv * FA_W. */
FA_INLINE void FN(pv_mk)(const int mr, const int nv, int64_t bk, const FA_T *p, int64_t ldp,
                         const FA_T *vp, int64_t ldv, FA_T *o, int64_t ldo, const FA_T *alpha)
{
    fa_vec acc[FA_MR_MAX][FA_NV_MAX];
    FA_UNROLL for (int r = 0; r < mr; r++)
    {
        const fa_vec a = VBCAST(alpha[r]);
        FA_UNROLL for (int v = 0; v < nv; v++) acc[r][v] = VMUL(a, VLOAD(o + r * ldo + v * FA_W));
    }
    for (int64_t j = 0; j < bk; j++) {
        fa_vec b[FA_NV_MAX];
        FA_UNROLL for (int v = 0; v < nv; v++) b[v] = VLOAD(vp + j * ldv + v * FA_W);
        FA_UNROLL for (int r = 0; r < mr; r++)
        {
            const fa_vec a = VBCAST(p[r * ldp + j]);
            FA_UNROLL for (int v = 0; v < nv; v++) acc[r][v] = VFMA(a, b[v], acc[r][v]);
        }
    }
    FA_UNROLL for (int r = 0; r < mr; r++) FA_UNROLL for (int v = 0; v < nv; v++)
        VSTORE(o + r * ldo + v * FA_W, acc[r][v]);
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

static void FN(qk_block)(int mr, int nv, int64_t d, const FA_T *qp, int64_t ldq, const FA_T *kt,
                         int64_t ldk, FA_T *s, int64_t lds)
{
#define FA_QK_CALL(m, n)                                                                            \
    if ((m) <= FA_MR && (n) <= FA_NV) FN(qk_mk)((m), (n), d, qp, ldq, kt, ldk, s, lds)
    FA_TILE_SWITCH(mr, nv, FA_QK_CALL)
#undef FA_QK_CALL
}

static void FN(pv_block)(int mr, int nv, int64_t bk, const FA_T *p, int64_t ldp, const FA_T *vp,
                         int64_t ldv, FA_T *o, int64_t ldo, const FA_T *alpha)
{
#define FA_PV_CALL(m, n)                                                                            \
    if ((m) <= FA_MR && (n) <= FA_NV) FN(pv_mk)((m), (n), bk, p, ldp, vp, ldv, o, ldo, alpha)
    FA_TILE_SWITCH(mr, nv, FA_PV_CALL)
#undef FA_PV_CALL
}

/* ---- packing ------------------------------------------------------------ */

#define FA_AT(base, off) (*(const FA_T *)((const char *)(base) + (off)))

/* qp[r][c] = scale * q[row0 + r][c] */
static void FN(pack_q)(const fa_problem *p, const int64_t *e, int64_t row0, int64_t bq, FA_T *qp,
                       FA_T scale)
{
    const int64_t d = p->d;
    for (int64_t r = 0; r < bq; r++) {
        const char *row = (const char *)p->q + e[FA_E_Q] + (row0 + r) * p->q_rs;
        FA_T *dst = qp + r * d;
        if (p->q_cs == (int64_t)sizeof(FA_T)) {
            const FA_T *src = (const FA_T *)row;
            for (int64_t c = 0; c < d; c++) dst[c] = scale * src[c];
        } else {
            for (int64_t c = 0; c < d; c++) dst[c] = scale * FA_AT(row, c * p->q_cs);
        }
    }
}

/* kt[c][j] = k[k0 + j][c] for j < bk; columns bk..ncols are zero. */
static void FN(pack_kt)(const fa_problem *p, const int64_t *e, int64_t k0, int64_t bk, int64_t ncols,
                        FA_T *kt)
{
    const int64_t d = p->d;
    for (int64_t j = 0; j < bk; j++) {
        const char *row = (const char *)p->k + e[FA_E_K] + (k0 + j) * p->k_rs;
        if (p->k_cs == (int64_t)sizeof(FA_T)) {
            const FA_T *src = (const FA_T *)row;
            for (int64_t c = 0; c < d; c++) kt[c * FA_BK + j] = src[c];
        } else {
            for (int64_t c = 0; c < d; c++) kt[c * FA_BK + j] = FA_AT(row, c * p->k_cs);
        }
    }
    if (bk < ncols)
        for (int64_t c = 0; c < d; c++)
            for (int64_t j = bk; j < ncols; j++) kt[c * FA_BK + j] = 0;
}

/* vp[j][c] = v[k0 + j][c] for c < dv; columns dv..dvp are zero.  The base
 * pointer and strides are passed so fa_weighted_sum's w can reuse this. */
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

/* ---- score tile --------------------------------------------------------- */

/* Options that act on one row of scores s[0..bk) (keys k0..k0+bk) of query
 * row i: soft-cap, ALiBi, the mask, then causal/window bounds (-inf). */
static void FN(score_row)(const fa_problem *p, const int64_t *e, int64_t i, int64_t k0, int64_t bk,
                          FA_T *s)
{
    const int64_t lq = e[FA_E_LQ], lk = e[FA_E_LK];
    if (p->softcap > 0) {
        const FA_T cap = (FA_T)p->softcap, inv = (FA_T)(1.0 / p->softcap);
        for (int64_t j = 0; j < bk; j++) s[j] = cap * (FA_T)tanh((double)(s[j] * inv));
    }
    if (p->alibi_slopes) {
        const FA_T slope = (FA_T)p->alibi_slopes[e[FA_E_HEAD]];
        const int64_t pos = i + lk - lq;
        for (int64_t j = 0; j < bk; j++) {
            const int64_t dist = pos - (k0 + j);
            s[j] -= slope * (FA_T)(dist < 0 ? -dist : dist);
        }
    }
    if (p->mask_kind != FA_MASK_NONE) {
        const char *m = (const char *)p->mask + e[FA_E_MASK] + i * p->mask_rs + k0 * p->mask_cs;
        const int64_t cs = p->mask_cs;
        switch (p->mask_kind) {
        case FA_MASK_BOOL:
            for (int64_t j = 0; j < bk; j++)
                if (!m[j * cs]) s[j] = -INFINITY;
            break;
        case FA_MASK_F32:
            for (int64_t j = 0; j < bk; j++) s[j] += (FA_T) * (const float *)(m + j * cs);
            break;
        case FA_MASK_F64:
            for (int64_t j = 0; j < bk; j++) s[j] += (FA_T) * (const double *)(m + j * cs);
            break;
        default: break;
        }
    }
    int64_t lo, hi;
    fa_row_range(p, i, lq, lk, &lo, &hi);
    const int64_t a = fa_min64(fa_max64(lo - k0, 0), bk), b = fa_max64(fa_min64(hi - k0, bk), 0);
    for (int64_t j = 0; j < a; j++) s[j] = -INFINITY;
    for (int64_t j = (b > a ? b : a); j < bk; j++) s[j] = -INFINITY;
}

/* s = (packed, scaled q rows) . K[k0:k0+bk]^T with every score option applied. */
static void FN(score_tile)(const fa_problem *p, const int64_t *e, FN(scratch) *w, int64_t row0,
                           int64_t bq, int64_t k0, int64_t bk)
{
    const int64_t ncols = fa_roundup64(bk, FA_NVW);
    FN(pack_kt)(p, e, k0, bk, ncols, w->kt);
    for (int64_t cb = 0; cb < ncols; cb += FA_NVW)
        for (int64_t r = 0; r < bq; r += FA_MR)
            FN(qk_block)((int)fa_min64(FA_MR, bq - r), FA_NV, p->d, w->qp + r * p->d, p->d, w->kt + cb,
                         FA_BK, w->s + r * FA_BK + cb, FA_BK);
    for (int64_t r = 0; r < bq; r++) FN(score_row)(p, e, row0 + r, k0, bk, w->s + r * FA_BK);
}

/* o[0..bq) = alpha * o + s[0..bq)[0..bk) . vp */
static void FN(pv_tile)(FN(scratch) *w, int64_t bq, int64_t bk)
{
    const int64_t dvp = w->dvp;
    for (int64_t cb = 0; cb < dvp; cb += FA_NVW) {
        const int nv = (int)fa_min64(FA_NV, (dvp - cb) / FA_W);
        for (int64_t r = 0; r < bq; r += FA_MR)
            FN(pv_block)((int)fa_min64(FA_MR, bq - r), nv, bk, w->s + r * FA_BK, FA_BK, w->vp + cb, dvp,
                         w->o + r * dvp + cb, dvp, w->alpha + r);
    }
}

/* ---- online softmax ----------------------------------------------------- */

/* Row max of s[0..n), n a multiple of FA_W. */
static FA_T FN(row_max)(const FA_T *s, int64_t n)
{
    fa_vec m = VBCAST((FA_T)-INFINITY);
    for (int64_t j = 0; j < n; j += FA_W) m = VMAX(m, VLOAD(s + j));
    return VHMAX(m);
}

/* s[j] = exp(s[j] - mx) for j < n (n a multiple of FA_W); returns the sum. */
static FA_T FN(row_exp_sum)(FA_T *s, int64_t n, FA_T mx)
{
#if FA_HAS_VEXP
    const fa_vec vm = VBCAST(mx);
    fa_vec acc = VZERO();
    for (int64_t j = 0; j < n; j += FA_W) {
        const fa_vec y = VEXP(VSUB(VLOAD(s + j), vm));
        VSTORE(s + j, y);
        acc = VFMA(y, VBCAST((FA_T)1), acc);
    }
    return VHSUM(acc);
#else
    FA_T sum = 0;
    for (int64_t j = 0; j < n; j++) {
        s[j] = (FA_T)exp((double)(s[j] - mx));
        sum += s[j];
    }
    return sum;
#endif
}

/* Fold one tile of scores s[0..bk) into the row state: s becomes the
 * unnormalised weights, *alpha the factor the accumulator must be scaled by. */
static void FN(softmax_row)(FA_T *s, int64_t bk, FA_T *rmax, FA_T *rsum, FA_T *alpha)
{
    const int64_t n = fa_roundup64(bk, FA_W);
    for (int64_t j = bk; j < n; j++) s[j] = (FA_T)-INFINITY;
    const FA_T tmax = FN(row_max)(s, n);
    const FA_T mnew = tmax > *rmax ? tmax : (tmax != tmax ? tmax : *rmax);
    if (mnew == (FA_T)-INFINITY) { /* nothing visible yet in this row */
        memset(s, 0, (size_t)bk * sizeof(FA_T));
        *alpha = 1;
        return;
    }
    *alpha = *rmax == (FA_T)-INFINITY ? (FA_T)0 : (FA_T)exp((double)(*rmax - mnew));
    const FA_T sum = FN(row_exp_sum)(s, n, mnew);
    *rsum = *rsum * *alpha + sum;
    *rmax = mnew;
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

static void FN(attention_item)(const fa_problem *p, const int64_t *e, FN(scratch) *w, int64_t row0,
                               int64_t bq)
{
    const int64_t lq = e[FA_E_LQ], lk = e[FA_E_LK];
    const int softmax = p->weights == FA_WEIGHTS_SOFTMAX;
    FN(pack_q)(p, e, row0, bq, w->qp, (FA_T)p->scale);
    memset(w->o, 0, (size_t)(bq * w->dvp) * sizeof(FA_T));
    for (int64_t r = 0; r < bq; r++) {
        w->rmax[r] = (FA_T)-INFINITY;
        w->rsum[r] = 0;
        w->alpha[r] = 1;
    }
    int64_t klo, khi, unused;
    fa_row_range(p, row0, lq, lk, &klo, &unused);
    fa_row_range(p, row0 + bq - 1, lq, lk, &unused, &khi);
    for (int64_t k0 = klo; k0 < khi; k0 += FA_BK) {
        const int64_t bk = fa_min64(FA_BK, khi - k0);
        FN(score_tile)(p, e, w, row0, bq, k0, bk);
        FN(pack_rows)(p->v, e[FA_E_V], p->v_rs, p->v_cs, k0, bk, p->dv, w->vp, w->dvp);
        for (int64_t r = 0; r < bq; r++) {
            FA_T *s = w->s + r * FA_BK;
            if (softmax) {
                FN(softmax_row)(s, bk, w->rmax + r, w->rsum + r, w->alpha + r);
            } else { /* plain dot weights: masked keys weigh nothing */
                for (int64_t j = 0; j < bk; j++)
                    if (s[j] == (FA_T)-INFINITY) s[j] = 0;
            }
        }
        FN(pv_tile)(w, bq, bk);
    }
    FN(store_rows)(p, e, w, row0, bq, softmax);
}

static void FN(scores_item)(const fa_problem *p, const int64_t *e, FN(scratch) *w, int64_t row0,
                            int64_t bq)
{
    const int64_t lk = e[FA_E_LK];
    FN(pack_q)(p, e, row0, bq, w->qp, (FA_T)p->scale);
    for (int64_t k0 = 0; k0 < lk; k0 += FA_BK) {
        const int64_t bk = fa_min64(FA_BK, lk - k0);
        FN(score_tile)(p, e, w, row0, bq, k0, bk);
        for (int64_t r = 0; r < bq; r++) {
            char *row = (char *)p->out + e[FA_E_OUT] + (row0 + r) * p->out_rs + k0 * p->out_cs;
            const FA_T *src = w->s + r * FA_BK;
            for (int64_t j = 0; j < bk; j++) *(FA_T *)(row + j * p->out_cs) = src[j];
        }
    }
}

static void FN(wsum_item)(const fa_problem *p, const int64_t *e, FN(scratch) *w, int64_t row0,
                          int64_t bq)
{
    const int64_t lk = e[FA_E_LK];
    memset(w->o, 0, (size_t)(bq * w->dvp) * sizeof(FA_T));
    for (int64_t r = 0; r < bq; r++) w->alpha[r] = 1;
    for (int64_t k0 = 0; k0 < lk; k0 += FA_BK) {
        const int64_t bk = fa_min64(FA_BK, lk - k0);
        /* the weight rows are w[row0 + r][k0 .. k0 + bk) */
        FN(pack_rows)(p->q, e[FA_E_Q] + k0 * p->q_cs, p->q_rs, p->q_cs, row0, bq, bk, w->s, FA_BK);
        FN(pack_rows)(p->v, e[FA_E_V], p->v_rs, p->v_cs, k0, bk, p->dv, w->vp, w->dvp);
        FN(pv_tile)(w, bq, bk);
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
        FN(row_exp_sum)(buf, FA_W, 0);
        for (int64_t j = 0; j < m; j++) y[i + j] = buf[j];
    }
}
#endif

#undef FA_NVW
#undef FN
