/*
 * fa_kernel_impl.h - the blocked attention kernels, written once.
 *
 * Included by fa_path_instances.h once per element type and path (and by
 * fa_path_avx512bf16.c), after fa_vec.h has defined the vector vocabulary,
 * with:
 *   FA_T        compute type, float or double
 *   FA_S        storage type of q, k, v, w and out (FA_T, or uint16_t for
 *               float16 / bfloat16, FA_S_KIND 1 / 2)
 *   FA_SUFFIX   name suffix of this instance, e.g. f32_avx512
 *   FA_BF16_DP  1: bfloat16 products on vdpbf16ps (see "bfloat16 with
 *               AVX512-BF16" below)
 *
 * Layout.  A work item is up to FA_BQ query rows of one entry.  Its queries
 * are packed once, transposed and pre-scaled (qt: D x FA_BQ), so the score
 * tile is computed as S^T = K . Q^T: the micro-kernel broadcasts elements of
 * K rows, read in place, against vectors of FA_W queries.  With queries
 * along the vector lanes, the online softmax needs no horizontal reductions:
 * the row max, the exponentials, the row sum and the rescale factor of
 * FA_W queries are each one vector operation per key.  P.V then broadcasts
 * weights (contiguous in P^T) against vectors of V rows, again read in place.
 * K and V are copied into scratch only when their layout or storage type
 * requires it.  Items of at most FA_ROWS_MAX rows (decoding) compute their
 * scores as dot products along D instead (qk_rows) and P.V two rows at a
 * time against whole V rows (pv_rows_block); being bound by memory, they
 * read each K and V row front to back, row after row, and prefetch the rows
 * they will need two tiles ahead.
 *
 * Nothing of size Lq x Lk is ever allocated: scratch is per thread,
 * O(FA_BQ x (D + Dv) + FA_BK x (FA_BQ + D + Dv)).
 */

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "fa_half.h"

#define FN(name) FA_CAT(name, FA_SUFFIX)

#ifndef FA_INLINE
#define FA_INLINE static inline __attribute__((always_inline))
#endif

#ifndef FA_UNROLL
#define FA_UNROLL _Pragma("GCC unroll 16")
#endif

/* A compiler-only barrier between the loads of consecutive K or V rows in
 * the decoding kernels.  Without it the compiler hoists the first loads of
 * every row of a block above the rest, and a block is then read in an order
 * the hardware prefetchers do not follow (half the bandwidth). */
#ifndef FA_IN_ORDER
#define FA_IN_ORDER() __asm__ volatile("" ::: "memory")
#endif

/* Width, in elements, of one micro-kernel column block. */
#define FA_NVW (FA_NV * FA_W)
/* Most vectors of a row pv_mk accumulates: FA_NV, or FA_RV for few rows. */
#define FA_PV_NV_MAX (FA_NV_MAX > FA_RV_MAX ? FA_NV_MAX : FA_RV_MAX)

typedef struct {
    FA_T *qt;    /* d x FA_BQ: scale * Q^T of the item, zero past its rows */
    FA_T *kp;    /* FA_BK x d: K rows, when they cannot be read in place */
    FA_T *vp;    /* FA_BK x dvp: V rows, when they cannot be read in place */
    FA_T *st;    /* FA_BK x FA_BQ: scores S^T, then weights P^T */
    FA_T *o;     /* FA_BQ x dvp: output accumulator */
    FA_T *rmax;  /* FA_BQ: running row max */
    FA_T *rsum;  /* FA_BQ: running row sum of exp */
    FA_T *alpha; /* FA_BQ: per-tile rescale of the accumulator */
    uint32_t *pw; /* FA_BK/2 x FA_BQ: bfloat16 weight pairs (dot-product path) */
    int64_t dvp; /* dv rounded up to the vector width */
    int64_t qoff, ldq; /* few-row items: lead and length of the packed Q rows (see pack_q) */
    int64_t voff, ldo; /* lead of the columns in the accumulator's rows, and their length (see plan_v) */
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
    const int64_t n_qt = fa_roundup64((d + 2 * FA_W) * FA_BQ, al), n_kp = fa_roundup64(FA_BK * d, al);
    const int64_t n_vp = fa_roundup64(FA_BK * dvp, al), n_st = FA_BK * FA_BQ;
    const int64_t n_o = fa_roundup64(FA_BQ * dvp, al), n_r = fa_roundup64(FA_BQ, al);
    const int64_t n_pw = FA_BK / 2 * FA_BQ * 4 / (int64_t)sizeof(FA_T);
    const int64_t total = n_qt + n_kp + n_vp + n_st + n_o + 3 * n_r + n_pw;
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
    w->pw = (uint32_t *)(w->alpha + n_r);
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

/* The few-row kernels read K and V rows in place as vectors of FA_T or, on
 * the AVX-512 float16 path (FA_HALF_ROWS), as float16 converted on load
 * (h = 1): half the bytes of float32, no packing pass. */
#undef FA_HALF_ROWS
#if FA_S_KIND == 1 && FA_VEC_ISA == 2 && FA_T_IS_FLOAT
#define FA_HALF_ROWS 1
#else
#define FA_HALF_ROWS 0
#endif

/* Bytes per element of rows read in place (h: float16). */
#define FA_ROW_ES(h) ((h) ? 2 : (int64_t)sizeof(FA_T))

/* Vector c of nc of a row at k, of FA_T or of float16 (h); with `masked`,
 * masked by mlo if it is the first and by mhi if it is the last (h, masked,
 * c and nc known at compile time). */
FA_INLINE fa_vec FN(rvec)(const int h, const int masked, const int c, const int nc, const char *k, fa_mask mlo,
                          fa_mask mhi)
{
#if FA_HALF_ROWS
    if (h) {
        const uint16_t *p = (const uint16_t *)k + c * FA_W;
        if (masked && c == 0 && nc == 1) return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(VMASK_AND(mlo, mhi), p));
        if (masked && c == 0) return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mlo, p));
        if (masked && c == nc - 1) return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mhi, p));
        return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)p));
    }
#endif
    (void)h;
    const FA_T *p = (const FA_T *)k + c * FA_W;
    if (masked && c == 0 && nc == 1) return VLOAD_MASKZ(VMASK_AND(mlo, mhi), p);
    if (masked && c == 0) return VLOAD_MASKZ(mlo, p);
    if (masked && c == nc - 1) return VLOAD_MASKZ(mhi, p);
    return VLOAD(p);
}

/* One vector at p under mask m, of FA_T or of float16 (h). */
static inline fa_vec FN(rvec_m)(int h, fa_mask m, const char *p)
{
#if FA_HALF_ROWS
    if (h) return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, p));
#endif
    (void)h;
    return VLOAD_MASKZ(m, (const FA_T *)p);
}

/* o[r][x] = alpha[r] * o[r][x] + sum_j pt[j * ldp + r * ldr] * v[j][x] for
 * r < mr, x < nv * FA_W (the weights as P^T: ldr = 1; as P rows: ldp = 1).
 * V rows ldvb bytes apart, of FA_T or of float16 (h); with `masked`, the
 * first and last vector of each V row are masked by mlo and mhi (see
 * rvec). */
FA_INLINE void FN(pv_mk)(const int mr, const int nv, const int masked, const int h, int64_t bk, const FA_T *pt,
                         int64_t ldp, int64_t ldr, const char *v, int64_t ldvb, FA_T *o, int64_t ldo,
                         const FA_T *alpha, fa_mask mlo, fa_mask mhi)
{
    fa_vec acc[FA_MR_MAX][FA_PV_NV_MAX];
    FA_UNROLL for (int r = 0; r < mr; r++)
    {
        const fa_vec a = VBCAST(alpha[r]);
        FA_UNROLL for (int x = 0; x < nv; x++) acc[r][x] = VMUL(a, VLOAD(o + r * ldo + x * FA_W));
    }
    for (int64_t j = 0; j < bk; j++) {
        fa_vec bv[FA_PV_NV_MAX];
        FA_UNROLL for (int x = 0; x < nv; x++) bv[x] = FN(rvec)(h, masked, x, nv, v + j * ldvb, mlo, mhi);
        FA_UNROLL for (int r = 0; r < mr; r++)
        {
            const fa_vec a = VBCAST(pt[j * ldp + r * ldr]);
            FA_UNROLL for (int x = 0; x < nv; x++) acc[r][x] = VFMA(a, bv[x], acc[r][x]);
        }
    }
    FA_UNROLL for (int r = 0; r < mr; r++) FA_UNROLL for (int x = 0; x < nv; x++)
        VSTORE(o + r * ldo + x * FA_W, acc[r][x]);
}

/* Rows of K and V to prefetch while a few-row (decoding) tile is computed:
 * n rows each, from k and v (row strides k_rs, v_rs; bytes per row kb, vb). */
typedef struct {
    const char *k, *v;
    int64_t k_rs, v_rs, kb, vb, n;
} FN(prefetch_plan);

/* Prefetch row j of the plan (K and V), if it has one. */
static inline void FN(prefetch_row)(const FN(prefetch_plan) *pf, int64_t j)
{
    if (j >= pf->n) return;
    for (int64_t b = 0; b < pf->kb; b += 64) __builtin_prefetch(pf->k + j * pf->k_rs + b, 0, 2);
    for (int64_t b = 0; b < pf->vb; b += 64) __builtin_prefetch(pf->v + j * pf->v_rs + b, 0, 2);
}

/* Lane j = sum of the lanes of a[j] (j < FA_W). */
static inline fa_vec FN(hsums)(const fa_vec *a)
{
#ifdef VHSUMS
    return VHSUMS(a);
#else
    FA_T t[FA_W];
    for (int j = 0; j < FA_W; j++) t[j] = VHSUM(a[j]);
    return VLOAD(t);
#endif
}

/* Vectors of a query row qk_rows keeps in registers: FA_RV, and one more
 * for a row that starts part-way into a vector. */
