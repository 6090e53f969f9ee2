/*
 * fa_tile.h - the seam between the driver and the kernel paths.
 *
 * The driver (fa_driver.c, compiled once for the baseline instruction set)
 * owns the work: items, the team of threads, each item's walk over its key
 * tiles, split-KV and the merge of its partial results.  A kernel path
 * supplies, for each element type, a table of tile operations that do the
 * arithmetic on one tile at a time with that path's instructions: pack an
 * item's queries, compute a score tile (with every score option), turn it
 * into weights (online softmax or plain dot), add weights x V into the
 * accumulator, and store rows.  The driver reaches them only through
 * fa_tile_ops, so an operation's hot loops stay inlined inside it and a new
 * path, element type or operation is a new table, not an edit of the driver.
 *
 * The tables are defined, with every operation named in full, in the path
 * files (fa_path_<path>.c) from the template in fa_tile_impl.h.
 */
#ifndef FA_TILE_H
#define FA_TILE_H

#include "fa_internal.h"
#include "fa_pool.h"

/* Rows of K and V to prefetch while a few-row (decoding) tile is computed:
 * n rows each, from k and v (row strides k_rs, v_rs; bytes per row kb, vb). */
typedef struct {
    const char *k, *v;
    int64_t k_rs, v_rs, kb, vb, n;
} fa_prefetch_plan;

/*
 * The tile operations of one (element type, path).  `w` is the thread's
 * scratch from scratch_new: the item's packed queries, the score tile, the
 * output accumulator and the online-softmax state of its rows.  An item is
 * up to FA_BQ rows of one entry, from row0; a tile is bk keys from k0.
 */
typedef struct {
    const char *name;   /* element type and path, e.g. "f32_avx2" */
    int elem_bytes;     /* size of the compute type (float or double) */
    int width;          /* lanes of a vector of the compute type */
    int rows_max;       /* items of at most this many rows use the few-row (decoding) kernels */
    int rows_tile;      /* keys per tile for such items (FA_BK for others) */
    int tile_segments;  /* does a few-row item's tile come in segments (col > 0, below)? */

    void *(*scratch_new)(const fa_problem *p); /* NULL if out of memory */
    void (*scratch_free)(void *w);

    /* fused attention: begin (pack queries, reset the rows' state), then per
     * key tile score -> options (mask, bounds, soft-cap, ALiBi) -> weights
     * (-> dropout) -> P.V, then store the rows or a partial.  A few-row
     * item's tile may come as segments (where tile_segments: paged keys,
     * at least one per page; a decoding bundle's keys): score and P.V per
     * segment, keys [k0, k0 + bk) at columns col .. col + bk of the tile
     * (alpha rescales the rows at col 0), options, weights and dropout once
     * for the whole tile; otherwise col is 0. */
    void (*attn_begin)(const fa_problem *p, const int64_t *e, void *w, int64_t row0, int64_t bq);
    void (*attn_score_tile)(const fa_problem *p, const int64_t *e, void *w, int64_t row0, int64_t bq,
                            int64_t k0, int64_t bk, int64_t col, const fa_prefetch_plan *pf);
    void (*attn_options_tile)(const fa_problem *p, const int64_t *e, void *w, int64_t row0, int64_t bq,
                              int64_t k0, int64_t bk);
    void (*weights_tile)(void *w, int softmax, int64_t bq, int64_t bk);
    /* dropout (p->dropout_p > 0) on the weights, between weights and P.V */
    void (*dropout_tile)(const fa_problem *p, const int64_t *e, void *w, int64_t row0, int64_t bq, int64_t k0,
                         int64_t bk);
    void (*attn_pv_tile)(const fa_problem *p, const int64_t *e, void *w, int64_t bq, int64_t k0, int64_t bk,
                         int64_t col);
    void (*store_rows)(const fa_problem *p, const int64_t *e, void *w, int64_t row0, int64_t bq, int normalise);
    /* split-KV: an item's unnormalised rows and their max and sum into a
     * slot of sr rows (sr * (dv rounded up to `width`) + 2 sr elements; bq
     * <= sr <= FA_BQ), and the merge of an entry's nsplit slots, first ..
     * first + nsplit - 1 */
    void (*store_partial)(const fa_problem *p, void *w, int64_t bq, int64_t sr, void *slot);
    void (*merge_rows)(const fa_problem *p, const int64_t *e, void *w, const void *slots, int64_t sr,
                       int64_t first, int nsplit, int64_t row0, int64_t bq);

    /* scores: pack queries, then per key tile write the scores to out */
    void (*scores_begin)(const fa_problem *p, const int64_t *e, void *w, int64_t row0, int64_t bq);
    void (*scores_tile)(const fa_problem *p, const int64_t *e, void *w, int64_t row0, int64_t bq, int64_t k0,
                        int64_t bk);

    /* weighted sum: reset the rows, then per key tile accumulate W V */
    void (*wsum_begin)(const fa_problem *p, const int64_t *e, void *w, int64_t bq);
    void (*wsum_tile)(const fa_problem *p, const int64_t *e, void *w, int64_t row0, int64_t bq, int64_t k0,
                      int64_t bk);

    /* attention backward (fa_tile_bwd.h), with a scratch of its own: a key
     * block's dk and dv summed over the entry's query tiles, each read from
     * its pack (bwd_pack_bytes bytes, a multiple of 64, or -1 if too large;
     * written once per tile by bwd_pack); after each tile, that tile's dS K
     * added to its rows' dq accumulator (acc, rows of ld elements of the
     * compute type), and the accumulator stored as dq once every key block
     * has added; a tile's share of a mask's gradient (p->gmask) is stored,
     * or added to it where its rows are shared (add_gmask) */
    int64_t (*bwd_pack_bytes)(const fa_problem *p);
    void (*bwd_pack)(const fa_problem *p, const int64_t *e, int64_t row0, int64_t bq, void *pack);
    void *(*bwd_scratch_new)(const fa_problem *p);
    void (*bwd_scratch_free)(void *w);
    void (*bwd_keys_begin)(const fa_problem *p, const int64_t *e, void *w, int64_t k0, int64_t bk);
    void (*bwd_keys_tile)(const fa_problem *p, const int64_t *e, void *w, int64_t row0, int64_t bq, int64_t k0,
                          int64_t bk, const void *pack, int add_gmask);
    void (*bwd_keys_dq)(void *w, int64_t bq, int64_t bk, void *acc, int64_t ld);
    void (*bwd_keys_store)(const fa_problem *p, const int64_t *e, void *w, int64_t k0, int64_t bk);
    void (*bwd_dq_store)(const fa_problem *p, const int64_t *e, const void *acc, int64_t ld, int64_t row0,
                         int64_t bq);
    /* delta = rowsum(dout * out) of rows [row0, row0 + bq) into p->delta */
    void (*bwd_delta)(const fa_problem *p, const int64_t *e, int64_t row0, int64_t bq);
} fa_tile_ops;

