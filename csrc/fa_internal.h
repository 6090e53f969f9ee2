/*
 * fa_internal.h - declarations shared by the dispatcher and the kernel paths.
 * Not part of the public interface.
 */
#ifndef FA_INTERNAL_H
#define FA_INTERNAL_H

#include <stdint.h>
#include <stddef.h>
#include "fastattn.h"

/*
 * Tile sizes.  A work item is FA_BQ query rows of one entry; keys are visited
 * FA_BK at a time.  FA_BQ is a multiple of every path's micro-kernel width
 * (64 floats for AVX-512; 32, 16, 8 and 4 for the others), so the packed
 * Q^T block the score micro-kernel sweeps (D x 64 floats: 32 KiB at D = 128)
 * stays in L1D while K rows stream past it.  The score tile (FA_BK x FA_BQ,
 * 16 KiB) and the accumulator (FA_BQ x Dv, 32 KiB at Dv = 128) stay in L2.
 */
#define FA_BQ 64
#define FA_BK 64

/* Largest register tile of any path (rows x vectors). */
#define FA_MR_MAX 6
#define FA_NV_MAX 4
/* Largest FA_RV of any path. */
#define FA_RV_MAX 8

/* What a run computes. */
enum {
    FA_KIND_ATTENTION = 0,
    FA_KIND_SCORES = 1,
    FA_KIND_WSUM = 2,
    FA_KIND_BWD = 3,      /* backward: an item is a key block (from row0) of an entry */
    FA_KIND_BWD_DELTA = 4, /* the backward's rowsum(dout * out): an item is a query tile */
    FA_KIND_BWD_PACK = 5   /* the backward's query-tile packs (bwd_pack): an item is a query tile */
};

/*
 * One unit of parallel work: up to FA_BQ (virtual) query rows of one entry,
 * against the keys in [k_lo, k_hi).  When an entry's keys are split across
 * items (split-KV, for problems with too few rows to keep every core busy),
 * each split writes its unnormalised partial result to slot `part` of a
 * partial buffer (slots part - split .. part - split + nsplit - 1 hold an
 * entry's splits), and whoever finishes the entry's last split merges them
 * by their log-sum-exp, in split order.
 */
typedef struct {
    int64_t entry;
    int64_t row0;
    int64_t k_lo, k_hi;
    int64_t part;   /* partial slot, or -1: write the output directly */
    int32_t split;  /* index of this split within its entry */
    int32_t nsplit; /* splits of the entry (1: no split) */
    int32_t bundle; /* entries entry .. entry + bundle - 1 run in lockstep (see fa_bundle_len) */
    int32_t tiles;  /* query tiles row0, row0 + FA_BQ, .. of the entry run in lockstep (a tile group) */
    int64_t cost;   /* estimated multiply-adds, for scheduling only */
} fa_item;

/*
 * A tile group: consecutive query tiles of one prefill entry whose key
 * tiles are gathered into contiguous rows (paged caches, the strided rows
 * of packed sequences: fa_gathers) and who begin at the same key.  One
 * item walks the key tiles once, gathering each once for all its query
 * tiles, which run on their own scratch in the order and with the tile
 * bounds they would have alone (gathered per query tile, a 512-query chunk
 * of grouped heads over 8704 paged keys copied 2.3 GB, 1.46x its time on
 * contiguous keys).  FA_GROUP_TILES at most; never split over the keys.
 */
#define FA_GROUP_TILES 4

/*
 * A bundle: consecutive decoding entries whose K and V rows interleave,
 * the heads of one sequence side by side within each row (packed and paged
 * caches store (tokens, heads, dim)).  Walked one head at a time, each head
 * reads a slice of every row, a stride the hardware prefetchers do not
 * follow; a bundle's item walks the key tiles once and runs every entry of
 * the bundle on each tile, so whole rows stream in order.  Each entry keeps
 * its own scratch and does the same arithmetic in the same order as alone.
 * With split-KV, entry b of a bundle item of split s writes partial slot
 * part + b * nsplit (part is the slot of entry 0).
 */
#define FA_BUNDLE_MAX 16
_Static_assert(FA_GROUP_TILES <= FA_BUNDLE_MAX, "a member's scratch per tile of a group");

#if defined(__x86_64__) || defined(_M_X64)
#define FA_HAVE_X86_PATHS 1
#else
#define FA_HAVE_X86_PATHS 0
#endif