#define FA_QV (FA_RV + 1)
#define FA_QV_MAX (FA_RV_MAX + 1)

/* acc[j] += sum_c q[c] k[j][c] over nc vectors (c < nc * FA_W) for j <
 * FA_W: the query chunk in registers, each key row read front to back, key
 * after key, so a block of K streams from memory in address order.  With
 * `masked`, the first and last vector of each row are masked by mlo and
 * mhi. */
FA_INLINE void FN(qk_rows_mk)(const int nc, const int masked, const int h, const FA_T *q, const char *k,
                              int64_t ldkb, fa_mask mlo, fa_mask mhi, fa_vec *acc)
{
    fa_vec qv[FA_QV_MAX];
    FA_UNROLL for (int c = 0; c < nc; c++) qv[c] = VLOAD(q + c * FA_W);
    FA_UNROLL for (int j = 0; j < FA_W; j++)
    {
        FA_UNROLL for (int c = 0; c < nc; c++) acc[j] = VFMA(FN(rvec)(h, masked, c, nc, k, mlo, mhi), qv[c], acc[j]);
        k += ldkb;
        FA_IN_ORDER();
    }
}

/* Scores of a few query rows (decoding), as rows: s[r][j] = q[r] . k[j] for
 * j < bk, r < bq (rows lds apart).  With so few rows the S^T micro-kernel
 * would leave most vector lanes idle; here the lanes run along D instead,
 * FA_W keys at a time, and one reduction tree turns FA_W dot-product
 * vectors into FA_W scores.  Each query row is swept against the key block
 * in turn: the first sweep reads the block from memory in address order
 * (which the hardware prefetchers follow; a column-wise order halves the
 * bandwidth), the others find it in L1.
 *
 * Alignment: K rows whose start lies `off` elements into a vector (the same
 * for every row: see k_lead) are read as ldq / FA_W whole, aligned vectors
 * from that vector's start, the first and last masked to the row; the
 * packed query rows qr (ldq apart) hold off zeros, then q.  Loads that
 * straddle cache lines would cost twice.  Rows that fill whole vectors need
 * no masks (masked loads slow the streaming down a little).  K rows are
 * ldkb bytes apart, of FA_T or of float16 (h). */
static void FN(qk_rows)(int64_t bq, int64_t d, int64_t off, const FA_T *qr, int64_t ldq, const char *k,
                        int64_t ldkb, int h, int64_t bk, FA_T *st, int64_t lds, const FN(prefetch_plan) *pf)
{
    const int64_t nvec = ldq / FA_W, es = FA_ROW_ES(h);
    const fa_mask m_first = VMASK((int)off, FA_W), m_last = VMASK(0, (int)(off + d - (nvec - 1) * FA_W));
    const int masked = off != 0 || d % FA_W != 0;
    const char *ka = k - off * es;
    for (int64_t j0 = 0; j0 < bk; j0 += FA_W) {
        const char *kb = ka + j0 * ldkb;
        /* spread the prefetch of later K and V rows over the work, as many
         * rows per key block as the block has keys, so requests never pile up */
        for (int64_t j = j0; j < j0 + FA_W; j++) FN(prefetch_row)(pf, j);
        if (bk - j0 < FA_W) { /* the last keys of the tile, one at a time */
            for (int64_t r = 0; r < bq; r++)
                for (int64_t j = j0; j < bk; j++) {
                    fa_vec a = VZERO();
                    for (int64_t c = 0; c < nvec; c++) {
                        const fa_mask m = VMASK_AND(c == 0 ? m_first : VMASK_ALL, c == nvec - 1 ? m_last : VMASK_ALL);
                        a = VFMA(FN(rvec_m)(h, m, ka + j * ldkb + c * FA_W * es), VLOAD(qr + r * ldq + c * FA_W), a);
                    }
                    st[r * lds + j] = VHSUM(a);
                }
            continue;
        }
        for (int64_t r = 0; r < bq; r++) {
            const FA_T *q = qr + r * ldq;
            fa_vec acc[FA_W];
            FA_UNROLL for (int j = 0; j < FA_W; j++) acc[j] = VZERO();
            for (int64_t c = 0; c < nvec; c += FA_QV) {
                const int nc = (int)fa_min64(FA_QV, nvec - c);
                const fa_mask mlo = c == 0 ? m_first : VMASK_ALL, mhi = c + nc == nvec ? m_last : VMASK_ALL;
#define FA_QKR_CALL(n)                                                                              \
    do {                                                                                            \
        const char *kc = kb + c * FA_W * es;                                                        \
        if (FA_HALF_ROWS && h && masked)                                                            \
            FN(qk_rows_mk)((n), 1, 1, q + c * FA_W, kc, ldkb, mlo, mhi, acc);                       \
        else if (FA_HALF_ROWS && h)                                                                 \
            FN(qk_rows_mk)((n), 0, 1, q + c * FA_W, kc, ldkb, mlo, mhi, acc);                       \
        else if (masked)                                                                            \
            FN(qk_rows_mk)((n), 1, 0, q + c * FA_W, kc, ldkb, mlo, mhi, acc);                       \
        else                                                                                        \
            FN(qk_rows_mk)((n), 0, 0, q + c * FA_W, kc, ldkb, mlo, mhi, acc);                       \
    } while (0)
                switch (nc) { /* compile-time chunk widths */
                case 1: FA_QKR_CALL(1); break;
                case 2: FA_QKR_CALL(2); break;
                case 3: FA_QKR_CALL(3); break;
                case 4: FA_QKR_CALL(4); break;
                case 5: if (FA_QV >= 5) FA_QKR_CALL(5); break;
                case 6: if (FA_QV >= 6) FA_QKR_CALL(6); break;
                case 7: if (FA_QV >= 7) FA_QKR_CALL(7); break;
                case 8: if (FA_QV >= 8) FA_QKR_CALL(8); break;
                default: if (FA_QV >= 9) FA_QKR_CALL(9); break;
                }
#undef FA_QKR_CALL
            }
            VSTORE(st + r * lds + j0, FN(hsums)(acc));
        }
    }
}

/* Few enough rows for qk_rows?  (Only where vectors are wide.) */
#define FA_ROWS_MAX (FA_W >= 8 ? FA_W / 2 : 0)

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

static void FN(pv_block)(int mr, int nv, int64_t bk, const FA_T *pt, int64_t ldp, int64_t ldr, const FA_T *v,
                         int64_t ldv, FA_T *o, int64_t ldo, const FA_T *alpha)
{
#define FA_PV_CALL(m, n)                                                                            \
    if ((m) <= FA_MR && (n) <= FA_NV)                                                               \
    FN(pv_mk)((m), (n), 0, 0, bk, pt, ldp, ldr, (const char *)v, ldv * (int64_t)sizeof(FA_T), o, ldo, alpha,   \
              VMASK_ALL, VMASK_ALL)
    FA_TILE_SWITCH(mr, nv, FA_PV_CALL)
#undef FA_PV_CALL
}

/* pv_mk for at most two rows of weights (P as rows, ldr apart) and
 * nv <= FA_RV vectors of V (rows ldvb bytes apart, of FA_T or of float16
 * if h): each V row is read whole, front to back, the first and last vector
 * masked if `masked`. */
static void FN(pv_rows_block)(int mr, int nv, int masked, int h, int64_t bk, const FA_T *p, int64_t ldr,
                              const char *v, int64_t ldvb, FA_T *o, int64_t ldo, const FA_T *alpha, fa_mask mlo,
                              fa_mask mhi)
{
#define FA_PVR_CALL(m, n)                                                                           \
    if ((n) > FA_RV)                                                                                \
        ;                                                                                           \
    else if (FA_HALF_ROWS && h && masked)                                                           \
        FN(pv_mk)((m), (n), 1, 1, bk, p, 1, ldr, v, ldvb, o, ldo, alpha, mlo, mhi);                 \
    else if (FA_HALF_ROWS && h)                                                                     \
        FN(pv_mk)((m), (n), 0, 1, bk, p, 1, ldr, v, ldvb, o, ldo, alpha, mlo, mhi);                 \
    else if (masked)                                                                                \
        FN(pv_mk)((m), (n), 1, 0, bk, p, 1, ldr, v, ldvb, o, ldo, alpha, mlo, mhi);                 \
    else                                                                                            \
        FN(pv_mk)((m), (n), 0, 0, bk, p, 1, ldr, v, ldvb, o, ldo, alpha, mlo, mhi)
    switch (mr * 16 + nv) {
    case 16 + 1: FA_PVR_CALL(1, 1); break;
    case 16 + 2: FA_PVR_CALL(1, 2); break;
    case 16 + 3: FA_PVR_CALL(1, 3); break;
    case 16 + 4: FA_PVR_CALL(1, 4); break;
    case 16 + 5: FA_PVR_CALL(1, 5); break;
    case 16 + 6: FA_PVR_CALL(1, 6); break;
    case 16 + 7: FA_PVR_CALL(1, 7); break;
    case 16 + 8: FA_PVR_CALL(1, 8); break;
    case 32 + 1: FA_PVR_CALL(2, 1); break;
    case 32 + 2: FA_PVR_CALL(2, 2); break;
    case 32 + 3: FA_PVR_CALL(2, 3); break;
    case 32 + 4: FA_PVR_CALL(2, 4); break;
    case 32 + 5: FA_PVR_CALL(2, 5); break;
    case 32 + 6: FA_PVR_CALL(2, 6); break;
    case 32 + 7: FA_PVR_CALL(2, 7); break;
    case 32 + 8: FA_PVR_CALL(2, 8); break;
    default: break;
    }
#undef FA_PVR_CALL
}

/* ---- operands ----------------------------------------------------------- */

/* Storage reads and writes: FA_LD(p) gives the FA_T value of the FA_S at p,
 * FA_ST(x) the FA_S nearest the FA_T x. */
