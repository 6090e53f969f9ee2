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
 * (dP for dot weights), times 1 - (z / softcap)^2 under a soft-cap; with
 * dropout, dP and dV's P are those of the kept weights (dropout_tile).
 */

/* A query tile's operands, packed once per tile (bwd_pack) into a block of
 * bwd_pack_bytes that every key block visiting the tile reads: this header,
 * then (each part 64-byte aligned) scale * Q^T and dO^T (d x FA_BQ and
 * dv x FA_BQ, zero past the rows), the rows' lse and delta (FA_BQ each),
 * and Q and dO rows (FA_BQ x dp and FA_BQ x dvp) where some tile's cannot
 * be read in place (bwd_rows_packed).  Packed by every key block instead,
 * the transposes and 16-bit conversions made a float32 backward up to 1.2x
 * and a bfloat16 one up to 1.4x slower (Xeon Cascade Lake, AVX-512). */
typedef struct {
    const FA_T *q, *o; /* the Q and dO rows: in place, or the pack's */
    int64_t ldq, ldo;
    const FA_T *qt, *dot, *lse, *delta; /* the pack's parts */
} FN(bwd_pack_head);

#define FA_BWD_PACK_HEAD 64 /* bytes before the parts: sizeof(bwd_pack_head), rounded up */

/* Can a tile's Q and dO rows be read in place when they are one head's
 * (whole vectors long, in the compute type: key_rows reads them in place)? */
static int FN(bwd_rows_in_place)(const fa_problem *p)
{
    return p->d == fa_roundup64(p->d, FA_W) && p->dv == fa_roundup64(p->dv, FA_W) &&
           FN(rows_in_place)(p->q_rs, p->q_cs) && FN(rows_in_place)(p->dout_rs, p->dout_cs);
}

/* Must the packs hold Q and dO rows, some tile's rows not being readable
 * in place (bwd_rows_in_place, and rows of a tile within one head)?  Where
 * every tile's are, the packs are half as large (float32 at d = 64: 33 KB a
 * tile instead of 66). */
static int FN(bwd_rows_packed)(const fa_problem *p)
{
    if (!FN(bwd_rows_in_place)(p)) return 1;
    if (p->group > 1)
        for (int64_t i = 0; i < p->n_entries; i++)
            if (p->entries[i * FA_ENTRY_FIELDS + FA_E_LQ] % FA_BQ != 0) return 1; /* tiles across heads */
    return 0;
}

/* The parts of a pack in order: qt, dot, lse, delta, qr, dor (elements);
 * sizes[4] and sizes[5] count only where rows (bwd_rows_packed). */
static void FN(bwd_pack_sizes)(const fa_problem *p, int rows, int64_t sizes[6])
{
    const int64_t al = 64 / (int64_t)sizeof(FA_T), nr = rows ? FA_BQ : 0;
    sizes[0] = fa_roundup64(p->d * FA_BQ, al);
    sizes[1] = fa_roundup64(p->dv * FA_BQ, al);
    sizes[2] = sizes[3] = fa_roundup64(FA_BQ, al);
    sizes[4] = fa_roundup64(nr * fa_roundup64(p->d, FA_W), al);
    sizes[5] = fa_roundup64(nr * fa_roundup64(p->dv, FA_W), al);
}

/* Bytes of a tile's pack (a multiple of 64), or -1 if it does not fit. */
int64_t FA_OP(bwd_pack_bytes)(const fa_problem *p)
{
    _Static_assert(sizeof(FN(bwd_pack_head)) <= FA_BWD_PACK_HEAD, "pack header");
    const int64_t limit = (INT64_MAX / 16) / (int64_t)sizeof(FA_T) / (4 * FA_BQ);
    if (p->d > limit || p->dv > limit) return -1;
    int64_t n[6], total = FA_BWD_PACK_HEAD;
    FN(bwd_pack_sizes)(p, FN(bwd_rows_packed)(p), n);
    for (int i = 0; i < 6; i++) total += n[i] * (int64_t)sizeof(FA_T);
    return total;
}

