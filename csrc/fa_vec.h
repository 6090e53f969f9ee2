/*
 * fa_vec.h - a small vector vocabulary shared by every kernel path.
 *
 * Include after defining FA_T (float or double), FA_T_IS_FLOAT and
 * FA_VEC_ISA (0 = portable C, 1 = AVX2+FMA, 2 = AVX-512, 3 = AArch64 NEON:
 * a plain number, since the preprocessor tests it).  It may be included several times in
 * one translation unit; each inclusion redefines:
 *
 *   fa_vec          the vector type, FA_W lanes of FA_T
 *   FA_MR, FA_NV    register tile of the micro-kernels: FA_MR rows by
 *                   FA_NV vectors (the largest that fits the register file
 *                   with the operand vectors beside it)
 *   FA_ROWS_MAX     items of at most this many query rows use the few-row
 *                   (decoding) kernels, whose lanes run along D; 0: none
 *   FA_F16C         1 where float16 converts with x86's F16C instructions
 *   FA_RV           vectors of one row the few-row (decoding) kernels keep
 *                   in registers: a chunk of a query row against FA_W
 *                   accumulators, or two output rows of FA_RV vectors
 *   VZERO VLOAD VSTORE VBCAST VFMA VADD VMUL VSUB VMAX VHMAX VHSUM
 *   VNEGINF0(x)     x with -inf lanes replaced by 0
 *   fa_mask, VMASK(lo, hi), VMASK_ALL, VMASK_AND(a, b), VLOAD_MASKZ(m, p)
 *                   lane masks (lanes lo <= i < hi) and a load of the masked
 *                   lanes (others zero) that never touches memory outside
 *                   them (no fault, no value read)
 *   VHSUMS(a)       from FA_W vectors a[0..FA_W), the vector whose lane j is
 *                   the sum of the lanes of a[j]
 *   VEXP(x)         exp of each lane, meant for x <= 0: -inf gives 0, NaN
 *                   stays NaN.  Float paths use a polynomial (see below);
 *                   double paths call libm's exp lane by lane.
 *   VDIV(a, b), VABS(a), VCOPYSIGN(m, s)
 *                   a / b; |a| (the sign bit cleared, NaN stays NaN); m's
 *                   magnitude with s's sign
 *
 * The file that includes it must already have enabled the instruction set
 * (target pragma) for the intrinsics it uses.
 */

#undef FA_W
#undef FA_ROWS_MAX
#undef FA_F16C
#undef FA_MR
#undef FA_NV
#undef FA_RV
#undef VZERO
#undef VLOAD
#undef VSTORE
#undef VBCAST
#undef VFMA
#undef VMUL
#undef VADD
#undef VNEGINF0
#undef VHSUMS
#undef VSUB
#undef VMAX
#undef VHMAX
#undef VHSUM
#undef VEXP
#undef VDIV
#undef VABS
#undef VCOPYSIGN
#undef fa_vec
#undef fa_mask
#undef VMASK
#undef VMASK_ALL
#undef VMASK_AND
#undef VLOAD_MASKZ

/* Coefficients of exp on [-ln2/2, ln2/2] (Taylor to degree 7: truncation
 * below 6e-9 relative, so the float result is within rounding error). */
#ifndef FA_EXP_CONSTANTS
#define FA_EXP_CONSTANTS
#define FA_LOG2E 1.44269504088896341f
#define FA_LN2_HI 0.693145751953125f
#define FA_LN2_LO 1.42860682030941723212e-6f
#define FA_EXP_C2 (1.0f / 2.0f)
#define FA_EXP_C3 (1.0f / 6.0f)
#define FA_EXP_C4 (1.0f / 24.0f)
#define FA_EXP_C5 (1.0f / 120.0f)
#define FA_EXP_C6 (1.0f / 720.0f)
#define FA_EXP_C7 (1.0f / 5040.0f)
#endif

#if FA_VEC_ISA == 2 /* AVX-512 */

#include <immintrin.h>
#include <math.h>
#define FA_MR 6
#define FA_NV 4
#define FA_RV 8
#define FA_ROWS_MAX (FA_W / 2)
#define FA_F16C 1

