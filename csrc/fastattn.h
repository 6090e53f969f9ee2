/*
 * fastattn.h - the C interface of the fastattn kernels.
 *
 * Pure C: pointers, sizes, byte strides and status codes; nothing here knows
 * about Python.  Every call is described by one fa_problem.  A problem is a
 * list of independent "entries" (one per batch x head, or per packed
 * sequence); each entry is a row of FA_ENTRY_FIELDS int64 values giving byte
 * offsets from the base pointers and the entry's lengths.  Broadcasting,
 * grouped heads and packed sequences are all expressed through that table,
 * so the kernels never copy or repeat an input.
 */
#ifndef FASTATTN_H
#define FASTATTN_H

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* Status codes returned by every entry point. */
enum {
    FA_OK = 0,
    FA_ERR_NOMEM = 1,   /* a scratch buffer could not be allocated */
    FA_ERR_INVALID = 2, /* inconsistent problem description */
    FA_ERR_ISA = 3,     /* the requested kernel path does not exist or this CPU cannot run it */
    FA_ERR_UNSUPPORTED = 4 /* no kernel for this combination of element types */
};

/* Element types.  `dtype` is that of q and out (and w for fa_weighted_sum),
 * `kv_dtype` that of the stored k and v: dtype itself, or (fa_attention
 * only) one of the 8-bit types, dequantised with scales: int8 (symmetric,
 * value = scale * x), float8 e4m3 (ml_dtypes float8_e4m3fn: no infinities,
 * its NaN is not kept) and e5m2 (value = scale * x).  The 16-bit types (IEEE
 * binary16 and bfloat16) are computed in float32; their lse and fa_scores
 * output are float32. */
enum { FA_F32 = 0, FA_F64 = 1, FA_F16 = 2, FA_BF16 = 3, FA_DTYPE_COUNT = 4 };
enum { FA_I8 = 4, FA_E4M3 = 5, FA_E5M2 = 6, FA_KV_DTYPE_COUNT = 7 };

/* Element type of the mask (independent of the data type): bool, or a
 * float type whose values are added to the scores (16-bit ones converted
 * to float on load). */
enum {
    FA_MASK_NONE = 0,
    FA_MASK_BOOL = 1,
    FA_MASK_F32 = 2,
    FA_MASK_F64 = 3,
    FA_MASK_F16 = 4,
    FA_MASK_BF16 = 5,
    FA_MASK_KIND_COUNT = 6
};

/* Mask blocks (fa_problem.mask_tiles). */
#define FA_TILE_BLOCK 64
enum { FA_BLOCK_MIXED = 0, FA_BLOCK_HIDDEN = 1, FA_BLOCK_VISIBLE = 2 };

/* How scores become weights. */
enum { FA_WEIGHTS_SOFTMAX = 0, FA_WEIGHTS_DOT = 1 };

/* Columns of the entry table (each an int64). Offsets are in bytes. */
enum {
    FA_E_Q = 0,    /* offset of row 0 of q (or of w, for fa_weighted_sum) */
    FA_E_K = 1,    /* offset of row 0 of k */
    FA_E_V = 2,    /* offset of row 0 of v */
    FA_E_OUT = 3,  /* offset of row 0 of the output */
    FA_E_MASK = 4, /* offset of row 0 of the mask (ignored without a mask) */
    FA_E_LSE = 5,  /* offset of element 0 of the log-sum-exp row (ignored without lse) */
    FA_E_LQ = 6,   /* number of query rows */
    FA_E_LK = 7,   /* number of key/value rows */
    FA_E_HEAD = 8, /* index into alibi_slopes */
    /* fa_attention_backward only (ignored by the others): */
    FA_E_DOUT = 9,   /* offset of row 0 of the output's gradient dout */
    FA_E_DELTA = 10, /* offset of element 0 of the row of delta = rowsum(dout * out) */
    FA_E_GQ = 11,    /* offset of row 0 of the gradient of q */
    FA_E_GK = 12,    /* offset of row 0 of the gradient of k */
    FA_E_GV = 13,    /* offset of row 0 of the gradient of v */
    /* paged k and v only (ignored without p->pages): */
    FA_E_PAGES = 14, /* index into p->pages of the entry's first page */
    /* 8-bit k and v only: */
    FA_E_KS = 15, /* offset of the scale of row 0 of k in k_scales (paged: of page 0) */
    FA_E_VS = 16, /* the same in v_scales */
    /* masks classified per tile only (p->mask_tiles): */
    FA_E_TILES = 17, /* offset of the entry's table of tile kinds */
    /* dropout only (p->dropout_p > 0): where the entry's weights lie in the
     * dropout mask (see fa_problem.dropout_p) */
    FA_E_DROP = 18,     /* stream of the entry's first query head (row v: + v / lq) */
    FA_E_DROP_ROW = 19, /* coordinate of query row 0 of each head */
    FA_E_DROP_KEY = 20, /* coordinate of key 0 */
    /* fa_attention_backward with a mask's gradient (p->gmask) only: */
    FA_E_GMASK = 21, /* offset of row 0 of the entry's gradient of the mask */
    FA_ENTRY_FIELDS = 22
};

