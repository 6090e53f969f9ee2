/*
 * fa_tile_bwd.h - the tile operations of the attention backward
 * (FlashAttention-2), part of the template: fa_tile_impl.h includes it with
 * its helpers in scope, once per element type and path.
 *
 * A tile pairs FA_BQ query rows (columns of the transposed tiles, along the
 * vector lanes) with up to FA_BK keys.  Scores and weights are recomputed
 * from the saved lse; every product runs on the forward's micro-kernels:
 *   S^T  = K Q^T (scaled)          qk_block, K rows read in place
 *   dP^T = V dO^T                   qk_block, V rows read in place
 *   dV  += P^T dO,  dK += dS^T Q    pv_block_tr over the key block's rows
 *   dQ  += dS K                     pv_block_st over the query tile's rows, into
 *                                   the tile's accumulator (the driver orders
 *                                   the key blocks' additions)
 * with P = exp(S - lse) (or S itself for dot weights), dS = P (dP - delta)
 * (dP for dot weights), times 1 - (z / softcap)^2 under a soft-cap.
 */

typedef struct {
    FA_T *qt;    /* d x FA_BQ: scale * Q^T of the query tile, zero past its rows */
    FA_T *qr;    /* FA_BQ x dp: Q rows (for dK), when they cannot be read in place */
    FA_T *dot;   /* dv x FA_BQ: dO^T, zero past the rows */
    FA_T *dor;   /* FA_BQ x dvp: dO rows (for dV), when they cannot be read in place */
    FA_T *kp;    /* FA_BK x dp: K rows when they cannot be read in place */
    FA_T *vp;    /* FA_BK x dv: V rows when they cannot be read in place */
    FA_T *st;    /* FA_BK x FA_BQ: S^T, then P^T */
    FA_T *dpt;   /* FA_BK x FA_BQ: dP^T, then dS^T */
    FA_T *zt;    /* FA_BK x FA_BQ: soft-capped scores (soft-cap only) */
    FA_T *acc_k; /* FA_BK x dp: dK of the key block */
    FA_T *acc_v; /* FA_BK x dvp: dV of the key block */
    FA_T *lse;   /* FA_BQ: the rows' lse; +inf for a row that sees no key and past the rows */
    FA_T *delta; /* FA_BQ: the rows' rowsum(dout * out) */
    const FA_T *k, *v; /* the key block's K and V rows (in place, or kp and vp), ldk and ldv apart */
    const FA_T *q, *o; /* the query tile's Q and dO rows (in place, or qr and dor), ldq and ldo apart */
    int64_t ldk, ldv, ldq, ldo;
    int64_t dp, dvp;
    void *block; /* fa_scratch_take */
    size_t bytes;
} FN(bwd_scratch);

void *FA_OP(bwd_scratch_new)(const fa_problem *p)
{
    const int64_t d = p->d, dv = p->dv, dp = fa_roundup64(d, FA_W), dvp = fa_roundup64(dv, FA_W);
    const int64_t al = 64 / (int64_t)sizeof(FA_T);
    const int64_t limit = (INT64_MAX / 16) / (int64_t)sizeof(FA_T) / (FA_BQ + FA_BK);
    if (dp > limit || dvp > limit) return NULL;
    const int64_t n[13] = {fa_roundup64(d * FA_BQ, al),   fa_roundup64(FA_BQ * dp, al), fa_roundup64(dv * FA_BQ, al),
                           fa_roundup64(FA_BQ * dvp, al), fa_roundup64(FA_BK * dp, al), fa_roundup64(FA_BK * dv, al),
                           FA_BK * FA_BQ,                 FA_BK * FA_BQ,                FA_BK * FA_BQ,
                           fa_roundup64(FA_BK * dp, al),  fa_roundup64(FA_BK * dvp, al), fa_roundup64(FA_BQ, al),
                           fa_roundup64(FA_BQ, al)};
    int64_t total = 0;
    for (int i = 0; i < 13; i++) total += n[i];
    FN(bwd_scratch) *w = (FN(bwd_scratch) *)malloc(sizeof *w);
    size_t bytes = (size_t)total * sizeof(FA_T);
    FA_T *b = w ? (FA_T *)fa_scratch_take(&bytes) : NULL;
    if (!b) {
        free(w);
        return NULL;
    }
    FA_T **slot[13] = {&w->qt, &w->qr, &w->dot, &w->dor, &w->kp, &w->vp, &w->st,
                       &w->dpt, &w->zt, &w->acc_k, &w->acc_v, &w->lse, &w->delta};
    FA_T *at = b;
    for (int i = 0; i < 13; i++) {
        *slot[i] = at;
        at += n[i];
    }
    w->block = b;
    w->bytes = bytes;
    w->dp = dp;
    w->dvp = dvp;
    return w;
}