#if FA_S_KIND == 0
#define FA_LD(p) (*(p))
#define FA_ST(x) (x)
#elif FA_S_KIND == 1 && FA_VEC_ISA >= 1
#define FA_LD(p) _cvtsh_ss(*(p))
#define FA_ST(x) ((uint16_t)_cvtss_sh((x), _MM_FROUND_TO_NEAREST_INT))
#elif FA_S_KIND == 1
#define FA_LD(p) fa_f16_to_f32(*(p))
#define FA_ST(x) fa_f32_to_f16(x)
#else
#define FA_LD(p) fa_bf16_to_f32(*(p))
#define FA_ST(x) fa_f32_to_bf16(x)
#endif
#define FA_AT(base, off) FA_LD((const FA_S *)((const char *)(base) + (off)))

/* Can rows of this array be read in place as contiguous vectors of FA_T? */
static inline int FN(rows_in_place)(int64_t rs, int64_t cs)
{
    return sizeof(FA_S) == sizeof(FA_T) && cs == (int64_t)sizeof(FA_T) && rs % (int64_t)sizeof(FA_T) == 0;
}

/* How the few-row kernels read the rows of this array in place: 1 as
 * float16 (FA_HALF_ROWS), 0 as FA_T, -1 not at all (they are packed). */
static inline int FN(few_rows_kind)(int64_t rs, int64_t cs)
{
    if (FA_HALF_ROWS && cs == 2 && rs % 2 == 0) return 1;
    return FN(rows_in_place)(rs, cs) ? 0 : -1;
}

/* The lead, in elements, of rows read in place by the few-row kernels
 * (kind as few_rows_kind) starting at address a, rows rs bytes apart: where
 * they start within a vector, or 0 unless every row starts there. */
static inline int64_t FN(rows_lead)(int kind, uintptr_t a, int64_t rs)
{
    if (kind < 0) return 0;
    const int64_t es = FA_ROW_ES(kind), vb = FA_W * es;
    if (rs % vb != 0 || a % (uintptr_t)es != 0) return 0;
    return (int64_t)(a % (uintptr_t)vb) / es;
}

/* out[c] = row[c] (converted to FA_T) for c < n, elements cs bytes apart. */
static inline void FN(load_row)(const char *row, int64_t cs, int64_t n, FA_T *out)
{
    if (cs != (int64_t)sizeof(FA_S)) {
        for (int64_t c = 0; c < n; c++) out[c] = FA_AT(row, c * cs);
        return;
    }
    const FA_S *src = (const FA_S *)row;
#if FA_S_KIND == 0
    memcpy(out, src, (size_t)n * sizeof(FA_T));
#else
    int64_t c = 0;
#if FA_S_KIND == 1 && FA_VEC_ISA >= 1
    for (; c + 8 <= n; c += 8) _mm256_storeu_ps(out + c, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(src + c))));
#endif
    for (; c < n; c++) out[c] = FA_LD(src + c);
#endif
}

/* dst[j][c] = src[r0 + j][c] for c < nc, zero for nc <= c < ld. */
static void FN(pack_rows)(const void *base, int64_t off, int64_t rs, int64_t cs, int64_t r0, int64_t nr,
                          int64_t nc, FA_T *dst, int64_t ld)
{
    for (int64_t j = 0; j < nr; j++) {
        FN(load_row)((const char *)base + off + (r0 + j) * rs, cs, nc, dst + j * ld);
        for (int64_t c = nc; c < ld; c++) dst[j * ld + c] = 0;
    }
}

/* dst[c][r] = scale * src[r0 + r][c] for r < nr, c < nc; zero for nr <= r < nrp,
 * where row v of src is row v % lq of head v / lq (heads hs bytes apart).
 * Packs Q^T (and, for fa_weighted_sum, W^T). */
static void FN(pack_transposed)(const void *base, int64_t off, int64_t rs, int64_t cs, int64_t lq,
                                int64_t hs, int64_t r0, int64_t nr, int64_t nrp, int64_t nc, FA_T scale,
                                FA_T *dst, int64_t ld)
{
    for (int64_t r = 0; r < nr; r++) {
        const char *row = (const char *)base + off + fa_vrow_off(r0 + r, lq, rs, hs);
        for (int64_t c = 0; c < nc; c++) dst[c * ld + r] = scale * FA_AT(row, c * cs);
    }
    for (int64_t c = 0; c < nc; c++)
        for (int64_t r = nr; r < nrp; r++) dst[c * ld + r] = 0;
}

/* Where an entry's K rows start within a vector, in elements (see
 * qk_rows): 0 unless they are read in place with a row stride that keeps
 * every row at the same place. */
static int64_t FN(k_lead)(const fa_problem *p, const int64_t *e)
{
    return FN(rows_lead)(FN(few_rows_kind)(p->k_rs, p->k_cs), (uintptr_t)((const char *)p->k + e[FA_E_K]),
                         p->k_rs);
}

/* The item's scaled query rows into w->qt: as Q^T (d x FA_BQ, zero past
 * row bq) for the S^T micro-kernel, or, for at most FA_ROWS_MAX rows, as
 * rows for qk_rows: w->qoff zeros, the row, zeros up to w->ldq. */