/* The key block's scratch. */
typedef struct {
    FA_T *kp;    /* FA_BK x dp: K rows when they cannot be read in place */
    FA_T *vp;    /* FA_BK x dv: V rows when they cannot be read in place */
    FA_T *st;    /* FA_BK x FA_BQ: S^T, then P^T */
    FA_T *dpt;   /* FA_BK x FA_BQ: dP^T, then dS^T */
    FA_T *zt;    /* FA_BK x FA_BQ: soft-capped scores (soft-cap only) */
    FA_T *ft;    /* FA_BK x FA_BQ: dropout's factors (dropout only) */
    FA_T *acc_k; /* FA_BK x dp: dK of the key block */
    FA_T *acc_v; /* FA_BK x dvp: dV of the key block */
    const FA_T *k, *v; /* the key block's K and V rows (in place, or kp and vp), ldk and ldv apart */
    int64_t ldk, ldv;
    /* the current query tile's operands, from its pack (bwd_pack_head) */
    const FA_T *qt, *dot, *lse, *delta;
    const FA_T *q, *o;
    int64_t ldq, ldo;
    FN(tile_seen) seen; /* the current tile's causal/window bounds (tile_ranges) */
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
    const int64_t tile = FA_BK * FA_BQ, ft = p->dropout_p > 0 ? tile : 0; /* dropout's factors only with dropout */
    const int64_t n[8] = {fa_roundup64(FA_BK * dp, al), fa_roundup64(FA_BK * dv, al), tile, tile, tile, ft,
                          fa_roundup64(FA_BK * dp, al), fa_roundup64(FA_BK * dvp, al)};
    int64_t total = 0;
    for (int i = 0; i < 8; i++) total += n[i];
    FN(bwd_scratch) *w = (FN(bwd_scratch) *)malloc(sizeof *w);
    size_t bytes = (size_t)total * sizeof(FA_T);
    FA_T *b = w ? (FA_T *)fa_scratch_take(&bytes) : NULL;
    if (!b) {
        free(w);
        return NULL;
    }
    FA_T **slot[8] = {&w->kp, &w->vp, &w->st, &w->dpt, &w->zt, &w->ft, &w->acc_k, &w->acc_v};
    FA_T *at = b;
    for (int i = 0; i < 8; i++) {
        *slot[i] = at;
        at += n[i];
    }
    w->block = b;
    w->bytes = bytes;
    w->seen.bounded = 0;
    w->dp = dp;
    w->dvp = dvp;
    return w;
}

void FA_OP(bwd_scratch_free)(void *w)
{
    fa_scratch_give(((FN(bwd_scratch) *)w)->block, ((FN(bwd_scratch) *)w)->bytes);
    free(w);
}

/* The query tile [row0, row0 + bq)'s pack: scale Q^T, dO^T, Q rows and dO
 * rows (read in place where the tile's rows are one head's and the rows
 * allow it), its rows' lse and delta. */
