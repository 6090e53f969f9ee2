/*
 * fa_driver.c - runs a problem's work items on one path's tile operations:
 * the OpenMP region, each thread's scratch, each item's walk over its key
 * tiles (or, for the backward's dk and dv, a key block's walk over its query
 * tiles) and, for split-KV, the merge of the partial results.  Written once
 * for every path and element type (see fa_tile.h); compiled for the baseline
 * instruction set only.
 */
#include <stdlib.h>
#include <string.h>

#include "fa_omp.h"
#include "fa_tile.h"

/* What a mask says of rows [row0, row0 + bq) and keys [k0, k0 + bk) of
 * entry e: every key hidden (the tile is skipped), none hidden and nothing
 * added (the tile runs without reading the mask), or neither.  A bool mask
 * hides with 0; a float mask hides with -inf and adds nothing with +-0. */
enum { FA_TILE_MIXED, FA_TILE_HIDDEN, FA_TILE_VISIBLE };

static int fa_mask_tile(const fa_problem *p, const int64_t *e, int64_t row0, int64_t bq, int64_t k0, int64_t bk)
{
    const int64_t lq = e[FA_E_LQ], cs = p->mask_cs;
    /* rows that share one mask row (a mask broadcast over rows and heads) are read once */
    const int64_t rows = p->mask_rs == 0 && (p->mask_hs == 0 || p->group == 1) ? 1 : bq;
    int hidden = 1, visible = 1;
    for (int64_t r = 0; r < rows; r++) {
        const int64_t v = row0 + r;
        const unsigned char *m = (const unsigned char *)p->mask + e[FA_E_MASK] + (v / lq) * p->mask_hs +
                                 (v % lq) * p->mask_rs + k0 * cs;
        int64_t j = 0;
        switch (p->mask_kind) {
        case FA_MASK_BOOL:
            if (cs == 1)
                for (; j + 8 <= bk; j += 8) { /* eight at a time: any nonzero byte, any zero byte */
                    uint64_t x;
                    memcpy(&x, m + j, 8);
                    hidden &= x == 0;
                    visible &= ((x - 0x0101010101010101ULL) & ~x & 0x8080808080808080ULL) == 0;
                }
            for (; j < bk; j++) {
                hidden &= m[j * cs] == 0;
                visible &= m[j * cs] != 0;
            }
            break;
        case FA_MASK_F32:
            for (; j < bk; j++) {
                uint32_t x;
                memcpy(&x, m + j * cs, 4);
                hidden &= x == 0xff800000u;
                visible &= (x & 0x7fffffffu) == 0;
            }
            break;
        default: /* FA_MASK_F64 */
            for (; j < bk; j++) {
                uint64_t x;
                memcpy(&x, m + j * cs, 8);
                hidden &= x == 0xfff0000000000000ULL;
                visible &= (x & 0x7fffffffffffffffULL) == 0;
            }
            break;
        }
        if (!hidden && !visible) return FA_TILE_MIXED;
    }
    return hidden ? FA_TILE_HIDDEN : FA_TILE_VISIBLE;
}

/* Fused attention over the keys of item `it`: rows [row0, row0 + bq) of
 * entry e.  A split-KV item writes its unnormalised rows to its slot. */
static void fa_attention_item(const fa_problem *p, const fa_tile_ops *ops, const int64_t *e, const fa_item *it,
                              void *w, int64_t row0, int64_t bq, char *slots, int64_t slot_bytes)
{
    const int64_t lq = e[FA_E_LQ], lk = e[FA_E_LK];
    const int softmax = p->weights == FA_WEIGHTS_SOFTMAX;
    const int few = bq <= ops->rows_max;
    ops->attn_begin(p, e, w, row0, bq);
    int64_t klo, khi, unused;
    fa_block_range(p, lq, lk, row0, bq, &klo, &khi, &unused, &unused);
    klo = fa_max64(klo, it->k_lo);
    khi = fa_min64(khi, it->k_hi);
    const int64_t tile = few ? ops->rows_tile : FA_BK;
    /* a mask is read per tile first: tiles it hides entirely are skipped,
     * tiles it leaves alone run as if unmasked */
    const int masked = p->mask_kind != FA_MASK_NONE;
    fa_problem unmasked;
    if (masked) {
        unmasked = *p;
        unmasked.mask_kind = FA_MASK_NONE;
    }
    for (int64_t k0 = klo; k0 < khi; k0 += tile) {
        const int64_t bk = fa_min64(tile, khi - k0);
        const fa_problem *tp = p;
        if (masked) {
            const int kind = fa_mask_tile(p, e, row0, bq, k0, bk);
            if (kind == FA_TILE_HIDDEN) continue;
            if (kind == FA_TILE_VISIBLE) tp = &unmasked;
        }
        /* decoding streams K and V once: ask for the tile after next (one
         * ahead is too late to hide the memory latency) */
        const int64_t pf0 = k0 + 2 * FA_BK;
        const fa_prefetch_plan pf = {
            (const char *)p->k + e[FA_E_K] + pf0 * p->k_rs, (const char *)p->v + e[FA_E_V] + pf0 * p->v_rs,
            p->k_rs, p->v_rs, p->d * p->k_cs, p->dv * p->v_cs,
            few ? fa_max64(0, fa_min64(FA_BK, khi - pf0)) : 0};
        ops->attn_score_tile(tp, e, w, row0, bq, k0, bk, &pf);
        ops->weights_tile(w, softmax, bq, bk);
        ops->attn_pv_tile(tp, e, w, bq, k0, bk);
    }
    if (it->part >= 0)
        ops->store_partial(p, w, bq, slots + it->part * slot_bytes);
    else
        ops->store_rows(p, e, w, row0, bq, softmax);
}