void FA_OP(bwd_scratch_free)(void *w)
{
    fa_scratch_give(((FN(bwd_scratch) *)w)->block, ((FN(bwd_scratch) *)w)->bytes);
    free(w);
}

/* The query tile's operands: scale Q^T, dO^T, Q rows and dO rows (read in
 * place where the tile's rows are one head's and the rows allow it), its
 * rows' lse and delta. */
static void FN(bwd_pack_rows)(const fa_problem *p, const int64_t *e, FN(bwd_scratch) *w, int64_t row0, int64_t bq)
{
    const int64_t lq = e[FA_E_LQ], bqp = fa_roundup64(bq, FA_W);
    FN(pack_transposed)(p->q, e[FA_E_Q], p->q_rs, p->q_cs, lq, p->q_hs, row0, bq, bqp, p->d, (FA_T)p->scale, w->qt,
                        FA_BQ);
    FN(pack_transposed)(p->dout, e[FA_E_DOUT], p->dout_rs, p->dout_cs, lq, p->dout_hs, row0, bq, bqp, p->dv, 1,
                        w->dot, FA_BQ);
    const int64_t head = row0 / lq, i0 = row0 % lq;
    if (i0 + bq <= lq) {
        w->q = FN(key_rows)(p->q, e[FA_E_Q] + head * p->q_hs, p->q_rs, p->q_cs, i0, bq, p->d, w->dp, w->qr, &w->ldq);
        w->o = FN(key_rows)(p->dout, e[FA_E_DOUT] + head * p->dout_hs, p->dout_rs, p->dout_cs, i0, bq, p->dv, w->dvp,
                            w->dor, &w->ldo);
    } else { /* rows of several heads */
        for (int64_t r = 0; r < bq; r++) {
            const char *qrow = (const char *)p->q + e[FA_E_Q] + fa_vrow_off(row0 + r, lq, p->q_rs, p->q_hs);
            const char *orow =
                (const char *)p->dout + e[FA_E_DOUT] + fa_vrow_off(row0 + r, lq, p->dout_rs, p->dout_hs);
            FA_T *qd = w->qr + r * w->dp, *od = w->dor + r * w->dvp;
            FN(load_row)(qrow, p->q_cs, p->d, qd);
            for (int64_t c = p->d; c < w->dp; c++) qd[c] = 0;
            FN(load_row)(orow, p->dout_cs, p->dv, od);
            for (int64_t c = p->dv; c < w->dvp; c++) od[c] = 0;
        }
        w->q = w->qr;
        w->o = w->dor;
        w->ldq = w->dp;
        w->ldo = w->dvp;
    }
    const int softmax = p->weights == FA_WEIGHTS_SOFTMAX;
    for (int64_t r = 0; r < FA_BQ; r++) {
        FA_T l = (FA_T)INFINITY, dl = 0;
        if (r < bq && softmax) {
            l = *(const FA_T *)((const char *)p->lse + e[FA_E_LSE] + fa_vrow_off(row0 + r, lq, p->lse_rs, p->lse_hs));
            dl = *(const FA_T *)((const char *)p->delta + e[FA_E_DELTA] +
                                 fa_vrow_off(row0 + r, lq, p->delta_rs, p->delta_hs));
            if (l == (FA_T)-INFINITY) l = (FA_T)INFINITY; /* a row that sees no key: P = 0 */
        }
        w->lse[r] = l;
        w->delta[r] = dl;
    }
}

/* S^T, P^T (in st) and dS^T (in dpt) of the query tile packed in w and the
 * key block [k0, k0 + bk) loaded in w. */