#ifndef FA_AVX512_HELPERS
#define FA_AVX512_HELPERS
/* exp(x) for float lanes: x = n ln2 + r, exp(r) by polynomial, 2^n applied
 * with vscalefps.  Results that would be subnormal (x < -87.33, also -inf)
 * are 0, as on the other paths (fa_flush_subnormals: on Intel CPUs each
 * subnormal weight made the products it entered take a microcode assist);
 * NaN propagates. */
static inline __m512 fa_exp_ps512(__m512 x)
{
    const __mmask16 tiny = _mm512_cmp_ps_mask(x, _mm512_set1_ps(-87.33654f), _CMP_LT_OQ);
    const __m512 xc = _mm512_max_ps(_mm512_set1_ps(-87.33654f), x);
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(xc, _mm512_set1_ps(FA_LOG2E)),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(FA_LN2_HI), xc);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(FA_LN2_LO), r);
    __m512 y = _mm512_set1_ps(FA_EXP_C7);
    y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(FA_EXP_C6));
    y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(FA_EXP_C5));
    y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(FA_EXP_C4));
    y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(FA_EXP_C3));
    y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(FA_EXP_C2));
    y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(1.0f));
    y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(1.0f));
    return _mm512_maskz_mov_ps((__mmask16)~tiny, _mm512_scalef_ps(y, n));
}

/* Lane j of the result = sum of the lanes of a[j], for 16 vectors: a tree of
 * shuffles and adds (31 + 15 operations) instead of 16 reductions. */
