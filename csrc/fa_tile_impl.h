/*
 * fa_tile_impl.h - the tile operations (fa_tile.h), written once.
 *
 * Included by fa_path_instances.h once per element type of a path, after
 * fa_vec.h has defined that path's vector vocabulary, with:
 *   FA_T        compute type, float or double
 *   FA_S        storage type of q, k, v, w and out (FA_T, or uint16_t for
 *               float16 / bfloat16, FA_S_KIND 1 / 2)
 *   FA_SUFFIX   name suffix of this instance, e.g. f32_avx512
 * Each instance defines the operations fa_<op>_<suffix> (FA_OP) that the
 * path file registers in its fa_tile_ops tables; everything else is static.
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

#include <float.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "fa_half.h"
#include "fa_tile.h"

#define FN(name) FA_CAT(name, FA_SUFFIX)
/* The tile operations a path registers (fa_tile.h): fa_<op>_<type>_<path>. */
#define FA_OP(name) FA_CAT(fa_##name, FA_SUFFIX)

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

/* What the rows of an S^T tile may see under the causal and window bounds
 * (tile_ranges): products outside it are neither computed nor summed. */
typedef struct {
    int bounded; /* the tile has keys some of its rows may not see; the rest holds only then */
    int32_t vlo[FA_BQ / FA_W + 1], vhi[FA_BQ / FA_W + 1]; /* keys each vector of rows may see, in the tile */
    int32_t rlo[FA_BQ], rhi[FA_BQ];                       /* ... each row */
} FN(tile_seen);

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
    FN(tile_seen) seen; /* the current S^T tile's bounds */
    int8_t *qi;        /* few-row items on integer K.Q: the query rows in 8 bits (see quantize_rows), or NULL */
    FA_T *qstep;       /* their quantisation steps, one per row */
    int32_t *qsum;     /* 128 x the sum of each row's codes */
    int8_t *ql;        /* ... and, for qk_i8_lanes, in lane layout (lane_rows), or NULL */
    /* dropout: the item's rows' words (dropout_rows), for the rows of drop_at: (stream and row of the entry's
     * row 0, its lq, row0, bq) */
    uint32_t drop_a[FA_BQ], drop_b[FA_BQ];
    int64_t drop_at[5];
    void *block; /* the one allocation behind all of the above (fa_scratch_take) */
    size_t bytes;
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
    w->bytes = (size_t)total * sizeof(FA_T);
    FA_T *b = (FA_T *)fa_scratch_take(&w->bytes);
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
    w->qi = NULL;
    w->ql = NULL;
    w->seen.bounded = 0;
    for (int i = 0; i < 5; i++) w->drop_at[i] = -1; /* no rows' words yet (bq -1 matches no item) */
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
 * (h = FA_RK_F16): half the bytes of float32, no packing pass.  Where the
 * path converts in vectors (FA_NARROW_ROWS), rows of a narrower storage
 * type than FA_T (16-bit floats; 8-bit k and v, whose scales the callers
 * apply to whole rows) are read in place too, converted in registers, when
 * they fill whole vectors (no masks; see narrow_kind).  h is the row kind,
 * a compile-time constant of every kernel instance. */
#ifndef FA_ROW_KINDS
#define FA_ROW_KINDS
#define FA_RK_T 0    /* FA_T */
#define FA_RK_F16 1  /* IEEE binary16 */
#define FA_RK_BF16 2 /* bfloat16 */
#define FA_RK_I8 3   /* int8 */
#define FA_RK_E4M3 4 /* float8 e4m3, as fa_e4m3_f16_bits: 2^-8 of its value */
#define FA_RK_E5M2 5 /* float8 e5m2 */
#endif
#undef FA_HALF_ROWS
#if FA_S_KIND == 1 && FA_VEC_ISA == 2 && FA_T_IS_FLOAT
#define FA_HALF_ROWS 1
#else
#define FA_HALF_ROWS 0
#endif
#undef FA_NARROW_ROWS
#if FA_T_IS_FLOAT && (FA_VEC_ISA == 1 || FA_VEC_ISA == 2 || FA_VEC_ISA == 3)
#define FA_NARROW_ROWS 1
#else
#define FA_NARROW_ROWS 0
#endif
/* Is kind h read through nload (whole vectors only)? */
#define FA_RK_NARROW(h) ((h) >= FA_RK_BF16 || ((h) == FA_RK_F16 && !FA_HALF_ROWS))

/* Bytes per element of rows read in place (h: row kind). */
#define FA_ROW_ES(h) ((h) == FA_RK_T ? (int64_t)sizeof(FA_T) : (h) <= FA_RK_BF16 ? 2 : 1)

#if FA_NARROW_ROWS
/* FA_W elements of row kind h (not FA_RK_T) at p, as floats: 8-bit
 * integers as their values, float8 through float16 bit patterns (fa_half.h:
 * e5m2 is the high byte of a float16; e4m3's sign, exponent and mantissa
 * move down one bit, giving 2^-8 of its value). */
FA_INLINE fa_vec FN(nload)(const int h, const char *p)
{
#if FA_VEC_ISA == 1
    if (h == FA_RK_F16) return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)p));
    if (h == FA_RK_BF16)
        return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p)), 16));
    const __m128i x = _mm_loadl_epi64((const __m128i *)p);
    if (h == FA_RK_I8) return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(x));
    const __m128i hi = _mm_unpacklo_epi8(_mm_setzero_si128(), x); /* the byte as the high half of a word */
    if (h == FA_RK_E5M2) return _mm256_cvtph_ps(hi);
    return _mm256_cvtph_ps(_mm_and_si128(_mm_srai_epi16(hi, 1), _mm_set1_epi16((short)0xbfff)));
#elif FA_VEC_ISA == 2
    if (h == FA_RK_F16) return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)p));
    if (h == FA_RK_BF16)
        return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p)), 16));
    const __m128i x = _mm_loadu_si128((const __m128i *)p);
    if (h == FA_RK_I8) return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(x));
    const __m256i hi = _mm256_slli_epi16(_mm256_cvtepu8_epi16(x), 8);
    if (h == FA_RK_E5M2) return _mm512_cvtph_ps(hi);
    return _mm512_cvtph_ps(_mm256_and_si256(_mm256_srai_epi16(hi, 1), _mm256_set1_epi16((short)0xbfff)));
#else /* NEON, 4 lanes */
    if (h == FA_RK_F16) return vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16((const uint16_t *)p)));
    if (h == FA_RK_BF16) return vreinterpretq_f32_u32(vshll_n_u16(vld1_u16((const uint16_t *)p), 16));
    uint32_t four;
    memcpy(&four, p, 4);
    const uint8x8_t x = vreinterpret_u8_u32(vdup_n_u32(four));
    if (h == FA_RK_I8) return vcvtq_f32_s32(vmovl_s16(vget_low_s16(vmovl_s8(vreinterpret_s8_u8(x)))));
    const uint16x4_t hi = vshl_n_u16(vget_low_u16(vmovl_u8(x)), 8);
    if (h == FA_RK_E5M2) return vcvt_f32_f16(vreinterpret_f16_u16(hi));
    return vcvt_f32_f16(vreinterpret_f16_s16(
        vand_s16(vshr_n_s16(vreinterpret_s16_u16(hi), 1), vdup_n_s16((int16_t)0xbfff))));
#endif
}
#else
FA_INLINE fa_vec FN(nload)(const int h, const char *p)
{
    (void)h;
    (void)p;
    return VZERO(); /* never called: narrow_kind finds no kind without FA_NARROW_ROWS */
}
#endif

/* out[c] = element c of a row of narrow kind h at src (contiguous), times
 * scale if `scaled`, for c up to the last whole vector (nload); returns how
 * many elements that was (0 on paths without narrow rows).  The tile
 * conversions into scratch (load_row, load_row16, load_row8) run on it. */
FA_INLINE int64_t FN(nload_row)(const int h, const int scaled, const char *src, FA_T scale, int64_t n, FA_T *out)
{
    int64_t c = 0;
#if FA_NARROW_ROWS
    const fa_vec s = VBCAST(scale);
    for (; c + FA_W <= n; c += FA_W) {
        const fa_vec x = FN(nload)(h, src + c * FA_ROW_ES(h));
        VSTORE(out + c, scaled ? VMUL(s, x) : x);
    }
#else
    (void)h, (void)scaled, (void)src, (void)scale, (void)n, (void)out;
#endif
    return c;
}

/* Vector c of nc of a row at k, of row kind h; with `masked`, masked by
 * mlo if it is the first and by mhi if it is the last (h, masked, c and nc
 * known at compile time; never masked for narrow kinds). */
FA_INLINE fa_vec FN(rvec)(const int h, const int masked, const int c, const int nc, const char *k, fa_mask mlo,
                          fa_mask mhi)
{
    if (FA_RK_NARROW(h)) return FN(nload)(h, k + c * FA_W * FA_ROW_ES(h));
#if FA_HALF_ROWS
    if (h) {
        const uint16_t *p = (const uint16_t *)k + c * FA_W;
        if (masked && c == 0 && nc == 1) return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(VMASK_AND(mlo, mhi), p));
        if (masked && c == 0) return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mlo, p));
        if (masked && c == nc - 1) return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mhi, p));
        return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)p));
    }
#endif
    const FA_T *p = (const FA_T *)k + c * FA_W;
    if (masked && c == 0 && nc == 1) return VLOAD_MASKZ(VMASK_AND(mlo, mhi), p);
    if (masked && c == 0) return VLOAD_MASKZ(mlo, p);
    if (masked && c == nc - 1) return VLOAD_MASKZ(mhi, p);
    return VLOAD(p);
}

/* One vector at p under mask m, of row kind h (narrow kinds: m must be
 * every lane). */
static inline fa_vec FN(rvec_m)(int h, fa_mask m, const char *p)
{
    if (FA_RK_NARROW(h)) {
        switch (h) { /* compile-time kinds for nload */
        case FA_RK_F16: return FN(nload)(FA_RK_F16, p);
        case FA_RK_BF16: return FN(nload)(FA_RK_BF16, p);
        case FA_RK_I8: return FN(nload)(FA_RK_I8, p);
        case FA_RK_E4M3: return FN(nload)(FA_RK_E4M3, p);
        default: return FN(nload)(FA_RK_E5M2, p);
        }
    }
#if FA_HALF_ROWS
    if (h) return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, p));
#endif
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

/* Prefetch row j of the plan (K and V), if it has one.  Always inlined:
 * GCC counts a prefetch as no side effect, so it finds a function that only
 * prefetches `const` and deletes every call to it that it has not inlined
 * first (GCC 12 emitted no prefetch at all from this function when it was
 * merely `static inline`). */
FA_INLINE void FN(prefetch_row)(const fa_prefetch_plan *pf, int64_t j)
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

/* CALL(h, ...) with the narrow row kind h (FA_RK_NARROW) as a compile-time
 * constant; no code on paths without narrow rows. */
#define FA_NARROW_SWITCH(h, CALL, ...)                                                              \
    do {                                                                                            \
        if (FA_NARROW_ROWS) switch (h) {                                                            \
            case FA_RK_F16: if (!FA_HALF_ROWS) CALL(FA_RK_F16, __VA_ARGS__); break;                 \
            case FA_RK_BF16: CALL(FA_RK_BF16, __VA_ARGS__); break;                                  \
            case FA_RK_I8: CALL(FA_RK_I8, __VA_ARGS__); break;                                      \
            case FA_RK_E4M3: CALL(FA_RK_E4M3, __VA_ARGS__); break;                                  \
            default: CALL(FA_RK_E5M2, __VA_ARGS__); break;                                          \
            }                                                                                       \
    } while (0)

/* Rows in registers at once by qk_rows_rk, rounded up to a power of two:
 * it keeps FA_W / FA_POW2(R) keys' scores for each of R rows in FA_W
 * accumulators. */
#define FA_POW2(r) ((r) <= 1 ? 1 : (r) <= 2 ? 2 : (r) <= 4 ? 4 : (r) <= 8 ? 8 : 16)

/* Vector c of the query rows against KB keys, each key vector loaded once
 * for all R rows: acc[r * KB + jj] += q[r][c] * k[jj][c].  The vector is
 * masked by m unless `full`. */
FA_INLINE void FN(qk_rows_rk_step)(const int R, const int KB, const int h, const int full, fa_mask m,
                                   const FA_T *qr, int64_t ldq, int64_t c, const char *kb, int64_t ldkb, fa_vec *acc)
{
    const int64_t es = FA_ROW_ES(h);
    fa_vec qv[FA_W];
    FA_UNROLL for (int r = 0; r < R; r++) qv[r] = VLOAD(qr + r * ldq + c * FA_W);
    FA_UNROLL for (int jj = 0; jj < KB; jj++)
    {
        const char *p = kb + jj * ldkb + c * FA_W * es;
        const fa_vec kv = full ? FN(rvec)(h, 0, 0, 1, p, m, m) : FN(rvec_m)(h, m, p);
        FA_UNROLL for (int r = 0; r < R; r++) acc[r * KB + jj] = VFMA(kv, qv[r], acc[r * KB + jj]);
    }
}

/* Scores of R (2 .. FA_ROWS_MAX) query rows against keys j0 .. j0 + KB - 1
 * (KB = FA_W / FA_POW2(R)), into st[r * lds + j0 + jj]: R x KB independent
 * dot products sweep the rows' nvec vectors together, so each K vector is
 * read once for all R rows (qk_rows' one-row sweeps read it R times) and
 * enough accumulators are in flight to keep the FMA units busy.  Masks as
 * in qk_rows. */
FA_INLINE void FN(qk_rows_rk)(const int R, const int KB, const int h, const int masked, int64_t nvec, const FA_T *qr,
                              int64_t ldq, const char *kb, int64_t ldkb, fa_mask m_first, fa_mask m_last, FA_T *st,
                              int64_t lds, int64_t j0)
{
    fa_vec acc[FA_W];
    FA_UNROLL for (int i = 0; i < FA_W; i++) acc[i] = VZERO();
    int64_t c = 0, end = nvec;
    if (masked) {
        FN(qk_rows_rk_step)(R, KB, h, 0, nvec == 1 ? VMASK_AND(m_first, m_last) : m_first, qr, ldq, 0, kb, ldkb, acc);
        c = 1;
        if (nvec > 1) end = nvec - 1;
    }
    for (; c < end; c++) FN(qk_rows_rk_step)(R, KB, h, 1, VMASK_ALL, qr, ldq, c, kb, ldkb, acc);
    if (masked && nvec > 1) FN(qk_rows_rk_step)(R, KB, h, 0, m_last, qr, ldq, nvec - 1, kb, ldkb, acc);
    FA_T t[FA_W];
    VSTORE(t, FN(hsums)(acc));
    FA_UNROLL for (int r = 0; r < R; r++) FA_UNROLL for (int jj = 0; jj < KB; jj++) st[r * lds + j0 + jj] = t[r * KB + jj];
}