static void FN(bwd_tile)(const fa_problem *p, const int64_t *e, FN(bwd_scratch) *w, int64_t row0, int64_t bq,
                         int64_t k0, int64_t bk)
{
    const int64_t d = p->d, dv = p->dv, bqp = fa_roundup64(bq, FA_W);
    const FA_T *k = w->k, *v = w->v;
    const int64_t ldk = w->ldk, ldv = w->ldv;
    for (int64_t cb = 0; cb < bqp; cb += FA_NVW) {
        const int nv = (int)fa_min64(FA_NV, (bqp - cb) / FA_W);
        for (int64_t j = 0; j < bk; j += FA_MR) {
            const int mr = (int)fa_min64(FA_MR, bk - j);
            FN(qk_block)(mr, nv, d, k + j * ldk, ldk, w->qt + cb, FA_BQ, w->st + j * FA_BQ + cb, FA_BQ);
            FN(qk_block)(mr, nv, dv, v + j * ldv, ldv, w->dot + cb, FA_BQ, w->dpt + j * FA_BQ + cb, FA_BQ);
        }
    }
    /* the score options: a soft-cap first, keeping z, then ALiBi, the mask and the bounds */
    fa_problem opt = *p;
    if (p->softcap > 0) {
        const fa_vec cap = VBCAST((FA_T)p->softcap), inv = VBCAST((FA_T)(1.0 / p->softcap));
        for (int64_t j = 0; j < bk; j++)
            for (int64_t r = 0; r < bqp; r += FA_W) { /* past the rows too: the scores there are 0 */
                const fa_vec z = FN(softcap_vec)(VLOAD(w->st + j * FA_BQ + r), inv, cap);
                VSTORE(w->st + j * FA_BQ + r, z);
                VSTORE(w->zt + j * FA_BQ + r, z);
            }
        opt.softcap = 0;
    }
    int64_t lo, hi, all_lo, all_hi;
    fa_block_range(p, e[FA_E_LQ], e[FA_E_LK], row0, bq, &lo, &hi, &all_lo, &all_hi);
    const int bounds = k0 < all_lo || k0 + bk > all_hi;
    if (p->alibi_slopes && FN(alibi_exact)(p, e)) { /* in vectors, over every key */
        FN(alibi_tile)(p, e, w->st, 0, NULL, NULL, row0, bq, k0, bk);
        opt.alibi_slopes = NULL;
    }
    if (bounds || p->mask_kind != FA_MASK_NONE || opt.alibi_slopes)
        FN(mask_and_bounds)(&opt, e, w->st, 0, row0, bq, k0, bk, bounds);
    /* P and dS, FA_W query rows at a time */
    if (p->weights == FA_WEIGHTS_SOFTMAX) {
        for (int64_t j = 0; j < bk; j++)
            for (int64_t c = 0; c < bqp; c += FA_W) {
                FA_T *s = w->st + j * FA_BQ + c, *dp = w->dpt + j * FA_BQ + c;
                const fa_vec pr = VEXP(VSUB(VLOAD(s), VLOAD(w->lse + c)));
                VSTORE(s, pr);
                VSTORE(dp, VMUL(pr, VSUB(VLOAD(dp), VLOAD(w->delta + c))));
            }
    } else {
        for (int64_t j = 0; j < bk; j++)
            for (int64_t r = 0; r < bqp; r++) {
                FA_T *s = w->st + j * FA_BQ + r;
                if (r >= bq || *s == (FA_T)-INFINITY) {
                    *s = 0;
                    w->dpt[j * FA_BQ + r] = 0;
                }
            }
    }
    if (p->softcap > 0) {
        const fa_vec inv = VBCAST((FA_T)(1.0 / p->softcap)), one = VBCAST((FA_T)1);
        for (int64_t j = 0; j < bk; j++)
            for (int64_t c = 0; c < bqp; c += FA_W) {
                FA_T *dp = w->dpt + j * FA_BQ + c;
                const fa_vec t = VMUL(VLOAD(w->zt + j * FA_BQ + c), inv);
                VSTORE(dp, VMUL(VLOAD(dp), VSUB(one, VMUL(t, t))));
            }
    }
}

static const FA_T FN(ones)[FA_MR_MAX] = {1, 1, 1, 1, 1, 1};

/* o (rows of n elements, ldo apart) += sum_j w(r, j) v[j] over nj terms, for
 * rows r < nr, with the weights w of a tile (FA_BK x FA_BQ, keys by
 * queries): the backward's products.  Rows are keys (w(r, j) = t[r * FA_BQ
 * + j], on pv_block_tr) if `keys`, else queries (t[j * FA_BQ + r], on
 * pv_block_st): both with their strides as constants. */
static void FN(bwd_accumulate)(int64_t nr, int64_t n, int64_t nj, const FA_T *t, int keys, const FA_T *v, int64_t ldv,
                               FA_T *o, int64_t ldo)
{
    for (int64_t cb = 0; cb < n; cb += FA_NVW) {
        const int nv = (int)fa_min64(FA_NV, (n - cb) / FA_W);
        for (int64_t r = 0; r < nr; r += FA_MR) {
            const int mr = (int)fa_min64(FA_MR, nr - r);
            if (keys)
                FN(pv_block_tr)(mr, nv, nj, t + r * FA_BQ, v + cb, ldv, o + r * ldo + cb, ldo, FN(ones));
            else
                FN(pv_block_st)(mr, nv, nj, t + r, v + cb, ldv, o + r * ldo + cb, ldo, FN(ones));
        }
    }
}

/* ---- dK and dV: one key block, every query tile of its entry ---------------- */