static inline __m512 fa_hsums_ps512(const __m512 *a)
{
    __m512 b[8], c[4], d[2];
    for (int k = 0; k < 8; k++) /* halves: key 2k in 128-bit blocks 0-1, key 2k+1 in 2-3 */
        b[k] = _mm512_add_ps(_mm512_shuffle_f32x4(a[2 * k], a[2 * k + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                             _mm512_shuffle_f32x4(a[2 * k], a[2 * k + 1], _MM_SHUFFLE(3, 2, 3, 2)));
    for (int k = 0; k < 4; k++) /* block t of c[k]: key 4k + t */
        c[k] = _mm512_add_ps(_mm512_shuffle_f32x4(b[2 * k], b[2 * k + 1], _MM_SHUFFLE(2, 0, 2, 0)),
                             _mm512_shuffle_f32x4(b[2 * k], b[2 * k + 1], _MM_SHUFFLE(3, 1, 3, 1)));
    for (int k = 0; k < 2; k++) /* block t of d[k]: lanes 0-1 key 8k + t, lanes 2-3 key 8k + 4 + t */
        d[k] = _mm512_add_ps(_mm512_shuffle_ps(c[2 * k], c[2 * k + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                             _mm512_shuffle_ps(c[2 * k], c[2 * k + 1], _MM_SHUFFLE(3, 2, 3, 2)));
    /* lane 4t + u holds key 4u + t; put key j in lane j */
    const __m512 e = _mm512_add_ps(_mm512_shuffle_ps(d[0], d[1], _MM_SHUFFLE(2, 0, 2, 0)),
                                   _mm512_shuffle_ps(d[0], d[1], _MM_SHUFFLE(3, 1, 3, 1)));
    const __m512i order = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
    return _mm512_permutexvar_ps(order, e);
}

static inline __m512d fa_exp_pd512(__m512d x)
{
    double t[8];
    _mm512_storeu_pd(t, x);
    for (int i = 0; i < 8; i++) t[i] = exp(t[i]);
    return _mm512_loadu_pd(t);
}
#endif

#if FA_T_IS_FLOAT
#define fa_vec __m512
#define FA_W 16
#define VZERO() _mm512_setzero_ps()
#define VLOAD(p) _mm512_loadu_ps(p)
#define VSTORE(p, x) _mm512_storeu_ps((p), (x))
#define VBCAST(x) _mm512_set1_ps(x)
#define VFMA(a, b, c) _mm512_fmadd_ps((a), (b), (c))
#define VMUL(a, b) _mm512_mul_ps((a), (b))
#define VADD(a, b) _mm512_add_ps((a), (b))
#define VSUB(a, b) _mm512_sub_ps((a), (b))
#define VNEGINF0(a) _mm512_mask_blend_ps(_mm512_cmp_ps_mask((a), _mm512_set1_ps(-INFINITY), _CMP_EQ_OQ), (a), _mm512_setzero_ps())
#define VMAX(a, b) _mm512_max_ps((a), (b))
#define VHMAX(a) _mm512_reduce_max_ps(a)
#define VHSUM(a) _mm512_reduce_add_ps(a)
#define VHSUMS(a) fa_hsums_ps512(a)
#define VEXP(x) fa_exp_ps512(x)
#define VDIV(a, b) _mm512_div_ps((a), (b))
#define VABS(a) _mm512_abs_ps(a)
#define VCOPYSIGN(m, s) _mm512_or_ps(_mm512_andnot_ps(_mm512_set1_ps(-0.0f), (m)), _mm512_and_ps(_mm512_set1_ps(-0.0f), (s)))
#define fa_mask __mmask16
#define VMASK(lo, hi) ((__mmask16)(((1u << (hi)) - 1u) & ~((1u << (lo)) - 1u)))
#define VMASK_ALL ((__mmask16)0xffff)
#define VMASK_AND(a, b) ((__mmask16)((a) & (b)))
#define VLOAD_MASKZ(m, p) _mm512_maskz_loadu_ps((m), (p))
#else
#define fa_vec __m512d
#define FA_W 8
#define VZERO() _mm512_setzero_pd()
#define VLOAD(p) _mm512_loadu_pd(p)
#define VSTORE(p, x) _mm512_storeu_pd((p), (x))
#define VBCAST(x) _mm512_set1_pd(x)
#define VFMA(a, b, c) _mm512_fmadd_pd((a), (b), (c))
#define VMUL(a, b) _mm512_mul_pd((a), (b))
#define VADD(a, b) _mm512_add_pd((a), (b))
#define VSUB(a, b) _mm512_sub_pd((a), (b))
#define VNEGINF0(a) _mm512_mask_blend_pd(_mm512_cmp_pd_mask((a), _mm512_set1_pd(-INFINITY), _CMP_EQ_OQ), (a), _mm512_setzero_pd())
#define VMAX(a, b) _mm512_max_pd((a), (b))
#define VHMAX(a) _mm512_reduce_max_pd(a)
#define VHSUM(a) _mm512_reduce_add_pd(a)
#define VEXP(x) fa_exp_pd512(x)
#define VDIV(a, b) _mm512_div_pd((a), (b))
#define VABS(a) _mm512_abs_pd(a)
#define VCOPYSIGN(m, s) _mm512_or_pd(_mm512_andnot_pd(_mm512_set1_pd(-0.0), (m)), _mm512_and_pd(_mm512_set1_pd(-0.0), (s)))
#define fa_mask __mmask8
#define VMASK(lo, hi) ((__mmask8)(((1u << (hi)) - 1u) & ~((1u << (lo)) - 1u)))
#define VMASK_ALL ((__mmask8)0xff)
#define VMASK_AND(a, b) ((__mmask8)((a) & (b)))
#define VLOAD_MASKZ(m, p) _mm512_maskz_loadu_pd((m), (p))
#endif

#elif FA_VEC_ISA == 1 /* AVX2 */

#include <immintrin.h>
#include <math.h>
#define FA_MR 6
#define FA_NV 2
#define FA_RV 4
/* double vectors are too narrow for the few-row kernels to gain */
#define FA_ROWS_MAX (FA_W >= 8 ? FA_W / 2 : 0)
#define FA_F16C 1

#ifndef FA_AVX2_HELPERS
#define FA_AVX2_HELPERS
/* exp(x) for float lanes, as fa_exp_ps512 but with 2^n built in the exponent
 * field.  Results that would be subnormal (x < -87.33) are flushed to 0. */
static inline __m256 fa_exp_ps256(__m256 x)
{
    const __m256 lo = _mm256_set1_ps(-87.33654f);
    const __m256 tiny = _mm256_cmp_ps(x, lo, _CMP_LT_OQ);
    const __m256 xc = _mm256_max_ps(lo, x);
    const __m256 n = _mm256_round_ps(_mm256_mul_ps(xc, _mm256_set1_ps(FA_LOG2E)),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(FA_LN2_HI), xc);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(FA_LN2_LO), r);
    __m256 y = _mm256_set1_ps(FA_EXP_C7);
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(FA_EXP_C6));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(FA_EXP_C5));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(FA_EXP_C4));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(FA_EXP_C3));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(FA_EXP_C2));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.0f));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.0f));
    /* n >= -126 here, so 2^n is a normal float */
    const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    y = _mm256_mul_ps(y, _mm256_castsi256_ps(e));
    return _mm256_andnot_ps(tiny, y);
}