void FA_OP(bwd_pack)(const fa_problem *p, const int64_t *e, int64_t row0, int64_t bq, void *pack)
{
    FN(bwd_pack_head) *h = (FN(bwd_pack_head) *)pack;
    const int64_t lq = e[FA_E_LQ], bqp = fa_roundup64(bq, FA_W);
    const fa_vrow first = fa_vrow_at(row0, lq);
    const int64_t head = first.head, i0 = first.i;
    const int64_t dp = fa_roundup64(p->d, FA_W), dvp = fa_roundup64(p->dv, FA_W);
    const int in_place = i0 + bq <= lq && FN(bwd_rows_in_place)(p); /* Q and dO rows read in place */
    int64_t n[6];
    FN(bwd_pack_sizes)(p, 1, n);
    struct {
        FA_T *qt, *dot, *lse, *delta, *qr, *dor;
    } w = {(FA_T *)((char *)pack + FA_BWD_PACK_HEAD), NULL, NULL, NULL, NULL, NULL};
    w.dot = w.qt + n[0], w.lse = w.dot + n[1], w.delta = w.lse + n[2];
    if (!in_place) /* then bwd_rows_packed counted them */
        w.qr = w.delta + n[3], w.dor = w.qr + n[4];
    h->qt = w.qt, h->dot = w.dot, h->lse = w.lse, h->delta = w.delta;
    FN(pack_transposed)(p->q, e[FA_E_Q], p->q_rs, p->q_cs, lq, p->q_hs, row0, bq, bqp, p->d, (FA_T)p->scale, w.qt,
                        FA_BQ);
    FN(pack_transposed)(p->dout, e[FA_E_DOUT], p->dout_rs, p->dout_cs, lq, p->dout_hs, row0, bq, bqp, p->dv, 1,
                        w.dot, FA_BQ);
    if (i0 + bq <= lq) {
        h->q = FN(key_rows)(p->q, e[FA_E_Q] + head * p->q_hs, p->q_rs, p->q_cs, i0, bq, p->d, dp, w.qr, &h->ldq);
        h->o = FN(key_rows)(p->dout, e[FA_E_DOUT] + head * p->dout_hs, p->dout_rs, p->dout_cs, i0, bq, p->dv, dvp,
                            w.dor, &h->ldo);
    } else { /* rows of several heads */
        fa_vrow at = first;
        for (int64_t r = 0; r < bq; r++, fa_vrow_next(&at)) {
            const char *qrow = (const char *)p->q + e[FA_E_Q] + fa_vrow_bytes(&at, p->q_rs, p->q_hs);
            const char *orow = (const char *)p->dout + e[FA_E_DOUT] + fa_vrow_bytes(&at, p->dout_rs, p->dout_hs);
            FA_T *qd = w.qr + r * dp, *od = w.dor + r * dvp;
            FN(load_row)(qrow, p->q_cs, p->d, qd);
            for (int64_t c = p->d; c < dp; c++) qd[c] = 0;
            FN(load_row)(orow, p->dout_cs, p->dv, od);
            for (int64_t c = p->dv; c < dvp; c++) od[c] = 0;
        }
        h->q = w.qr;
        h->o = w.dor;
        h->ldq = dp;
        h->ldo = dvp;
    }
    const int softmax = p->weights == FA_WEIGHTS_SOFTMAX;
    fa_vrow at = first;
    for (int64_t r = 0; r < FA_BQ; r++) {
        FA_T l = (FA_T)INFINITY, dl = 0;
        if (r < bq && softmax) {
            l = *(const FA_T *)((const char *)p->lse + e[FA_E_LSE] + fa_vrow_bytes(&at, p->lse_rs, p->lse_hs));
            dl = *(const FA_T *)((const char *)p->delta + e[FA_E_DELTA] + fa_vrow_bytes(&at, p->delta_rs, p->delta_hs));
            fa_vrow_next(&at);
            if (l == (FA_T)-INFINITY) l = (FA_T)INFINITY; /* a row that sees no key: P = 0 */
        }
        w.lse[r] = l;
        w.delta[r] = dl;
    }
}

/* x[0] + .. + x[n - 1] (n <= FA_BQ) summed pairwise, in a fixed order. */
static FA_T FN(pairwise_sum)(const FA_T *x, int64_t n)
{
    FA_T t[FA_BQ];
    for (int64_t i = 0; i < n; i++) t[i] = x[i];
    for (int64_t step = 1; step < n; step *= 2)
        for (int64_t i = 0; i + step < n; i += 2 * step) t[i] += t[i + step];
    return t[0];
}

/* The gradient of a float mask (p->gmask) over the tile: dS itself (the
 * mask is added to the scores, after any soft-cap), from its transpose;
 * added to what the rows that share the mask's rows have added before if
 * `add` (the gradient's rows are shared), else stored (a first touch of
 * fresh zero pages that reads them as well as writes them faults twice:
 * 1.19x the time of a (1, 16, 1024, 64) backward).  Rows of the tile that
 * share one gradient row (a row stride of 0: the rows of a head, or all of
 * them if the heads share too) add their sum, summed pairwise, so that a
 * float32 sum over B x H x Lq rows rounds like one over B x H x Lq / FA_BQ. */