void FA_OP(bwd_keys_begin)(const fa_problem *p, const int64_t *e, void *w, int64_t k0, int64_t bk)
{
    FN(bwd_scratch) *s = (FN(bwd_scratch) *)w;
    s->k = FN(key_rows)(p->k, e[FA_E_K], p->k_rs, p->k_cs, k0, bk, p->d, s->dp, s->kp, &s->ldk);
    s->v = FN(key_rows)(p->v, e[FA_E_V], p->v_rs, p->v_cs, k0, bk, p->dv, p->dv, s->vp, &s->ldv);
    memset(s->acc_k, 0, (size_t)(bk * s->dp) * sizeof(FA_T));
    memset(s->acc_v, 0, (size_t)(bk * s->dvp) * sizeof(FA_T));
}

void FA_OP(bwd_keys_tile)(const fa_problem *p, const int64_t *e, void *w, int64_t row0, int64_t bq, int64_t k0,
                          int64_t bk)
{
    FN(bwd_scratch) *s = (FN(bwd_scratch) *)w;
    FN(bwd_pack_rows)(p, e, s, row0, bq);
    FN(bwd_tile)(p, e, s, row0, bq, k0, bk);
    /* dV += P^T dO and dK += dS^T Q (scaled at the store): rows are keys, terms queries */
    FN(bwd_accumulate)(bk, s->dvp, bq, s->st, 1, s->o, s->ldo, s->acc_v, s->dvp);
    FN(bwd_accumulate)(bk, s->dp, bq, s->dpt, 1, s->q, s->ldq, s->acc_k, s->dp);
}

void FA_OP(bwd_keys_store)(const fa_problem *p, const int64_t *e, void *w, int64_t k0, int64_t bk)
{
    const FN(bwd_scratch) *s = (const FN(bwd_scratch) *)w;
    const FA_T scale = (FA_T)p->scale;
    for (int64_t j = 0; j < bk; j++) {
        char *gk = (char *)p->gk + e[FA_E_GK] + (k0 + j) * p->gk_rs;
        char *gv = (char *)p->gv + e[FA_E_GV] + (k0 + j) * p->gv_rs;
        FN(store_scaled)(gk, p->gk_cs, s->acc_k + j * s->dp, scale, p->d);
        FN(store_scaled)(gv, p->gv_cs, s->acc_v + j * s->dvp, 1, p->dv);
    }
}

/* dQ += dS K (scaled at the store) for the last tile of bwd_keys_tile: rows
 * are queries, terms keys; acc holds the tile's bq rows, ld apart. */
void FA_OP(bwd_keys_dq)(void *w, int64_t bq, int64_t bk, void *acc, int64_t ld)
{
    FN(bwd_scratch) *s = (FN(bwd_scratch) *)w;
    FN(bwd_accumulate)(bq, s->dp, bk, s->dpt, 0, s->k, s->ldk, (FA_T *)acc, ld);
}

/* dq of rows [row0, row0 + bq): scale times their accumulator. */
void FA_OP(bwd_dq_store)(const fa_problem *p, const int64_t *e, const void *acc, int64_t ld, int64_t row0, int64_t bq)
{
    const FA_T *a = (const FA_T *)acc;
    const int64_t lq = e[FA_E_LQ];
    const FA_T scale = (FA_T)p->scale;
    for (int64_t r = 0; r < bq; r++)
        FN(store_scaled)((char *)p->gq + e[FA_E_GQ] + fa_vrow_off(row0 + r, lq, p->gq_rs, p->gq_hs), p->gq_cs,
                         a + r * ld, scale, p->d);
}

/* delta = rowsum(dout * out) of rows [row0, row0 + bq), summed in double
 * (as the reference does), into p->delta in the compute type. */
void FA_OP(bwd_delta)(const fa_problem *p, const int64_t *e, int64_t row0, int64_t bq)
{
    const int64_t lq = e[FA_E_LQ];
    for (int64_t r = 0; r < bq; r++) {
        const char *o = (const char *)p->out + e[FA_E_OUT] + fa_vrow_off(row0 + r, lq, p->out_rs, p->out_hs);
        const char *g = (const char *)p->dout + e[FA_E_DOUT] + fa_vrow_off(row0 + r, lq, p->dout_rs, p->dout_hs);
        double sum = 0;
        for (int64_t c = 0; c < p->dv; c++) sum += (double)FA_AT(o, c * p->out_cs) * (double)FA_AT(g, c * p->dout_cs);
        *(FA_T *)((char *)p->delta + e[FA_E_DELTA] + fa_vrow_off(row0 + r, lq, p->delta_rs, p->delta_hs)) = (FA_T)sum;
    }
}
