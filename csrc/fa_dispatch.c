/*
 * fa_dispatch.c - entry points of the C interface: the table of kernel
 * paths and the CPU features each needs (CPUID + XGETBV, read once); checks
 * a problem, splits its work into items and runs them on the problem's
 * path.  Compiled for the baseline instruction set only.
 */
#include <stdlib.h>
#include <string.h>

#include "fa_tile.h"

/* CPU features a kernel path may need (bits of fa_path.needs). */
enum {
    FA_CPU_AVX2 = 1u << 0,       /* AVX2 and FMA, with the OS saving YMM state */
    FA_CPU_F16C = 1u << 1,       /* float16 conversions */
    FA_CPU_AVX512 = 1u << 2,     /* AVX-512 F, BW, DQ, VL, with the OS saving ZMM and opmask state */
    FA_CPU_AVX512BF16 = 1u << 3, /* the bfloat16 dot product, vdpbf16ps */
    FA_CPU_NEON = 1u << 4,       /* AArch64 Advanced SIMD (every AArch64 CPU) */
    FA_CPU_AVX512VNNI = 1u << 5  /* integer dot products, vpdpbusd (used within the AVX-512 path where present) */
};

/*
 * One kernel path: the architecture it is built for, the CPU features it
 * needs, and its tile operations for each pair of element types, ops[q and
 * out][k and v as stored] (NULL: no kernel for that pair).  A path may reuse
 * another's tables for types it adds nothing to, as avx512bf16 does for all
 * but bfloat16.  Adding a path is one source file and one row of fa_paths;
 * adding a k/v storage type is a table and an entry in the rows.
 */
typedef struct {
    const char *name;
    const char *arch;
    unsigned needs;            /* FA_CPU_* bits */
    const char *feature_names; /* the same, for people */
    const fa_tile_ops *ops[FA_DTYPE_COUNT][FA_KV_DTYPE_COUNT];
    fa_exp_fn exp_f32;
} fa_path;

/* The tables of a path: k and v stored as the type of q, in 8 bits, or in
 * 16 bits under float32 queries (converted as the tiles are read: the same
 * tables, but for bfloat16, whose table for 8-bit k and v is bf16_q8). */
#define FA_KV8(q, t) [q][FA_I8] = (t), [q][FA_E4M3] = (t), [q][FA_E5M2] = (t)
#define FA_TYPES(f32, f64, f16, bf16, bf16_q8)                                                                   \
    {[FA_F32][FA_F32] = (f32), [FA_F64][FA_F64] = (f64), [FA_F16][FA_F16] = (f16), [FA_BF16][FA_BF16] = (bf16), \
     [FA_F32][FA_F16] = (f32), [FA_F32][FA_BF16] = (f32),                                                      \
     FA_KV8(FA_F32, f32), FA_KV8(FA_F64, f64), FA_KV8(FA_F16, f16), FA_KV8(FA_BF16, bf16_q8)}
#define FA_SAME_TYPES(f32, f64, f16, bf16) FA_TYPES(f32, f64, f16, bf16, bf16)

#if FA_HAVE_X86_PATHS
#include <cpuid.h>

static uint64_t fa_xgetbv(uint32_t index)
{
    uint32_t lo, hi;
    __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(index));
    return ((uint64_t)hi << 32) | lo;
}

/* The CPU must advertise the instructions *and* the OS must save the
 * registers (XCR0): YMM state for AVX2, plus opmask and ZMM state for AVX-512. */
static unsigned fa_detect_features(void)
{
    unsigned a, b, c, d, f = 0;
    if (!__get_cpuid(1, &a, &b, &c, &d)) return 0;
    const int osxsave = (c >> 27) & 1, avx = (c >> 28) & 1, fma = (c >> 12) & 1, f16c = (c >> 29) & 1;
    if (!osxsave || !avx) return 0;
    const uint64_t xcr0 = fa_xgetbv(0);
    const int ymm_state = (xcr0 & 0x6) == 0x6;
    const int zmm_state = (xcr0 & 0xe6) == 0xe6;
    if (!ymm_state) return 0;
    if (f16c) f |= FA_CPU_F16C;
    if (__get_cpuid_max(0, NULL) < 7) return f;
    __cpuid_count(7, 0, a, b, c, d);
    const unsigned max_subleaf = a;
    if (((b >> 5) & 1) && fma) f |= FA_CPU_AVX2;
    const int avx512 = ((b >> 16) & 1) && ((b >> 17) & 1) && ((b >> 30) & 1) && ((b >> 31) & 1);
    if (zmm_state && avx512) {
        f |= FA_CPU_AVX512;
        if ((c >> 11) & 1) f |= FA_CPU_AVX512VNNI;
        if (max_subleaf >= 1) {
            __cpuid_count(7, 1, a, b, c, d);
            if ((a >> 5) & 1) f |= FA_CPU_AVX512BF16;
        }
    }
    return f;
}
#elif defined(__aarch64__)
static unsigned fa_detect_features(void) { return FA_CPU_NEON; } /* Advanced SIMD is mandatory on AArch64 */
#else
static unsigned fa_detect_features(void) { return 0; }
#endif