typedef struct {
    int dtype;       /* FA_F32, ...: element type of q and out */
    int kv_dtype;    /* element type of k and v as stored */
    int path;        /* kernel path: an index below fa_path_count() that fa_path_supported() */
    int num_threads; /* >= 1 */

    int64_t n_entries;
    const int64_t *entries; /* n_entries x FA_ENTRY_FIELDS */

    int64_t d;  /* head dimension of q and k (for fa_weighted_sum: unused) */
    int64_t dv; /* head dimension of v and of the output */

    /* Query heads per entry (grouped-query attention; fa_attention only,
     * else 1).  An entry then holds group x lq query rows: row v is row
     * v % lq of head v / lq, the heads q_hs / out_hs / lse_hs / mask_hs bytes
     * apart, all attending to the entry's one k and v; alibi_slopes are
     * indexed by FA_E_HEAD + v / lq. */
    int64_t group;
    int64_t q_hs, out_hs, lse_hs, mask_hs;

    /* Base pointers; rows and columns are reached through byte strides
     * (rs: between rows, cs: between elements of a row; any sign). */
    const void *q;
    const void *k;
    const void *v;
    void *out;
    void *lse; /* optional, same element type as the data; rows strided by lse_rs */
    int64_t q_rs, q_cs, k_rs, k_cs, v_rs, v_cs, out_rs, out_cs, lse_rs;

    int mask_kind; /* FA_MASK_*; bool: nonzero = may attend; float: added */
    const void *mask;
    int64_t mask_rs, mask_cs;
    /* The mask classified once per block of FA_TILE_BLOCK x FA_TILE_BLOCK
     * (rows x keys), or NULL: the kind of the block of query row i and key
     * j of head h of an entry is the byte at mask_tiles + e[FA_E_TILES] +
     * h * tiles_hs + (i / FA_TILE_BLOCK) * tiles_rs + (j / FA_TILE_BLOCK) *
     * tiles_cs: FA_BLOCK_HIDDEN (every key hidden: the kernels skip it),
     * FA_BLOCK_VISIBLE (none hidden, nothing added: run unmasked) or
     * FA_BLOCK_MIXED (the mask is read).  It must describe the mask. */
    const uint8_t *mask_tiles;
    int64_t tiles_rs, tiles_cs, tiles_hs;

    int weights;  /* FA_WEIGHTS_* */
    double scale; /* multiplies q.k */
    int causal;   /* key j visible iff j <= i', the query's key position */
    int top_left; /* i' = i (top-left alignment); else i' = i + lk - lq (bottom-right) */
    int64_t q_shift; /* added to every i': the key position of query 0 is q_shift (top-left) */
    int64_t window_left, window_right; /* keys within [i'-left, i'+right]; -1 = unbounded */
    double softcap;                    /* 0: off; else s <- softcap * tanh(s / softcap) */
    const double *alibi_slopes;        /* NULL: off; else bias -slope[head] * |i' - j| */
    /* Attention sinks (softmax weights only): NULL: off; else one logit per
     * query head, sinks[head] (indexed like alibi_slopes), added to every
     * row's softmax denominator as a key with no value. */
    const double *sinks;

    /* Dropout on the weights (fa_attention and fa_attention_backward only):
     * 0: off; else in (0, 1), and the weight of query row v and key j of an
     * entry (after the softmax, or the score for dot weights) is multiplied
     * by 1 / (1 - dropout_p) where it is kept and by 0 where it is dropped;
     * the softmax's sums (and lse) count every weight.  Whether it is kept
     * depends only on dropout_seed and the weight's coordinates: stream s =
     * e[FA_E_DROP] + v / lq, row i = e[FA_E_DROP_ROW] + v % lq and key c =
     * e[FA_E_DROP_KEY] + j (mix64: SplitMix64's step, fmix32: MurmurHash3's
     * finaliser, arithmetic modulo 2^64 and 2^32):
     *   r = mix64(dropout_seed ^ mix64(s ^ mix64(i))), a = r mod 2^32, b = r >> 32
     *   t = fmix32(((c >> 1) ^ b) * 0x9E3779B1 + a)   (one hash per pair of keys)
     *   kept iff ((t >> 16 * (c & 1)) & 0xFFFF) >= round(dropout_p * 2^16)
     * so a mask never depends on tiles, splits or thread counts, and the
     * backward, given the forward's seed and coordinates, drops the same
     * weights (fastattn.reference.dropout_keep computes the same mask). */
    double dropout_p;
    uint64_t dropout_seed;

    /* Paged k and v (fa_attention only).  NULL: key j of an entry is row
     * e[FA_E_K] + j * k_rs of k (and likewise v).  Else the keys lie in
     * pages of page_size rows: key j is row j % page_size of page
     * pages[e[FA_E_PAGES] + j / page_size], at k + page * k_ps + e[FA_E_K]
     * + (j % page_size) * k_rs (v: v_ps, v_rs).  Every page id an entry
     * uses must be in [0, n_pages), and a page stride must be a multiple of
     * 64 bytes or of its row stride (so every page starts at the same place
     * within a vector). */
    const int32_t *pages;
    int64_t page_size, n_pages, k_ps, v_ps;

    /* 8-bit k and v (kv_dtype FA_I8, FA_E4M3, FA_E5M2; required then, else
     * NULL; their rows' elements contiguous, k_cs = v_cs = 1): row j of k
     * holds scale * x, the float32 scale at k_scales +
     * e[FA_E_KS] + j * ks_rs (paged: + page * ks_ps, j the row within its
     * page), bytes; a stride of 0 shares one scale (per tensor).  v alike. */
    const float *k_scales, *v_scales;
    int64_t ks_rs, ks_ps, vs_rs, vs_ps;

    /* fa_attention_backward: the output's gradient (rows like out's), delta
     * = rowsum(dout * out) (compute type, like lse, which must be given for
     * softmax weights; or NULL, and out the forward's output, from which
     * the backward computes delta itself), and the gradients it writes: gq
     * like q, gk like k, gv like v, in the element type of q. */
    const void *dout;
    const void *delta;
    void *gq, *gk, *gv;
    int64_t dout_rs, dout_cs, dout_hs, delta_rs, delta_hs;
    int64_t gq_rs, gq_cs, gq_hs, gk_rs, gk_cs, gv_rs, gv_cs;
    /* fa_attention_backward, a float mask only: NULL, or where the gradient
     * of the mask goes (dS, the gradient of the scores the mask is added
     * to), per entry, rows like the mask's (gmask_rs, gmask_cs, gmask_hs),
     * in the compute type; the caller zeroes it first (the tiles the
     * backward skips add nothing).  Rows that an entry's query rows share (a
     * row or head stride of 0) add to them in row order; entries with the
     * same offset share their gradient and add to it in entry order (they
     * must have the same lq and lk), so the sums do not depend on the thread
     * count.  Entries must not overlap otherwise, nor may elements of a row
     * (gmask_cs != 0). */
    void *gmask;
    int64_t gmask_rs, gmask_cs, gmask_hs;
} fa_problem;