static void fa_scores_item(const fa_problem *p, const fa_tile_ops *ops, const int64_t *e, void *w, int64_t row0,
                           int64_t bq)
{
    const int64_t lk = e[FA_E_LK];
    ops->scores_begin(p, e, w, row0, bq);
    for (int64_t k0 = 0; k0 < lk; k0 += FA_BK) ops->scores_tile(p, e, w, row0, bq, k0, fa_min64(FA_BK, lk - k0));
}

static void fa_wsum_item(const fa_problem *p, const fa_tile_ops *ops, const int64_t *e, void *w, int64_t row0,
                         int64_t bq)
{
    const int64_t lk = e[FA_E_LK];
    ops->wsum_begin(p, e, w, bq);
    for (int64_t k0 = 0; k0 < lk; k0 += FA_BK) ops->wsum_tile(p, e, w, row0, bq, k0, fa_min64(FA_BK, lk - k0));
    ops->store_rows(p, e, w, row0, bq, 0);
}

/* Backward, dk and dv of keys [k0, k0 + bk) of entry e: summed over every
 * query tile of the entry (all heads of a group) that sees them, in order,
 * by this one item, so no other item writes these rows. */
static void fa_bwd_keys_item(const fa_problem *p, const fa_tile_ops *ops, const int64_t *e, void *w, int64_t k0)
{
    const int64_t lq = e[FA_E_LQ], lk = e[FA_E_LK], rows = p->group * lq, bk = fa_min64(FA_BK, lk - k0);
    ops->bwd_keys_begin(p, e, w, k0, bk);
    for (int64_t row0 = 0; row0 < rows; row0 += FA_BQ) {
        const int64_t bq = fa_min64(FA_BQ, rows - row0);
        int64_t lo, hi, unused;
        fa_block_range(p, lq, lk, row0, bq, &lo, &hi, &unused, &unused);
        if (hi > k0 && lo < k0 + bk) ops->bwd_keys_tile(p, e, w, row0, bq, k0, bk);
    }
    ops->bwd_keys_store(p, e, w, k0, bk);
}

/* Backward, dq of rows [row0, row0 + bq) of entry e, over the keys they see. */
static void fa_bwd_rows_item(const fa_problem *p, const fa_tile_ops *ops, const int64_t *e, void *w, int64_t row0,
                             int64_t bq)
{
    int64_t klo, khi, unused;
    fa_block_range(p, e[FA_E_LQ], e[FA_E_LK], row0, bq, &klo, &khi, &unused, &unused);
    ops->bwd_rows_begin(p, e, w, row0, bq);
    for (int64_t k0 = klo; k0 < khi; k0 += FA_BK) ops->bwd_rows_tile(p, e, w, row0, bq, k0, fa_min64(FA_BK, khi - k0));
    ops->bwd_rows_store(p, e, w, row0, bq);
}

int fa_run_items(const fa_problem *p, int kind, const fa_item *items, int64_t n_items, int64_t n_parts,
                 int num_threads, const fa_tile_ops *ops)
{
    int status = FA_OK;
    if (n_items <= 0) return FA_OK;
    /* a partial slot: FA_BQ rows of the accumulator, then the rows' max and sum */
    const int64_t slot_bytes = FA_BQ * (fa_roundup64(p->dv, ops->width) + 2) * ops->elem_bytes;
    char *slots = NULL;
    if (n_parts > 0) {
        if ((uint64_t)n_parts > (uint64_t)SIZE_MAX / (uint64_t)slot_bytes) return FA_ERR_NOMEM;
        slots = (char *)malloc((size_t)(n_parts * slot_bytes));
        if (!slots) return FA_ERR_NOMEM;
    }
#pragma omp parallel num_threads(num_threads) if (num_threads > 1)
    {
        const int bwd = kind == FA_KIND_BWD_KEYS || kind == FA_KIND_BWD_ROWS;
        void *w = bwd ? ops->bwd_scratch_new(p) : ops->scratch_new(p);
        if (!w) {
#pragma omp atomic write
            status = FA_ERR_NOMEM;
        }
#pragma omp for schedule(dynamic, 1)
        for (int64_t t = 0; t < n_items; t++) {
            if (!w) continue;
            const int64_t *e = p->entries + items[t].entry * FA_ENTRY_FIELDS;
            const int64_t row0 = items[t].row0, bq = fa_min64(FA_BQ, p->group * e[FA_E_LQ] - row0);
            switch (kind) {
            case FA_KIND_ATTENTION: fa_attention_item(p, ops, e, &items[t], w, row0, bq, slots, slot_bytes); break;
            case FA_KIND_SCORES: fa_scores_item(p, ops, e, w, row0, bq); break;
            case FA_KIND_WSUM: fa_wsum_item(p, ops, e, w, row0, bq); break;
            case FA_KIND_BWD_KEYS: fa_bwd_keys_item(p, ops, e, w, row0); break;
            default: fa_bwd_rows_item(p, ops, e, w, row0, bq); break;
            }
        }
        if (n_parts > 0) { /* after the loop's barrier every partial is written */
#pragma omp for schedule(dynamic, 1)
            for (int64_t t = 0; t < n_items; t++) {
                const fa_item *it = &items[t];
                if (!w || it->split != 0 || it->part < 0) continue;
                const int64_t *e = p->entries + it->entry * FA_ENTRY_FIELDS;
                const int64_t bq = fa_min64(FA_BQ, p->group * e[FA_E_LQ] - it->row0);
                ops->merge_rows(p, e, w, slots, it->part, it->nsplit, it->row0, bq);
            }
        }
        if (w) (bwd ? ops->bwd_scratch_free : ops->scratch_free)(w);
    }
    free(slots);
    return status;
}