static void FN(pack_q)(const fa_problem *p, const int64_t *e, int64_t row0, int64_t bq, FN(scratch) *w)
{
    const int64_t lq = e[FA_E_LQ], d = p->d;
    FA_T *qt = w->qt;
    if (bq <= FA_ROWS_MAX) {
        const int64_t off = FN(k_lead)(p, e), ldq = fa_roundup64(off + d, FA_W);
        w->qoff = off;
        w->ldq = ldq;
        for (int64_t r = 0; r < bq; r++) {
            const char *row = (const char *)p->q + e[FA_E_Q] + fa_vrow_off(row0 + r, lq, p->q_rs, p->q_hs);
            FA_T *dst = qt + r * ldq;
            for (int64_t c = 0; c < ldq; c++) dst[c] = 0;
            for (int64_t c = 0; c < d; c++) dst[off + c] = (FA_T)p->scale * FA_AT(row, c * p->q_cs);
        }
    } else {
        FN(pack_transposed)(p->q, e[FA_E_Q], p->q_rs, p->q_cs, lq, p->q_hs, row0, bq,
                            fa_roundup64(bq, FA_W), d, (FA_T)p->scale, qt, FA_BQ);
    }
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

/* Options that act on the scores s[j * ld], j < bk (keys k0 + j), of virtual
 * row v: soft-cap, ALiBi, the mask; then causal/window bounds (-inf). */
static void FN(score_options)(const fa_problem *p, const int64_t *e, int64_t v, int64_t k0, int64_t bk,
                              FA_T *s, int64_t ld, int bounds)
{
    const int64_t lq = e[FA_E_LQ], lk = e[FA_E_LK], head = v / lq, i = v % lq;
    if (p->softcap > 0) {
        const FA_T cap = (FA_T)p->softcap, inv = (FA_T)(1.0 / p->softcap);
        for (int64_t j = 0; j < bk; j++) s[j * ld] = cap * (FA_T)tanh((double)(s[j * ld] * inv));
    }
    if (p->alibi_slopes) {
        const FA_T slope = (FA_T)p->alibi_slopes[e[FA_E_HEAD] + head];
        const int64_t pos = fa_pos(p, i, lq, lk);
        for (int64_t j = 0; j < bk; j++) {
            const int64_t dist = pos - (k0 + j);
            s[j * ld] -= slope * (FA_T)(dist < 0 ? -dist : dist);
        }
    }
    if (p->mask_kind != FA_MASK_NONE) {
        const char *m = (const char *)p->mask + e[FA_E_MASK] + head * p->mask_hs + i * p->mask_rs +
                        k0 * p->mask_cs;
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

/* Score options of every row of the tile, in st's layout for bq rows. */
static void FN(apply_options)(const fa_problem *p, const int64_t *e, FN(scratch) *w, int64_t row0, int64_t bq,
                              int64_t k0, int64_t bk, int bounds)
{
    if (!(bounds || p->mask_kind != FA_MASK_NONE || p->softcap > 0 || p->alibi_slopes)) return;
    const int rows = bq <= FA_ROWS_MAX;
    for (int64_t r = 0; r < bq; r++)
        FN(score_options)(p, e, row0 + r, k0, bk, rows ? w->st + r * FA_BK : w->st + r, rows ? 1 : FA_BQ,
                          bounds);
}

/* The score tile: K[k0 : k0 + bk] . qt, with every score option applied.
 * Layout of st: S^T (bk x FA_BQ), or for at most FA_ROWS_MAX rows S as rows
 * (bq x FA_BK). */
static void FN(score_tile)(const fa_problem *p, const int64_t *e, FN(scratch) *w, int64_t row0,
                           int64_t bq, int64_t k0, int64_t bk, const FN(prefetch_plan) *pf)
{
    const int64_t d = p->d, bqp = fa_roundup64(bq, FA_W);
    int64_t ldk;
    if (bq <= FA_ROWS_MAX && FN(few_rows_kind)(p->k_rs, p->k_cs) == 1) { /* float16 rows in place */
        FN(qk_rows)(bq, d, w->qoff, w->qt, w->ldq, (const char *)p->k + e[FA_E_K] + k0 * p->k_rs, p->k_rs, 1,
                    bk, w->st, FA_BK, pf);
    } else {
        const FA_T *k = FN(key_rows)(p->k, e[FA_E_K], p->k_rs, p->k_cs, k0, bk, d, d, w->kp, &ldk);
        if (bq <= FA_ROWS_MAX) /* qt holds Q rows (see pack_q) */
            FN(qk_rows)(bq, d, w->qoff, w->qt, w->ldq, (const char *)k, ldk * (int64_t)sizeof(FA_T), 0, bk,
                        w->st, FA_BK, pf);
        else
            for (int64_t cb = 0; cb < bqp; cb += FA_NVW) {
                const int nv = (int)fa_min64(FA_NV, (bqp - cb) / FA_W);
                for (int64_t j = 0; j < bk; j += FA_MR)
                    FN(qk_block)((int)fa_min64(FA_MR, bk - j), nv, d, k + j * ldk, ldk, w->qt + cb, FA_BQ,
                                 w->st + j * FA_BQ + cb, FA_BQ);
            }
    }
    /* The causal/window bounds matter only where the tile is not visible to
     * every row of the item. */
    int64_t lo, hi, all_lo, all_hi;
    fa_block_range(p, e[FA_E_LQ], e[FA_E_LK], row0, bq, &lo, &hi, &all_lo, &all_hi);
    const int bounds = k0 < all_lo || k0 + bk > all_hi;
    FN(apply_options)(p, e, w, row0, bq, k0, bk, bounds);
}

/* Must the few-row P.V kernels read the V rows of tile [k0, k0 + bk)
 * through masks?  Read unmasked, a row's first and last vectors (vb bytes)
 * reach past the row into its neighbour rows' span, which lies inside the
 * array only when the rows are at least a vector apart and the tile holds
 * neither the entry's first nor its last row. */
static inline int FN(v_edge_tile)(const fa_problem *p, const int64_t *e, int64_t k0, int64_t bk, int64_t vb)
{
    return k0 == 0 || k0 + bk == e[FA_E_LK] || (p->v_rs < vb && p->v_rs > -vb);
}

/* o = alpha * o + P . V[k0 : k0 + bk] for the item's rows, P in st (as P^T,
 * or as rows for a few-row item). */
static void FN(pv_tile)(const fa_problem *p, const int64_t *e, FN(scratch) *w, int64_t bq, int64_t k0,
                        int64_t bk)
{
    const int64_t dvp = w->dvp;
    int64_t ldv;
    const FA_T *v;
    if (bq <= FA_ROWS_MAX) {
        /* weights as rows: two rows at a time against whole V rows (FA_RV
         * vectors each, from the aligned vector in which they start: see
         * plan_v), FA_W keys at a time so that the next row pair finds them
         * in L1; alpha scales the accumulator once, at the first keys.  The
         * lanes before and after a row land in accumulator lanes that are
         * never stored; masks only where v_edge_tile says (masked loads slow
         * the streaming down). */
        static const FA_T ones[2] = {1, 1};
        const int64_t voff = w->voff, ldo = w->ldo, nvec = ldo / FA_W;
        const int kind = FN(few_rows_kind)(p->v_rs, p->v_cs), h = kind == 1; /* as plan_v decided */
        const int edge = FN(v_edge_tile)(p, e, k0, bk, FA_W * FA_ROW_ES(h));
        const char *vr;
        int64_t ldvb;
        if (kind >= 0) {
            vr = (const char *)p->v + e[FA_E_V] + k0 * p->v_rs - voff * FA_ROW_ES(h);
            ldvb = p->v_rs;
        } else {
            vr = (const char *)FN(key_rows)(p->v, e[FA_E_V], p->v_rs, p->v_cs, k0, bk, p->dv, dvp, w->vp, &ldv);
            ldvb = ldv * (int64_t)sizeof(FA_T);
        }
        const fa_mask m_first = VMASK((int)voff, FA_W), m_last = VMASK(0, (int)(voff + p->dv - (nvec - 1) * FA_W));
        for (int64_t j0 = 0; j0 < bk; j0 += FA_W) {
            const int64_t nj = fa_min64(FA_W, bk - j0);
            for (int64_t cb = 0; cb < nvec; cb += FA_RV) {
                const int nv = (int)fa_min64(FA_RV, nvec - cb);
                const fa_mask mlo = cb == 0 ? m_first : VMASK_ALL, mhi = cb + nv == nvec ? m_last : VMASK_ALL;
                for (int64_t r = 0; r < bq; r += 2)
                    FN(pv_rows_block)((int)fa_min64(2, bq - r), nv, edge, h, nj, w->st + r * FA_BK + j0, FA_BK,
                                      vr + j0 * ldvb + cb * FA_W * FA_ROW_ES(h), ldvb, w->o + r * ldo + cb * FA_W,
                                      ldo, j0 == 0 ? w->alpha + r : ones, mlo, mhi);
            }
        }
        return;
    }
    v = FN(key_rows)(p->v, e[FA_E_V], p->v_rs, p->v_cs, k0, bk, p->dv, dvp, w->vp, &ldv);
    for (int64_t cb = 0; cb < dvp; cb += FA_NVW) {
        const int nv = (int)fa_min64(FA_NV, (dvp - cb) / FA_W);
        for (int64_t r = 0; r < bq; r += FA_MR)
            FN(pv_block)((int)fa_min64(FA_MR, bq - r), nv, bk, w->st + r, FA_BQ, 1, v + cb, ldv,
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

/* As softmax_tile, for a few-row item whose scores are rows of st (bq x
 * FA_BK): one row at a time, the keys along the vector lanes. */
static void FN(softmax_rows)(FN(scratch) *w, int64_t bq, int64_t bk)
{
    const int64_t n = fa_roundup64(bk, FA_W);
    FA_T mold[FA_W], muse[FA_W], tsum[FA_W]; /* per row; bq <= FA_W */
    for (int64_t r = 0; r < FA_W; r++) mold[r] = muse[r] = tsum[r] = 0;
    for (int64_t r = 0; r < bq; r++) {
        FA_T *s = w->st + r * FA_BK;
        for (int64_t j = bk; j < n; j++) s[j] = (FA_T)-INFINITY;
        fa_vec vmax = VBCAST((FA_T)-INFINITY);
        for (int64_t j = 0; j < n; j += FA_W) vmax = VMAX(vmax, VLOAD(s + j));
        const FA_T tmax = VHMAX(vmax);
        mold[r] = w->rmax[r];
        const FA_T mnew = tmax > mold[r] ? tmax : (tmax != tmax ? tmax : mold[r]);
        muse[r] = mnew == (FA_T)-INFINITY ? (FA_T)0 : mnew;
        const fa_vec vm = VBCAST(muse[r]);
        fa_vec sum = VZERO();
        for (int64_t j = 0; j < n; j += FA_W) {
            const fa_vec x = VEXP(VSUB(VLOAD(s + j), vm));
            VSTORE(s + j, x);
            sum = VADD(sum, x);
        }
        tsum[r] = VHSUM(sum);
        w->rmax[r] = mnew;
    }
    /* every row's rescale factor in one vector exp */
    VSTORE(mold, VEXP(VSUB(VLOAD(mold), VLOAD(muse))));
    for (int64_t r = 0; r < bq; r++) {
        w->alpha[r] = mold[r];
        w->rsum[r] = w->rsum[r] * mold[r] + tsum[r];
    }
}

/* Fold a score tile into the item's state, in the tile's layout. */
static void FN(weights_tile)(FN(scratch) *w, int softmax, int64_t bq, int64_t bk)
{
    const int64_t bqp = fa_roundup64(bq, FA_W);
    if (bq > FA_ROWS_MAX) {
        if (softmax)
            FN(softmax_tile)(w, bqp, bk);
        else
            FN(dot_tile)(w, bqp, bk);
        return;
    }
    if (softmax) {
        FN(softmax_rows)(w, bq, bk);
    } else {
        for (int64_t r = 0; r < bq; r++)
            for (int64_t j = 0; j < bk; j++)
                if (w->st[r * FA_BK + j] == (FA_T)-INFINITY) w->st[r * FA_BK + j] = 0;
    }
}


/* ---- work items --------------------------------------------------------- */

/* Write one output row: out = o * inv; lse = rmax + log(rsum) when asked. */
static void FN(store_row)(const fa_problem *p, const int64_t *e, int64_t v, const FA_T *o, FA_T rmax,
                          FA_T rsum, int normalise)
{
    const int64_t dv = p->dv, lq = e[FA_E_LQ];
    FA_T inv = 1;
    if (normalise) inv = rsum == 0 ? (FA_T)0 : (FA_T)1 / rsum;
    char *row = (char *)p->out + e[FA_E_OUT] + fa_vrow_off(v, lq, p->out_rs, p->out_hs);
    if (p->out_cs == (int64_t)sizeof(FA_S)) {
        FA_S *dst = (FA_S *)row;
        for (int64_t c = 0; c < dv; c++) dst[c] = FA_ST(o[c] * inv);
    } else {
        for (int64_t c = 0; c < dv; c++) *(FA_S *)(row + c * p->out_cs) = FA_ST(o[c] * inv);
    }
    if (normalise && p->lse) {
        FA_T *l = (FA_T *)((char *)p->lse + e[FA_E_LSE] + fa_vrow_off(v, lq, p->lse_rs, p->lse_hs));
        *l = rsum == 0 ? (FA_T)-INFINITY : rmax + (FA_T)log((double)rsum);
    }
}

static void FN(store_rows)(const fa_problem *p, const int64_t *e, const FN(scratch) *w, int64_t row0,
                           int64_t bq, int normalise)
{
    for (int64_t r = 0; r < bq; r++)
        FN(store_row)(p, e, row0 + r, w->o + r * w->dvp, w->rmax[r], w->rsum[r], normalise);
}

/* A partial slot: FA_BQ rows of the accumulator, then the rows' max and sum. */
static inline int64_t FN(slot_size)(int64_t dvp) { return FA_BQ * (dvp + 2); }

static void FN(store_partial)(const FN(scratch) *w, int64_t bq, FA_T *slot)
{
    memcpy(slot, w->o, (size_t)(bq * w->dvp) * sizeof(FA_T));
    memcpy(slot + FA_BQ * w->dvp, w->rmax, (size_t)bq * sizeof(FA_T));
    memcpy(slot + FA_BQ * (w->dvp + 1), w->rsum, (size_t)bq * sizeof(FA_T));
}

/* Merge the nsplit partial results of rows [row0, row0 + bq) of an entry
 * (slots first .. first + nsplit - 1, in key order) and write the output:
 * with M the largest partial max, the softmax sum is sum_s l_s exp(m_s - M)
 * and the output sum_s exp(m_s - M) o_s over that sum.  Dot weights add. */
static void FN(merge_partials)(const fa_problem *p, const int64_t *e, const FA_T *slots, int64_t first,
                               int nsplit, int64_t row0, int64_t bq, int64_t dvp, FA_T *acc)
{
    const int softmax = p->weights == FA_WEIGHTS_SOFTMAX;
    const int64_t size = FN(slot_size)(dvp);
    for (int64_t r = 0; r < bq; r++) {
        FA_T m = (FA_T)-INFINITY, l = 0;
        if (softmax)
            for (int s = 0; s < nsplit; s++) {
                const FA_T ms = slots[(first + s) * size + FA_BQ * dvp + r];
                if (ms > m) m = ms;
            }
        for (int64_t c = 0; c < dvp; c++) acc[c] = 0;
        for (int s = 0; s < nsplit; s++) {
            const FA_T *slot = slots + (first + s) * size;
            FA_T f = 1;
            if (softmax) {
                const FA_T ms = slot[FA_BQ * dvp + r];
                if (ms == (FA_T)-INFINITY) continue; /* this split saw no key of the row */
                f = (FA_T)exp((double)(ms - m));
                l += f * slot[FA_BQ * (dvp + 1) + r];
            }
            for (int64_t c = 0; c < dvp; c++) acc[c] += f * slot[r * dvp + c];
        }
        FN(store_row)(p, e, row0 + r, acc, m, l, softmax);
    }
}

/* Can pv_rows_dp (bfloat16 on vdpbf16ps) read V in place? */
static inline int FN(v_words_in_place)(const fa_problem *p) { return p->v_cs == 2; }

/* The accumulator's layout.  A few-row item reading V rows in place reads
 * them in whole, aligned vectors from the start of the vector in which they
 * begin, voff elements before the row (when the row stride keeps every row
 * there), so its accumulator rows hold column c at c + voff, ldo apart:
 * whole vectors for pv_tile, whole pairs of them for pv_rows_dp (dp).
 * unshift_rows restores the plain layout.  Other items: voff 0, ldo dvp. */
static void FN(plan_v)(const fa_problem *p, const int64_t *e, int64_t bq, int dp, FN(scratch) *w)
{
    w->voff = 0;
    w->ldo = w->dvp;
    if (bq > FA_ROWS_MAX || p->dv <= 0) return;
    const uintptr_t a = (uintptr_t)((const char *)p->v + e[FA_E_V]);
    if (dp) {
        if (!FN(v_words_in_place)(p)) return;
        if (p->v_rs % 64 == 0 && a % 2 == 0) w->voff = (int64_t)(a % 64) / 2;
        w->ldo = fa_roundup64(w->voff + p->dv, 32);
        return;
    }
    const int kind = FN(few_rows_kind)(p->v_rs, p->v_cs);
    if (kind < 0) return;
    w->voff = FN(rows_lead)(kind, a, p->v_rs);
    w->ldo = fa_roundup64(w->voff + p->dv, FA_W);
}

/* Accumulator rows back to the plain layout (rows dvp apart, column c at c),
 * in place: row r moves down, never onto a later row's columns. */
static void FN(unshift_rows)(FN(scratch) *w, int64_t bq, int64_t dv)
{
    if (w->voff == 0 && w->ldo == w->dvp) return;
    for (int64_t r = 0; r < bq; r++)
        memmove(w->o + r * w->dvp, w->o + r * w->ldo + w->voff, (size_t)dv * sizeof(FA_T));
}

static void FN(start_rows)(FN(scratch) *w, int64_t bq)
{
    memset(w->o, 0, (size_t)(bq * w->ldo) * sizeof(FA_T));
    for (int64_t r = 0; r < FA_BQ; r++) {
        w->rmax[r] = (FA_T)-INFINITY;
        w->rsum[r] = 0;
        w->alpha[r] = 1;
    }
}

#if FA_BF16_DP
/*
 * bfloat16 with AVX512-BF16: the two products run on vdpbf16ps, which
 * multiplies pairs of bfloat16 and adds both products to a float32 lane,
 * twice the work of an FMA per instruction.  Operands are packed as 32-bit
 * words holding two bfloat16 values adjacent along the reduction:
 *   Q.K^T: words of K rows (2 elements of D, read in place) broadcast
 *          against Q^T words (qt as [D/2][FA_BQ]); products are exact,
 *          sums float32, the scale applied to the result.
 *   P.V:   words of P (2 keys of one row, rounded to bfloat16 as the
 *          weights are on GPUs) against V words (2 keys of one column).
 */
static inline uint32_t FN(bf16_pair)(const char *row, int64_t cs, int64_t c, int64_t n)
{
    const uint32_t lo = *(const uint16_t *)(row + c * cs);
    const uint32_t hi = c + 1 < n ? *(const uint16_t *)(row + (c + 1) * cs) : 0;
    return lo | (hi << 16);
}

/* Are K rows read in place as words (even D, contiguous 16-bit elements,
 * rows a whole number of words apart)?  Else score_tile_dp packs them. */
static inline int FN(k_words_in_place)(const fa_problem *p)
{
    return p->d % 2 == 0 && p->k_cs == 2 && p->k_rs % 4 == 0;
}

/* As k_lead, in words, for K rows read in place as words (a word is the
 * size of FA_T here, float: rows_lead's element). */
static int64_t FN(k_lead_dp)(const fa_problem *p, const int64_t *e)
{
    if (!FN(k_words_in_place)(p)) return 0;
    return FN(rows_lead)(0, (uintptr_t)((const char *)p->k + e[FA_E_K]), p->k_rs);
}

/* Q as words of two bfloat16 along D: transposed, qt[t][r] = (q[r][2t],
 * q[r][2t+1]) with zeros past the rows; or, for at most FA_ROWS_MAX rows,
 * row by row as pack_q lays them out (w->qoff zero words, the row's words,
 * zeros up to w->ldq). */
static void FN(pack_q_dp)(const fa_problem *p, const int64_t *e, int64_t row0, int64_t bq, FN(scratch) *w)
{
    const int64_t lq = e[FA_E_LQ], d2 = (p->d + 1) / 2, bqp = fa_roundup64(bq, FA_W);
    uint32_t *qt = (uint32_t *)w->qt;
    const int rows = bq <= FA_ROWS_MAX;
    const int64_t off = rows ? FN(k_lead_dp)(p, e) : 0, ldq = fa_roundup64(off + d2, 16);
    w->qoff = off;
    w->ldq = ldq;
    for (int64_t r = 0; r < bq; r++) {
        const char *row = (const char *)p->q + e[FA_E_Q] + fa_vrow_off(row0 + r, lq, p->q_rs, p->q_hs);
        if (rows)
            for (int64_t t = 0; t < ldq; t++) qt[r * ldq + t] = 0;
        for (int64_t t = 0; t < d2; t++)
            qt[rows ? r * ldq + off + t : t * FA_BQ + r] = FN(bf16_pair)(row, p->q_cs, 2 * t, p->d);
    }
    if (!rows)
        for (int64_t t = 0; t < d2; t++)
            for (int64_t r = bq; r < bqp; r++) qt[t * FA_BQ + r] = 0;
}

/* Vector c of nc of a row of words at k, masked as in rvec if `masked`. */
FA_INLINE __m512bh FN(k_words)(const int masked, const int c, const int nc, const uint32_t *k, __mmask16 mlo,
                               __mmask16 mhi)
{
    if (!masked) return (__m512bh)_mm512_loadu_si512(k + c * 16);
    if (c == 0 && nc == 1) return (__m512bh)_mm512_maskz_loadu_epi32(mlo & mhi, k);
    if (c == 0) return (__m512bh)_mm512_maskz_loadu_epi32(mlo, k);
    if (c == nc - 1) return (__m512bh)_mm512_maskz_loadu_epi32(mhi, k + c * 16);
    return (__m512bh)_mm512_loadu_si512(k + c * 16);
}

/* acc[j] += sum_t <q[t], k[j][t]> over nc vectors of 16 words (t < 16 nc)
 * for j < 16: as qk_rows_mk, on vdpbf16ps. */
FA_INLINE void FN(qk_rows_dp_mk)(const int nc, const int masked, const uint32_t *q, const uint32_t *k,
                                 int64_t ldk, __mmask16 mlo, __mmask16 mhi, __m512 *acc)
{
    __m512bh qv[FA_QV_MAX];
    FA_UNROLL for (int c = 0; c < nc; c++) qv[c] = (__m512bh)_mm512_loadu_si512(q + c * 16);
    FA_UNROLL for (int j = 0; j < 16; j++)
    {
        FA_UNROLL for (int c = 0; c < nc; c++) acc[j] =
            _mm512_dpbf16_ps(acc[j], FN(k_words)(masked, c, nc, k, mlo, mhi), qv[c]);
        k += ldk;
        FA_IN_ORDER();
    }
}

/* Scores of a few query rows from word-packed Q rows (decoding): as qk_rows
 * (rows of st, FA_BK apart; K rows from the aligned vector in which they
 * start, off words before), with vdpbf16ps taking 32 elements of D per
 * instruction. */
static void FN(qk_rows_dp)(int64_t bq, int64_t d2, int64_t off, const uint32_t *qw, int64_t ldq,
                           const uint32_t *k, int64_t ldk, int64_t bk, float scale, float *st,
                           const FN(prefetch_plan) *pf)
{
    const int64_t nvec = ldq / 16;
    const __mmask16 m_first = (__mmask16)(0xffffu << off),
                    m_last = (__mmask16)(0xffffu >> (16 - (off + d2 - (nvec - 1) * 16)));
    const __m512 sc = _mm512_set1_ps(scale);
    const int masked = off != 0 || d2 % 16 != 0;
    const uint32_t *ka = k - off;
    for (int64_t j0 = 0; j0 < bk; j0 += 16) {
        const uint32_t *kb = ka + j0 * ldk;
        for (int64_t j = j0; j < j0 + 16; j++) FN(prefetch_row)(pf, j); /* as in qk_rows */
        if (bk - j0 < 16) { /* the last keys of the tile, one at a time */
            for (int64_t r = 0; r < bq; r++)
                for (int64_t j = j0; j < bk; j++) {
                    __m512 a = _mm512_setzero_ps();
                    for (int64_t c = 0; c < nvec; c++) {
                        const __mmask16 m = (c == 0 ? m_first : 0xffff) & (c == nvec - 1 ? m_last : 0xffff);
                        a = _mm512_dpbf16_ps(a, (__m512bh)_mm512_maskz_loadu_epi32(m, ka + j * ldk + c * 16),
                                             (__m512bh)_mm512_loadu_si512(qw + r * ldq + c * 16));
                    }
                    st[r * FA_BK + j] = scale * _mm512_reduce_add_ps(a);
                }
            continue;
        }
        for (int64_t r = 0; r < bq; r++) {
            const uint32_t *q = qw + r * ldq;
            __m512 acc[16];
            FA_UNROLL for (int j = 0; j < 16; j++) acc[j] = _mm512_setzero_ps();
            for (int64_t c = 0; c < nvec; c += FA_QV) {
                const int nc = (int)fa_min64(FA_QV, nvec - c);
                const __mmask16 mlo = c == 0 ? m_first : 0xffff, mhi = c + nc == nvec ? m_last : 0xffff;
#define FA_QKRDP_CALL(n)                                                                            \
    do {                                                                                            \
        if (masked)                                                                                 \
            FN(qk_rows_dp_mk)((n), 1, q + c * 16, kb + c * 16, ldk, mlo, mhi, acc);                 \
        else                                                                                        \
            FN(qk_rows_dp_mk)((n), 0, q + c * 16, kb + c * 16, ldk, mlo, mhi, acc);                 \
    } while (0)
                switch (nc) { /* compile-time chunk widths */
                case 1: FA_QKRDP_CALL(1); break;
                case 2: FA_QKRDP_CALL(2); break;
                case 3: FA_QKRDP_CALL(3); break;
                case 4: FA_QKRDP_CALL(4); break;
                case 5: FA_QKRDP_CALL(5); break;
                case 6: FA_QKRDP_CALL(6); break;
                case 7: FA_QKRDP_CALL(7); break;
                case 8: FA_QKRDP_CALL(8); break;
                default: FA_QKRDP_CALL(9); break;
                }
#undef FA_QKRDP_CALL
            }
            _mm512_storeu_ps(st + r * FA_BK + j0, _mm512_mul_ps(sc, fa_hsums_ps512(acc)));
        }
    }
}

/* st[j][r] = scale * sum_t <k[j] pair t, q[r] pair t> for j < mr, r < nv * 16 */
FA_INLINE void FN(qk_dp_mk)(const int mr, const int nv, int64_t d2, const uint32_t *k, int64_t ldk,
                            const uint32_t *qt, float scale, float *st)
{
    __m512 acc[FA_MR_MAX][FA_NV_MAX];
    FA_UNROLL for (int r = 0; r < mr; r++) FA_UNROLL for (int v = 0; v < nv; v++) acc[r][v] = _mm512_setzero_ps();
    for (int64_t t = 0; t < d2; t++) {
        __m512bh b[FA_NV_MAX];
        FA_UNROLL for (int v = 0; v < nv; v++) b[v] = (__m512bh)_mm512_loadu_si512(qt + t * FA_BQ + v * 16);
        FA_UNROLL for (int r = 0; r < mr; r++)
        {
            const __m512bh a = (__m512bh)_mm512_set1_epi32((int)k[r * ldk + t]);
            FA_UNROLL for (int v = 0; v < nv; v++) acc[r][v] = _mm512_dpbf16_ps(acc[r][v], a, b[v]);
        }
    }
    const __m512 sc = _mm512_set1_ps(scale);
    FA_UNROLL for (int r = 0; r < mr; r++) FA_UNROLL for (int v = 0; v < nv; v++)
        _mm512_storeu_ps(st + r * FA_BQ + v * 16, _mm512_mul_ps(sc, acc[r][v]));
}

static void FN(qk_dp_block)(int mr, int nv, int64_t d2, const uint32_t *k, int64_t ldk, const uint32_t *qt,
                            float scale, float *st)
{
#define FA_QKDP_CALL(m, n) FN(qk_dp_mk)((m), (n), d2, k, ldk, qt, scale, st)
    FA_TILE_SWITCH(mr, nv, FA_QKDP_CALL)
#undef FA_QKDP_CALL
}

/* The score tile from packed Q^T words; K rows as words, in place when the
 * layout allows (even D, contiguous rows), else packed into w->kp. */
static void FN(score_tile_dp)(const fa_problem *p, const int64_t *e, FN(scratch) *w, int64_t row0,
                              int64_t bq, int64_t k0, int64_t bk, const FN(prefetch_plan) *pf)
{
    const int64_t d2 = (p->d + 1) / 2, bqp = fa_roundup64(bq, FA_W);
    const uint32_t *k;
    int64_t ldk;
    if (FN(k_words_in_place)(p)) {
        k = (const uint32_t *)((const char *)p->k + e[FA_E_K] + k0 * p->k_rs);
        ldk = p->k_rs / 4;
    } else {
        uint32_t *kp = (uint32_t *)w->kp;
        for (int64_t j = 0; j < bk; j++) {
            const char *row = (const char *)p->k + e[FA_E_K] + (k0 + j) * p->k_rs;
            for (int64_t t = 0; t < d2; t++) kp[j * d2 + t] = FN(bf16_pair)(row, p->k_cs, 2 * t, p->d);
        }
        k = kp;
        ldk = d2;
    }
    const uint32_t *qt = (const uint32_t *)w->qt;
    if (bq <= FA_ROWS_MAX) {
        FN(qk_rows_dp)(bq, d2, w->qoff, qt, w->ldq, k, ldk, bk, (float)p->scale, w->st, pf);
    } else {
        for (int64_t cb = 0; cb < bqp; cb += FA_NVW) {
            const int nv = (int)fa_min64(FA_NV, (bqp - cb) / FA_W);
            for (int64_t j = 0; j < bk; j += FA_MR)
                FN(qk_dp_block)((int)fa_min64(FA_MR, bk - j), nv, d2, k + j * ldk, ldk, qt + cb,
                                (float)p->scale, w->st + j * FA_BQ + cb);
        }
    }
    int64_t lo, hi, all_lo, all_hi;
    fa_block_range(p, e[FA_E_LQ], e[FA_E_LK], row0, bq, &lo, &hi, &all_lo, &all_hi);
    FN(apply_options)(p, e, w, row0, bq, k0, bk, k0 < all_lo || k0 + bk > all_hi);
}

/* 16 words (lo[i], hi[i]) from two rows of 16 floats, rounded to bfloat16. */
static inline __m512i FN(bf16_words)(__m512 lo, __m512 hi)
{
    const __m512i l = _mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(lo));
    const __m512i h = _mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(hi));
    return _mm512_or_si512(l, _mm512_slli_epi32(h, 16));
}

/* o[r][x] = alpha[r] o[r][x] + sum_t <pw[t][r], vw[t][x]> */
FA_INLINE void FN(pv_dp_mk)(const int mr, const int nv, int64_t b2, const uint32_t *pw, const uint32_t *vw,
                            int64_t ldv, float *o, int64_t ldo, const float *alpha)
{
    __m512 acc[FA_MR_MAX][FA_NV_MAX];
    FA_UNROLL for (int r = 0; r < mr; r++)
    {
        const __m512 a = _mm512_set1_ps(alpha[r]);
        FA_UNROLL for (int x = 0; x < nv; x++) acc[r][x] = _mm512_mul_ps(a, _mm512_loadu_ps(o + r * ldo + x * 16));
    }
    for (int64_t t = 0; t < b2; t++) {
        __m512bh b[FA_NV_MAX];
        FA_UNROLL for (int x = 0; x < nv; x++) b[x] = (__m512bh)_mm512_loadu_si512(vw + t * ldv + x * 16);
        FA_UNROLL for (int r = 0; r < mr; r++)
        {
            const __m512bh a = (__m512bh)_mm512_set1_epi32((int)pw[t * FA_BQ + r]);
            FA_UNROLL for (int x = 0; x < nv; x++) acc[r][x] = _mm512_dpbf16_ps(acc[r][x], a, b[x]);
        }
    }
    FA_UNROLL for (int r = 0; r < mr; r++) FA_UNROLL for (int x = 0; x < nv; x++)
        _mm512_storeu_ps(o + r * ldo + x * 16, acc[r][x]);
}

static void FN(pv_dp_block)(int mr, int nv, int64_t b2, const uint32_t *pw, const uint32_t *vw, int64_t ldv,
                            float *o, int64_t ldo, const float *alpha)
{
#define FA_PVDP_CALL(m, n) FN(pv_dp_mk)((m), (n), b2, pw, vw, ldv, o, ldo, alpha)
    FA_TILE_SWITCH(mr, nv, FA_PVDP_CALL)
#undef FA_PVDP_CALL
}

/* Most chunks of 32 columns pv_rows_dp_mk accumulates (4 make 128
 * columns; the fifth takes a row that starts part-way into a chunk). */
#define FA_PVDP_NCH 5

/* Chunk c of nch (32 bfloat16) of a V row at v, masked as in rvec if
 * `masked`. */
FA_INLINE __m512i FN(v_chunk)(const int masked, const int c, const int nch, const char *v, __mmask32 mlo,
                              __mmask32 mhi)
{
    if (!masked) return _mm512_loadu_si512(v + 64 * c);
    if (c == 0 && nch == 1) return _mm512_maskz_loadu_epi16(mlo & mhi, v);
    if (c == 0) return _mm512_maskz_loadu_epi16(mlo, v);
    if (c == nch - 1) return _mm512_maskz_loadu_epi16(mhi, v + 64 * c);
    return _mm512_loadu_si512(v + 64 * c);
}

/* One pair of keys for pv_rows_dp_mk: V rows v0 and v0 + ldv (only v0 when
 * !has1) interleaved as words against the rows' weight pairs wt. */
FA_INLINE void FN(pv_rows_dp_pair)(const int mr, const int nch, const int masked, const int has1, const char *v0,
                                   int64_t ldv, __mmask32 mlo, __mmask32 mhi, const __m512bh *wt,
                                   __m512 (*lo)[FA_PVDP_NCH], __m512 (*hi)[FA_PVDP_NCH])
{
    FA_UNROLL for (int c = 0; c < nch; c++)
    {
        const __m512i a = FN(v_chunk)(masked, c, nch, v0, mlo, mhi);
        const __m512i b = has1 ? FN(v_chunk)(masked, c, nch, v0 + ldv, mlo, mhi) : _mm512_setzero_si512();
        const __m512bh ul = (__m512bh)_mm512_unpacklo_epi16(a, b), uh = (__m512bh)_mm512_unpackhi_epi16(a, b);
        FA_UNROLL for (int r = 0; r < mr; r++)
        {
            lo[r][c] = _mm512_dpbf16_ps(lo[r][c], wt[r], ul);
            hi[r][c] = _mm512_dpbf16_ps(hi[r][c], wt[r], uh);
        }
    }
}

/* o[r][x] = alpha[r] o[r][x] + sum_j pw[r][j] v[j][x] for r < mr (<= 2),
 * x < 32 nch (nch <= FA_PVDP_NCH), j < bk; weights as bfloat16 rows FA_BK
 * apart, V bfloat16 rows ldv bytes apart, read in place, the first and last
 * chunk of each masked by mlo and mhi if `masked`.  Two V rows interleaved by
 * vpunpck{l,h}wd become the words vdpbf16ps multiplies by a weight pair;
 * the interleave puts each 32 columns in the order {0-3, 8-11, 16-19,
 * 24-27} (lo) and {4-7, 12-15, 20-23, 28-31} (hi), so the accumulator is
 * permuted to match on load and back on store. */
FA_INLINE void FN(pv_rows_dp_mk)(const int mr, const int nch, const int masked, int64_t bk, const uint16_t *pw,
                                 const char *v, int64_t ldv, float *o, int64_t ldo, const float *alpha,
                                 __mmask32 mlo, __mmask32 mhi)
{
    __m512 lo[2][FA_PVDP_NCH], hi[2][FA_PVDP_NCH];
    FA_UNROLL for (int r = 0; r < mr; r++)
    {
        const __m512 a = _mm512_set1_ps(alpha[r]);
        FA_UNROLL for (int c = 0; c < nch; c++)
        {
            const __m512 n0 = _mm512_loadu_ps(o + r * ldo + 32 * c), n1 = _mm512_loadu_ps(o + r * ldo + 32 * c + 16);
            lo[r][c] = _mm512_mul_ps(a, _mm512_shuffle_f32x4(n0, n1, _MM_SHUFFLE(2, 0, 2, 0)));
            hi[r][c] = _mm512_mul_ps(a, _mm512_shuffle_f32x4(n0, n1, _MM_SHUFFLE(3, 1, 3, 1)));
        }
    }
    __m512bh wt[2];
    int64_t t = 0;
    for (; 2 * t + 1 < bk; t++) {
        FA_UNROLL for (int r = 0; r < mr; r++) wt[r] =
            (__m512bh)_mm512_set1_epi32(*(const int32_t *)(pw + r * FA_BK + 2 * t));
        FN(pv_rows_dp_pair)(mr, nch, masked, 1, v + 2 * t * ldv, ldv, mlo, mhi, wt, lo, hi);
        FA_IN_ORDER();
    }
    if (2 * t < bk) { /* an odd key out: its partner's weight is zero */
        FA_UNROLL for (int r = 0; r < mr; r++) wt[r] =
            (__m512bh)_mm512_set1_epi32(*(const int32_t *)(pw + r * FA_BK + 2 * t));
        FN(pv_rows_dp_pair)(mr, nch, masked, 0, v + 2 * t * ldv, ldv, mlo, mhi, wt, lo, hi);
    }
    FA_UNROLL for (int r = 0; r < mr; r++) FA_UNROLL for (int c = 0; c < nch; c++)
    {
        const __m512 t0 = _mm512_shuffle_f32x4(lo[r][c], hi[r][c], _MM_SHUFFLE(1, 0, 1, 0));
        const __m512 t1 = _mm512_shuffle_f32x4(lo[r][c], hi[r][c], _MM_SHUFFLE(3, 2, 3, 2));
        _mm512_storeu_ps(o + r * ldo + 32 * c, _mm512_shuffle_f32x4(t0, t0, _MM_SHUFFLE(3, 1, 2, 0)));
        _mm512_storeu_ps(o + r * ldo + 32 * c + 16, _mm512_shuffle_f32x4(t1, t1, _MM_SHUFFLE(3, 1, 2, 0)));
    }
}

/* o = alpha o + P.V[k0 : k0 + bk] for a few rows (decoding) with V rows of
 * contiguous bfloat16: the weights rounded to bfloat16 (as in pv_tile_dp),
 * V read in place from the aligned 64 bytes in which each row starts (see
 * plan_v), two rows at a time against up to FA_PVDP_NCH chunks of 32
 * columns of every V row of the tile (in L1 for the second pair).  As in
 * pv_tile, only the entry's first and last rows are read through masks. */
static void FN(pv_rows_dp)(const fa_problem *p, const int64_t *e, FN(scratch) *w, int64_t bq, int64_t k0,
                           int64_t bk)
{
    const int64_t voff = w->voff, ldo = w->ldo, nchunk = ldo / 32;
    if (nchunk == 0) return;
    uint16_t *pw = (uint16_t *)w->pw; /* row r at pw + r * FA_BK, zero past bk */
    for (int64_t r = 0; r < bq; r++)
        for (int64_t j = 0; j < bk; j += 16) {
            const __mmask16 m = j + 16 <= bk ? (__mmask16)0xffff : (__mmask16)((1u << (bk - j)) - 1);
            _mm256_storeu_si256((__m256i *)(pw + r * FA_BK + j),
                                (__m256i)_mm512_cvtneps_pbh(_mm512_maskz_loadu_ps(m, w->st + r * FA_BK + j)));
        }
    const __mmask32 m_first = (__mmask32)(0xffffffffu << voff),
                    m_last = (__mmask32)(0xffffffffu >> (32 - (voff + p->dv - (nchunk - 1) * 32)));
    const char *v = (const char *)p->v + e[FA_E_V] + k0 * p->v_rs - 2 * voff;
    const int edge = FN(v_edge_tile)(p, e, k0, bk, 64);
    for (int64_t cb = 0; cb < nchunk; cb += FA_PVDP_NCH) {
        const int nch = (int)fa_min64(FA_PVDP_NCH, nchunk - cb);
        const __mmask32 mlo = cb == 0 ? m_first : 0xffffffffu, mhi = cb + nch == nchunk ? m_last : 0xffffffffu;
        for (int64_t r = 0; r < bq; r += 2) {
            const uint16_t *pr = pw + r * FA_BK;
            const char *vc = v + 64 * cb;
            float *o = w->o + r * ldo + 32 * cb;
            const float *al = w->alpha + r;
#define FA_PVRDP_CALL(m, n)                                                                         \
    if (edge)                                                                                       \
        FN(pv_rows_dp_mk)((m), (n), 1, bk, pr, vc, p->v_rs, o, ldo, al, mlo, mhi);                  \
    else                                                                                            \
        FN(pv_rows_dp_mk)((m), (n), 0, bk, pr, vc, p->v_rs, o, ldo, al, mlo, mhi)
            switch ((int)fa_min64(2, bq - r) * 8 + nch) {
            case 8 + 1: FA_PVRDP_CALL(1, 1); break;
            case 8 + 2: FA_PVRDP_CALL(1, 2); break;
            case 8 + 3: FA_PVRDP_CALL(1, 3); break;
            case 8 + 4: FA_PVRDP_CALL(1, 4); break;
            case 8 + 5: FA_PVRDP_CALL(1, 5); break;
            case 16 + 1: FA_PVRDP_CALL(2, 1); break;
            case 16 + 2: FA_PVRDP_CALL(2, 2); break;
            case 16 + 3: FA_PVRDP_CALL(2, 3); break;
            case 16 + 4: FA_PVRDP_CALL(2, 4); break;
            default: FA_PVRDP_CALL(2, 5); break;
            }
#undef FA_PVRDP_CALL
        }
    }
}

/* o = alpha o + P.V[k0 : k0 + bk]: weights and V packed as bfloat16 pairs of keys. */
static void FN(pv_tile_dp)(const fa_problem *p, const int64_t *e, FN(scratch) *w, int64_t bq, int64_t k0,
                           int64_t bk)
{
    if (bq <= FA_ROWS_MAX && FN(v_words_in_place)(p)) { /* as plan_v decided */
        FN(pv_rows_dp)(p, e, w, bq, k0, bk);
        return;
    }
    const int64_t dvp = w->dvp, b2 = (bk + 1) / 2, bqp = fa_roundup64(bq, FA_W);
    uint32_t *vw = (uint32_t *)w->vp;
    const __m512 zero = _mm512_setzero_ps();
    const int rows = bq <= FA_ROWS_MAX;
    for (int64_t t = 0; t < b2; t++) {
        const int has1 = 2 * t + 1 < bk;
        if (rows) { /* P pairs from rows of st: (P[r][2t], P[r][2t+1]) */
            for (int64_t r = 0; r < bq; r++) {
                const float *pr = w->st + r * FA_BK + 2 * t;
                w->pw[t * FA_BQ + r] =
                    (uint32_t)fa_f32_to_bf16(pr[0]) | ((uint32_t)(has1 ? fa_f32_to_bf16(pr[1]) : 0) << 16);
            }
        } else { /* P pairs from st rows 2t and 2t+1 of P^T (a zero row past bk) */
            const float *s0 = w->st + 2 * t * FA_BQ, *s1 = s0 + FA_BQ;
            for (int64_t r = 0; r < bqp; r += 16)
                _mm512_storeu_si512(w->pw + t * FA_BQ + r,
                                    FN(bf16_words)(_mm512_loadu_ps(s0 + r), has1 ? _mm512_loadu_ps(s1 + r) : zero));
        }
        /* V pairs: rows k0 + 2t and k0 + 2t + 1, columns zero past dv */
        const char *v0 = (const char *)p->v + e[FA_E_V] + (k0 + 2 * t) * p->v_rs;
        const char *v1 = v0 + p->v_rs;
        if (p->v_cs == 2 && has1) {
            int64_t c = 0;
            for (; c + 16 <= p->dv; c += 16) {
                const __m512i l = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(v0 + 2 * c)));
                const __m512i h = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(v1 + 2 * c)));
                _mm512_storeu_si512(vw + t * dvp + c, _mm512_or_si512(l, _mm512_slli_epi32(h, 16)));
            }
            for (; c < p->dv; c++)
                vw[t * dvp + c] = (uint32_t) * (const uint16_t *)(v0 + 2 * c) |
                                  ((uint32_t) * (const uint16_t *)(v1 + 2 * c) << 16);
            for (; c < dvp; c++) vw[t * dvp + c] = 0;
        } else {
            for (int64_t c = 0; c < dvp; c++) {
                const uint32_t l = c < p->dv ? *(const uint16_t *)(v0 + c * p->v_cs) : 0;
                const uint32_t h = c < p->dv && has1 ? *(const uint16_t *)(v1 + c * p->v_cs) : 0;
                vw[t * dvp + c] = l | (h << 16);
            }
        }
    }
    for (int64_t cb = 0; cb < dvp; cb += FA_NVW) {
        const int nv = (int)fa_min64(FA_NV, (dvp - cb) / FA_W);
        for (int64_t r = 0; r < bq; r += FA_MR)
            FN(pv_dp_block)((int)fa_min64(FA_MR, bq - r), nv, b2, w->pw + r, vw + cb, dvp, w->o + r * dvp + cb,
                            dvp, w->alpha + r);
    }
}
#endif /* FA_BF16_DP */