static unsigned fa_cpu_features(void)
{
    /* detection is idempotent, so a race here only repeats it */
    static volatile int cached = -1;
    int f = cached;
    if (f < 0) cached = f = (int)fa_detect_features();
    return (unsigned)f;
}

int fa_cpu_avx512vnni(void) { return (fa_cpu_features() & FA_CPU_AVX512VNNI) != 0; }

/*
 * The kernel paths of this build, in order of preference: the best path a
 * CPU supports is the last one whose features it has.  A row names the
 * driver of each element type (q/out and k/v stored alike) and the
 * softmax exponential.
 */
extern const fa_tile_ops fa_ops_f32_generic, fa_ops_f64_generic, fa_ops_f16_generic, fa_ops_bf16_generic;
void fa_exp_f32_generic(const float *x, float *y, int64_t n);
#if FA_HAVE_X86_PATHS
extern const fa_tile_ops fa_ops_f32_avx2, fa_ops_f64_avx2, fa_ops_f16_avx2, fa_ops_bf16_avx2;
extern const fa_tile_ops fa_ops_f32_avx512, fa_ops_f64_avx512, fa_ops_f16_avx512, fa_ops_bf16_avx512;
extern const fa_tile_ops fa_ops_bf16_avx512bf16;
void fa_exp_f32_avx2(const float *x, float *y, int64_t n);
void fa_exp_f32_avx512(const float *x, float *y, int64_t n);
#elif defined(__aarch64__)
extern const fa_tile_ops fa_ops_f32_neon, fa_ops_f64_neon, fa_ops_f16_neon, fa_ops_bf16_neon;
void fa_exp_f32_neon(const float *x, float *y, int64_t n);
#endif

static const fa_path fa_paths[] = {
    {"generic", "any", 0, "",
     FA_SAME_TYPES(&fa_ops_f32_generic, &fa_ops_f64_generic, &fa_ops_f16_generic, &fa_ops_bf16_generic),
     fa_exp_f32_generic},
#if FA_HAVE_X86_PATHS
    {"avx2", "x86_64", FA_CPU_AVX2 | FA_CPU_F16C, "avx2 fma f16c",
     FA_SAME_TYPES(&fa_ops_f32_avx2, &fa_ops_f64_avx2, &fa_ops_f16_avx2, &fa_ops_bf16_avx2),
     fa_exp_f32_avx2},
    {"avx512", "x86_64", FA_CPU_AVX2 | FA_CPU_F16C | FA_CPU_AVX512, "avx512f avx512bw avx512dq avx512vl",
     FA_SAME_TYPES(&fa_ops_f32_avx512, &fa_ops_f64_avx512, &fa_ops_f16_avx512, &fa_ops_bf16_avx512),
     fa_exp_f32_avx512},
    {"avx512bf16", "x86_64", FA_CPU_AVX2 | FA_CPU_F16C | FA_CPU_AVX512 | FA_CPU_AVX512BF16,
     "avx512f avx512bw avx512dq avx512vl avx512_bf16",
     FA_TYPES(&fa_ops_f32_avx512, &fa_ops_f64_avx512, &fa_ops_f16_avx512, &fa_ops_bf16_avx512bf16,
              &fa_ops_bf16_avx512),
     fa_exp_f32_avx512},
#elif defined(__aarch64__)
    {"neon", "aarch64", FA_CPU_NEON, "neon (asimd)",
     FA_SAME_TYPES(&fa_ops_f32_neon, &fa_ops_f64_neon, &fa_ops_f16_neon, &fa_ops_bf16_neon),
     fa_exp_f32_neon},
#endif
};

#define FA_PATH_COUNT ((int)(sizeof fa_paths / sizeof fa_paths[0]))

/* Kernel calls per path (fa_path_runs). */
static int64_t fa_runs[FA_PATH_COUNT];

int fa_path_count(void) { return FA_PATH_COUNT; }

static const fa_path *fa_path_at(int path) { return path >= 0 && path < FA_PATH_COUNT ? &fa_paths[path] : NULL; }

const char *fa_path_name(int path) { return fa_path_at(path) ? fa_paths[path].name : NULL; }
const char *fa_path_arch(int path) { return fa_path_at(path) ? fa_paths[path].arch : NULL; }
const char *fa_path_features(int path) { return fa_path_at(path) ? fa_paths[path].feature_names : NULL; }

int fa_path_supported(int path)
{
    const fa_path *p = fa_path_at(path);
    return p != NULL && (p->needs & ~fa_cpu_features()) == 0;
}