/* Fused attention: out = weights(scale q k^T [+ options]) v, lse if requested. */
int fa_attention(const fa_problem *p);

/* Scores: out (lq x lk per entry) = scale q k^T with every option applied,
 * masked entries -inf. Uses q, k, out, mask and the score options. */
int fa_scores(const fa_problem *p);

/* Weighted sum: out (lq x dv per entry) = w v, where w is given through the
 * q pointer and strides (lq x lk per entry). */
int fa_weighted_sum(const fa_problem *p);

/* The gradients of fused attention: given dout, the forward's lse (softmax)
 * and delta (or its output), writes gq, gk and gv (FlashAttention-2's
 * backward: scores and weights recomputed tile by tile; nothing of size
 * Lq x Lk).  Each row of gk and gv is written by one item that sums over
 * every query row of its entry (all heads of a group), so entries must not
 * share k or v rows; results do not depend on the thread count. */
int fa_attention_backward(const fa_problem *p);

/* Kernel paths.  Each path is built for one architecture (or for any) and
 * needs a set of CPU features; the paths of this build are numbered
 * 0 .. fa_path_count() - 1 in order of preference (0 is the portable path,
 * which every CPU runs).  fa_best_path() is the last one this CPU and
 * operating system support. */
int fa_path_count(void);
const char *fa_path_name(int path);     /* "avx2"; NULL past the table */
const char *fa_path_arch(int path);     /* "x86_64", "aarch64" or "any" */
const char *fa_path_features(int path); /* the CPU features it needs, e.g. "avx2 fma f16c" */
int fa_path_supported(int path);        /* 1 if this CPU can run it */
int fa_best_path(void);
/* Kernel calls that ran on each path since the library was loaded (for
 * tests that check which path executed). */
int64_t fa_path_runs(int path);

/* The compiler that built this. */
const char *fa_compiler(void);

/* The softmax exponential of a path, exposed so its accuracy can be tested:
 * y[i] = exp(x[i]) for x[i] <= 0 (-inf gives exactly 0). */
int fa_exp_f32(int path, const float *x, float *y, int64_t n);

#ifdef __cplusplus
}
#endif

#endif /* FASTATTN_H */