static void FN(attention_item)(const fa_problem *p, const int64_t *e, const fa_item *it, FN(scratch) *w,
                               int64_t row0, int64_t bq, FA_T *slots)
{
    const int64_t lq = e[FA_E_LQ], lk = e[FA_E_LK];
    const int softmax = p->weights == FA_WEIGHTS_SOFTMAX;
#if FA_BF16_DP
    const int dp = 1;
#else
    const int dp = 0;
#endif
    if (dp) {
#if FA_BF16_DP
        FN(pack_q_dp)(p, e, row0, bq, w);
#endif
    } else {
        FN(pack_q)(p, e, row0, bq, w);
    }
    FN(plan_v)(p, e, bq, dp, w);
    FN(start_rows)(w, bq);
    int64_t klo, khi, unused;
    fa_block_range(p, lq, lk, row0, bq, &klo, &khi, &unused, &unused);
    klo = fa_max64(klo, it->k_lo);
    khi = fa_min64(khi, it->k_hi);
    /* bfloat16 decoding interleaves K and V reads more finely (measured
     * faster); float32 keeps whole tiles */
    const int64_t tile = dp && bq <= FA_ROWS_MAX ? FA_W : FA_BK;
    for (int64_t k0 = klo; k0 < khi; k0 += tile) {
        const int64_t bk = fa_min64(tile, khi - k0);
        /* decoding streams K and V once: ask for the tile after next (one
         * ahead is too late to hide the memory latency) */
        const int64_t pf0 = k0 + 2 * FA_BK;
        const FN(prefetch_plan) pf = {
            (const char *)p->k + e[FA_E_K] + pf0 * p->k_rs, (const char *)p->v + e[FA_E_V] + pf0 * p->v_rs,
            p->k_rs, p->v_rs, p->d * p->k_cs, p->dv * p->v_cs,
            bq <= FA_ROWS_MAX ? fa_max64(0, fa_min64(FA_BK, khi - pf0)) : 0};
#if FA_BF16_DP
        if (dp) {
            FN(score_tile_dp)(p, e, w, row0, bq, k0, bk, &pf);
            FN(weights_tile)(w, softmax, bq, bk);
            FN(pv_tile_dp)(p, e, w, bq, k0, bk);
            continue;
        }
#endif
        FN(score_tile)(p, e, w, row0, bq, k0, bk, &pf);
        FN(weights_tile)(w, softmax, bq, bk);
        FN(pv_tile)(p, e, w, bq, k0, bk);
    }
    FN(unshift_rows)(w, bq, p->dv);
    if (it->part >= 0)
        FN(store_partial)(w, bq, slots + it->part * FN(slot_size)(w->dvp));
    else
        FN(store_rows)(p, e, w, row0, bq, softmax);
}