int fa_best_path(void)
{
    int best = 0;
    for (int i = 0; i < FA_PATH_COUNT; i++)
        if (fa_path_supported(i)) best = i;
    return best;
}

int64_t fa_path_runs(int path) { return fa_path_at(path) ? __atomic_load_n(&fa_runs[path], __ATOMIC_RELAXED) : 0; }

const char *fa_compiler(void)
{
#if defined(__clang__)
    return "clang " __clang_version__;
#elif defined(__GNUC__)
    return "gcc " __VERSION__;
#else
    return "unknown compiler";
#endif
}

int fa_exp_f32(int path, const float *x, float *y, int64_t n)
{
    if (!fa_path_supported(path)) return FA_ERR_ISA;
    if (n < 0) return FA_ERR_INVALID;
    fa_paths[path].exp_f32(x, y, n);
    return FA_OK;
}

/* Below this many multiply-adds a call runs on one thread: waking a team
 * costs more than it saves. */
#define FA_SERIAL_WORK (1 << 18)

/* Split-KV: entries of one item each (decoding: a few query rows per head
 * against a long KV cache), when there are at most FA_SPLIT_MAX_ENTRIES of
 * them, have their keys split into chunks of at least FA_SPLIT_MIN_KEYS
 * keys (half as many for a bundle of heads, whose keys carry more work:
 * fa_split_count; at least four key tiles), so that about FA_SPLIT_TARGET
 * such items exist; entries of several items (prefill) give enough items
 * of their own and are not split.  A batch may mix both (continuous
 * batching).  The split depends on the problem only, never on the thread
 * count, so results are bitwise identical for any number of threads. */
#define FA_SPLIT_MAX_ENTRIES 64
#define FA_SPLIT_TARGET 64
#define FA_SPLIT_MIN_KEYS 1024

static int fa_cmp_items(const void *a, const void *b)
{
    const fa_item *x = (const fa_item *)a, *y = (const fa_item *)b;
    if (x->entry != y->entry) return x->entry < y->entry ? -1 : 1;
    if (x->cost != y->cost) return x->cost > y->cost ? -1 : 1;
    if (x->row0 != y->row0) return x->row0 < y->row0 ? -1 : 1;
    return x->k_lo < y->k_lo ? -1 : (x->k_lo > y->k_lo);
}

/* The entries from entry i that form a bundle (fa_internal.h): decoding
 * entries (few-row kernels), unmasked, of the same lengths and pages, whose
 * k and v offsets step up by one amount and stay within one row; 1 if
 * entry i bundles with none. */
static int fa_bundle_len(const fa_problem *p, const fa_tile_ops *ops, int kind, int64_t i)
{
    const int64_t *e = p->entries + i * FA_ENTRY_FIELDS;
    if (kind != FA_KIND_ATTENTION || p->mask_kind != FA_MASK_NONE || p->group * e[FA_E_LQ] > ops->rows_max ||
        i + 1 >= p->n_entries || p->k_cs <= 0 || p->v_cs <= 0)
        return 1;
    const int64_t ks = e[FA_ENTRY_FIELDS + FA_E_K] - e[FA_E_K], vs = e[FA_ENTRY_FIELDS + FA_E_V] - e[FA_E_V];
    if (ks <= 0 || vs <= 0) return 1;
    int n = 1;
    while (n < FA_BUNDLE_MAX && i + n < p->n_entries) {
        const int64_t *f = e + n * FA_ENTRY_FIELDS;
        if (f[FA_E_LQ] != e[FA_E_LQ] || f[FA_E_LK] != e[FA_E_LK] || f[FA_E_K] - e[FA_E_K] != n * ks ||
            f[FA_E_V] - e[FA_E_V] != n * vs || (p->pages && f[FA_E_PAGES] != e[FA_E_PAGES]))
            break;
        if (n * ks + p->d * p->k_cs > p->k_rs || n * vs + p->dv * p->v_cs > p->v_rs) break; /* beyond one row */
        n++;
    }
    return n;
}

/* The most key splits of an entry (or bundle) of one item (1: no split). */
static int64_t fa_split_want(const fa_problem *p, const fa_tile_ops *ops, int kind)
{
    if (kind != FA_KIND_ATTENTION) return 1;
    int64_t single = 0;
    for (int64_t i = 0, n; i < p->n_entries; i += n) {
        n = fa_bundle_len(p, ops, kind, i);
        single += p->group * p->entries[i * FA_ENTRY_FIELDS + FA_E_LQ] <= FA_BQ;
    }
    if (single == 0 || single > FA_SPLIT_MAX_ENTRIES) return 1;
    return (FA_SPLIT_TARGET + single - 1) / single;
}