/* qk_rows for keys j0 .. j1 - 1 one at a time (the last keys of a tile),
 * K rows from ka as in qk_rows. */
static void FN(qk_rows_each)(int64_t bq, int64_t j0, int64_t j1, int64_t nvec, const FA_T *qr, int64_t ldq,
                             const char *ka, int64_t ldkb, int h, fa_mask m_first, fa_mask m_last, FA_T *st,
                             int64_t lds)
{
    const int64_t es = FA_ROW_ES(h);
    for (int64_t r = 0; r < bq; r++)
        for (int64_t j = j0; j < j1; j++) {
            fa_vec a = VZERO();
            for (int64_t c = 0; c < nvec; c++) {
                const fa_mask m = VMASK_AND(c == 0 ? m_first : VMASK_ALL, c == nvec - 1 ? m_last : VMASK_ALL);
                a = VFMA(FN(rvec_m)(h, m, ka + j * ldkb + c * FA_W * es), VLOAD(qr + r * ldq + c * FA_W), a);
            }
            st[r * lds + j] = VHSUM(a);
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
                        int64_t ldkb, int h, int64_t bk, FA_T *st, int64_t lds, const fa_prefetch_plan *pf)
{
    const int64_t nvec = ldq / FA_W, es = FA_ROW_ES(h);
    const fa_mask m_first = VMASK((int)off, FA_W), m_last = VMASK(0, (int)(off + d - (nvec - 1) * FA_W));
    const int masked = off != 0 || d % FA_W != 0;
    const char *ka = k - off * es;
    if (bq >= 2 && bq <= FA_ROWS_MAX) { /* several rows: each K vector once for all of them */
        const int64_t kb_keys = FA_W / FA_POW2(bq);
        int64_t j0 = 0;
        for (; j0 + kb_keys <= bk; j0 += kb_keys) {
            for (int64_t j = j0; j < j0 + kb_keys; j++) FN(prefetch_row)(pf, j);
            const char *kb = ka + j0 * ldkb;
#define FA_QKRK_CALL(r)                                                                                       \
    do {                                                                                                      \
        if (h) FN(qk_rows_rk)((r), FA_W / FA_POW2(r), 1, masked, nvec, qr, ldq, kb, ldkb, m_first, m_last, st, \
                              lds, j0);                                                                       \
        else FN(qk_rows_rk)((r), FA_W / FA_POW2(r), 0, masked, nvec, qr, ldq, kb, ldkb, m_first, m_last, st,   \
                            lds, j0);                                                                         \
    } while (0)
            switch (bq) { /* compile-time row counts */
            case 2: FA_QKRK_CALL(2); break;
            case 3: if (FA_ROWS_MAX >= 3) FA_QKRK_CALL(3); break;
            case 4: if (FA_ROWS_MAX >= 4) FA_QKRK_CALL(4); break;
            case 5: if (FA_ROWS_MAX >= 5) FA_QKRK_CALL(5); break;
            case 6: if (FA_ROWS_MAX >= 6) FA_QKRK_CALL(6); break;
            case 7: if (FA_ROWS_MAX >= 7) FA_QKRK_CALL(7); break;
            default: if (FA_ROWS_MAX >= 8) FA_QKRK_CALL(8); break;
            }
#undef FA_QKRK_CALL
        }
        for (int64_t j = j0; j < bk; j++) FN(prefetch_row)(pf, j);
        FN(qk_rows_each)(bq, j0, bk, nvec, qr, ldq, ka, ldkb, h, m_first, m_last, st, lds);
        return;
    }
    for (int64_t j0 = 0; j0 < bk; j0 += FA_W) {
        const char *kb = ka + j0 * ldkb;
        /* spread the prefetch of later K and V rows over the work, as many
         * rows per key block as the block has keys, so requests never pile up */
        for (int64_t j = j0; j < j0 + FA_W; j++) FN(prefetch_row)(pf, j);
        if (bk - j0 < FA_W) {
            FN(qk_rows_each)(bq, j0, bk, nvec, qr, ldq, ka, ldkb, h, m_first, m_last, st, lds);
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

/* qk_rows for K rows of a narrow kind h (FA_RK_NARROW) that fill nvec whole
 * vectors (no lead, no masks; qr as pack_q lays it out with qoff 0), from
 * one query row on: every row count sweeps the rows together (qk_rows_rk),
 * so each K vector is converted once for all of them. */
static void FN(qk_rows_narrow)(int64_t bq, int64_t nvec, const FA_T *qr, int64_t ldq, const char *k, int64_t ldkb,
                               int h, int64_t bk, FA_T *st, int64_t lds, const fa_prefetch_plan *pf)
{
    const int64_t kb_keys = FA_W / FA_POW2(bq);
    int64_t j0 = 0;
    for (; j0 + kb_keys <= bk; j0 += kb_keys) {
        for (int64_t j = j0; j < j0 + kb_keys; j++) FN(prefetch_row)(pf, j);
        const char *kb = k + j0 * ldkb;
#define FA_QKN_KIND(hk, r)                                                                          \
    FN(qk_rows_rk)((r), FA_W / FA_POW2(r), (hk), 0, nvec, qr, ldq, kb, ldkb, VMASK_ALL, VMASK_ALL, st, lds, j0)
#define FA_QKN_CALL(r) FA_NARROW_SWITCH(h, FA_QKN_KIND, r)
        switch (bq) { /* compile-time row counts */
        case 1: FA_QKN_CALL(1); break;
        case 2: FA_QKN_CALL(2); break;
        case 3: if (FA_ROWS_MAX >= 3) FA_QKN_CALL(3); break;
        case 4: if (FA_ROWS_MAX >= 4) FA_QKN_CALL(4); break;
        case 5: if (FA_ROWS_MAX >= 5) FA_QKN_CALL(5); break;
        case 6: if (FA_ROWS_MAX >= 6) FA_QKN_CALL(6); break;
        case 7: if (FA_ROWS_MAX >= 7) FA_QKN_CALL(7); break;
        default: if (FA_ROWS_MAX >= 8) FA_QKN_CALL(8); break;
        }
#undef FA_QKN_CALL
#undef FA_QKN_KIND
    }
    for (int64_t j = j0; j < bk; j++) FN(prefetch_row)(pf, j);
    FN(qk_rows_each)(bq, j0, bk, nvec, qr, ldq, k, ldkb, h, VMASK_ALL, VMASK_ALL, st, lds);
}

/* ---- int8 keys on integer dot products ---------------------------------- */

/* A few query rows against int8 K rows (decoding with an int8 cache), as
 * llama.cpp does with its 8-bit caches: the item's scaled query rows are
 * quantised once, each to int8 with its own step (quantize_rows), and the
 * products of each K vector with every row run on integer multiply-adds,
 * exact in int32:
 *   AVX2: vpmaddubsw on |k| (0..128) and q with k's sign (-127..127), whose
 *     pair sums fit in int16 (2 x 128 x 127 < 2^15), then vpmaddwd by ones;
 *   AVX512-VNNI: vpdpbusd on k + 128 (0..255, an xor per K vector) and q,
 *     less 128 x sum(q), which each row keeps from its quantisation (an
 *     offset on q instead would need a sum over each K vector: one more
 *     accumulator per key, more than the registers hold).
 * A score is the integer dot product times the row's step (and, as on the
 * float kernels, times the K row's scale: scale_columns).  The lanes'
 * partial sums are added in float, exactly while every partial sum stays
 * below 2^24: rows of d <= FA_IDOT_MAXD elements (sums of at most
 * 128 x 127 x d, and 255 x 127 x d before VNNI's correction).  K rows fill
 * whole vectors of FA_IDOT_BYTES bytes. */
#undef FA_IDOT
#undef FA_IDOT_BYTES
#undef FA_IDOT_MAXD
#undef FA_IDOT_TARGET
#if FA_T_IS_FLOAT && FA_VEC_ISA == 1
#define FA_IDOT 1
#define FA_IDOT_BYTES 32
#define FA_IDOT_TARGET
#elif FA_T_IS_FLOAT && FA_VEC_ISA == 2 && defined(__GNUC__) && !defined(__clang__)
/* only on CPUs with AVX512-VNNI (fa_cpu_avx512vnni): the functions that
 * use it are compiled for it, the rest of the path is not */
#define FA_IDOT 2
#define FA_IDOT_BYTES 64
#define FA_IDOT_TARGET __attribute__((target("avx512vnni")))
#else
#define FA_IDOT 0
#define FA_IDOT_BYTES 64
#define FA_IDOT_TARGET
#endif
#define FA_IDOT_MAXD (FA_IDOT == 2 ? 512 : 1024)

/* The largest |q[c * cs]|, c < d (NaNs ignored), and whether every element
 * is finite: eight independent maxima and sums of |q| * 0 (0 while finite,
 * NaN after an infinity or a NaN), which the compiler turns into vectors
 * (one compare chain per element cost a decoding call's 4 query rows as
 * much as 512 keys of its integer K.Q). */
static FA_T FN(row_absmax)(const FA_T *q, int64_t cs, int64_t d, int *finite)
{
    FA_T m[8] = {0}, z[8] = {0};
    int64_t c = 0;
    if (cs == 1)
        for (; c + 8 <= d; c += 8)
            for (int i = 0; i < 8; i++) {
                const FA_T a = q[c + i] < 0 ? -q[c + i] : q[c + i];
                m[i] = a > m[i] ? a : m[i];
                z[i] += a * 0;
            }
    for (; c < d; c++) {
        const FA_T a = q[c * cs] < 0 ? -q[c * cs] : q[c * cs];
        m[0] = a > m[0] ? a : m[0];
        z[0] += a * 0;
    }
    FA_T amax = 0, zs = 0;
    for (int i = 0; i < 8; i++) {
        amax = m[i] > amax ? m[i] : amax;
        zs += z[i];
    }
    *finite = zs == 0;
    return amax;
}

/* Query rows against an int8 cache are quantised per row, on every path
 * and item shape (so that a row's result never depends on which computed
 * it): rows r < bq of x (element c of row r at x[r * rs + c * cs], d
 * elements, already times the softmax scale) get the step max |q| / 127
 * and the codes round(q / step), to nearest even (computed as
 * q * (127 / max) in double); fastattn.reference.int8_queries does the
 * same.  A row of zeros has step 0; a row with a NaN or an infinity step
 * NaN (its scores NaN, as in float).  With qi, the codes go there (rows of
 * ldqi bytes, zero-padded) with each row's sum of codes times 128 in
 * qsum, and x is left as it is; without, x's elements become step * code. */
static void FN(quantize_rows)(int64_t bq, int64_t d, FA_T *x, int64_t rs, int64_t cs, int8_t *qi, int64_t ldqi,
                              FA_T *step, int32_t *qsum)
{
    for (int64_t r = 0; r < bq; r++) {
        FA_T *q = x + r * rs;
        int finite;
        const FA_T amax = FN(row_absmax)(q, cs, d, &finite);
        if (qi && ldqi > 0) memset(qi + r * ldqi, 0, (size_t)ldqi);
        step[r] = finite ? (FA_T)((double)amax / 127.0) : (FA_T)NAN;
        const double inv = finite && amax > 0 ? 127.0 / (double)amax : 0;
        int32_t sum = 0;
        for (int64_t c = 0; c < d; c++) {
            const int code = (int)rint((double)q[c * cs] * inv); /* |code| <= 127; rint: nearest even */
            sum += code;
            if (qi)
                qi[r * ldqi + c] = (int8_t)code;
            else
                q[c * cs] = step[r] * (FA_T)code;
        }
        if (qsum) qsum[r] = 128 * sum;
    }
}

#if FA_IDOT
#if FA_IDOT == 1
#define FA_IV __m256i
#define FA_IV_ZERO() _mm256_setzero_si256()
#define FA_IV_LOAD(p) _mm256_loadu_si256((const __m256i *)(p))
#define FA_IV_FLOAT(x) _mm256_cvtepi32_ps(x)
#else
/* acc + the dot products of 4 unsigned bytes of a with 4 signed bytes of b
 * per lane (vpdpbusd).  In asm: GCC 12 and 13 give the intrinsic's
 * accumulator a new register each time (a copy around every vpdpbusd, and
 * accumulators spilled inside the K loop); tied in place, they stay put. */
#ifndef FA_DPBUSD_DEFINED
#define FA_DPBUSD_DEFINED
static inline __m512i fa_dpbusd(__m512i acc, __m512i a, __m512i b)
{
    __asm__("vpdpbusd %2, %1, %0" : "+v"(acc) : "v"(a), "v"(b));
    return acc;
}
#endif
#define FA_IV __m512i
#define FA_IV_ZERO() _mm512_setzero_si512()
#define FA_IV_LOAD(p) _mm512_loadu_si512((const void *)(p))
#define FA_IV_FLOAT(x) _mm512_cvtepi32_ps(x)
#endif

/* Scores of R (1 .. FA_ROWS_MAX) quantised query rows (qi, ldqi bytes
 * apart) against the KB int8 K rows at kb (ldkb apart), nb vectors each:
 * st[r * lds + j0 + jj] = step[r] * q[r] . k[jj], every K vector loaded
 * once for all R rows, R x KB integer accumulators turned into scores by
 * one reduction tree (as qk_rows_rk). */
FA_IDOT_TARGET FA_INLINE void FN(qk_i8_rk)(const int R, const int KB, int64_t nb, const int8_t *qi, int64_t ldqi,
                                           const char *kb, int64_t ldkb, const FA_T *step, const int32_t *qsum,
                                           FA_T *st, int64_t lds, int64_t j0)
{
    FA_IV acc[FA_W];
    FA_UNROLL for (int i = 0; i < FA_W; i++) acc[i] = FA_IV_ZERO();
#if FA_IDOT == 2
    const __m512i flip = _mm512_set1_epi8((char)0x80);
#else
    const __m256i ones = _mm256_set1_epi16(1);
#endif
    for (int64_t c = 0; c < nb; c++) {
        FA_IV qv[FA_W];
        FA_UNROLL for (int r = 0; r < R; r++) qv[r] = FA_IV_LOAD(qi + r * ldqi + c * FA_IDOT_BYTES);
        FA_UNROLL for (int jj = 0; jj < KB; jj++)
        {
            const FA_IV kv = FA_IV_LOAD(kb + jj * ldkb + c * FA_IDOT_BYTES);
#if FA_IDOT == 1
            const __m256i ak = _mm256_abs_epi8(kv);
            FA_UNROLL for (int r = 0; r < R; r++) acc[r * KB + jj] = _mm256_add_epi32(
                acc[r * KB + jj], _mm256_madd_epi16(_mm256_maddubs_epi16(ak, _mm256_sign_epi8(qv[r], kv)), ones));
#else
            const __m512i ku = _mm512_xor_si512(kv, flip); /* k + 128 */
            FA_UNROLL for (int r = 0; r < R; r++) acc[r * KB + jj] = fa_dpbusd(acc[r * KB + jj], ku, qv[r]);
#endif
        }
    }
    fa_vec f[FA_W];
    FA_UNROLL for (int i = 0; i < FA_W; i++) f[i] = FA_IV_FLOAT(acc[i]);
    FA_T t[FA_W];
    VSTORE(t, FN(hsums)(f));
    FA_UNROLL for (int r = 0; r < R; r++) FA_UNROLL for (int jj = 0; jj < KB; jj++)
        st[r * lds + j0 + jj] = (FA_IDOT == 2 ? t[r * KB + jj] - (FA_T)qsum[r] : t[r * KB + jj]) * step[r];
}

#if FA_IDOT == 2
#define FA_LANE_HEAD 256 /* bytes of lane_rows' vectors of sums and steps */
/* Three to eight quantised rows (qi, rows of d bytes; their sums and steps)
 * in the lane layout of qk_i8_lanes, at ql (64-byte aligned): four vectors,
 * each row's sum in the four elements of its lane (group g's rows 4g ..
 * 4g + 3 in vector g, lane l for row 4g + l), then each row's step in the
 * same way (vectors 2 and 3); then group g's rows, for each 16-byte chunk
 * c of the rows, as one vector whose 128-bit lane l is chunk c of row
 * 4g + l (zeros past row bq). */
static void FN(lane_rows)(int64_t bq, int64_t d, const int8_t *qi, const int32_t *qsum, const FA_T *step,
                          int8_t *ql)
{
    const int64_t nc = d / 16;
    float *head = (float *)(void *)ql;
    for (int64_t x = 0; x < 32; x++) {
        const int64_t r = x / 4; /* vector x / 16, lane (x / 4) % 4 */
        head[x] = r < bq ? (float)qsum[r] : 0.0f;
        head[32 + x] = r < bq ? (float)step[r] : 0.0f;
    }
    int8_t *rows = ql + FA_LANE_HEAD;
    for (int64_t g = 0; g < (bq + 3) / 4; g++)
        for (int64_t c = 0; c < nc; c++)
            for (int64_t l = 0; l < 4; l++) {
                int8_t *dst = rows + ((g * nc + c) * 4 + l) * 16;
                if (4 * g + l < bq)
                    memcpy(dst, qi + (4 * g + l) * d + c * 16, 16);
                else
                    memset(dst, 0, 16);
            }
}

#ifndef FA_LANE_SUMS4_DEFINED
#define FA_LANE_SUMS4_DEFINED
/* The sums of the four int32 elements of each 128-bit lane of four vectors
 * a[0..3]: element x of lane l of the result is the sum of lane l of a[x]
 * (two unpacks and an add per level). */
FA_IDOT_TARGET FA_INLINE __m512i fa_lane_sums4(const __m512i *a)
{
    const __m512i t0 = _mm512_add_epi32(_mm512_unpacklo_epi32(a[0], a[1]), _mm512_unpackhi_epi32(a[0], a[1]));
    const __m512i t1 = _mm512_add_epi32(_mm512_unpacklo_epi32(a[2], a[3]), _mm512_unpackhi_epi32(a[2], a[3]));
    return _mm512_add_epi32(_mm512_unpacklo_epi64(t0, t1), _mm512_unpackhi_epi64(t0, t1));
}
#endif

/* qk_i8_rk for NG groups of four rows in lane layout (lane_rows; nc chunks
 * of 16 bytes) against KB (4 or 8; only the first nk loaded) int8 K rows at
 * kb, ldkb apart: each 16-byte chunk of a K row is broadcast to the four
 * 128-bit lanes by its load, so one vpdpbusd multiplies it with that chunk
 * of four rows, and one accumulator per key and group sums a row in each
 * lane; four keys' accumulators give the 16 scores of 4 rows x 4 keys in six
 * unpacks and three adds (qk_i8_rk's accumulator per row and key needs a
 * tree over all 16 lanes, and a scalar store per score).  The integer sums
 * are exact and converted once, then less the rows' sums (vq: lane l holds
 * row 4g + l's) and times their steps (vs), the operations and order of
 * qk_i8_rk: the same scores, bit for bit. */
FA_IDOT_TARGET FA_INLINE void FN(qk_i8_lanes)(const int NG, const int KB, const int nk, int64_t nc,
                                              const int8_t *ql, const char *kb, int64_t ldkb, const __m512 *vq,
                                              const __m512 *vs, int64_t bq, FA_T *st, int64_t lds, int64_t j0)
{
    __m512i acc[2][8];
    FA_UNROLL for (int g = 0; g < NG; g++) FA_UNROLL for (int jj = 0; jj < KB; jj++) acc[g][jj] = _mm512_setzero_si512();
    const __m512i flip = _mm512_set1_epi8((char)0x80);
    for (int64_t c = 0; c < nc; c++) {
        FA_UNROLL for (int jj = 0; jj < KB; jj++)
        {
            if (jj >= nk) break;
            const __m512i kv = _mm512_xor_si512(
                _mm512_broadcast_i32x4(_mm_loadu_si128((const __m128i *)(kb + jj * ldkb + c * 16))), flip);
            FA_UNROLL for (int g = 0; g < NG; g++) acc[g][jj] = fa_dpbusd(
                acc[g][jj], kv, _mm512_load_si512((const void *)(ql + (g * nc + c) * 64)));
        }
    }
    FA_UNROLL for (int g = 0; g < NG; g++) FA_UNROLL for (int j4 = 0; j4 < KB; j4 += 4)
    {
        const __m512 s = _mm512_mul_ps(_mm512_sub_ps(_mm512_cvtepi32_ps(fa_lane_sums4(acc[g] + j4)), vq[g]), vs[g]);
        const int n4 = nk - j4 < 4 ? nk - j4 : 4;
        if (n4 <= 0) break;
        const __mmask8 m = (__mmask8)((1u << n4) - 1);
        FA_T *o = st + 4 * g * lds + j0 + j4;
        _mm_mask_storeu_ps(o, m, _mm512_castps512_ps128(s));
        if (4 * g + 1 < bq) _mm_mask_storeu_ps(o + lds, m, _mm512_extractf32x4_ps(s, 1));
        if (4 * g + 2 < bq) _mm_mask_storeu_ps(o + 2 * lds, m, _mm512_extractf32x4_ps(s, 2));
        if (4 * g + 3 < bq) _mm_mask_storeu_ps(o + 3 * lds, m, _mm512_extractf32x4_ps(s, 3));
    }
}
#endif

/* qk_rows on integer dot products (see above) for the bq quantised rows of
 * the item (w->qi, w->qstep; with ql, three or more rows also in lane
 * layout: qk_i8_lanes) against bk int8 K rows of d elements at k, ldkb bytes
 * apart; scores unscaled by the K rows' scales, as qk_rows_narrow gives
 * them. */
FA_IDOT_TARGET static void FN(qk_rows_i8)(int64_t bq, int64_t d, const int8_t *qi, int64_t ldqi, const int8_t *ql,
                                          const FA_T *step, const int32_t *qsum, const char *k, int64_t ldkb,
                                          int64_t bk, FA_T *st, int64_t lds, const fa_prefetch_plan *pf)
{
    const int64_t nb = d / FA_IDOT_BYTES, kb_keys = FA_W / FA_POW2(bq);
    int64_t j0 = 0;
#if FA_IDOT == 2
    if (ql) {
        const int64_t nc = d / 16;
        const __m512 vq[2] = {_mm512_load_ps((const float *)(const void *)ql),
                              _mm512_load_ps((const float *)(const void *)ql + 16)};
        const __m512 vs[2] = {_mm512_load_ps((const float *)(const void *)ql + 32),
                              _mm512_load_ps((const float *)(const void *)ql + 48)};
        ql += FA_LANE_HEAD;
        const int KB = bq > 4 ? 4 : 8;
        for (; j0 + KB <= bk; j0 += KB) {
            for (int64_t j = j0; j < j0 + KB; j++) FN(prefetch_row)(pf, j);
            if (bq > 4)
                FN(qk_i8_lanes)(2, 4, 4, nc, ql, k + j0 * ldkb, ldkb, vq, vs, bq, st, lds, j0);
            else
                FN(qk_i8_lanes)(1, 8, 8, nc, ql, k + j0 * ldkb, ldkb, vq, vs, bq, st, lds, j0);
        }
        for (; j0 < bk; j0 += 4) { /* the last keys, four at a time */
            const int nk = (int)fa_min64(4, bk - j0);
            for (int64_t j = j0; j < j0 + nk; j++) FN(prefetch_row)(pf, j);
            const char *kb = k + j0 * ldkb;
#define FA_QKL_TAIL(N)                                                                              \
    (bq > 4 ? FN(qk_i8_lanes)(2, 4, (N), nc, ql, kb, ldkb, vq, vs, bq, st, lds, j0)                \
            : FN(qk_i8_lanes)(1, 4, (N), nc, ql, kb, ldkb, vq, vs, bq, st, lds, j0))
            switch (nk) {
            case 1: FA_QKL_TAIL(1); break;
            case 2: FA_QKL_TAIL(2); break;
            case 3: FA_QKL_TAIL(3); break;
            default: FA_QKL_TAIL(4); break;
            }
#undef FA_QKL_TAIL
        }
        return;
    }
#else
    (void)ql;
#endif
#define FA_QKI_SWITCH(KB)                                                                           \
    switch (bq) { /* compile-time row counts */                                                     \
    case 1: FN(qk_i8_rk)(1, (KB) ? (KB) : FA_W, nb, qi, ldqi, kb, ldkb, step, qsum, st, lds, j0); break;  \
    case 2: FN(qk_i8_rk)(2, (KB) ? (KB) : FA_W / 2, nb, qi, ldqi, kb, ldkb, step, qsum, st, lds, j0); break; \
    case 3: if (FA_ROWS_MAX >= 3) FN(qk_i8_rk)(3, (KB) ? (KB) : FA_W / 4, nb, qi, ldqi, kb, ldkb, step, qsum, st, lds, j0); break; \
    case 4: if (FA_ROWS_MAX >= 4) FN(qk_i8_rk)(4, (KB) ? (KB) : FA_W / 4, nb, qi, ldqi, kb, ldkb, step, qsum, st, lds, j0); break; \
    case 5: if (FA_ROWS_MAX >= 5) FN(qk_i8_rk)(5, (KB) ? (KB) : FA_W / 8, nb, qi, ldqi, kb, ldkb, step, qsum, st, lds, j0); break; \
    case 6: if (FA_ROWS_MAX >= 6) FN(qk_i8_rk)(6, (KB) ? (KB) : FA_W / 8, nb, qi, ldqi, kb, ldkb, step, qsum, st, lds, j0); break; \
    case 7: if (FA_ROWS_MAX >= 7) FN(qk_i8_rk)(7, (KB) ? (KB) : FA_W / 8, nb, qi, ldqi, kb, ldkb, step, qsum, st, lds, j0); break; \
    default: if (FA_ROWS_MAX >= 8) FN(qk_i8_rk)(8, (KB) ? (KB) : FA_W / 8, nb, qi, ldqi, kb, ldkb, step, qsum, st, lds, j0); break; \
    }
    for (; j0 + kb_keys <= bk; j0 += kb_keys) {
        for (int64_t j = j0; j < j0 + kb_keys; j++) FN(prefetch_row)(pf, j);
        const char *kb = k + j0 * ldkb;
        FA_QKI_SWITCH(0)
    }
    for (; j0 < bk; j0++) { /* the last keys, one at a time */
        FN(prefetch_row)(pf, j0);
        const char *kb = k + j0 * ldkb;
        FA_QKI_SWITCH(1)
    }
#undef FA_QKI_SWITCH
}
#undef FA_IV
#undef FA_IV_ZERO
#undef FA_IV_LOAD
#undef FA_IV_FLOAT
#endif /* FA_IDOT */

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

/* P.V with weights as P^T (ldr = 1) or as P rows (ldp = 1), V rows of FA_T:
 * pv_mk at the tile size (mr, nv) picks. */
FA_INLINE void FN(pv_block_at)(int mr, int nv, int64_t bk, const FA_T *pt, int64_t ldp, int64_t ldr, const FA_T *v,
                               int64_t ldv, FA_T *o, int64_t ldo, const FA_T *alpha)
{
#define FA_PV_CALL(m, n)                                                                            \
    if ((m) <= FA_MR && (n) <= FA_NV)                                                               \
    FN(pv_mk)((m), (n), 0, 0, bk, pt, ldp, ldr, (const char *)v, ldv * (int64_t)sizeof(FA_T), o, ldo, alpha,   \
              VMASK_ALL, VMASK_ALL)
    FA_TILE_SWITCH(mr, nv, FA_PV_CALL)
#undef FA_PV_CALL
}

/* pv_block for a transposed tile (the backward's dV and dK: weights of row
 * r and term j at pt[r * FA_BQ + j]), its strides as constants. */
static void FN(pv_block_tr)(int mr, int nv, int64_t bk, const FA_T *pt, const FA_T *v, int64_t ldv, FA_T *o,
                            int64_t ldo, const FA_T *alpha)
{
    FN(pv_block_at)(mr, nv, bk, pt, 1, FA_BQ, v, ldv, o, ldo, alpha);
}

/* pv_block for the prefill's score tile (P^T, FA_BQ apart): its strides as
 * constants, so the code is specialised for them whatever GCC decides for
 * pv_block (unspecialised, the prefill ran 3-5% slower). */
static void FN(pv_block_st)(int mr, int nv, int64_t bk, const FA_T *pt, const FA_T *v, int64_t ldv, FA_T *o,
                            int64_t ldo, const FA_T *alpha)
{
    FN(pv_block_at)(mr, nv, bk, pt, FA_BQ, 1, v, ldv, o, ldo, alpha);
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

/* pv_mk for up to four rows of weights (P as rows, ldr apart) and
 * nv <= FA_RV / 2 vectors of V rows of a narrow kind h (whole vectors, no
 * masks): each V vector is converted once for all the rows. */
static void FN(pv_rows_narrow)(int mr, int nv, int h, int64_t bk, const FA_T *p, int64_t ldr, const char *v,
                               int64_t ldvb, FA_T *o, int64_t ldo, const FA_T *alpha)
{
#define FA_PVN_KIND(hk, m, n)                                                                       \
    FN(pv_mk)((m), (n), 0, (hk), bk, p, 1, ldr, v, ldvb, o, ldo, alpha, VMASK_ALL, VMASK_ALL)
#define FA_PVN_CALL(m, n)                                                                           \
    if ((n) <= FA_RV / 2) FA_NARROW_SWITCH(h, FA_PVN_KIND, m, n)
    switch (mr * 16 + nv) {
    case 16 + 1: FA_PVN_CALL(1, 1); break;
    case 16 + 2: FA_PVN_CALL(1, 2); break;
    case 16 + 3: FA_PVN_CALL(1, 3); break;
    case 16 + 4: FA_PVN_CALL(1, 4); break;
    case 32 + 1: FA_PVN_CALL(2, 1); break;
    case 32 + 2: FA_PVN_CALL(2, 2); break;
    case 32 + 3: FA_PVN_CALL(2, 3); break;
    case 32 + 4: FA_PVN_CALL(2, 4); break;
    case 48 + 1: FA_PVN_CALL(3, 1); break;
    case 48 + 2: FA_PVN_CALL(3, 2); break;
    case 48 + 3: FA_PVN_CALL(3, 3); break;
    case 48 + 4: FA_PVN_CALL(3, 4); break;
    case 64 + 1: FA_PVN_CALL(4, 1); break;
    case 64 + 2: FA_PVN_CALL(4, 2); break;
    case 64 + 3: FA_PVN_CALL(4, 3); break;
    case 64 + 4: FA_PVN_CALL(4, 4); break;
    default: break;
    }
#undef FA_PVN_CALL
#undef FA_PVN_KIND
}

/* ---- operands ----------------------------------------------------------- */

/* Storage reads and writes: FA_LD(p) gives the FA_T value of the FA_S at p,
 * FA_ST(x) the FA_S nearest the FA_T x. */
#if FA_S_KIND == 0
#define FA_LD(p) (*(p))
#define FA_ST(x) (x)
#elif FA_S_KIND == 1 && FA_F16C
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

/* How the few-row kernels read the rows of K (v = 0) or V (v = 1) in
 * place: 1 as float16 (FA_HALF_ROWS), 0 as FA_T, -1 not at all (they are
 * packed; or they are stored in another type than q, for narrow_kind and
 * kv_rows: 16-bit rows whose elements lie 4 bytes apart are no float rows). */
static inline int FN(few_rows_kind)(const fa_problem *p, int v)
{
    const int64_t rs = v ? p->v_rs : p->k_rs, cs = v ? p->v_cs : p->k_cs;
    if (p->kv_dtype != p->dtype) return -1;
    if (FA_HALF_ROWS && cs == 2 && rs % 2 == 0) return 1;
    return FN(rows_in_place)(rs, cs) ? 0 : -1;
}

/* The narrow row kind (FA_RK_*) in which the few-row kernels read entry
 * rows of K (v = 0) or V (v = 1) stored in another type than FA_T, or -1
 * (they are converted into scratch by kv_rows): on FA_NARROW_ROWS paths,
 * for rows of contiguous elements that fill whole vectors, when the path
 * does not read them as FA_HALF_ROWS (few_rows_kind). */
static inline int FN(narrow_kind)(const fa_problem *p, int v)
{
    const int64_t cs = v ? p->v_cs : p->k_cs, n = v ? p->dv : p->d;
    if (!FA_NARROW_ROWS || n <= 0 || n % FA_W != 0 || FN(few_rows_kind)(p, v) >= 0) return -1;
    int h;
    switch (p->kv_dtype == p->dtype ? (FA_S_KIND == 1 ? FA_F16 : FA_S_KIND == 2 ? FA_BF16 : -1) : p->kv_dtype) {
    case FA_F16: h = FA_RK_F16; break;
    case FA_BF16: h = FA_RK_BF16; break;
    case FA_I8: h = FA_RK_I8; break;
    case FA_E4M3: h = FA_RK_E4M3; break;
    case FA_E5M2: h = FA_RK_E5M2; break;
    default: return -1;
    }
    return cs == FA_ROW_ES(h) ? h : -1;
}

/* Column j of a few-row item's scores or weights (st: bq rows, FA_BK
 * apart) times the scale of row k0 + j of its 8-bit K (v = 0) or V (v = 1),
 * as a multiplier of the values nload gives; sc: bk elements of scratch. */
static void FN(scale_columns)(const fa_problem *p, const int64_t *e, int v, int64_t k0, int64_t bk, int64_t bq,
                              FA_T *st, FA_T *sc)
{
    const char *s = (const char *)(v ? p->v_scales : p->k_scales) + e[v ? FA_E_VS : FA_E_KS];
    const int64_t srs = v ? p->vs_rs : p->ks_rs;
    const FA_T unit = p->kv_dtype == FA_E4M3 ? (FA_T)FA_E4M3_UNIT : 1;
    for (int64_t j = 0; j < bk; j++) sc[j] = unit * (FA_T) * (const float *)(s + (k0 + j) * srs);
    for (int64_t r = 0; r < bq; r++)
        for (int64_t j = 0; j < bk; j++) st[r * FA_BK + j] *= sc[j];
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
    int64_t c = FN(nload_row)(FA_S_KIND == 1 ? FA_RK_F16 : FA_RK_BF16, 0, row, 1, n, out);
    for (; c < n; c++) out[c] = FA_LD(src + c);
#endif
}

/* out[c] = scale * value of the 8-bit element c of a row (kv: FA_I8,
 * FA_E4M3 or FA_E5M2), elements cs bytes apart, for c < n.  The floats
 * convert through float16 bit patterns (fa_half.h); contiguous elements in
 * vectors (nload_row) where the path has narrow rows. */
static void FN(load_row8)(const uint8_t *src, int64_t cs, int kv, FA_T scale, int64_t n, FA_T *out)
{
    int64_t c = 0;
    if (kv == FA_I8) {
        if (cs == 1) c = FN(nload_row)(FA_RK_I8, 1, (const char *)src, scale, n, out);
        for (; c < n; c++) out[c] = scale * (FA_T)(int8_t)src[c * cs];
        return;
    }
    const int e4 = kv == FA_E4M3;
    if (e4) scale *= (FA_T)FA_E4M3_UNIT;
    if (cs == 1)
        c = e4 ? FN(nload_row)(FA_RK_E4M3, 1, (const char *)src, scale, n, out)
               : FN(nload_row)(FA_RK_E5M2, 1, (const char *)src, scale, n, out);
    for (; c < n; c++) {
        const uint8_t x = src[c * cs];
        out[c] = scale * (FA_T)fa_f16_to_f32(e4 ? fa_e4m3_f16_bits(x) : fa_e5m2_f16_bits(x));
    }
}

/* dst[j][c] = src[r0 + j][c] for c < nc, zero for nc <= c < ld.  Aligned to
 * a cache line: its conversion loop is the hot part of float16 decoding on
 * AVX2, which ran 5-8% slower (same-process A/B, same machine code) when
 * another function's growth moved it off one. */
__attribute__((aligned(64))) static void FN(pack_rows)(const void *base, int64_t off, int64_t rs, int64_t cs,
                                                       int64_t r0, int64_t nr, int64_t nc, FA_T *dst, int64_t ld)
{
    for (int64_t j = 0; j < nr; j++) {
        FN(load_row)((const char *)base + off + (r0 + j) * rs, cs, nc, dst + j * ld);
        for (int64_t c = nc; c < ld; c++) dst[j * ld + c] = 0;
    }
}

#if FA_T_IS_FLOAT && (FA_VEC_ISA == 1 || FA_VEC_ISA == 2)
/* col[i] = element c + i of the 8 rows (an 8 x 8 transpose in registers),
 * the rows float32, or float16 or bfloat16 converted on load (kind, a
 * constant: FA_MASK_F32, FA_MASK_F16 or FA_MASK_BF16).  Rows r and r + 4
 * are loaded into the two halves of one register, so the halves need no
 * exchange afterwards: two shuffles per column, not three (the shuffle
 * port is what this transpose waits for). */
FA_INLINE __m256 FN(rows_halves)(const int kind, const void *lo, const void *hi, int64_t x)
{
    if (kind == FA_MASK_F32)
        return _mm256_insertf128_ps(_mm256_castps128_ps256(_mm_loadu_ps((const float *)lo + x)),
                                    _mm_loadu_ps((const float *)hi + x), 1);
    const __m128i h = _mm_unpacklo_epi64(_mm_loadl_epi64((const __m128i *)((const uint16_t *)lo + x)),
                                         _mm_loadl_epi64((const __m128i *)((const uint16_t *)hi + x)));
    if (kind == FA_MASK_F16) return _mm256_cvtph_ps(h);
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

FA_INLINE void FN(transpose8_of)(const int kind, const void *const row[8], int64_t c, __m256 col[8])
{
    for (int h = 0; h < 2; h++) { /* elements c + 4h .. c + 4h + 3 */
        const int64_t x = c + 4 * h;
        const __m256 r0 = FN(rows_halves)(kind, row[0], row[4], x), r1 = FN(rows_halves)(kind, row[1], row[5], x);
        const __m256 r2 = FN(rows_halves)(kind, row[2], row[6], x), r3 = FN(rows_halves)(kind, row[3], row[7], x);
        const __m256 t0 = _mm256_unpacklo_ps(r0, r1), t1 = _mm256_unpackhi_ps(r0, r1);
        const __m256 t2 = _mm256_unpacklo_ps(r2, r3), t3 = _mm256_unpackhi_ps(r2, r3);
        col[4 * h] = _mm256_shuffle_ps(t0, t2, _MM_SHUFFLE(1, 0, 1, 0));
        col[4 * h + 1] = _mm256_shuffle_ps(t0, t2, _MM_SHUFFLE(3, 2, 3, 2));
        col[4 * h + 2] = _mm256_shuffle_ps(t1, t3, _MM_SHUFFLE(1, 0, 1, 0));
        col[4 * h + 3] = _mm256_shuffle_ps(t1, t3, _MM_SHUFFLE(3, 2, 3, 2));
    }
}

FA_INLINE void FN(transpose8)(const float *const row[8], int64_t c, __m256 col[8])
{
    FN(transpose8_of)(FA_MASK_F32, (const void *const *)row, c, col);
}
#endif

/* dst[c][r] = scale * src[r0 + r][c] for r < nr, c < nc; zero for nr <= r < nrp,
 * where row v of src is row v % lq of head v / lq (heads hs bytes apart).
 * Packs Q^T (and, for fa_weighted_sum, W^T). */
static void FN(pack_transposed)(const void *base, int64_t off, int64_t rs, int64_t cs, int64_t lq,
                                int64_t hs, int64_t r0, int64_t nr, int64_t nrp, int64_t nc, FA_T scale,
                                FA_T *dst, int64_t ld)
{
    int64_t rv = 0; /* rows done in 8 x 8 blocks */
#if FA_T_IS_FLOAT && FA_S_KIND == 0 && (FA_VEC_ISA == 1 || FA_VEC_ISA == 2)
    if (cs == (int64_t)sizeof(float)) { /* 8 x 8 transposes in registers (a scalar transpose cost tiny
                                         * sequences an eighth of their time) */
        const __m256 s = _mm256_set1_ps(scale);
        for (fa_vrow at = fa_vrow_at(r0, lq); rv + 8 <= nr; rv += 8) {
            const float *row[8];
            for (int i = 0; i < 8; i++, fa_vrow_next(&at))
                row[i] = (const float *)((const char *)base + off + fa_vrow_bytes(&at, rs, hs));
            int64_t c = 0;
            for (; c + 8 <= nc; c += 8) {
                __m256 col[8];
                FN(transpose8)(row, c, col);
                for (int i = 0; i < 8; i++) _mm256_storeu_ps(dst + (c + i) * ld + rv, _mm256_mul_ps(s, col[i]));
            }
            for (; c < nc; c++)
                for (int i = 0; i < 8; i++) dst[c * ld + rv + i] = scale * row[i][c];
        }
    }
#endif
    for (fa_vrow at = fa_vrow_at(r0 + rv, lq); rv < nr; rv++, fa_vrow_next(&at)) {
        const char *row = (const char *)base + off + fa_vrow_bytes(&at, rs, hs);
        for (int64_t c = 0; c < nc; c++) dst[c * ld + rv] = scale * FA_AT(row, c * cs);
    }
    for (int64_t c = 0; c < nc; c++)
        for (int64_t r = nr; r < nrp; r++) dst[c * ld + r] = 0;
}

/* Where an entry's K rows start within a vector, in elements (see
 * qk_rows): 0 unless they are read in place with a row stride that keeps
 * every row at the same place. */
static int64_t FN(k_lead)(const fa_problem *p, const int64_t *e)
{
    return FN(rows_lead)(FN(few_rows_kind)(p, 0), (uintptr_t)((const char *)p->k + e[FA_E_K]),
                         p->k_rs);
}

/* Does this path compute an item's K.Q on integer dot products?  For int8
 * K rows read in place (narrow_kind) of d elements. */
static inline int FN(int8_dot)(const fa_problem *p, int64_t d)
{
    return FA_IDOT && (FA_IDOT != 2 || fa_cpu_avx512vnni()) && p->kv_dtype == FA_I8 && d % FA_IDOT_BYTES == 0 &&
           d <= FA_IDOT_MAXD && FN(narrow_kind)(p, 0) == FA_RK_I8;
}

/* The item's scaled query rows into w->qt: as Q^T (d x FA_BQ, zero past
 * row bq) for the S^T micro-kernel, or, for at most FA_ROWS_MAX rows, as
 * rows for qk_rows: w->qoff zeros, the row, zeros up to w->ldq. */
static void FN(pack_q)(const fa_problem *p, const int64_t *e, int64_t row0, int64_t bq, FN(scratch) *w)
{
    const int64_t lq = e[FA_E_LQ], d = p->d;
    FA_T *qt = w->qt;
    w->qi = NULL;
    w->ql = NULL;
    if (bq <= FA_ROWS_MAX) {
        const int64_t off = FN(k_lead)(p, e), ldq = fa_roundup64(off + d, FA_W);
        w->qoff = off;
        w->ldq = ldq;
        const FA_T scale = (FA_T)p->scale;
        fa_vrow at = fa_vrow_at(row0, lq);
        for (int64_t r = 0; r < bq; r++, fa_vrow_next(&at)) {
            const char *row = (const char *)p->q + e[FA_E_Q] + fa_vrow_bytes(&at, p->q_rs, p->q_hs);
            FA_T *dst = qt + r * ldq;
            memset(dst, 0, (size_t)off * sizeof(FA_T));
#if FA_S_KIND == 0
            if (p->q_cs == (int64_t)sizeof(FA_T)) { /* in vectors */
                const FA_T *src = (const FA_T *)row;
                for (int64_t c = 0; c < d; c++) dst[off + c] = scale * src[c];
            } else
#endif
            {
                FN(load_row)(row, p->q_cs, d, dst + off); /* in vectors where contiguous */
                for (int64_t c = off; c < off + d; c++) dst[c] *= scale;
            }
            memset(dst + off + d, 0, (size_t)(ldq - off - d) * sizeof(FA_T));
        }
        if (p->kv_dtype == FA_I8) { /* behind the float rows in qt: steps, sums, 8-bit rows of d bytes */
            FA_T *step = qt + FA_ROWS_MAX * ldq;
            int32_t *qsum = (int32_t *)(step + FA_ROWS_MAX);
            int8_t *qi = FN(int8_dot)(p, d) ? (int8_t *)(qsum + FA_ROWS_MAX) : NULL;
            FN(quantize_rows)(bq, d, qt + off, ldq, 1, qi, d, step, qsum);
            w->qsum = qsum;
            w->qi = qi;
#if FA_IDOT == 2
            if (qi && bq >= 3) { /* the lane layout after the rows, 64-byte aligned */
                w->ql = (int8_t *)fa_roundup64((int64_t)(uintptr_t)(qi + FA_ROWS_MAX * d), 64);
                FN(lane_rows)(bq, d, qi, qsum, step, w->ql);
            }
#endif
            w->qstep = step;
        }
    } else {
        FN(pack_transposed)(p->q, e[FA_E_Q], p->q_rs, p->q_cs, lq, p->q_hs, row0, bq,
                            fa_roundup64(bq, FA_W), d, (FA_T)p->scale, qt, FA_BQ);
        if (p->kv_dtype == FA_I8) {
            FA_T step[FA_BQ];
            FN(quantize_rows)(bq, d, qt, 1, FA_BQ, NULL, 0, step, NULL);
        }
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

/* out[c] = the 16-bit float (kv: FA_F16 or FA_BF16) element c of a row,
 * elements cs bytes apart, for c < n: k and v stored in 16 bits under
 * queries of another type. */
static void FN(load_row16)(const uint16_t *src, int64_t cs, int kv, int64_t n, FA_T *out)
{
    int64_t c = 0;
    if (cs == 2) {
        c = kv == FA_F16 ? FN(nload_row)(FA_RK_F16, 0, (const char *)src, 1, n, out)
                         : FN(nload_row)(FA_RK_BF16, 0, (const char *)src, 1, n, out);
        for (; c < n; c++) out[c] = (FA_T)(kv == FA_F16 ? fa_f16_to_f32(src[c]) : fa_bf16_to_f32(src[c]));
        return;
    }
    for (; c < n; c++) {
        const uint16_t x = *(const uint16_t *)((const char *)src + c * cs);
        out[c] = (FA_T)(kv == FA_F16 ? fa_f16_to_f32(x) : fa_bf16_to_f32(x));
    }
}

/* Rows k0 .. k0 + bk of entry e's K (v = 0) or V (v = 1), as key_rows
 * gives them; rows stored in another type than q's are converted into buf
 * (8-bit rows dequantised with their scales). */
static const FA_T *FN(kv_rows)(const fa_problem *p, const int64_t *e, int v, int64_t k0, int64_t bk, int64_t n,
                               int64_t np, FA_T *buf, int64_t *ld)
{
    const void *base = v ? p->v : p->k;
    const int64_t off = e[v ? FA_E_V : FA_E_K], rs = v ? p->v_rs : p->k_rs, cs = v ? p->v_cs : p->k_cs;
    if (p->kv_dtype == p->dtype) return FN(key_rows)(base, off, rs, cs, k0, bk, n, np, buf, ld);
    const char *scales = (const char *)(v ? p->v_scales : p->k_scales) + e[v ? FA_E_VS : FA_E_KS];
    const int64_t srs = v ? p->vs_rs : p->ks_rs;
    for (int64_t j = 0; j < bk; j++) {
        FA_T *dst = buf + j * np;
        const char *row = (const char *)base + off + (k0 + j) * rs;
        if (p->kv_dtype >= FA_I8)
            FN(load_row8)((const uint8_t *)row, cs, p->kv_dtype, (FA_T) * (const float *)(scales + (k0 + j) * srs), n,
                          dst);
        else
            FN(load_row16)((const uint16_t *)row, cs, p->kv_dtype, n, dst);
        for (int64_t c = n; c < np; c++) dst[c] = 0;
    }
    *ld = np;
    return buf;
}

/* ---- score tile --------------------------------------------------------- */

/* The keys [*j0, *j1) of a tile of bk keys that the row vector from row c
 * may see: its union of the rows' ranges (vlo, vhi: tile_ranges; an empty
 * range if none), or all of them where vlo is NULL. */
static inline void FN(vector_keys)(const int32_t *vlo, const int32_t *vhi, int64_t c, int64_t bk, int64_t *j0,
                                   int64_t *j1)
{
    *j0 = 0, *j1 = bk;
    if (vlo) {
        *j0 = vlo[c / FA_W], *j1 = vhi[c / FA_W];
        if (*j1 < *j0) *j0 = *j1 = 0;
    }
}

/* the ranges of a tile (tile_seen) for vector_keys (NULL: all keys) */
#define FA_TILE_VLO(s) ((s)->bounded ? (s)->vlo : NULL)

/* cap tanh(x / cap) lane by lane (inv = 1 / cap): tanh |y| = (1 - e) /
 * (1 + e) with e = exp(-2 |y|) in [0, 1], y's sign put back (NaN stays
 * NaN, +-inf gives +-cap).  Its absolute error is about cap times the
 * exponential's relative error, which is what the softmax sees (a scalar
 * tanh in double per score cost a soft-capped call 4 times the time). */
static inline fa_vec FN(softcap_vec)(fa_vec x, fa_vec inv, fa_vec cap)
{
    const fa_vec y = VMUL(x, inv), one = VBCAST((FA_T)1);
    const fa_vec e = VEXP(VMUL(VBCAST((FA_T)-2), VABS(y)));
    return VMUL(cap, VCOPYSIGN(VDIV(VSUB(one, e), VADD(one, e)), y));
}

/* The soft-cap on the scores of a tile in st's layout: rows of FA_BK (few
 * rows; whole vectors, the lanes past bk unused) or S^T (bk x bqp), there
 * only over the keys each row vector sees when the tile is bounded (the
 * others were not computed: tile_ranges). */
static void FN(softcap_tile)(const fa_problem *p, FN(scratch) *w, int64_t bq, int64_t bk)
{
    const fa_vec cap = VBCAST((FA_T)p->softcap), inv = VBCAST((FA_T)(1.0 / p->softcap));
    if (bq <= FA_ROWS_MAX) {
        for (int64_t r = 0; r < bq; r++)
            for (int64_t j = 0; j < bk; j += FA_W) {
                FA_T *s = w->st + r * FA_BK + j;
                VSTORE(s, FN(softcap_vec)(VLOAD(s), inv, cap));
            }
        return;
    }
    for (int64_t c = 0; c < fa_roundup64(bq, FA_W); c += FA_W) {
        int64_t j0, j1;
        FN(vector_keys)(FA_TILE_VLO(&w->seen), w->seen.vhi, c, bk, &j0, &j1);
        for (int64_t j = j0; j < j1; j++) {
            FA_T *s = w->st + j * FA_BQ + c;
            VSTORE(s, FN(softcap_vec)(VLOAD(s), inv, cap));
        }
    }
}

/* The ALiBi bias, s -= slope |pos - key|, on a score tile st in vectors:
 * rows of FA_BK if `rows`, else S^T (bk x bqp) over the keys vector_keys
 * gives (vlo, vhi).  The positions and keys are FA_T, exact while below
 * 2^24 (alibi_exact), so the terms are the scalar loop's. */
static inline int FN(alibi_exact)(const fa_problem *p, const int64_t *e)
{
    const int64_t shift = p->q_shift < 0 ? -p->q_shift : p->q_shift;
    return e[FA_E_LQ] + e[FA_E_LK] + shift < ((int64_t)1 << 24);
}

static void FN(alibi_tile)(const fa_problem *p, const int64_t *e, FA_T *st, int rows, const int32_t *vlo,
                           const int32_t *vhi, int64_t row0, int64_t bq, int64_t k0, int64_t bk)
{
    const int64_t lq = e[FA_E_LQ], lk = e[FA_E_LK], bqp = fa_roundup64(bq, FA_W);
    FA_T slope[FA_BQ + FA_W], pos[FA_BQ + FA_W], iota[FA_W];
    fa_vrow at = fa_vrow_at(row0, lq);
    for (int64_t r = 0; r < bqp; r++) {
        slope[r] = (FA_T)p->alibi_slopes[e[FA_E_HEAD] + at.head];
        pos[r] = (FA_T)fa_pos(p, at.i, lq, lk);
        if (r + 1 < bq) fa_vrow_next(&at); /* rows past bq: row bq - 1's (any finite values) */
    }
    for (int i = 0; i < FA_W; i++) iota[i] = (FA_T)i;
    if (rows) {
        for (int64_t r = 0; r < bq; r++) {
            const fa_vec sv = VBCAST(slope[r]), pv = VBCAST(pos[r]);
            for (int64_t j = 0; j < bk; j += FA_W) {
                FA_T *s = st + r * FA_BK + j;
                const fa_vec key = VADD(VBCAST((FA_T)(k0 + j)), VLOAD(iota));
                VSTORE(s, VSUB(VLOAD(s), VMUL(sv, VABS(VSUB(pv, key)))));
            }
        }
        return;
    }
    for (int64_t c = 0; c < bqp; c += FA_W) {
        int64_t j0, j1;
        FN(vector_keys)(vlo, vhi, c, bk, &j0, &j1);
        const fa_vec sv = VLOAD(slope + c), pv = VLOAD(pos + c);
        for (int64_t j = j0; j < j1; j++) {
            FA_T *s = st + j * FA_BQ + c;
            VSTORE(s, VSUB(VLOAD(s), VMUL(sv, VABS(VSUB(pv, VBCAST((FA_T)(k0 + j)))))));
        }
    }
}

/* Options that act on the scores s[j * ld], j < bk (keys k0 + j), of virtual
 * row v, after the soft-cap (softcap_tile: p->softcap must be 0 here): ALiBi
 * (scalar: positions past alibi_exact), the mask; then
 * causal/window bounds (-inf). */
static void FN(score_options)(const fa_problem *p, const int64_t *e, int64_t v, int64_t k0, int64_t bk,
                              FA_T *s, int64_t ld, int bounds, int masked)
{
    const int64_t lq = e[FA_E_LQ], lk = e[FA_E_LK];
    const fa_vrow at = fa_vrow_at(v, lq);
    const int64_t head = at.head, i = at.i;
    if (p->alibi_slopes) {
        const FA_T slope = (FA_T)p->alibi_slopes[e[FA_E_HEAD] + head];
        const int64_t pos = fa_pos(p, i, lq, lk);
        for (int64_t j = 0; j < bk; j++) {
            const int64_t dist = pos - (k0 + j);
            s[j * ld] -= slope * (FA_T)(dist < 0 ? -dist : dist);
        }
    }
    if (masked && p->mask_kind != FA_MASK_NONE) {
        const char *m = (const char *)p->mask + e[FA_E_MASK] + head * p->mask_hs + i * p->mask_rs +
                        k0 * p->mask_cs;
        const int64_t cs = p->mask_cs;
        switch (p->mask_kind) {
        case FA_MASK_BOOL: { /* a select on the bits, not a branch (random masks mispredict); a
                              * hidden score is -inf even where it was NaN */
#if FA_T_IS_FLOAT
            typedef uint32_t bits_t;
#else
            typedef uint64_t bits_t;
#endif
            const FA_T ninf = (FA_T)-INFINITY;
            bits_t nb;
            memcpy(&nb, &ninf, sizeof nb);
            for (int64_t j = 0; j < bk; j++) {
                const bits_t keep = (bits_t)0 - (bits_t)(m[j * cs] != 0);
                bits_t b;
                memcpy(&b, &s[j * ld], sizeof b);
                b = (b & keep) | (nb & ~keep);
                memcpy(&s[j * ld], &b, sizeof b);
            }
            break;
        }
        case FA_MASK_F32:
            for (int64_t j = 0; j < bk; j++) s[j * ld] += (FA_T) * (const float *)(m + j * cs);
            break;
        case FA_MASK_F64:
            for (int64_t j = 0; j < bk; j++) s[j * ld] += (FA_T) * (const double *)(m + j * cs);
            break;
        case FA_MASK_F16:
            for (int64_t j = 0; j < bk; j++) s[j * ld] += (FA_T)fa_f16_to_f32(*(const uint16_t *)(m + j * cs));
            break;
        case FA_MASK_BF16:
            for (int64_t j = 0; j < bk; j++) s[j * ld] += (FA_T)fa_bf16_to_f32(*(const uint16_t *)(m + j * cs));
            break;
        default: break;
        }
    }
    if (bounds) {
        int64_t a, b;
        fa_tile_row_range(p, i, lq, lk, k0, bk, &a, &b);
        for (int64_t j = 0; j < a; j++) s[j * ld] = (FA_T)-INFINITY;
        for (int64_t j = b; j < bk; j++) s[j * ld] = (FA_T)-INFINITY;
    }
}

#undef FA_MASK_TILES
#if FA_T_IS_FLOAT && (FA_VEC_ISA == 1 || FA_VEC_ISA == 2)
#define FA_MASK_TILES 1
/* A bool mask (elements contiguous) on a score tile in S^T layout (key j,
 * row r at st[j * FA_BQ + r]), 8 rows by 8 keys at a time: the 8 x 8 mask
 * bytes are transposed in registers, and each key's 8 rows take -inf in
 * one vector blend where the mask is 0 (NaN scores included), instead of
 * a scalar select per score (which cost as much as a product of the tile). */
static void FN(bool_mask_tile)(const fa_problem *p, const int64_t *e, FA_T *st, int64_t row0, int64_t bq, int64_t k0,
                               int64_t bk)
{
    const int64_t lq = e[FA_E_LQ];
    const unsigned char *m[8];
    const __m256 ninf = _mm256_set1_ps(-INFINITY);
    fa_vrow at = fa_vrow_at(row0, lq);
    int64_t r = 0;
    for (; r < bq; r += 8) {
        const int nr = (int)fa_min64(8, bq - r);
        for (int t = 0; t < 8; t++) { /* rows past nr: row r's */
            m[t] = t < nr ? (const unsigned char *)p->mask + e[FA_E_MASK] + fa_vrow_bytes(&at, p->mask_rs, p->mask_hs) + k0
                          : m[0];
            if (t < nr) fa_vrow_next(&at);
        }
        int64_t j = 0;
        if (nr == 8)
            for (; j + 8 <= bk; j += 8) {
                __m128i a[8];
                for (int t = 0; t < 8; t++) a[t] = _mm_loadl_epi64((const __m128i *)(m[t] + j));
                const __m128i t0 = _mm_unpacklo_epi8(a[0], a[1]), t1 = _mm_unpacklo_epi8(a[2], a[3]);
                const __m128i t2 = _mm_unpacklo_epi8(a[4], a[5]), t3 = _mm_unpacklo_epi8(a[6], a[7]);
                const __m128i u0 = _mm_unpacklo_epi16(t0, t1), u1 = _mm_unpackhi_epi16(t0, t1);
                const __m128i u2 = _mm_unpacklo_epi16(t2, t3), u3 = _mm_unpackhi_epi16(t2, t3);
                const __m128i c[4] = {_mm_unpacklo_epi32(u0, u2), _mm_unpackhi_epi32(u0, u2), _mm_unpacklo_epi32(u1, u3),
                                      _mm_unpackhi_epi32(u1, u3)}; /* keys 2x, 2x + 1: rows 0..7 each */
                for (int x = 0; x < 8; x++) {
                    const __m128i col = x & 1 ? _mm_srli_si128(c[x >> 1], 8) : c[x >> 1];
                    const __m256 hide =
                        _mm256_castsi256_ps(_mm256_cmpeq_epi32(_mm256_cvtepu8_epi32(col), _mm256_setzero_si256()));
                    FA_T *s = st + (j + x) * FA_BQ + r;
                    _mm256_storeu_ps(s, _mm256_blendv_ps(_mm256_loadu_ps(s), ninf, hide));
                }
            }
        for (; j < bk; j++)
            for (int t = 0; t < nr; t++)
                if (!m[t][j]) st[j * FA_BQ + r + t] = (FA_T)-INFINITY;
    }
}

/* Element j of a float mask's row (kind FA_MASK_F32, F16 or BF16) as float32. */
FA_INLINE float FN(mask_at)(const int kind, const void *row, int64_t j)
{
    if (kind == FA_MASK_F32) return ((const float *)row)[j];
    const uint16_t h = ((const uint16_t *)row)[j];
    return kind == FA_MASK_F16 ? fa_f16_to_f32(h) : fa_bf16_to_f32(h);
}

/* A float mask (float32, float16 or bfloat16, elements contiguous) added
 * to a score tile in S^T layout, 8 rows by 8 keys at a time through an
 * 8 x 8 transpose of the mask (16-bit elements converted as they are
 * loaded): the same sums as score_options' scalar loop over the strided
 * scores, which made a tile of a random mask cost 1.23x an unmasked one
 * (now 1.11x). */
FA_INLINE void FN(float_mask_tile_of)(const int kind, const fa_problem *p, const int64_t *e, FA_T *st, int64_t row0,
                                      int64_t bq, int64_t k0, int64_t bk)
{
    const int64_t lq = e[FA_E_LQ], es = kind == FA_MASK_F32 ? 4 : 2;
    const void *m[8];
    fa_vrow at = fa_vrow_at(row0, lq);
    for (int64_t r = 0; r < bq; r += 8) {
        const int nr = (int)fa_min64(8, bq - r);
        for (int t = 0; t < 8; t++) { /* rows past nr: row r's */
            m[t] = t < nr ? (const char *)p->mask + e[FA_E_MASK] + fa_vrow_bytes(&at, p->mask_rs, p->mask_hs) + k0 * es
                          : m[0];
            if (t < nr) fa_vrow_next(&at);
        }
        int64_t j = 0;
        if (nr == 8)
            for (; j + 8 <= bk; j += 8) {
                __m256 col[8];
                FN(transpose8_of)(kind, m, j, col);
                for (int x = 0; x < 8; x++) {
                    FA_T *s = st + (j + x) * FA_BQ + r;
                    _mm256_storeu_ps(s, _mm256_add_ps(_mm256_loadu_ps(s), col[x]));
                }
            }
        for (; j < bk; j++)
            for (int t = 0; t < nr; t++) st[j * FA_BQ + r + t] += FN(mask_at)(kind, m[t], j);
    }
}

static void FN(float_mask_tile)(const fa_problem *p, const int64_t *e, FA_T *st, int64_t row0, int64_t bq,
                                int64_t k0, int64_t bk)
{
    switch (p->mask_kind) { /* one instance per kind: its loads and conversions inlined */
    case FA_MASK_F32: FN(float_mask_tile_of)(FA_MASK_F32, p, e, st, row0, bq, k0, bk); break;
    case FA_MASK_F16: FN(float_mask_tile_of)(FA_MASK_F16, p, e, st, row0, bq, k0, bk); break;
    default: FN(float_mask_tile_of)(FA_MASK_BF16, p, e, st, row0, bq, k0, bk); break;
    }
}
#else
#define FA_MASK_TILES 0
#endif

/* The causal/window bounds on an S^T tile (key j, row r at st[j * FA_BQ +
 * r]): -inf where row r may not see key k0 + j, key by key over the rows
 * as one select per score that the compiler turns into vectors (row by row
 * in score_options, a strided scalar store per hidden score, took a ninth
 * of a causal call on sequences of 32). */
static void FN(bounds_tile)(const fa_problem *p, const int64_t *e, FA_T *st, int64_t row0, int64_t bq, int64_t k0,
                            int64_t bk)
{
    const int64_t lq = e[FA_E_LQ], lk = e[FA_E_LK];
    int32_t lo[FA_BQ], hi[FA_BQ];
    fa_vrow at = fa_vrow_at(row0, lq);
    for (int64_t r = 0; r < bq; r++, fa_vrow_next(&at)) {
        int64_t a, b;
        fa_tile_row_range(p, at.i, lq, lk, k0, bk, &a, &b);
        lo[r] = (int32_t)a;
        hi[r] = (int32_t)b;
    }
    for (int32_t j = 0; j < (int32_t)bk; j++) {
        FA_T *s = st + (int64_t)j * FA_BQ;
        for (int64_t r = 0; r < bq; r++) s[r] = j < lo[r] || j >= hi[r] ? (FA_T)-INFINITY : s[r];
    }
}

/* The mask and the causal/window bounds on a score tile st (rows of FA_BK
 * if `rows`, else S^T), after the soft-cap and ALiBi (p->softcap must be
 * 0; ALiBi only where alibi_exact failed): a bool mask on an S^T tile goes
 * last, in vectors (the select commutes with the bounds, not with soft-cap
 * and ALiBi, which it must follow); a float one (32 or 16 bits) first,
 * once soft-cap and ALiBi are done (the sum does not commute with the
 * bounds' -inf: +inf + -inf); ALiBi and other masks row by row
 * (score_options), and the bounds of rows of FA_BK there too, those of an
 * S^T tile after them (bounds_tile). */
static void FN(mask_and_bounds)(const fa_problem *p, const int64_t *e, FA_T *st, int rows, int64_t row0, int64_t bq,
                                int64_t k0, int64_t bk, int bounds)
{
    const int bool_tile = FA_MASK_TILES && !rows && p->mask_kind == FA_MASK_BOOL && p->mask_cs == 1;
    const int float_tile = FA_MASK_TILES && !rows && !p->alibi_slopes &&
                           ((p->mask_kind == FA_MASK_F32 && p->mask_cs == (int64_t)sizeof(float)) ||
                            ((p->mask_kind == FA_MASK_F16 || p->mask_kind == FA_MASK_BF16) && p->mask_cs == 2));
#if FA_MASK_TILES
    if (float_tile) FN(float_mask_tile)(p, e, st, row0, bq, k0, bk);
#endif
    const int vector_mask = bool_tile || float_tile;
    const int row_bounds = bounds && rows; /* an S^T tile's bounds go after its rows' options */
    if (row_bounds || p->alibi_slopes || (p->mask_kind != FA_MASK_NONE && !vector_mask))
        for (int64_t r = 0; r < bq; r++)
            FN(score_options)(p, e, row0 + r, k0, bk, rows ? st + r * FA_BK : st + r, rows ? 1 : FA_BQ, row_bounds,
                              !vector_mask);
    if (bounds && !rows) FN(bounds_tile)(p, e, st, row0, bq, k0, bk);
#if FA_MASK_TILES
    if (bool_tile) FN(bool_mask_tile)(p, e, st, row0, bq, k0, bk);
#endif
}

/* Score options of every row of the forward's tile, in st's layout for bq
 * rows: soft-cap and ALiBi in vectors, then the mask and the bounds. */
static void FN(apply_options)(const fa_problem *p, const int64_t *e, FN(scratch) *w, int64_t row0, int64_t bq,
                              int64_t k0, int64_t bk, int bounds)
{
    if (!(bounds || p->mask_kind != FA_MASK_NONE || p->softcap > 0 || p->alibi_slopes)) return;
    const int rows = bq <= FA_ROWS_MAX;
    fa_problem opt;
    const int alibi = p->alibi_slopes && FN(alibi_exact)(p, e);
    if (p->softcap > 0 || alibi) { /* in vectors first, then the other options without them (p->softcap
                                    * is 0 from here on) */
        if (p->softcap > 0) FN(softcap_tile)(p, w, bq, bk);
        if (alibi) FN(alibi_tile)(p, e, w->st, rows, FA_TILE_VLO(&w->seen), w->seen.vhi, row0, bq, k0, bk);
        opt = *p;
        opt.softcap = 0;
        if (alibi) opt.alibi_slopes = NULL;
        p = &opt;
    }
    FN(mask_and_bounds)(p, e, w->st, rows, row0, bq, k0, bk, bounds);
}

/* The keys [rlo, rhi) of tile [k0, k0 + bk) that each row of an S^T tile
 * may see under its causal and window bounds (relative to k0), and the
 * union of those of each vector of FA_W rows (vlo, vhi): products of key
 * rows and row vectors outside them are neither computed (score_tile: their
 * scores become -inf; the backward's bwd_tile: their P and dS 0) nor summed
 * (pv_tile, bwd_accumulate: their weights are 0), which on a tile the
 * diagonal crosses saves about half of both.  (The blocks between the first
 * and the last vector that see a key are computed whole: a few more products,
 * of weight 0, where a tile's rows span two heads.) */
static void FN(tile_ranges)(const fa_problem *p, const int64_t *e, FN(tile_seen) *s, int64_t row0, int64_t bq,
                            int64_t k0, int64_t bk)
{
    const int64_t lq = e[FA_E_LQ], lk = e[FA_E_LK];
    for (int64_t c = 0; c * FA_W < bq; c++) {
        s->vlo[c] = (int32_t)bk;
        s->vhi[c] = 0;
    }
    fa_vrow at = fa_vrow_at(row0, lq);
    for (int64_t r = 0; r < bq; r++, fa_vrow_next(&at)) {
        int64_t lo, hi;
        fa_tile_row_range(p, at.i, lq, lk, k0, bk, &lo, &hi);
        s->rlo[r] = (int32_t)lo;
        s->rhi[r] = (int32_t)hi;
        if (hi > lo) {
            const int64_t c = r / FA_W;
            s->vlo[c] = (int32_t)fa_min64(s->vlo[c], lo);
            s->vhi[c] = (int32_t)fa_max64(s->vhi[c], hi);
        }
    }
}

/* Of the nv row vectors from vector v0 of a bounded S^T tile, those
 * [*c0, *c1) that may see a key of [j, j + mr): 0 if none. */
static inline int FN(tile_vectors)(const FN(tile_seen) *s, int64_t v0, int64_t nv, int64_t j, int64_t mr,
                                   int64_t *c0, int64_t *c1)
{
    int64_t a = 0, b = nv;
    while (a < nv && (s->vlo[v0 + a] >= j + mr || s->vhi[v0 + a] <= j)) a++;
    while (b > a && (s->vlo[v0 + b - 1] >= j + mr || s->vhi[v0 + b - 1] <= j)) b--;
    *c0 = a;
    *c1 = b;
    return b > a;
}

/* The keys [*j0, *j1) of a tile of bk keys that rows r .. r + mr - 1 may
 * see (all of them unless the tile is bounded; an empty range if none). */
static inline void FN(tile_keys)(const FN(tile_seen) *s, int64_t r, int64_t mr, int64_t bk, int64_t *j0,
                                 int64_t *j1)
{
    int64_t a = 0, b = bk;
    if (s->bounded) {
        a = bk, b = 0;
        for (int64_t x = r; x < r + mr; x++)
            if (s->rhi[x] > s->rlo[x]) {
                a = fa_min64(a, s->rlo[x]);
                b = fa_max64(b, s->rhi[x]);
            }
        if (b < a) a = b = 0;
    }
    *j0 = a;
    *j1 = b;
}

/* Do the causal/window bounds cut tile [k0, k0 + bk) of the item's rows
 * (are its keys not all visible to every row)?  They matter only then. */
static int FN(tile_cut)(const fa_problem *p, const int64_t *e, int64_t row0, int64_t bq, int64_t k0, int64_t bk)
{
    int64_t lo, hi, all_lo, all_hi;
    fa_block_range(p, e[FA_E_LQ], e[FA_E_LK], row0, bq, &lo, &hi, &all_lo, &all_hi);
    return k0 < all_lo || k0 + bk > all_hi;
}

/* tile_cut, and where it cuts an S^T tile, what each row sees: the tile
 * then skips what no row sees (w->seen.bounded, tile_ranges). */
static int FN(tile_bounds)(const fa_problem *p, const int64_t *e, FN(scratch) *w, int64_t row0, int64_t bq,
                           int64_t k0, int64_t bk)
{
    const int bounds = FN(tile_cut)(p, e, row0, bq, k0, bk);
    w->seen.bounded = bounds && bq > FA_ROWS_MAX;
    if (w->seen.bounded) FN(tile_ranges)(p, e, &w->seen, row0, bq, k0, bk);
    return bounds;
}

/* The score tile: K[k0 : k0 + bk] . qt, before the score options
 * (apply_options, which needs the returned tile_bounds).  Layout of st: S^T
 * (bk x FA_BQ), or for at most FA_ROWS_MAX rows S as rows (bq x FA_BK). */
static int FN(score_tile)(const fa_problem *p, const int64_t *e, FN(scratch) *w, int64_t row0,
                           int64_t bq, int64_t k0, int64_t bk, const fa_prefetch_plan *pf)
{
    const int64_t d = p->d, bqp = fa_roundup64(bq, FA_W);
    int64_t ldk;
    const int nk = bq <= FA_ROWS_MAX ? FN(narrow_kind)(p, 0) : -1;
    const int bounds = FN(tile_bounds)(p, e, w, row0, bq, k0, bk);
    if (bq <= FA_ROWS_MAX && FN(few_rows_kind)(p, 0) == 1) { /* float16 rows in place */
        FN(qk_rows)(bq, d, w->qoff, w->qt, w->ldq, (const char *)p->k + e[FA_E_K] + k0 * p->k_rs, p->k_rs, 1,
                    bk, w->st, FA_BK, pf);
    } else if (nk >= 0) { /* narrow rows in place (qoff is 0: k_lead), 8-bit ones scaled afterwards */
        const char *k = (const char *)p->k + e[FA_E_K] + k0 * p->k_rs;
#if FA_IDOT
        if (w->qi)
            FN(qk_rows_i8)(bq, d, w->qi, d, w->ql, w->qstep, w->qsum, k, p->k_rs, bk, w->st, FA_BK, pf);
        else
#endif
            FN(qk_rows_narrow)(bq, d / FA_W, w->qt, w->ldq, k, p->k_rs, nk, bk, w->st, FA_BK, pf);
        if (p->kv_dtype >= FA_I8) FN(scale_columns)(p, e, 0, k0, bk, bq, w->st, w->kp);
    } else {
        const FA_T *k = FN(kv_rows)(p, e, 0, k0, bk, d, d, w->kp, &ldk);
        if (bq <= FA_ROWS_MAX) /* qt holds Q rows (see pack_q) */
            FN(qk_rows)(bq, d, w->qoff, w->qt, w->ldq, (const char *)k, ldk * (int64_t)sizeof(FA_T), 0, bk,
                        w->st, FA_BK, pf);
        else
            for (int64_t cb = 0; cb < bqp; cb += FA_NVW) {
                const int64_t nv = fa_min64(FA_NV, (bqp - cb) / FA_W), v0 = cb / FA_W;
                for (int64_t j = 0; j < bk; j += FA_MR) {
                    const int64_t mr = fa_min64(FA_MR, bk - j);
                    int64_t c0 = 0, c1 = nv; /* the vectors of this chunk that see a key of [j, j + mr) */
                    if (w->seen.bounded && !FN(tile_vectors)(&w->seen, v0, nv, j, mr, &c0, &c1)) continue;
                    FN(qk_block)((int)mr, (int)(c1 - c0), d, k + j * ldk, ldk, w->qt + cb + c0 * FA_W, FA_BQ,
                                 w->st + j * FA_BQ + cb + c0 * FA_W, FA_BQ);
                }
            }
    }
    return bounds;
}

/* Must the few-row P.V kernels read the V rows of tile [k0, k0 + bk)
 * through masks?  Read unmasked, a row's first and last vectors (vb bytes)
 * reach past the row into its neighbour rows' span, which lies inside the
 * array only when the rows are at least a vector apart and the tile holds
 * neither the entry's first nor its last row (nor, paged, lies in the
 * array's first or last page). */
static inline int FN(v_edge_tile)(const fa_problem *p, const int64_t *e, int64_t k0, int64_t bk, int64_t vb)
{
    if (k0 == 0 || k0 + bk == e[FA_E_LK] || (p->v_rs < vb && p->v_rs > -vb)) return 1;
    if (!p->pages) return 0;
    /* paged: a tile's rows are its page's, whose neighbours in memory are
     * other pages, except past the first and the last page of the array */
    const int64_t page = fa_page_of(p, e, k0);
    return page == 0 || page == p->n_pages - 1;
}

/* o = alpha * o + P . V[k0 : k0 + bk] for the item's rows, P in st (as P^T,
 * or as rows for a few-row item); o += P . V for a tile's later segment
 * (`first` 0: only a few-row item's). */
static void FN(pv_tile)(const fa_problem *p, const int64_t *e, FN(scratch) *w, int64_t bq, int64_t k0,
                        int64_t bk, int first)
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
        static const FA_T ones[4] = {1, 1, 1, 1};
        const int64_t voff = w->voff, ldo = w->ldo, nvec = ldo / FA_W;
        const int kind = FN(few_rows_kind)(p, 1), nk = kind < 0 ? FN(narrow_kind)(p, 1) : -1;
        const int h = nk >= 0 ? nk : kind == 1; /* as plan_v decided */
        /* narrow rows fill whole vectors: never masked */
        const int edge = nk < 0 && FN(v_edge_tile)(p, e, k0, bk, FA_W * FA_ROW_ES(h));
        const char *vr;
        int64_t ldvb;
        if (kind >= 0 || nk >= 0) {
            vr = (const char *)p->v + e[FA_E_V] + k0 * p->v_rs - voff * FA_ROW_ES(h);
            ldvb = p->v_rs;
            if (nk >= 0 && p->kv_dtype >= FA_I8) /* each V row's scale into its weights */
                FN(scale_columns)(p, e, 1, k0, bk, bq, w->st, w->vp);
        } else {
            vr = (const char *)FN(kv_rows)(p, e, 1, k0, bk, p->dv, dvp, w->vp, &ldv);
            ldvb = ldv * (int64_t)sizeof(FA_T);
        }
        const fa_mask m_first = VMASK((int)voff, FA_W), m_last = VMASK(0, (int)(voff + p->dv - (nvec - 1) * FA_W));
        /* narrow rows: four rows at a time, half the vectors, each converted
         * once; FA_W keys at a time where several groups of four rows take
         * turns (each finds the keys the one before read in L1), else every
         * key of the tile at once (the accumulators loaded and stored once
         * per vector block, not once per FA_W keys: an int8 decode of 32
         * heads over 8 took 0.93x the time, a bfloat16 one 0.96x) */
        const int64_t nstep = bq <= 4 ? bk : FA_W;
        for (int64_t j0 = 0; j0 < bk && nk >= 0; j0 += nstep) {
            const int64_t nj = fa_min64(nstep, bk - j0);
            for (int64_t cb = 0; cb < nvec; cb += FA_RV / 2) {
                const int nv = (int)fa_min64(FA_RV / 2, nvec - cb);
                for (int64_t r = 0; r < bq; r += 4)
                    FN(pv_rows_narrow)((int)fa_min64(4, bq - r), nv, h, nj, w->st + r * FA_BK + j0, FA_BK,
                                       vr + j0 * ldvb + cb * FA_W * FA_ROW_ES(h), ldvb, w->o + r * ldo + cb * FA_W, ldo,
                                       j0 == 0 && first ? w->alpha + r : ones);
            }
        }
        for (int64_t j0 = 0; j0 < bk && nk < 0; j0 += FA_W) {
            const int64_t nj = fa_min64(FA_W, bk - j0);
            for (int64_t cb = 0; cb < nvec; cb += FA_RV) {
                const int nv = (int)fa_min64(FA_RV, nvec - cb);
                const fa_mask mlo = cb == 0 ? m_first : VMASK_ALL, mhi = cb + nv == nvec ? m_last : VMASK_ALL;
                for (int64_t r = 0; r < bq; r += 2)
                    FN(pv_rows_block)((int)fa_min64(2, bq - r), nv, edge, h, nj, w->st + r * FA_BK + j0, FA_BK,
                                      vr + j0 * ldvb + cb * FA_W * FA_ROW_ES(h), ldvb, w->o + r * ldo + cb * FA_W,
                                      ldo, j0 == 0 && first ? w->alpha + r : ones, mlo, mhi);
            }
        }
        return;
    }
    v = FN(kv_rows)(p, e, 1, k0, bk, p->dv, dvp, w->vp, &ldv);
    for (int64_t cb = 0; cb < dvp; cb += FA_NVW) {
        const int nv = (int)fa_min64(FA_NV, (dvp - cb) / FA_W);
        for (int64_t r = 0; r < bq; r += FA_MR) {
            const int64_t mr = fa_min64(FA_MR, bq - r);
            int64_t j0, j1; /* the keys these rows see: the others weigh 0 (none: o is only rescaled) */
            FN(tile_keys)(&w->seen, r, mr, bk, &j0, &j1);
            FN(pv_block_st)((int)mr, nv, j1 - j0, w->st + j0 * FA_BQ + r, v + j0 * ldv + cb, ldv, w->o + r * dvp + cb,
                            dvp, w->alpha + r);
        }
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
        /* keys outside what these rows see (tile_ranges) are -inf: weight 0, no exp */
        int64_t j0, j1;
        FN(vector_keys)(FA_TILE_VLO(&w->seen), w->seen.vhi, c, bk, &j0, &j1);
        for (int64_t j = 0; j < j0; j++) VSTORE(col + j * FA_BQ, VZERO());
        for (int64_t j = j1; j < bk; j++) VSTORE(col + j * FA_BQ, VZERO());
        fa_vec tmax = VBCAST((FA_T)-INFINITY);
        for (int64_t j = j0; j < j1; j++) tmax = VMAX(tmax, VLOAD(col + j * FA_BQ));
        const fa_vec mold = VLOAD(w->rmax + c);
        const fa_vec mnew = VMAX(tmax, mold);
        const fa_vec muse = VNEGINF0(mnew);
        fa_vec sum = VZERO();
        for (int64_t j = j0; j < j1; j++) {
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

/* The dropout words (a, b: the low and high halves of fa_dropout_row's) of
 * the entry's rows [row0, row0 + bq), without a 64-bit division per row. */
static void FN(dropout_rows)(const fa_problem *p, const int64_t *e, int64_t row0, int64_t bq, uint32_t *a, uint32_t *b)
{
    fa_vrow at = fa_vrow_at(row0, e[FA_E_LQ]);
    for (int64_t r = 0; r < bq; r++, fa_vrow_next(&at)) {
        const uint64_t word = fa_dropout_row(p->dropout_seed, e[FA_E_DROP] + at.head, e[FA_E_DROP_ROW] + at.i);
        a[r] = (uint32_t)word;
        b[r] = (uint32_t)(word >> 32);
    }
}

/* One key's weights of a transposed tile's rows (s, and the factors f if
 * given), or two consecutive keys' (s, s2, f, f2) whose coordinates are
 * 2q and 2q + 1: the factor of row r comes from the 16 bits at `shift`
 * (0 or 16) of its pair hash (fa_dropout_pair; with two keys, the low bits
 * for s, the high ones for s2).  Loops along the rows, in vectors. */
FA_INLINE void FN(dropout_keys)(const uint32_t *a, const uint32_t *b, int64_t bq, uint32_t q, int shift,
                                uint32_t thr, FA_T kept, FA_T *s, FA_T *f, FA_T *s2, FA_T *f2)
{
    if (s2) {
        for (int64_t r = 0; r < bq; r++) {
            const uint32_t h = fa_dropout_pair(a[r], b[r], q);
            const FA_T x = (h & 0xFFFFu) >= thr ? kept : 0, x2 = (h >> 16) >= thr ? kept : 0;
            s[r] *= x;
            s2[r] *= x2;
            if (f) {
                f[r] = x;
                f2[r] = x2;
            }
        }
    } else {
        for (int64_t r = 0; r < bq; r++) {
            const FA_T x = ((fa_dropout_pair(a[r], b[r], q) >> shift) & 0xFFFFu) >= thr ? kept : 0;
            s[r] *= x;
            if (f) f[r] = x;
        }
    }
}

/* Dropout (fa_problem.dropout_p) on a tile of weights of bq rows, whose
 * words are a and b (dropout_rows), and keys [k0, k0 + bk) of entry e:
 * each multiplied by 1 / (1 - p) if kept, by 0 if dropped, and that factor
 * stored at the same place in ft if given (a transposed tile only).  st's
 * layout: rows of FA_BK if `rows`, else the transpose (keys by FA_BQ
 * rows).  One hash per pair of keys (fa_dropout_pair), each loop along the
 * tile's contiguous axis in 32-bit lanes, which the compiler turns into the
 * path's vectors. */
static void FN(dropout_tile)(const fa_problem *p, const int64_t *e, const uint32_t *a, const uint32_t *b, FA_T *st,
                             int rows, int64_t bq, int64_t k0, int64_t bk, FA_T *ft)
{
    const uint32_t thr = fa_dropout_threshold(p->dropout_p), c0 = (uint32_t)(e[FA_E_DROP_KEY] + k0);
    const FA_T kept = (FA_T)(1.0 / (1.0 - p->dropout_p));
    if (rows) {
        /* the 16 bits of key c0 + j at bits[j + lead]: the pairs' hashes from c0's pair on, each split into
         * its low and high half */
        const int64_t lead = c0 & 1, pairs = (lead + bk + 1) / 2;
        uint16_t bits[FA_BK + 2];
        for (int64_t r = 0; r < bq; r++) {
            FA_T *s = st + r * FA_BK;
            const uint32_t ar = a[r], br = b[r];
            for (int64_t i = 0; i < pairs; i++) {
                const uint32_t h = fa_dropout_pair(ar, br, ((c0 >> 1) + (uint32_t)i) & 0x7FFFFFFFu);
                bits[2 * i] = (uint16_t)h;
                bits[2 * i + 1] = (uint16_t)(h >> 16);
            }
            for (int64_t j = 0; j < bk; j++) s[j] *= bits[j + lead] >= thr ? kept : 0;
        }
    } else {
        uint32_t c = c0;
        for (int64_t j = 0; j < bk;) {
            FA_T *s = st + j * FA_BQ, *f = ft ? ft + j * FA_BQ : NULL;
            if ((c & 1) == 0 && j + 1 < bk) { /* keys c and c + 1: one pair */
                FN(dropout_keys)(a, b, bq, c >> 1, 0, thr, kept, s, f, s + FA_BQ, f ? f + FA_BQ : NULL);
                j += 2;
                c += 2;
            } else {
                FN(dropout_keys)(a, b, bq, c >> 1, (int)(c & 1) * 16, thr, kept, s, f, NULL, NULL);
                j++;
                c++;
            }
        }
    }
}

/* ---- work items --------------------------------------------------------- */

/* row[c] = a[c] * scale in the storage type, elements cs bytes apart, for
 * c < n (contiguous rows in a loop the compiler vectorises). */
static void FN(store_scaled)(char *row, int64_t cs, const FA_T *a, FA_T scale, int64_t n)
{
    if (cs == (int64_t)sizeof(FA_S)) {
        FA_S *dst = (FA_S *)row;
        for (int64_t c = 0; c < n; c++) dst[c] = FA_ST(a[c] * scale);
    } else {
        for (int64_t c = 0; c < n; c++) *(FA_S *)(row + c * cs) = FA_ST(a[c] * scale);
    }
}

/* Write one output row: out = o * inv; lse = rmax + log(rsum) when asked.
 * An attention sink adds exp(sink) to the softmax sum (in terms of the
 * larger of rmax and the sink, so that neither overflows). */
static void FN(store_row)(const fa_problem *p, const int64_t *e, const fa_vrow *v, const FA_T *o, FA_T rmax,
                          FA_T rsum, int normalise)
{
    const int64_t dv = p->dv;
    FA_T inv = 1;
    if (normalise && p->sinks) {
        const FA_T sink = (FA_T)p->sinks[e[FA_E_HEAD] + v->head];
        if (rsum == 0) {
            rmax = sink;
            rsum = 1;
            inv = 0;
        } else {
            const FA_T m = sink > rmax ? sink : rmax, f = (FA_T)exp((double)(rmax - m));
            rsum = rsum * f + (FA_T)exp((double)(sink - m));
            rmax = m;
            inv = f / rsum;
        }
    } else if (normalise) {
        inv = rsum == 0 ? (FA_T)0 : (FA_T)1 / rsum;
    }
    FN(store_scaled)((char *)p->out + e[FA_E_OUT] + fa_vrow_bytes(v, p->out_rs, p->out_hs), p->out_cs, o, inv, dv);
    if (normalise && p->lse) {
        FA_T *l = (FA_T *)((char *)p->lse + e[FA_E_LSE] + fa_vrow_bytes(v, p->lse_rs, p->lse_hs));
        *l = rsum == 0 ? (FA_T)-INFINITY : rmax + (FA_T)log((double)rsum);
    }
}

static void FN(store_rows)(const fa_problem *p, const int64_t *e, const FN(scratch) *w, int64_t row0,
                           int64_t bq, int normalise)
{
    fa_vrow at = fa_vrow_at(row0, e[FA_E_LQ]);
    for (int64_t r = 0; r < bq; r++, fa_vrow_next(&at))
        FN(store_row)(p, e, &at, w->o + r * w->dvp, w->rmax[r], w->rsum[r], normalise);
}

/* A partial slot: sr rows of the accumulator, then the rows' max and sum. */
static inline int64_t FN(slot_size)(int64_t dvp, int64_t sr) { return sr * (dvp + 2); }

static void FN(store_partial)(const FN(scratch) *w, int64_t bq, int64_t sr, FA_T *slot)
{
    memcpy(slot, w->o, (size_t)(bq * w->dvp) * sizeof(FA_T));
    memcpy(slot + sr * w->dvp, w->rmax, (size_t)bq * sizeof(FA_T));
    memcpy(slot + sr * (w->dvp + 1), w->rsum, (size_t)bq * sizeof(FA_T));
}

/* Merge the nsplit partial results of rows [row0, row0 + bq) of an entry
 * (slots first .. first + nsplit - 1, in key order) and write the output:
 * with M the largest partial max, the softmax sum is sum_s l_s exp(m_s - M)
 * and the output sum_s exp(m_s - M) o_s over that sum.  Dot weights add. */
static void FN(merge_partials)(const fa_problem *p, const int64_t *e, const FA_T *slots, int64_t sr,
                               int64_t first, int nsplit, int64_t row0, int64_t bq, int64_t dvp, FA_T *acc)
{
    const int softmax = p->weights == FA_WEIGHTS_SOFTMAX;
    const int64_t size = FN(slot_size)(dvp, sr);
    fa_vrow at = fa_vrow_at(row0, e[FA_E_LQ]);
    for (int64_t r = 0; r < bq; r++, fa_vrow_next(&at)) {
        FA_T m = (FA_T)-INFINITY, l = 0;
        if (softmax)
            for (int s = 0; s < nsplit; s++) {
                const FA_T ms = slots[(first + s) * size + sr * dvp + r];
                if (ms > m) m = ms;
            }
        for (int64_t c = 0; c < dvp; c++) acc[c] = 0;
        for (int s = 0; s < nsplit; s++) {
            const FA_T *slot = slots + (first + s) * size;
            FA_T f = 1;
            if (softmax) {
                const FA_T ms = slot[sr * dvp + r];
                if (ms == (FA_T)-INFINITY) continue; /* this split saw no key of the row */
                f = (FA_T)exp((double)(ms - m));
                l += f * slot[sr * (dvp + 1) + r];
            }
            for (int64_t c = 0; c < dvp; c++) acc[c] += f * slot[r * dvp + c];
        }
        FN(store_row)(p, e, &at, acc, m, l, softmax);
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
    const int kind = FN(few_rows_kind)(p, 1);
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


/* ---- the tile operations (fa_tile.h) --------------------------------------- */

void *FA_OP(scratch_new)(const fa_problem *p)
{
    FN(scratch) *w = (FN(scratch) *)malloc(sizeof *w);
    if (w && FN(scratch_alloc)(w, p) != 0) {
        free(w);
        w = NULL;
    }
    return w;
}

void FA_OP(scratch_free)(void *w)
{
    fa_scratch_give(((FN(scratch) *)w)->block, ((FN(scratch) *)w)->bytes);
    free(w);
}

void FA_OP(attn_begin)(const fa_problem *p, const int64_t *e, void *w, int64_t row0, int64_t bq)
{
    FN(pack_q)(p, e, row0, bq, (FN(scratch) *)w);
    FN(plan_v)(p, e, bq, 0, (FN(scratch) *)w);
    FN(start_rows)((FN(scratch) *)w, bq);
}

/* A segment's scores go to columns col .. of the few-row item's rows of st:
 * its score tile is the same operation on st from column col. */
void FA_OP(attn_score_tile)(const fa_problem *p, const int64_t *e, void *w, int64_t row0, int64_t bq, int64_t k0,
                            int64_t bk, int64_t col, const fa_prefetch_plan *pf)
{
    FN(scratch) *s = (FN(scratch) *)w;
    FA_T *const st = s->st;
    s->st = st + col;
    FN(score_tile)(p, e, s, row0, bq, k0, bk, pf);
    s->st = st;
}

void FA_OP(attn_options_tile)(const fa_problem *p, const int64_t *e, void *w, int64_t row0, int64_t bq, int64_t k0,
                              int64_t bk)
{
    FN(apply_options)(p, e, (FN(scratch) *)w, row0, bq, k0, bk, FN(tile_cut)(p, e, row0, bq, k0, bk));
}

void FA_OP(weights_tile)(void *w, int softmax, int64_t bq, int64_t bk)
{
    FN(weights_tile)((FN(scratch) *)w, softmax, bq, bk);
}

/* Dropout on the weights of a tile (after weights_tile, in its layout);
 * the rows' words are made at the item's first tile. */
void FA_OP(dropout_tile)(const fa_problem *p, const int64_t *e, void *w, int64_t row0, int64_t bq, int64_t k0,
                         int64_t bk)
{
    FN(scratch) *s = (FN(scratch) *)w;
    const int64_t at[5] = {e[FA_E_DROP], e[FA_E_DROP_ROW], e[FA_E_LQ], row0, bq};
    if (memcmp(at, s->drop_at, sizeof at) != 0) {
        FN(dropout_rows)(p, e, row0, bq, s->drop_a, s->drop_b);
        memcpy(s->drop_at, at, sizeof at);
    }
    FN(dropout_tile)(p, e, s->drop_a, s->drop_b, s->st, bq <= FA_ROWS_MAX, bq, k0, bk, NULL);
}

void FA_OP(attn_pv_tile)(const fa_problem *p, const int64_t *e, void *w, int64_t bq, int64_t k0, int64_t bk,
                        int64_t col)
{
    FN(scratch) *s = (FN(scratch) *)w;
    FA_T *const st = s->st;
    s->st = st + col;
    FN(pv_tile)(p, e, s, bq, k0, bk, col == 0);
    s->st = st;
}

void FA_OP(store_rows)(const fa_problem *p, const int64_t *e, void *w, int64_t row0, int64_t bq, int normalise)
{
    FN(unshift_rows)((FN(scratch) *)w, bq, p->dv);
    FN(store_rows)(p, e, (FN(scratch) *)w, row0, bq, normalise);
}

void FA_OP(store_partial)(const fa_problem *p, void *w, int64_t bq, int64_t sr, void *slot)
{
    FN(unshift_rows)((FN(scratch) *)w, bq, p->dv);
    FN(store_partial)((FN(scratch) *)w, bq, sr, (FA_T *)slot);
}

void FA_OP(merge_rows)(const fa_problem *p, const int64_t *e, void *w, const void *slots, int64_t sr, int64_t first,
                       int nsplit, int64_t row0, int64_t bq)
{
    FN(scratch) *s = (FN(scratch) *)w;
    FN(merge_partials)(p, e, (const FA_T *)slots, sr, first, nsplit, row0, bq, s->dvp, s->o);
}

void FA_OP(scores_begin)(const fa_problem *p, const int64_t *e, void *w, int64_t row0, int64_t bq)
{
    FN(pack_q)(p, e, row0, bq, (FN(scratch) *)w);
}

/* The scores of keys [k0, k0 + bk) into the rows of out. */
void FA_OP(scores_tile)(const fa_problem *p, const int64_t *e, void *w, int64_t row0, int64_t bq, int64_t k0,
                        int64_t bk)
{
    FN(scratch) *s = (FN(scratch) *)w;
    const fa_prefetch_plan none = {0};
    FN(apply_options)(p, e, s, row0, bq, k0, bk, FN(score_tile)(p, e, s, row0, bq, k0, bk, &none));
    fa_vrow at = fa_vrow_at(row0, e[FA_E_LQ]);
    for (int64_t r = 0; r < bq; r++, fa_vrow_next(&at)) {
        char *row = (char *)p->out + e[FA_E_OUT] + fa_vrow_bytes(&at, p->out_rs, p->out_hs) + k0 * p->out_cs;
        const FA_T *sr = bq <= FA_ROWS_MAX ? s->st + r * FA_BK : s->st + r; /* see score_tile */
        const int64_t sj = bq <= FA_ROWS_MAX ? 1 : FA_BQ;
        for (int64_t j = 0; j < bk; j++) *(FA_T *)(row + j * p->out_cs) = sr[j * sj];
    }
}

void FA_OP(wsum_begin)(const fa_problem *p, const int64_t *e, void *w, int64_t bq)
{
    FN(plan_v)(p, e, bq, 0, (FN(scratch) *)w);
    FN(start_rows)((FN(scratch) *)w, bq);
}

/* Accumulate W[rows, k0 : k0 + bk] V[k0 : k0 + bk], W given as q. */
void FA_OP(wsum_tile)(const fa_problem *p, const int64_t *e, void *w, int64_t row0, int64_t bq, int64_t k0,
                      int64_t bk)
{
    FN(scratch) *s = (FN(scratch) *)w;
    /* the weights in st's layout (see score_tile): W^T, st[j][r] =
     * w[row0 + r][k0 + j], or for a few rows W itself, st[r][j] */
    if (bq <= FA_ROWS_MAX)
        FN(pack_rows)(p->q, e[FA_E_Q] + k0 * p->q_cs, p->q_rs, p->q_cs, row0, bq, bk, s->st, FA_BK);
    else
        FN(pack_transposed)(p->q, e[FA_E_Q] + k0 * p->q_cs, p->q_rs, p->q_cs, e[FA_E_LQ], 0, row0, bq,
                            fa_roundup64(bq, FA_W), bk, 1, s->st, FA_BQ);
    FN(pv_tile)(p, e, s, bq, k0, bk, 1);
}

/* The shape the driver needs (fa_tile_ops.width, .rows_max), as constants
 * named for this instance: fa_width_<suffix>, fa_rows_max_<suffix>. */
enum { FA_CAT(fa_width, FA_SUFFIX) = FA_W, FA_CAT(fa_rows_max, FA_SUFFIX) = FA_ROWS_MAX };

/* The backward's operations. */
#include "fa_tile_bwd.h"

/* A path may add operations of its own to this instance (FA_TILE_EXTRA
 * names the header), with every helper above in scope. */
#ifdef FA_TILE_EXTRA
#include FA_TILE_EXTRA
#endif

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
#undef FA_MASK_TILES
#undef FA_LD
#undef FA_ST
#undef FA_AT
#undef FN