static void FN(scores_item)(const fa_problem *p, const int64_t *e, FN(scratch) *w, int64_t row0,
                            int64_t bq)
{
    const int64_t lq = e[FA_E_LQ], lk = e[FA_E_LK];
    FN(pack_q)(p, e, row0, bq, w);
    for (int64_t k0 = 0; k0 < lk; k0 += FA_BK) {
        const int64_t bk = fa_min64(FA_BK, lk - k0);
        const FN(prefetch_plan) none = {0};
        FN(score_tile)(p, e, w, row0, bq, k0, bk, &none);
        for (int64_t r = 0; r < bq; r++) {
            char *row = (char *)p->out + e[FA_E_OUT] + fa_vrow_off(row0 + r, lq, p->out_rs, p->out_hs) +
                        k0 * p->out_cs;
            const FA_T *sr = bq <= FA_ROWS_MAX ? w->st + r * FA_BK : w->st + r; /* see score_tile */
            const int64_t sj = bq <= FA_ROWS_MAX ? 1 : FA_BQ;
            for (int64_t j = 0; j < bk; j++) *(FA_T *)(row + j * p->out_cs) = sr[j * sj];
        }
    }
}

static void FN(wsum_item)(const fa_problem *p, const int64_t *e, FN(scratch) *w, int64_t row0,
                          int64_t bq)
{
    const int64_t lk = e[FA_E_LK], bqp = fa_roundup64(bq, FA_W);
    FN(plan_v)(p, e, bq, 0, w);
    FN(start_rows)(w, bq);
    for (int64_t k0 = 0; k0 < lk; k0 += FA_BK) {
        const int64_t bk = fa_min64(FA_BK, lk - k0);
        /* the weights in st's layout (see score_tile): W^T, st[j][r] =
         * w[row0 + r][k0 + j], or for a few rows W itself, st[r][j] */
        if (bq <= FA_ROWS_MAX)
            FN(pack_rows)(p->q, e[FA_E_Q] + k0 * p->q_cs, p->q_rs, p->q_cs, row0, bq, bk, w->st, FA_BK);
        else
            FN(pack_transposed)(p->q, e[FA_E_Q] + k0 * p->q_cs, p->q_rs, p->q_cs, e[FA_E_LQ], 0, row0, bq,
                                bqp, bk, 1, w->st, FA_BQ);
        FN(pv_tile)(p, e, w, bq, k0, bk);
    }
    FN(unshift_rows)(w, bq, p->dv);
    FN(store_rows)(p, e, w, row0, bq, 0);
}