/* Key splits of entry e, heading a bundle of n entries, given
 * fa_split_want's `want`: each split has at least FA_SPLIT_MIN_KEYS keys,
 * half as many in a bundle (n heads per key: more work per key, but also
 * per split: n heads' queries packed, n heads' partial rows stored and
 * merged).  With FA_SPLIT_MIN_KEYS / n keys, one sequence decoded in a
 * bundle of 8 heads (twice the splits) took 1.03-1.06 times as long in
 * float32, 1.12-1.20 in int8 (4096 and 16384 keys; Cascade Lake Xeon, 2
 * threads). */
static int64_t fa_split_count(const fa_problem *p, const int64_t *e, int64_t n, int64_t want)
{
    if (want <= 1 || p->group * e[FA_E_LQ] > FA_BQ) return 1;
    const int64_t min_keys = fa_max64(4 * FA_BK, FA_SPLIT_MIN_KEYS / fa_min64(n, 2));
    return fa_max64(1, fa_min64(want, e[FA_E_LK] / min_keys));
}

/* A page stride that starts every page at the same place within a vector
 * (of up to 64 bytes) as the rows of a page. */
static int fa_page_stride_ok(int64_t ps, int64_t rs) { return ps % 64 == 0 || (rs != 0 && ps % rs == 0); }

/* The checks every entry point makes: a consistent problem whose path this
 * CPU runs and has tile operations for its element types (*ops).  The call
 * then counts as run on that path. */
static int fa_check(const fa_problem *p, int kind, const fa_tile_ops **ops)
{
    if (!p || !p->entries || p->n_entries < 0 || p->d < 0 || p->dv < 0 || p->num_threads < 1)
        return FA_ERR_INVALID;
    if (p->dtype < 0 || p->dtype >= FA_DTYPE_COUNT || p->kv_dtype < 0 || p->kv_dtype >= FA_KV_DTYPE_COUNT)
        return FA_ERR_INVALID;
    const int kv8 = p->kv_dtype >= FA_I8; /* forward attention only, with scales, contiguous rows */
    if (kv8 ? kind != FA_KIND_ATTENTION || !p->k_scales || !p->v_scales || (p->k_cs != 1 && p->d > 1) ||
                  (p->v_cs != 1 && p->dv > 1)
            : p->k_scales || p->v_scales)
        return FA_ERR_INVALID;
    if (p->mask_kind < 0 || p->mask_kind >= FA_MASK_KIND_COUNT) return FA_ERR_INVALID;
    if (p->kv_dtype != p->dtype && kind != FA_KIND_ATTENTION) return FA_ERR_INVALID; /* converted k and v */
    if (p->group < 1 || (p->group != 1 && kind != FA_KIND_ATTENTION)) return FA_ERR_INVALID;
    if (!fa_path_supported(p->path)) return FA_ERR_ISA;
    *ops = fa_paths[p->path].ops[p->dtype][p->kv_dtype];
    if (!*ops) return FA_ERR_UNSUPPORTED;
    if (p->sinks && p->weights != FA_WEIGHTS_SOFTMAX) return FA_ERR_INVALID;
    if (!(p->dropout_p >= 0 && p->dropout_p < 1) ||
        (p->dropout_p > 0 && (kind == FA_KIND_SCORES || kind == FA_KIND_WSUM)))
        return FA_ERR_INVALID;
    if (p->pages && (kind != FA_KIND_ATTENTION || p->page_size < 1 || p->n_pages < 1 ||
                     !fa_page_stride_ok(p->k_ps, p->k_rs) || !fa_page_stride_ok(p->v_ps, p->v_rs)))
        return FA_ERR_INVALID;
    for (int64_t i = 0; i < p->n_entries; i++) {
        const int64_t *e = p->entries + i * FA_ENTRY_FIELDS;
        if (e[FA_E_LQ] < 0 || e[FA_E_LK] < 0 || e[FA_E_LQ] > INT64_MAX / p->group) return FA_ERR_INVALID;
        if (p->pages) /* every page the entry's keys use */
            for (int64_t j = 0; j < e[FA_E_LK]; j += p->page_size) {
                const int64_t page = fa_page_of(p, e, j);
                if (page < 0 || page >= p->n_pages) return FA_ERR_INVALID;
            }
    }
    __atomic_fetch_add(&fa_runs[p->path], 1, __ATOMIC_RELAXED);
    return FA_OK;
}

/* Below this many multiply-adds a call runs on one thread; never more
 * threads than items. */
static int fa_thread_count(const fa_problem *p, double work, int64_t n_items)
{
    int threads = p->num_threads;
    if (work < (double)FA_SERIAL_WORK) threads = 1;
    if ((int64_t)threads > n_items) threads = (int)n_items;
    return threads;
}