static void FN(store_mask_gradient)(const fa_problem *p, const int64_t *e, const FA_T *dst, int64_t row0, int64_t bq,
                                    int64_t k0, int64_t bk, int add)
{
    fa_vrow at = fa_vrow_at(row0, e[FA_E_LQ]);
    for (int64_t r = 0, n; r < bq; r += n) {
        char *row = (char *)p->gmask + e[FA_E_GMASK] + fa_vrow_bytes(&at, p->gmask_rs, p->gmask_hs) + k0 * p->gmask_cs;
        n = 1; /* the rows from r that share this gradient row */
        if (add && p->gmask_rs == 0)
            n = p->gmask_hs == 0 ? bq - r : fa_min64(bq - r, at.lq - at.i);
        for (int64_t t = 0; t < n; t++) fa_vrow_next(&at);
        if (n > 1)
            for (int64_t j = 0; j < bk; j++)
                *(FA_T *)(row + j * p->gmask_cs) += FN(pairwise_sum)(dst + j * FA_BQ + r, n);
        else if (add)
            for (int64_t j = 0; j < bk; j++) *(FA_T *)(row + j * p->gmask_cs) += dst[j * FA_BQ + r];
        else
            for (int64_t j = 0; j < bk; j++) *(FA_T *)(row + j * p->gmask_cs) = dst[j * FA_BQ + r];
    }
}

/* S^T, P^T (in st) and dS^T (in dpt) of the query tile packed in w and the
 * key block [k0, k0 + bk) loaded in w.  Where the causal/window bounds cut
 * the tile (w->seen), the products of key rows and row vectors that see
 * none of them are not computed (as tile_ranges says), and P and dS outside
 * the keys each row vector sees are 0 (bwd_accumulate does not sum them
 * either): on a tile the diagonal crosses, about half of the work.  So a
 * key outside a row vector's keys adds nothing to the gradients through it
 * even where dO, Q, K or V hold an infinity or a NaN (where the product is
 * computed, 0 times it is NaN, as before). */
