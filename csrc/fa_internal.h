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

/* What a run computes. */
enum { FA_KIND_ATTENTION = 0, FA_KIND_SCORES = 1, FA_KIND_WSUM = 2 };

/* One unit of parallel work: FA_BQ (or fewer) query rows of one entry. */
typedef struct {
    int64_t entry;
    int64_t row0;
    int64_t cost; /* estimated multiply-adds, for scheduling only */
} fa_item;

typedef int (*fa_run_fn)(const fa_problem *p, int kind, const fa_item *items, int64_t n_items,
                         int num_threads);
typedef void (*fa_exp_fn)(const float *x, float *y, int64_t n);

#define FA_DECLARE_PATH(isa)                                                                    \
    int fa_run_f32_##isa(const fa_problem *p, int kind, const fa_item *items, int64_t n_items,   \
                         int num_threads);                                                       \
    int fa_run_f64_##isa(const fa_problem *p, int kind, const fa_item *items, int64_t n_items,   \
                         int num_threads);                                                       \
    void fa_exp_f32_##isa(const float *x, float *y, int64_t n);

FA_DECLARE_PATH(generic)
#if defined(__x86_64__) || defined(_M_X64)
#define FA_HAVE_X86_PATHS 1
FA_DECLARE_PATH(avx2)
FA_DECLARE_PATH(avx512)
#else
#define FA_HAVE_X86_PATHS 0
#endif

/* Token pasting with expansion: FA_CAT(f32, generic) -> f32_generic. */
#define FA_CAT_(a, b) a##_##b
#define FA_CAT(a, b) FA_CAT_(a, b)

static inline int64_t fa_min64(int64_t a, int64_t b) { return a < b ? a : b; }
static inline int64_t fa_max64(int64_t a, int64_t b) { return a > b ? a : b; }
static inline int64_t fa_roundup64(int64_t a, int64_t m) { return (a + m - 1) / m * m; }

/*
 * The keys row i of an entry may see, as the half-open range [*lo, *hi),
 * from the causal and window options (the mask is applied separately).
 * Positions are bottom-right aligned: query i sits at key position
 * i + lk - lq.  Both bounds are non-decreasing in i, so the keys a block of
 * rows may see are [lo(first row), hi(last row)).
 */
static inline void fa_row_range(const fa_problem *p, int64_t i, int64_t lq, int64_t lk, int64_t *lo,
                                int64_t *hi)
{
    const int64_t pos = i + lk - lq;
    int64_t a = 0, b = lk;
    if (p->causal) b = fa_min64(b, pos + 1);
    if (p->window_left >= 0) a = fa_max64(a, pos - p->window_left);
    if (p->window_right >= 0) b = fa_min64(b, pos + p->window_right + 1);
    a = fa_max64(a, 0);
    b = fa_min64(b, lk);
    if (b < a) b = a;
    *lo = a;
    *hi = b;
}

#endif /* FA_INTERNAL_H */