static int fa_run(const fa_problem *p, int kind)
{
    const fa_tile_ops *ops;
    const int checked = fa_check(p, kind, &ops);
    if (checked != FA_OK) return checked;
    const int64_t want = fa_split_want(p, ops, kind);
    int64_t n_items = 0;
    for (int64_t i = 0, n; i < p->n_entries; i += n) {
        const int64_t *e = p->entries + i * FA_ENTRY_FIELDS;
        n = fa_bundle_len(p, ops, kind, i);
        n_items += (p->group * e[FA_E_LQ] + FA_BQ - 1) / FA_BQ * fa_split_count(p, e, n, want);
    }
    if (n_items == 0) return FA_OK;
    if ((uint64_t)n_items > SIZE_MAX / sizeof(fa_item)) return FA_ERR_NOMEM;
    fa_item *items = (fa_item *)malloc((size_t)n_items * sizeof(fa_item));
    if (!items) return FA_ERR_NOMEM;

    /* One item per FA_BQ query rows (and key split), handed out in order
     * (dynamic schedule): entry by entry, so threads working side by side
     * share one entry's K and V in cache (measured: +20% on causal problems
     * over a global heaviest-first order), and within an entry heaviest
     * first (the last rows of a causal problem), so the small items come
     * last and even out the finish. */
    double total = 0;
    int64_t t = 0, n_parts = 0;
    /* tile groups of up to FA_GROUP_TILES, while they leave at least two
     * items per thread (a tile computes the same in a group as alone) */
    const int64_t group_max = fa_gathers(p, kind) ? fa_max64(1, fa_min64(FA_GROUP_TILES, n_items / (2 * p->num_threads)))
                                                  : 1;
    for (int64_t i = 0, n; i < p->n_entries; i += n) {
        const int64_t *e = p->entries + i * FA_ENTRY_FIELDS;
        const int64_t lq = e[FA_E_LQ], lk = e[FA_E_LK], rows = p->group * lq;
        n = fa_bundle_len(p, ops, kind, i);
        const int64_t nsplit = fa_split_count(p, e, n, want);
        const int64_t chunk = fa_roundup64((lk + nsplit - 1) / nsplit, FA_BK);
        for (int64_t row0 = 0, tiles; row0 < rows; row0 += tiles * FA_BQ) {
            int64_t bq = fa_min64(FA_BQ, rows - row0);
            int64_t lo = 0, hi = lk, width, unused;
            if (kind == FA_KIND_ATTENTION) {
                fa_block_range(p, lq, lk, row0, bq, &lo, &hi, &unused, &unused);
                width = p->d + p->dv + 16; /* + per-score softmax work */
            } else {
                width = (kind == FA_KIND_SCORES ? p->d : p->dv) + 1;
            }
            /* a tile group (fa_internal.h): the next query tiles that begin at the same key */
            for (tiles = 1; nsplit == 1 && n == 1 && tiles < group_max && row0 + bq < rows; tiles++) {
                const int64_t bq2 = fa_min64(FA_BQ, rows - row0 - bq);
                int64_t lo2, hi2;
                fa_block_range(p, lq, lk, row0 + bq, bq2, &lo2, &hi2, &unused, &unused);
                if (lo2 != lo || bq2 <= ops->rows_max) break; /* a few-row tile is neither gathered nor grouped */
                bq += bq2;
                hi = fa_max64(hi, hi2);
            }
            for (int64_t s = 0; s < nsplit; s++) {
                fa_item *it = &items[t++];
                it->entry = i;
                it->row0 = row0;
                it->k_lo = nsplit > 1 ? s * chunk : 0;
                it->k_hi = nsplit > 1 ? (s + 1) * chunk : INT64_MAX;
                it->part = nsplit > 1 ? n_parts + s : -1; /* entry b of the bundle: + b * nsplit */
                it->split = (int32_t)s;
                it->nsplit = (int32_t)nsplit;
                it->bundle = (int32_t)n;
                it->tiles = (int32_t)tiles;
                const int64_t keys = fa_max64(0, fa_min64(hi, it->k_hi) - fa_max64(lo, it->k_lo));
                it->cost = n * bq * (keys + 1) * width;
                total += (double)it->cost;
            }
            if (nsplit > 1) n_parts += n * nsplit;
        }
    }
    n_items = t; /* fewer with tile groups */
    qsort(items, (size_t)n_items, sizeof(fa_item), fa_cmp_items);
    const int threads = fa_thread_count(p, total, n_items);
    /* a mask shared by several entries: classified once, not once per entry */
    fa_problem local;
    int64_t *local_entries = NULL;
    uint8_t *tables = NULL;
    const int shared = kind == FA_KIND_ATTENTION ? fa_shared_mask_tables(p, threads, &local, &local_entries, &tables)
                                                 : 0;
    int status = FA_ERR_NOMEM;
    if (shared >= 0) status = fa_run_items(shared ? &local : p, kind, items, n_items, n_parts, threads, ops, NULL);
    free(local_entries);
    free(tables);
    free(items);
    return status;
}