static inline __m256d fa_exp_pd256(__m256d x)
{
    double t[4];
    _mm256_storeu_pd(t, x);
    for (int i = 0; i < 4; i++) t[i] = exp(t[i]);
    return _mm256_loadu_pd(t);
}

static inline float fa_hmax_ps256(__m256 a)
{
    __m128 m = _mm_max_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    m = _mm_max_ss(m, _mm_shuffle_ps(m, m, 1));
    return _mm_cvtss_f32(m);
}
static inline float fa_hsum_ps256(__m256 a)
{
    __m128 m = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    m = _mm_add_ps(m, _mm_movehl_ps(m, m));
    m = _mm_add_ss(m, _mm_shuffle_ps(m, m, 1));
    return _mm_cvtss_f32(m);
}
/* Lane j of the result = sum of the lanes of a[j], for 8 vectors, added in
 * fa_hsum_ps256's order (lane i + lane i + 4, then i + (i + 2), then 0 + 1),
 * so each sum is bit for bit fa_hsum_ps256(a[j]): a tree of 15 shuffles and
 * 7 adds instead of 8 reductions and 8 scalar stores. */
static inline __m256 fa_hsums_ps256(const __m256 *a)
{
    __m256 b[4], c[2];
    for (int k = 0; k < 4; k++) /* halves added: a[2k]'s in lanes 0-3, a[2k+1]'s in 4-7 */
        b[k] = _mm256_add_ps(_mm256_permute2f128_ps(a[2 * k], a[2 * k + 1], 0x20),
                             _mm256_permute2f128_ps(a[2 * k], a[2 * k + 1], 0x31));
    for (int k = 0; k < 2; k++) /* lanes 0-1: a[4k]'s pair sums, 2-3: a[4k+2]'s; 4-7 the same of 4k+1, 4k+3 */
        c[k] = _mm256_add_ps(_mm256_shuffle_ps(b[2 * k], b[2 * k + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                             _mm256_shuffle_ps(b[2 * k], b[2 * k + 1], _MM_SHUFFLE(3, 2, 3, 2)));
    /* lanes 0-3: sums of a[0], a[2], a[4], a[6]; 4-7: of a[1], a[3], a[5], a[7] */
    const __m256 e = _mm256_add_ps(_mm256_shuffle_ps(c[0], c[1], _MM_SHUFFLE(2, 0, 2, 0)),
                                   _mm256_shuffle_ps(c[0], c[1], _MM_SHUFFLE(3, 1, 3, 1)));
    return _mm256_permutevar8x32_ps(e, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
}
static inline double fa_hmax_pd256(__m256d a)
{
    __m128d m = _mm_max_pd(_mm256_castpd256_pd128(a), _mm256_extractf128_pd(a, 1));
    m = _mm_max_sd(m, _mm_unpackhi_pd(m, m));
    return _mm_cvtsd_f64(m);
}
static inline double fa_hsum_pd256(__m256d a)
{
    __m128d m = _mm_add_pd(_mm256_castpd256_pd128(a), _mm256_extractf128_pd(a, 1));
    m = _mm_add_sd(m, _mm_unpackhi_pd(m, m));
    return _mm_cvtsd_f64(m);
}
#endif

#if FA_T_IS_FLOAT
#define fa_vec __m256
#define FA_W 8
#define VZERO() _mm256_setzero_ps()
#define VLOAD(p) _mm256_loadu_ps(p)
#define VSTORE(p, x) _mm256_storeu_ps((p), (x))
#define VBCAST(x) _mm256_set1_ps(x)
#define VFMA(a, b, c) _mm256_fmadd_ps((a), (b), (c))
#define VMUL(a, b) _mm256_mul_ps((a), (b))
#define VADD(a, b) _mm256_add_ps((a), (b))
#define VSUB(a, b) _mm256_sub_ps((a), (b))
#define VNEGINF0(a) _mm256_blendv_ps((a), _mm256_setzero_ps(), _mm256_cmp_ps((a), _mm256_set1_ps(-INFINITY), _CMP_EQ_OQ))
#define VMAX(a, b) _mm256_max_ps((a), (b))
#define VHMAX(a) fa_hmax_ps256(a)
#define VHSUM(a) fa_hsum_ps256(a)
#define VHSUMS(a) fa_hsums_ps256(a)
#define VEXP(x) fa_exp_ps256(x)
#define VDIV(a, b) _mm256_div_ps((a), (b))
#define VABS(a) _mm256_andnot_ps(_mm256_set1_ps(-0.0f), (a))
#define VCOPYSIGN(m, s) _mm256_or_ps(_mm256_andnot_ps(_mm256_set1_ps(-0.0f), (m)), _mm256_and_ps(_mm256_set1_ps(-0.0f), (s)))
#define fa_mask __m256i
#define VMASK(lo, hi)                                                                               \
    _mm256_and_si256(_mm256_cmpgt_epi32(_mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7), _mm256_set1_epi32((lo) - 1)), \
                     _mm256_cmpgt_epi32(_mm256_set1_epi32(hi), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7)))
#define VMASK_ALL _mm256_set1_epi32(-1)
#define VMASK_AND(a, b) _mm256_and_si256((a), (b))
#define VLOAD_MASKZ(m, p) _mm256_maskload_ps((p), (m))
#else
#define fa_vec __m256d
#define FA_W 4
#define VZERO() _mm256_setzero_pd()
#define VLOAD(p) _mm256_loadu_pd(p)
#define VSTORE(p, x) _mm256_storeu_pd((p), (x))
#define VBCAST(x) _mm256_set1_pd(x)
#define VFMA(a, b, c) _mm256_fmadd_pd((a), (b), (c))
#define VMUL(a, b) _mm256_mul_pd((a), (b))
#define VADD(a, b) _mm256_add_pd((a), (b))
#define VSUB(a, b) _mm256_sub_pd((a), (b))
#define VNEGINF0(a) _mm256_blendv_pd((a), _mm256_setzero_pd(), _mm256_cmp_pd((a), _mm256_set1_pd(-INFINITY), _CMP_EQ_OQ))
#define VMAX(a, b) _mm256_max_pd((a), (b))
#define VHMAX(a) fa_hmax_pd256(a)
#define VHSUM(a) fa_hsum_pd256(a)
#define VEXP(x) fa_exp_pd256(x)
#define VDIV(a, b) _mm256_div_pd((a), (b))
#define VABS(a) _mm256_andnot_pd(_mm256_set1_pd(-0.0), (a))
#define VCOPYSIGN(m, s) _mm256_or_pd(_mm256_andnot_pd(_mm256_set1_pd(-0.0), (m)), _mm256_and_pd(_mm256_set1_pd(-0.0), (s)))
#define fa_mask __m256i
#define VMASK(lo, hi)                                                                               \
    _mm256_and_si256(_mm256_cmpgt_epi64(_mm256_setr_epi64x(0, 1, 2, 3), _mm256_set1_epi64x((lo) - 1)), \
                     _mm256_cmpgt_epi64(_mm256_set1_epi64x(hi), _mm256_setr_epi64x(0, 1, 2, 3)))
#define VMASK_ALL _mm256_set1_epi64x(-1)
#define VMASK_AND(a, b) _mm256_and_si256((a), (b))
#define VLOAD_MASKZ(m, p) _mm256_maskload_pd((p), (m))
#endif

#elif FA_VEC_ISA == 3 /* AArch64 NEON (Advanced SIMD), 32 registers of 128 bits */

#include <arm_neon.h>
#include <math.h>
#define FA_MR 6
#define FA_NV 4
#define FA_RV 8
#define FA_F16C 0

#ifndef FA_NEON_HELPERS
#define FA_NEON_HELPERS
/* exp(x) for float lanes, as fa_exp_ps256: x = n ln2 + r, exp(r) by the
 * same polynomial, 2^n built in the exponent field; results that would be
 * subnormal (x < -87.33) are flushed to 0; NaN propagates. */
static inline float32x4_t fa_exp_f32x4(float32x4_t x)
{
    const float32x4_t lo = vdupq_n_f32(-87.33654f);
    const uint32x4_t tiny = vcltq_f32(x, lo);
    const float32x4_t xc = vmaxq_f32(lo, x); /* NaN stays NaN */
    const float32x4_t n = vrndnq_f32(vmulq_f32(xc, vdupq_n_f32(FA_LOG2E)));
    float32x4_t r = vfmsq_f32(xc, n, vdupq_n_f32(FA_LN2_HI));
    r = vfmsq_f32(r, n, vdupq_n_f32(FA_LN2_LO));
    float32x4_t y = vdupq_n_f32(FA_EXP_C7);
    y = vfmaq_f32(vdupq_n_f32(FA_EXP_C6), y, r);
    y = vfmaq_f32(vdupq_n_f32(FA_EXP_C5), y, r);
    y = vfmaq_f32(vdupq_n_f32(FA_EXP_C4), y, r);
    y = vfmaq_f32(vdupq_n_f32(FA_EXP_C3), y, r);
    y = vfmaq_f32(vdupq_n_f32(FA_EXP_C2), y, r);
    y = vfmaq_f32(vdupq_n_f32(1.0f), y, r);
    y = vfmaq_f32(vdupq_n_f32(1.0f), y, r);
    /* n >= -126 here, so 2^n is a normal float */
    const int32x4_t e = vshlq_n_s32(vaddq_s32(vcvtq_s32_f32(n), vdupq_n_s32(127)), 23);
    y = vmulq_f32(y, vreinterpretq_f32_s32(e));
    return vreinterpretq_f32_u32(vbicq_u32(vreinterpretq_u32_f32(y), tiny));
}

static inline float64x2_t fa_exp_f64x2(float64x2_t x)
{
    return vcombine_f64(vdup_n_f64(exp(vgetq_lane_f64(x, 0))), vdup_n_f64(exp(vgetq_lane_f64(x, 1))));
}

/* Lanes lo <= i < hi of a mask of 4 (or 2) lanes. */
static inline uint32x4_t fa_mask_u32x4(int lo, int hi)
{
    const int32x4_t i = {0, 1, 2, 3};
    return vandq_u32(vcgeq_s32(i, vdupq_n_s32(lo)), vcltq_s32(i, vdupq_n_s32(hi)));
}
static inline uint64x2_t fa_mask_u64x2(int lo, int hi)
{
    const int64x2_t i = {0, 1};
    return vandq_u64(vcgeq_s64(i, vdupq_n_s64(lo)), vcltq_s64(i, vdupq_n_s64(hi)));
}

/* The masked lanes of p, others zero, without touching the memory of the
 * others (NEON has no masked load). */
static inline float32x4_t fa_load_maskz_f32x4(uint32x4_t m, const float *p)
{
    float t[4];
    uint32_t b[4];
    vst1q_u32(b, m);
    for (int i = 0; i < 4; i++) t[i] = b[i] ? p[i] : 0.0f;
    return vld1q_f32(t);
}
static inline float64x2_t fa_load_maskz_f64x2(uint64x2_t m, const double *p)
{
    return vcombine_f64(vdup_n_f64(vgetq_lane_u64(m, 0) ? p[0] : 0.0), vdup_n_f64(vgetq_lane_u64(m, 1) ? p[1] : 0.0));
}
#endif

#if FA_T_IS_FLOAT
#define fa_vec float32x4_t
#define FA_W 4
#define FA_ROWS_MAX 2
#define VZERO() vdupq_n_f32(0.0f)
#define VLOAD(p) vld1q_f32(p)
#define VSTORE(p, x) vst1q_f32((p), (x))
#define VBCAST(x) vdupq_n_f32(x)
#define VFMA(a, b, c) vfmaq_f32((c), (a), (b))
#define VMUL(a, b) vmulq_f32((a), (b))
#define VADD(a, b) vaddq_f32((a), (b))
#define VSUB(a, b) vsubq_f32((a), (b))
/* a > b ? a : b lane by lane, as the other paths (a NaN in b is kept, in a dropped) */
#define VMAX(a, b) vbslq_f32(vcgtq_f32((a), (b)), (a), (b))
#define VNEGINF0(a) vbslq_f32(vceqq_f32((a), vdupq_n_f32(-INFINITY)), vdupq_n_f32(0.0f), (a))
#define VHMAX(a) vmaxvq_f32(a)
#define VHSUM(a) vaddvq_f32(a)
#define VEXP(x) fa_exp_f32x4(x)
#define VDIV(a, b) vdivq_f32((a), (b))
#define VABS(a) vabsq_f32(a)
#define VCOPYSIGN(m, s) vbslq_f32(vdupq_n_u32(0x80000000u), (s), (m))
#define fa_mask uint32x4_t
#define VMASK(lo, hi) fa_mask_u32x4((lo), (hi))
#define VMASK_ALL vdupq_n_u32(0xffffffffu)
#define VMASK_AND(a, b) vandq_u32((a), (b))
#define VLOAD_MASKZ(m, p) fa_load_maskz_f32x4((m), (p))
#else
#define fa_vec float64x2_t
#define FA_W 2
#define FA_ROWS_MAX 0
#define VZERO() vdupq_n_f64(0.0)
#define VLOAD(p) vld1q_f64(p)
#define VSTORE(p, x) vst1q_f64((p), (x))
#define VBCAST(x) vdupq_n_f64(x)
#define VFMA(a, b, c) vfmaq_f64((c), (a), (b))
#define VMUL(a, b) vmulq_f64((a), (b))
#define VADD(a, b) vaddq_f64((a), (b))
#define VSUB(a, b) vsubq_f64((a), (b))
#define VMAX(a, b) vbslq_f64(vcgtq_f64((a), (b)), (a), (b))
#define VNEGINF0(a) vbslq_f64(vceqq_f64((a), vdupq_n_f64(-INFINITY)), vdupq_n_f64(0.0), (a))
#define VHMAX(a) vmaxvq_f64(a)
#define VHSUM(a) vaddvq_f64(a)
#define VEXP(x) fa_exp_f64x2(x)
#define VDIV(a, b) vdivq_f64((a), (b))
#define VABS(a) vabsq_f64(a)
#define VCOPYSIGN(m, s) vbslq_f64(vdupq_n_u64(1ull << 63), (s), (m))
#define fa_mask uint64x2_t
#define VMASK(lo, hi) fa_mask_u64x2((lo), (hi))
#define VMASK_ALL vdupq_n_u64(~0ull)
#define VMASK_AND(a, b) vandq_u64((a), (b))
#define VLOAD_MASKZ(m, p) fa_load_maskz_f64x2((m), (p))
#endif

#else /* portable C: one-lane "vectors", a 4x4 register tile */

#include <math.h>
#define fa_vec FA_T
#define FA_W 1
#define FA_ROWS_MAX 0
#define FA_F16C 0
#define FA_MR 4
#define FA_NV 4
#define FA_RV 1
#define VZERO() ((FA_T)0)
#define VLOAD(p) (*(p))
#define VSTORE(p, x) (*(p) = (x))
#define VBCAST(x) (x)
#define VFMA(a, b, c) ((a) * (b) + (c))
#define VMUL(a, b) ((a) * (b))
#define VADD(a, b) ((a) + (b))
#define VSUB(a, b) ((a) - (b))
#define VMAX(a, b) ((a) > (b) ? (a) : (b))
#define VHMAX(a) (a)
#define VHSUM(a) (a)
#define VNEGINF0(a) ((a) == (FA_T)-INFINITY ? (FA_T)0 : (a))
#define VEXP(x) ((FA_T)exp((double)(x)))
#define VDIV(a, b) ((a) / (b))
#define VABS(a) ((FA_T)fabs((double)(a)))
#define VCOPYSIGN(m, s) ((FA_T)copysign((double)(m), (double)(s)))
#define fa_mask int
#define VMASK(lo, hi) ((lo) <= 0 && 0 < (hi))
#define VMASK_ALL 1
#define VMASK_AND(a, b) ((a) && (b))
#define VLOAD_MASKZ(m, p) ((m) ? *(p) : (FA_T)0)

#endif