static void FN(bwd_tile)(const fa_problem *p, const int64_t *e, FN(bwd_scratch) *w, int64_t row0, int64_t bq,
                         int64_t k0, int64_t bk, int add_gmask)
{
    const int64_t d = p->d, dv = p->dv, bqp = fa_roundup64(bq, FA_W);
    const FA_T *k = w->k, *v = w->v;
    const int64_t ldk = w->ldk, ldv = w->ldv;
    const int bounds = FN(tile_cut)(p, e, row0, bq, k0, bk);
    w->seen.bounded = bounds;
    if (bounds) FN(tile_ranges)(p, e, &w->seen, row0, bq, k0, bk);
    const int32_t *vlo = FA_TILE_VLO(&w->seen), *vhi = w->seen.vhi;
    int64_t j0[FA_BQ / FA_W], j1[FA_BQ / FA_W]; /* the keys each row vector sees: vector_keys */
    for (int64_t c = 0; c < bqp; c += FA_W) FN(vector_keys)(vlo, vhi, c, bk, &j0[c / FA_W], &j1[c / FA_W]);
    for (int64_t cb = 0; cb < bqp; cb += FA_NVW) {
        const int64_t nv = fa_min64(FA_NV, (bqp - cb) / FA_W), v0 = cb / FA_W;
        for (int64_t j = 0; j < bk; j += FA_MR) {
            const int mr = (int)fa_min64(FA_MR, bk - j);
            int64_t c0 = 0, c1 = nv; /* the vectors of this chunk that see a key of [j, j + mr) */
            if (bounds && !FN(tile_vectors)(&w->seen, v0, nv, j, mr, &c0, &c1)) continue;
            const int64_t x = cb + c0 * FA_W;
            FN(qk_block)(mr, (int)(c1 - c0), d, k + j * ldk, ldk, w->qt + x, FA_BQ, w->st + j * FA_BQ + x, FA_BQ);
            FN(qk_block)(mr, (int)(c1 - c0), dv, v + j * ldv, ldv, w->dot + x, FA_BQ, w->dpt + j * FA_BQ + x, FA_BQ);
        }
    }
    /* the score options: a soft-cap first, keeping z, then ALiBi, the mask and the bounds */
    fa_problem opt = *p;
    if (p->softcap > 0) {
        const fa_vec cap = VBCAST((FA_T)p->softcap), inv = VBCAST((FA_T)(1.0 / p->softcap));
        for (int64_t c = 0; c < bqp; c += FA_W) /* past the rows too: the scores there are 0 */
            for (int64_t j = j0[c / FA_W]; j < j1[c / FA_W]; j++) {
                const fa_vec z = FN(softcap_vec)(VLOAD(w->st + j * FA_BQ + c), inv, cap);
                VSTORE(w->st + j * FA_BQ + c, z);
                VSTORE(w->zt + j * FA_BQ + c, z);
            }
        opt.softcap = 0;
    }
    if (p->alibi_slopes && FN(alibi_exact)(p, e)) { /* in vectors, over the keys each row vector sees */
        FN(alibi_tile)(p, e, w->st, 0, vlo, vhi, row0, bq, k0, bk);
        opt.alibi_slopes = NULL;
    }
    if (bounds || p->mask_kind != FA_MASK_NONE || opt.alibi_slopes)
        FN(mask_and_bounds)(&opt, e, w->st, 0, row0, bq, k0, bk, bounds);
    /* dropout: dP is that of the kept weights, times 1 / (1 - p) (then dS = P (dP - delta), as delta sums
     * dout * out over the kept ones), and dV's weights are the kept ones (below) */
    const int dropout = p->dropout_p > 0;
    uint32_t da[FA_BQ], db[FA_BQ];
    if (dropout) {
        FN(dropout_rows)(p, e, row0, bq, da, db);
        FN(dropout_tile)(p, e, da, db, w->dpt, 0, bq, k0, bk, w->ft);
    }
    /* P and dS, FA_W query rows at a time (0 outside the keys they see: not computed) */
    if (p->weights == FA_WEIGHTS_SOFTMAX) {
        for (int64_t j = 0; j < bk; j++) /* key by key: the tile's rows in address order */
            for (int64_t c = 0; c < bqp; c += FA_W) {
                FA_T *s = w->st + j * FA_BQ + c, *dp = w->dpt + j * FA_BQ + c;
                if (j < j0[c / FA_W] || j >= j1[c / FA_W]) {
                    VSTORE(s, VZERO());
                    VSTORE(dp, VZERO());
                    continue;
                }
                const fa_vec pr = VEXP(VSUB(VLOAD(s), VLOAD(w->lse + c)));
                VSTORE(s, pr);
                VSTORE(dp, VMUL(pr, VSUB(VLOAD(dp), VLOAD(w->delta + c))));
            }
    } else { /* dot weights: the bounds made every score they hide -inf */
        for (int64_t j = 0; j < bk; j++)
            for (int64_t r = 0; r < bqp; r++) {
                FA_T *s = w->st + j * FA_BQ + r;
                if (r >= bq || *s == (FA_T)-INFINITY) {
                    *s = 0;
                    w->dpt[j * FA_BQ + r] = 0;
                }
            }
    }
    if (dropout) /* the same factors (only rows below bq are summed) */
        for (int64_t j = 0; j < bk; j++) {
            FA_T *s = w->st + j * FA_BQ;
            const FA_T *f = w->ft + j * FA_BQ;
            for (int64_t r = 0; r < bq; r++) s[r] *= f[r];
        }
    if (p->gmask) /* dS: a mask is added after the cap */
        FN(store_mask_gradient)(p, e, w->dpt, row0, bq, k0, bk, add_gmask);
    if (p->softcap > 0) { /* dS is 0 (and z unset) outside the keys each row vector sees */
        const fa_vec inv = VBCAST((FA_T)(1.0 / p->softcap)), one = VBCAST((FA_T)1);
        for (int64_t c = 0; c < bqp; c += FA_W)
            for (int64_t j = j0[c / FA_W]; j < j1[c / FA_W]; j++) {
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
 * pv_block_st): both with their strides as constants.  Of a tile the
 * bounds cut (seen), each block of rows sums only the terms that may weigh:
 * the query vectors that see one of its keys, or the keys its queries see. */
static void FN(bwd_accumulate)(const FN(tile_seen) *seen, int64_t nr, int64_t n, int64_t nj, const FA_T *t, int keys,
                               const FA_T *v, int64_t ldv, FA_T *o, int64_t ldo)
{
    for (int64_t cb = 0; cb < n; cb += FA_NVW) {
        const int nv = (int)fa_min64(FA_NV, (n - cb) / FA_W);
        for (int64_t r = 0; r < nr; r += FA_MR) {
            const int mr = (int)fa_min64(FA_MR, nr - r);
            int64_t j0 = 0, j1 = nj;
            if (keys) {
                int64_t c0, c1;
                if (seen->bounded) {
                    if (!FN(tile_vectors)(seen, 0, (nj + FA_W - 1) / FA_W, r, mr, &c0, &c1)) continue;
                    j0 = c0 * FA_W, j1 = fa_min64(nj, c1 * FA_W);
                }
                FN(pv_block_tr)(mr, nv, j1 - j0, t + r * FA_BQ + j0, v + j0 * ldv + cb, ldv, o + r * ldo + cb, ldo,
                                FN(ones));
            } else {
                FN(tile_keys)(seen, r, mr, nj, &j0, &j1);
                if (j1 > j0)
                    FN(pv_block_st)(mr, nv, j1 - j0, t + j0 * FA_BQ + r, v + j0 * ldv + cb, ldv, o + r * ldo + cb,
                                    ldo, FN(ones));
            }
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
                          int64_t bk, const void *pack, int add_gmask)
{
    FN(bwd_scratch) *s = (FN(bwd_scratch) *)w;
    const FN(bwd_pack_head) *h = (const FN(bwd_pack_head) *)pack;
    s->qt = h->qt, s->dot = h->dot, s->lse = h->lse, s->delta = h->delta;
    s->q = h->q, s->o = h->o, s->ldq = h->ldq, s->ldo = h->ldo;
    FN(bwd_tile)(p, e, s, row0, bq, k0, bk, add_gmask);
    /* dV += P^T dO and dK += dS^T Q (scaled at the store): rows are keys, terms queries */
    FN(bwd_accumulate)(&s->seen, bk, s->dvp, bq, s->st, 1, s->o, s->ldo, s->acc_v, s->dvp);
    FN(bwd_accumulate)(&s->seen, bk, s->dp, bq, s->dpt, 1, s->q, s->ldq, s->acc_k, s->dp);
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
    FN(bwd_accumulate)(&s->seen, bq, s->dp, bk, s->dpt, 0, s->k, s->ldk, (FA_T *)acc, ld);
}

/* dq of rows [row0, row0 + bq): scale times their accumulator. */
void FA_OP(bwd_dq_store)(const fa_problem *p, const int64_t *e, const void *acc, int64_t ld, int64_t row0, int64_t bq)
{
    const FA_T *a = (const FA_T *)acc;
    const FA_T scale = (FA_T)p->scale;
    fa_vrow at = fa_vrow_at(row0, e[FA_E_LQ]);
    for (int64_t r = 0; r < bq; r++, fa_vrow_next(&at))
        FN(store_scaled)((char *)p->gq + e[FA_E_GQ] + fa_vrow_bytes(&at, p->gq_rs, p->gq_hs), p->gq_cs, a + r * ld,
                         scale, p->d);
}

/* delta = rowsum(dout * out) of rows [row0, row0 + bq), summed in double
 * (as the reference does), into p->delta in the compute type. */
void FA_OP(bwd_delta)(const fa_problem *p, const int64_t *e, int64_t row0, int64_t bq)
{
    fa_vrow at = fa_vrow_at(row0, e[FA_E_LQ]);
    for (int64_t r = 0; r < bq; r++, fa_vrow_next(&at)) {
        const char *o = (const char *)p->out + e[FA_E_OUT] + fa_vrow_bytes(&at, p->out_rs, p->out_hs);
        const char *g = (const char *)p->dout + e[FA_E_DOUT] + fa_vrow_bytes(&at, p->dout_rs, p->dout_hs);
        double sum = 0;
        for (int64_t c = 0; c < p->dv; c++) sum += (double)FA_AT(o, c * p->out_cs) * (double)FA_AT(g, c * p->dout_cs);
        *(FA_T *)((char *)p->delta + e[FA_E_DELTA] + fa_vrow_bytes(&at, p->delta_rs, p->delta_hs)) = (FA_T)sum;
    }
}