/* Most bytes of dq accumulators and query-tile packs a backward round
 * holds: entries are run in rounds whose accumulators and packs fit (at
 * least one entry per round). */
#define FA_BWD_ACC_BYTES ((int64_t)32 << 20)

/* One item per query tile of entries [i0, i1) into items; returns their count. */
static int64_t fa_query_tile_items(const fa_problem *p, int64_t i0, int64_t i1, fa_item *items)
{
    int64_t t = 0;
    for (int64_t i = i0; i < i1; i++)
        for (int64_t row0 = 0; row0 < p->group * p->entries[i * FA_ENTRY_FIELDS + FA_E_LQ]; row0 += FA_BQ)
            items[t++] = (fa_item){.entry = i, .row0 = row0, .part = -1, .bundle = 1, .tiles = 1};
    return t;
}

/* The problem p with delta = rowsum(dout * out) computed from its out, in
 * parallel, into a buffer of its own (*delta, the compute type, an entry's
 * group * lq values after the previous entry's) that *local's entries
 * (*entries) point into. */
static int fa_bwd_delta(const fa_problem *p, const fa_tile_ops *ops, fa_problem *local, int64_t **entries,
                        char **delta)
{
    const int64_t n = p->n_entries, eb = ops->elem_bytes;
    int64_t rows = 0, n_items = 0;
    for (int64_t i = 0; i < n; i++) {
        const int64_t r = p->group * p->entries[i * FA_ENTRY_FIELDS + FA_E_LQ];
        rows += r;
        n_items += (r + FA_BQ - 1) / FA_BQ;
    }
    if ((uint64_t)n > SIZE_MAX / (FA_ENTRY_FIELDS * sizeof(int64_t)) || (uint64_t)rows > SIZE_MAX / (uint64_t)eb - 1 ||
        (uint64_t)n_items > SIZE_MAX / sizeof(fa_item) - 1)
        return FA_ERR_NOMEM;
    *entries = (int64_t *)malloc((size_t)n * FA_ENTRY_FIELDS * sizeof(int64_t));
    *delta = (char *)malloc((size_t)(rows * eb) + 1);
    fa_item *items = (fa_item *)malloc((size_t)(n_items + 1) * sizeof(fa_item));
    int status = *entries && *delta && items ? FA_OK : FA_ERR_NOMEM;
    if (status == FA_OK) {
        memcpy(*entries, p->entries, (size_t)n * FA_ENTRY_FIELDS * sizeof(int64_t));
        *local = *p;
        local->entries = *entries;
        local->delta = *delta;
        local->delta_rs = p->group * eb; /* row i of head h of an entry: element i * group + h */
        local->delta_hs = eb;
        int64_t at = 0;
        for (int64_t i = 0; i < n; i++) {
            int64_t *e = *entries + i * FA_ENTRY_FIELDS;
            e[FA_E_DELTA] = at * eb;
            at += p->group * e[FA_E_LQ];
        }
        const int64_t t = fa_query_tile_items(p, 0, n, items);
        double work = (double)rows * (double)p->dv;
        status = fa_run_items(local, FA_KIND_BWD_DELTA, items, t, 0, fa_thread_count(p, work, t), ops, NULL);
    }
    free(items);
    return status;
}

/* Entries by the offset of their mask gradient, then by index. */
static int fa_cmp_gmask(const void *a, const void *b)
{
    const int64_t *x = (const int64_t *)a, *y = (const int64_t *)b;
    if (x[0] != y[0]) return x[0] < y[0] ? -1 : 1;
    return x[1] < y[1] ? -1 : x[1] > y[1];
}

/* The entries that share a mask gradient (fa_problem.gmask: the same
 * offset), in order: gprev[i] is the last entry before i with i's offset,
 * or -1.  NULL gprev (FA_OK) when no two share; FA_ERR_INVALID when two
 * that share differ in lq or lk. */
static int fa_bwd_gmask_chain(const fa_problem *p, int64_t **gprev)
{
    const int64_t n = p->n_entries;
    *gprev = NULL;
    int64_t *order = (int64_t *)malloc((size_t)n * 2 * sizeof(int64_t));
    if (!order) return FA_ERR_NOMEM;
    for (int64_t i = 0; i < n; i++) {
        order[2 * i] = p->entries[i * FA_ENTRY_FIELDS + FA_E_GMASK];
        order[2 * i + 1] = i;
    }
    qsort(order, (size_t)n, 2 * sizeof(int64_t), fa_cmp_gmask);
    int status = FA_OK;
    for (int64_t t = 1; t < n && status == FA_OK; t++) {
        if (order[2 * t] != order[2 * t - 2]) continue;
        const int64_t i = order[2 * t + 1], h = order[2 * t - 1];
        const int64_t *e = p->entries + i * FA_ENTRY_FIELDS, *f = p->entries + h * FA_ENTRY_FIELDS;
        if (e[FA_E_LQ] != f[FA_E_LQ] || e[FA_E_LK] != f[FA_E_LK]) {
            status = FA_ERR_INVALID;
        } else {
            if (!*gprev) { /* the first two that share: every entry starts a chain of its own until found */
                if (!(*gprev = (int64_t *)malloc((size_t)n * sizeof(int64_t)))) {
                    status = FA_ERR_NOMEM;
                    break;
                }
                for (int64_t x = 0; x < n; x++) (*gprev)[x] = -1;
            }
            (*gprev)[i] = h;
        }
    }
    if (status != FA_OK) {
        free(*gprev);
        *gprev = NULL;
    }
    free(order);
    return status;
}