/* A shared mask's tables of block kinds, built once per call (fa_driver.c). */
int fa_shared_mask_tables(const fa_problem *p, int num_threads, fa_problem *local, int64_t **entries,
                          uint8_t **tables);

/* The backward's dq accumulators and query-tile packs (fa_attention_backward),
 * shared by the items of a round: entry i's virtual rows start at row
 * acc_row[i] of acc (rows of ld elements of elem_bytes), its query tiles'
 * turns at turns + tile0[i] and their packs at packs + tile0[i] *
 * pack_bytes.  A tile's turn counts the key blocks that have added their
 * dS K to it, so they add in key order whatever the thread count. */
typedef struct {
    char *acc;
    int64_t ld, elem_bytes;
    const int64_t *acc_row, *tile0;
    int64_t *turns;
    char *packs;
    int64_t pack_bytes;
    /* A float mask's gradient that entries share (p->gmask; NULL gprev: none
     * shared): entry i adds each of its tiles after entry gprev[i] (-1:
     * none, or one of an earlier round, before entry0) has added the same
     * tile, so the sums run in entry order.  The query tiles that key block
     * j of entry i has passed, visited or not, are counted at done[kb0[i] + j]. */
    const int64_t *gprev, *kb0;
    int64_t *done, entry0;
    int add_gmask; /* some rows of the mask gradient are shared: tiles add to it */
} fa_bwd_dq;

/* Run the items of a problem on the tile operations `ops` (fa_driver.c);
 * dq: the backward's accumulators and packs (FA_KIND_BWD, FA_KIND_BWD_PACK), else NULL. */
int fa_run_items(const fa_problem *p, int kind, const fa_item *items, int64_t n_items, int64_t n_parts,
                 int num_threads, const fa_tile_ops *ops, const fa_bwd_dq *dq);

/* Does a thread gather the key tiles of this problem's prefill items into
 * contiguous rows (fa_driver.c)? */
int fa_gathers(const fa_problem *p, int kind);

/* Does the CPU have AVX512-VNNI (fa_dispatch.c)?  The AVX-512 path's
 * int8-cache decoding runs K.Q on vpdpbusd where it does. */
int fa_cpu_avx512vnni(void);

/* The softmax exponential of a path, exposed for accuracy tests. */
typedef void (*fa_exp_fn)(const float *x, float *y, int64_t n);

#endif /* FA_TILE_H */