/* ---- parallel driver ---------------------------------------------------- */

int FN(fa_run)(const fa_problem *p, int kind, const fa_item *items, int64_t n_items, int64_t n_parts,
               int num_threads)
{
    int status = FA_OK;
    if (n_items <= 0) return FA_OK;
    const int64_t dvp = fa_roundup64(p->dv, FA_W);
    FA_T *slots = NULL;
    if (n_parts > 0) {
        if ((uint64_t)n_parts > (uint64_t)SIZE_MAX / sizeof(FA_T) / (uint64_t)FN(slot_size)(dvp))
            return FA_ERR_NOMEM;
        slots = (FA_T *)malloc((size_t)(n_parts * FN(slot_size)(dvp)) * sizeof(FA_T));
        if (!slots) return FA_ERR_NOMEM;
    }
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
            const int64_t row0 = items[t].row0, bq = fa_min64(FA_BQ, p->group * e[FA_E_LQ] - row0);
            switch (kind) {
            case FA_KIND_ATTENTION: FN(attention_item)(p, e, &items[t], &w, row0, bq, slots); break;
            case FA_KIND_SCORES: FN(scores_item)(p, e, &w, row0, bq); break;
            default: FN(wsum_item)(p, e, &w, row0, bq); break;
            }
        }
        if (n_parts > 0) { /* after the loop's barrier every partial is written */
#pragma omp for schedule(dynamic, 1)
            for (int64_t t = 0; t < n_items; t++) {
                const fa_item *it = &items[t];
                if (!ok || it->split != 0 || it->part < 0) continue;
                const int64_t *e = p->entries + it->entry * FA_ENTRY_FIELDS;
                const int64_t bq = fa_min64(FA_BQ, p->group * e[FA_E_LQ] - it->row0);
                FN(merge_partials)(p, e, slots, it->part, it->nsplit, it->row0, bq, dvp, w.o);
            }
        }
        if (ok) free(w.block);
    }
    free(slots);
    return status;
}

/* ---- exp entry point for accuracy tests ---------------------------------- */

#if FA_T_IS_FLOAT && FA_S_KIND == 0
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
#undef FA_HALF_ROWS
#undef FA_LD
#undef FA_ST
#undef FA_AT
#undef FN