/* The backward: one item per key block of an entry, writing its dk and dv
 * rows (summed over every query row of the entry) and adding to the dq
 * accumulators of the query tiles that see it, in key-block order (see
 * fa_bwd_keys_item); the tiles no key block visits get dq = 0.  Sums are
 * fixed by the problem, so the gradients are bitwise the same for any
 * thread count. */
int fa_attention_backward(const fa_problem *p)
{
    const fa_tile_ops *ops;
    const int checked = fa_check(p, FA_KIND_ATTENTION, &ops);
    if (checked != FA_OK) return checked;
    if (!p->dout || !p->gq || !p->gk || !p->gv || p->pages || p->kv_dtype != p->dtype) return FA_ERR_INVALID;
    if (p->weights == FA_WEIGHTS_SOFTMAX && (!p->lse || (!p->delta && !p->out))) return FA_ERR_INVALID;
    if (p->gmask && (p->mask_kind == FA_MASK_NONE || p->mask_kind == FA_MASK_BOOL || p->gmask_cs == 0))
        return FA_ERR_INVALID;
    const int64_t n = p->n_entries, ld = fa_roundup64(p->d, ops->width), eb = ops->elem_bytes;
    const int64_t pack_bytes = ops->bwd_pack_bytes(p);
    if (n <= 0) return FA_OK;
    if (pack_bytes < 0 || ld > (INT64_MAX / 16) / FA_BQ / eb) return FA_ERR_NOMEM;
    const int64_t tile_bytes = FA_BQ * ld * eb + pack_bytes; /* a query tile's accumulator and pack */
    if ((uint64_t)n > SIZE_MAX / (3 * sizeof(int64_t))) return FA_ERR_NOMEM;
    fa_problem local;
    int64_t *local_entries = NULL;
    char *delta = NULL;
    if (p->weights == FA_WEIGHTS_SOFTMAX && !p->delta) {
        const int status = fa_bwd_delta(p, ops, &local, &local_entries, &delta);
        if (status != FA_OK) {
            free(local_entries);
            free(delta);
            return status;
        }
        p = &local;
    }
    /* per entry: its first accumulator row, first tile and first key block within its run */
    int64_t *acc_row = (int64_t *)malloc((size_t)n * 3 * sizeof(int64_t)), *tile0 = acc_row + n, *kb0 = tile0 + n;
    int64_t *gprev = NULL; /* entries that share a mask gradient */
    const int chained = p->gmask ? fa_bwd_gmask_chain(p, &gprev) : FA_OK;
    int64_t n_keys = 0;
    for (int64_t i = 0; i < n; i++) n_keys += (p->entries[i * FA_ENTRY_FIELDS + FA_E_LK] + FA_BK - 1) / FA_BK;
    fa_item *items = acc_row && (uint64_t)n_keys < SIZE_MAX / sizeof(fa_item)
                         ? (fa_item *)malloc((size_t)(n_keys + 1) * sizeof(fa_item))
                         : NULL;
    int status = chained != FA_OK ? chained : acc_row && items ? FA_OK : FA_ERR_NOMEM;
    for (int64_t i0 = 0, i1; i0 < n && status == FA_OK; i0 = i1) {
        /* entries [i0, i1): their accumulator rows, tiles and items */
        int64_t rows = 0, tiles = 0, t = 0;
        double work = 0;
        for (i1 = i0; i1 < n; i1++) {
            const int64_t *e = p->entries + i1 * FA_ENTRY_FIELDS;
            const int64_t er = fa_roundup64(p->group * e[FA_E_LQ], FA_BQ);
            if (i1 > i0 && tiles + er / FA_BQ > FA_BWD_ACC_BYTES / tile_bytes) break;
            acc_row[i1] = rows;
            tile0[i1] = tiles;
            kb0[i1] = t;
            rows += er;
            tiles += er / FA_BQ;
            /* about 2.5 forward passes of work */
            work += 2.5 * (double)(p->group * e[FA_E_LQ]) * (double)e[FA_E_LK] * (double)(p->d + p->dv);
            t += (e[FA_E_LK] + FA_BK - 1) / FA_BK;
        }
        if ((uint64_t)rows > SIZE_MAX / (uint64_t)fa_max64(1, ld * eb) - 1 ||
            (uint64_t)tiles > SIZE_MAX / sizeof(int64_t) || (uint64_t)tiles > SIZE_MAX / (uint64_t)pack_bytes - 1 ||
            (uint64_t)tiles > SIZE_MAX / sizeof(fa_item) - 1) { /* D = 0: no accumulator bytes per row */
            status = FA_ERR_NOMEM;
            break;
        }
        /* The items: a key block waits its turn behind the entry's earlier
         * blocks, so the threads spread over entries: key block by key block
         * across groups of threads / 2 entries (one entry at a time on two
         * threads, whose pair of blocks in flight keeps in step). */
        const int threads = fa_thread_count(p, work, t);
        const int64_t group = fa_max64(1, threads / 2);
        t = 0;
        for (int64_t g0 = i0; g0 < i1; g0 += group) {
            const int64_t g1 = fa_min64(i1, g0 + group);
            int64_t lk_max = 0;
            for (int64_t i = g0; i < g1; i++) lk_max = fa_max64(lk_max, p->entries[i * FA_ENTRY_FIELDS + FA_E_LK]);
            for (int64_t k0 = 0; k0 < lk_max; k0 += FA_BK)
                for (int64_t i = g0; i < g1; i++)
                    if (k0 < p->entries[i * FA_ENTRY_FIELDS + FA_E_LK])
                        items[t++] = (fa_item){.entry = i, .row0 = k0, .part = -1, .bundle = 1, .tiles = 1};
        }
        /* the accumulators (each tile zeroed by its first key block), turns
         * and packs (written first, in parallel: one item per query tile) */
        size_t acc_bytes = (size_t)(rows * ld * eb), turn_bytes = (size_t)tiles * sizeof(int64_t);
        size_t pack_total = (size_t)(tiles * pack_bytes), tile_items_bytes = (size_t)(tiles + 1) * sizeof(fa_item);
        size_t done_bytes = gprev ? (size_t)t * sizeof(int64_t) : 0;
        fa_bwd_dq dq = {(char *)fa_scratch_take(&acc_bytes),
                        ld,
                        eb,
                        acc_row,
                        tile0,
                        (int64_t *)fa_scratch_take(&turn_bytes),
                        (char *)fa_scratch_take(&pack_total),
                        pack_bytes,
                        gprev,
                        kb0,
                        gprev ? (int64_t *)fa_scratch_take(&done_bytes) : NULL,
                        i0,
                        gprev || p->gmask_rs == 0 || (p->gmask_hs == 0 && p->group > 1)};
        fa_item *tile_items = (fa_item *)malloc(tile_items_bytes);
        if (dq.acc && dq.turns && dq.packs && tile_items && (!gprev || dq.done)) {
            memset(dq.turns, 0, (size_t)tiles * sizeof(int64_t));
            if (gprev) memset(dq.done, 0, done_bytes);
            const int64_t nt = fa_query_tile_items(p, i0, i1, tile_items);
            status = fa_run_items(p, FA_KIND_BWD_PACK, tile_items, nt, 0, threads, ops, &dq);
            if (status == FA_OK) status = fa_run_items(p, FA_KIND_BWD, items, t, 0, threads, ops, &dq);
            /* the tiles no key block visits: dq = 0 */
            for (int64_t i = i0; i < i1 && status == FA_OK; i++) {
                const int64_t *e = p->entries + i * FA_ENTRY_FIELDS, lq = e[FA_E_LQ], lk = e[FA_E_LK];
                for (int64_t row0 = 0; row0 < p->group * lq; row0 += FA_BQ) {
                    const int64_t bq = fa_min64(FA_BQ, p->group * lq - row0);
                    int64_t first, last;
                    fa_bwd_visits(p, lq, lk, row0, bq, &first, &last);
                    if (last >= first) continue;
                    char *acc = dq.acc + (acc_row[i] + row0) * ld * eb;
                    memset(acc, 0, (size_t)(bq * ld * eb));
                    ops->bwd_dq_store(p, e, acc, ld, row0, bq);
                }
            }
        } else {
            status = FA_ERR_NOMEM;
        }
        free(tile_items);
        fa_scratch_give(dq.acc, acc_bytes);
        fa_scratch_give(dq.turns, turn_bytes);
        fa_scratch_give(dq.packs, pack_total);
        fa_scratch_give(dq.done, done_bytes);
    }
    free(items);
    free(acc_row);
    free(gprev);
    free(local_entries);
    free(delta);
    return status;
}

int fa_attention(const fa_problem *p) { return fa_run(p, FA_KIND_ATTENTION); }
int fa_scores(const fa_problem *p) { return fa_run(p, FA_KIND_SCORES); }
int fa_weighted_sum(const fa_problem *p) { return fa_run(p, FA_KIND_WSUM); }