/*
 * Subnormal numbers are flushed to zero while a kernel runs: each member of
 * a run sets its thread's floating-point mode to flush subnormal results and
 * operands (x86: MXCSR's FTZ and DAZ bits; AArch64: FPCR.FZ) and puts the
 * thread's own mode back before it returns.  Peaked softmax rows give weights
 * and gradient terms below float's smallest normal number (2^-126: a score
 * 87 below its row's max); on Intel CPUs every product that makes or takes
 * one costs a microcode assist, and a backward whose far keys all had such
 * weights ran 7x slower.  The exponentials flush such results on every path
 * (fa_vec.h); the mode does it for the products too.  A flushed term is
 * below 2^-126 times the magnitudes it sums with.
 */
typedef uint64_t fa_fpmode;

static inline fa_fpmode fa_flush_subnormals(void)
{
#if defined(__x86_64__) || defined(__i386__)
    const unsigned old = __builtin_ia32_stmxcsr();
    __builtin_ia32_ldmxcsr(old | 0x8040u); /* FTZ (bit 15) and DAZ (bit 6) */
    return old;
#elif defined(__aarch64__)
    uint64_t old;
    __asm__ __volatile__("mrs %0, fpcr" : "=r"(old));
    __asm__ __volatile__("msr fpcr, %0" : : "r"(old | ((uint64_t)1 << 24))); /* FZ */
    return old;
#else
    return 0;
#endif
}

static inline void fa_restore_fpmode(fa_fpmode old)
{
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_ldmxcsr((unsigned)old);
#elif defined(__aarch64__)
    __asm__ __volatile__("msr fpcr, %0" : : "r"(old));
#else
    (void)old;
#endif
}

/* Token pasting with expansion: FA_CAT(f32, generic) -> f32_generic. */
#define FA_CAT_(a, b) a##_##b
#define FA_CAT(a, b) FA_CAT_(a, b)

static inline int64_t fa_min64(int64_t a, int64_t b) { return a < b ? a : b; }
static inline int64_t fa_max64(int64_t a, int64_t b) { return a > b ? a : b; }
static inline int64_t fa_roundup64(int64_t a, int64_t m) { return (a + m - 1) / m * m; }

/*
 * The keys row i of an entry may see, as the half-open range [*lo, *hi),
 * from the causal and window options (the mask is applied separately).
 * Query i sits at key position fa_pos(): i + lk - lq (bottom-right aligned,
 * the default) or i (top-left), plus q_shift.  Both bounds are non-decreasing in i, so the
 * keys a block of rows may see are [lo(first row), hi(last row)).
 */
static inline int64_t fa_pos(const fa_problem *p, int64_t i, int64_t lq, int64_t lk)
{
    return (p->top_left ? i : i + lk - lq) + p->q_shift;
}

static inline void fa_row_range(const fa_problem *p, int64_t i, int64_t lq, int64_t lk, int64_t *lo,
                                int64_t *hi)
{
    const int64_t pos = fa_pos(p, i, lq, lk);
    int64_t a = 0, b = lk;
    if (p->causal) b = fa_min64(b, pos + 1);
    if (p->window_left >= 0) a = fa_max64(a, pos - p->window_left);
    if (p->window_right >= 0) b = fa_min64(b, pos + p->window_right + 1);
    a = fa_min64(fa_max64(a, 0), lk); /* a row past the last key sees none: [lk, lk) */
    b = fa_min64(b, lk);
    if (b < a) b = a;
    *lo = a;
    *hi = b;
}

/* The keys of tile [k0, k0 + bk) that row i may see, relative to k0:
 * [*lo, *hi), empty at *lo when none. */
static inline void fa_tile_row_range(const fa_problem *p, int64_t i, int64_t lq, int64_t lk, int64_t k0, int64_t bk,
                                     int64_t *lo, int64_t *hi)
{
    int64_t a, b;
    fa_row_range(p, i, lq, lk, &a, &b);
    *lo = fa_min64(fa_max64(a - k0, 0), bk);
    *hi = fa_max64(fa_min64(b - k0, bk), *lo);
}

/* Virtual row v of an entry: row i of head `head` (v = head * lq + i), at
 * byte head * hs + i * rs of an array of rows (fa_vrow_bytes).  A tile's
 * rows are walked with fa_vrow_next from one fa_vrow_at, which divides only
 * for rows past the first head (and decoding's, lq 1, never): a 64-bit
 * division per row cost a tile of 32 rows of tiny sequences ~2000 cycles
 * on a Cascade Lake Xeon, in each of the query pack, the store and every
 * masked or bounded tile. */
typedef struct {
    int64_t head, i, lq;
} fa_vrow;

