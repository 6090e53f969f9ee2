/*
 * fa_tile_bf16dp.h - bfloat16 attention on vdpbf16ps (AVX512-BF16): the
 * tile operations that the avx512bf16 path supplies for bfloat16 problems
 * in place of the template's (fa_tile_impl.h).  Included by
 * fa_path_avx512bf16.c after the template's bfloat16 instance, whose
 * helpers (scratch, option masks, row leads, V plans) it shares.
 *
 * The two products run on vdpbf16ps, which multiplies pairs of bfloat16 and
 * adds both products to a float32 lane, twice the work of an FMA per
 * instruction.  Operands are packed as 32-bit
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
    fa_vrow at = fa_vrow_at(row0, lq);
    for (int64_t r = 0; r < bq; r++, fa_vrow_next(&at)) {
        const char *row = (const char *)p->q + e[FA_E_Q] + fa_vrow_bytes(&at, p->q_rs, p->q_hs);
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
                           const fa_prefetch_plan *pf)
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
                              int64_t bq, int64_t k0, int64_t bk, const fa_prefetch_plan *pf)
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
    FN(tile_bounds)(p, e, w, row0, bq, k0, bk); /* w->seen, as score_tile; the options follow */
    const uint32_t *qt = (const uint32_t *)w->qt;
    if (bq <= FA_ROWS_MAX) {
        FN(qk_rows_dp)(bq, d2, w->qoff, qt, w->ldq, k, ldk, bk, (float)p->scale, w->st, pf);
    } else {
        for (int64_t cb = 0; cb < bqp; cb += FA_NVW) {
            const int64_t nv = fa_min64(FA_NV, (bqp - cb) / FA_W);
            for (int64_t j = 0; j < bk; j += FA_MR) {
                const int64_t mr = fa_min64(FA_MR, bk - j);
                int64_t c0 = 0, c1 = nv;
                if (w->seen.bounded && !FN(tile_vectors)(&w->seen, cb / FA_W, nv, j, mr, &c0, &c1)) continue;
                FN(qk_dp_block)((int)mr, (int)(c1 - c0), d2, k + j * ldk, ldk, qt + cb + c0 * FA_W, (float)p->scale,
                                w->st + j * FA_BQ + cb + c0 * FA_W);
            }
        }
    }
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
        for (int64_t r = 0; r < bq; r += FA_MR) {
            const int64_t mr = fa_min64(FA_MR, bq - r);
            int64_t j0, j1, t0, t1; /* the key pairs these rows see: the others weigh 0 */
            FN(tile_keys)(&w->seen, r, mr, bk, &j0, &j1);
            t0 = j0 / 2, t1 = j1 > j0 ? (j1 + 1) / 2 : t0;
            FN(pv_dp_block)((int)mr, nv, t1 - t0, w->pw + t0 * FA_BQ + r, vw + t0 * dvp + cb, dvp,
                            w->o + r * dvp + cb, dvp, w->alpha + r);
        }
    }
}

/* ---- the tile operations (fa_tile.h) --------------------------------------- */

void FA_OP(attn_begin_dp)(const fa_problem *p, const int64_t *e, void *w, int64_t row0, int64_t bq)
{
    FN(pack_q_dp)(p, e, row0, bq, (FN(scratch) *)w);
    FN(plan_v)(p, e, bq, 1, (FN(scratch) *)w);
    FN(start_rows)((FN(scratch) *)w, bq);
}

/* Tiles whole (col 0): this path's ops do not take segments (tile_segments 0). */
void FA_OP(attn_score_tile_dp)(const fa_problem *p, const int64_t *e, void *w, int64_t row0, int64_t bq,
                               int64_t k0, int64_t bk, int64_t col, const fa_prefetch_plan *pf)
{
    (void)col;
    FN(score_tile_dp)(p, e, (FN(scratch) *)w, row0, bq, k0, bk, pf);
}

void FA_OP(attn_pv_tile_dp)(const fa_problem *p, const int64_t *e, void *w, int64_t bq, int64_t k0, int64_t bk,
                            int64_t col)
{
    (void)col;
    FN(pv_tile_dp)(p, e, (FN(scratch) *)w, bq, k0, bk);
}