static inline fa_vrow fa_vrow_at(int64_t v, int64_t lq)
{
    const int64_t head = lq == 1 ? v : v < lq ? 0 : v / lq;
    const fa_vrow r = {head, v - head * lq, lq};
    return r;
}

static inline void fa_vrow_next(fa_vrow *r)
{
    if (++r->i == r->lq) {
        r->i = 0;
        r->head++;
    }
}

static inline int64_t fa_vrow_bytes(const fa_vrow *r, int64_t rs, int64_t hs) { return r->head * hs + r->i * rs; }

/* The keys the virtual rows [v0, v0 + n) of an entry may see, as the range
 * [*lo, *hi) (a superset: rows of several heads count as all positions),
 * and the keys every one of them may see, [*all_lo, *all_hi). */
static inline void fa_block_range(const fa_problem *p, int64_t lq, int64_t lk, int64_t v0, int64_t n,
                                  int64_t *lo, int64_t *hi, int64_t *all_lo, int64_t *all_hi)
{
    const fa_vrow first = fa_vrow_at(v0, lq);
    int64_t imin = 0, imax = 0; /* decoding (lq 1): every row is row 0 */
    if (first.i + n > lq) { /* spans a head boundary */
        imax = lq - 1;
    } else {
        imin = first.i;
        imax = first.i + n - 1;
    }
    fa_row_range(p, imin, lq, lk, lo, all_hi);
    fa_row_range(p, imax, lq, lk, all_lo, hi);
}

/* The key blocks (of FA_BK keys, from key 0) the backward visits for the
 * virtual rows [v0, v0 + n) of an entry: blocks *first .. *last, none if
 * *last < *first.  A block is visited where it meets fa_block_range's keys. */
static inline void fa_bwd_visits(const fa_problem *p, int64_t lq, int64_t lk, int64_t v0, int64_t n, int64_t *first,
                                 int64_t *last)
{
    int64_t lo, hi, unused;
    fa_block_range(p, lq, lk, v0, n, &lo, &hi, &unused, &unused);
    *first = lo / FA_BK;
    *last = lo < lk ? (hi + FA_BK - 1) / FA_BK - 1 : *first - 1;
}

/* ---- dropout (fastattn.h, fa_problem.dropout_p) ---- */

/* SplitMix64's step: the golden-ratio increment, then its finaliser. */
static inline uint64_t fa_mix64(uint64_t x)
{
    x += 0x9E3779B97F4A7C15ull;
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
    x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
    return x ^ (x >> 31);
}

/* MurmurHash3's 32-bit finaliser (a bijection). */
static inline uint32_t fa_fmix32(uint32_t h)
{
    h ^= h >> 16;
    h *= 0x85EBCA6Bu;
    h ^= h >> 13;
    h *= 0xC2B2AE35u;
    return h ^ (h >> 16);
}

/* A row's word r of the dropout hash (row coordinate i of stream s). */
static inline uint64_t fa_dropout_row(uint64_t seed, int64_t stream, int64_t row)
{
    return fa_mix64(seed ^ fa_mix64((uint64_t)stream ^ fa_mix64((uint64_t)row)));
}

/* The hash of key pair q (key coordinates 2q and 2q + 1, modulo 2^32) of
 * a row whose word r is (a, b) = (low, high half): its low 16 bits are
 * compared with fa_dropout_threshold for key 2q, its high 16 bits for key
 * 2q + 1.  In 32-bit lanes only, so that a loop over rows or keys runs in
 * vectors on every path; its three multiplications are the costly part,
 * so one hash decides two weights (a float32 forward at D = 64 spent 17%
 * of its time on dropout with a second fmix32 round, 12% with one hash
 * per weight; Xeon Cascade Lake, AVX-512, one thread).  For a given row,
 * distinct pairs give distinct hashes (each step is a bijection). */
static inline uint32_t fa_dropout_pair(uint32_t a, uint32_t b, uint32_t q)
{
    return fa_fmix32((q ^ b) * 0x9E3779B1u + a);
}

/* Weights whose 16 bits are below this are dropped (p in steps of 2^-16). */
static inline uint32_t fa_dropout_threshold(double p) { return (uint32_t)(p * 65536.0 + 0.5); }

/* Paged k and v (p->pages): the page that holds key j of entry e. */
static inline int64_t fa_page_of(const fa_problem *p, const int64_t *e, int64_t j)
{
    return p->pages[e[FA_E_PAGES] + j / p->page_size];
}

#endif /* FA_INTERNAL_H */
