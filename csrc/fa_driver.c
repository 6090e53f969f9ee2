/*
 * fa_driver.c - runs a problem's work items on one path's tile operations:
 * the team of threads (fa_pool.h), each thread's scratch, each item's walk over its key
 * tiles (or, for the backward's dk and dv, a key block's walk over its query
 * tiles) and, for split-KV, the merge of the partial results.  Written once
 * for every path and element type (see fa_tile.h); compiled for the baseline
 * instruction set only.
 */
#include <stdlib.h>
#include <string.h>

#include "fa_pool.h"
#include "fa_tile.h"

#if defined(__SSE2__)
#include <emmintrin.h>
#endif

/* What a mask says of rows [row0, row0 + bq) and keys [k0, k0 + bk) of
 * entry e: every key hidden (the tile is skipped), none hidden and nothing
 * added (the tile runs without reading the mask), or neither.  A bool mask
 * hides with 0; a float mask hides with -inf and adds nothing with +-0. */
enum { FA_TILE_MIXED = FA_BLOCK_MIXED, FA_TILE_HIDDEN = FA_BLOCK_HIDDEN, FA_TILE_VISIBLE = FA_BLOCK_VISIBLE };

/* The same from the mask's table of block kinds (p->mask_tiles): the tile
 * is hidden (visible) if every block it touches is. */
static int fa_mask_tile_table(const fa_problem *p, const int64_t *e, int64_t row0, int64_t bq, int64_t k0,
                              int64_t bk)
{
    const int64_t lq = e[FA_E_LQ], kb0 = k0 / FA_TILE_BLOCK, kb1 = (k0 + bk - 1) / FA_TILE_BLOCK;
    int hidden = 1, visible = 1;
    for (int64_t v = row0; v < row0 + bq;) { /* one head's rows at a time */
        const int64_t head = v / lq, i0 = v % lq, i1 = fa_min64(lq, i0 + row0 + bq - v) - 1;
        const uint8_t *t = p->mask_tiles + e[FA_E_TILES] + head * p->tiles_hs;
        for (int64_t rb = i0 / FA_TILE_BLOCK; rb <= i1 / FA_TILE_BLOCK; rb++)
            for (int64_t kb = kb0; kb <= kb1; kb++) {
                const uint8_t kind = t[rb * p->tiles_rs + kb * p->tiles_cs];
                hidden &= kind == FA_BLOCK_HIDDEN;
                visible &= kind == FA_BLOCK_VISIBLE;
            }
        if (!hidden && !visible) return FA_TILE_MIXED;
        v += i1 - i0 + 1;
    }
    return hidden ? FA_TILE_HIDDEN : FA_TILE_VISIBLE;
}

/* Fold keys [0, bk) of one mask row (m: its first key's element) into
 * *hidden (every key hidden) and *visible (none hidden, nothing added). */
static inline void fa_mask_row(const fa_problem *p, const unsigned char *m, int64_t bk, int *hidden_io,
                               int *visible_io)
{
    const int64_t cs = p->mask_cs;
    int64_t j = 0;
    int hidden = *hidden_io, visible = *visible_io; /* locals: m's bytes may alias them */
    switch (p->mask_kind) {
    case FA_MASK_BOOL:
#if defined(__SSE2__)
        if (cs == 1) { /* sixteen at a time (SSE2, in every x86-64): or of the bytes, or of their == 0 */
            const __m128i zero = _mm_setzero_si128();
            __m128i any = zero, zeros = zero;
            for (; j + 16 <= bk; j += 16) {
                const __m128i x = _mm_loadu_si128((const __m128i *)(m + j));
                any = _mm_or_si128(any, x);
                zeros = _mm_or_si128(zeros, _mm_cmpeq_epi8(x, zero));
            }
            hidden &= _mm_movemask_epi8(_mm_cmpeq_epi8(any, zero)) == 0xffff;
            visible &= _mm_movemask_epi8(zeros) == 0;
        }
#endif
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
#if defined(__SSE2__)
        if (cs == 4) { /* four at a time: all -inf, all +-0 */
            const __m128i ninf = _mm_set1_epi32((int)0xff800000u), magnitude = _mm_set1_epi32(0x7fffffff);
            const __m128i zero = _mm_setzero_si128();
            __m128i all_ninf = _mm_set1_epi32(-1), all_zero = all_ninf;
            for (; j + 4 <= bk; j += 4) {
                const __m128i x = _mm_loadu_si128((const __m128i *)(m + 4 * j));
                all_ninf = _mm_and_si128(all_ninf, _mm_cmpeq_epi32(x, ninf));
                all_zero = _mm_and_si128(all_zero, _mm_cmpeq_epi32(_mm_and_si128(x, magnitude), zero));
            }
            hidden &= _mm_movemask_epi8(all_ninf) == 0xffff;
            visible &= _mm_movemask_epi8(all_zero) == 0xffff;
        }
#endif
        for (; j < bk; j++) {
            uint32_t x;
            memcpy(&x, m + j * cs, 4);
            hidden &= x == 0xff800000u;
            visible &= (x & 0x7fffffffu) == 0;
        }
        break;
    case FA_MASK_F64:
        for (; j < bk; j++) {
            uint64_t x;
            memcpy(&x, m + j * cs, 8);
            hidden &= x == 0xfff0000000000000ULL;
            visible &= (x & 0x7fffffffffffffffULL) == 0;
        }
        break;
    default: { /* FA_MASK_F16, FA_MASK_BF16: -inf is 0xfc00 / 0xff80 */
        const uint16_t ninf16 = p->mask_kind == FA_MASK_F16 ? 0xfc00u : 0xff80u;
#if defined(__SSE2__)
        if (cs == 2) { /* eight at a time: all -inf, all +-0 */
            const __m128i ninf = _mm_set1_epi16((short)ninf16), magnitude = _mm_set1_epi16(0x7fff);
            const __m128i zero = _mm_setzero_si128();
            __m128i all_ninf = _mm_set1_epi32(-1), all_zero = all_ninf;
            for (; j + 8 <= bk; j += 8) {
                const __m128i x = _mm_loadu_si128((const __m128i *)(m + 2 * j));
                all_ninf = _mm_and_si128(all_ninf, _mm_cmpeq_epi16(x, ninf));
                all_zero = _mm_and_si128(all_zero, _mm_cmpeq_epi16(_mm_and_si128(x, magnitude), zero));
            }
            hidden &= _mm_movemask_epi8(all_ninf) == 0xffff;
            visible &= _mm_movemask_epi8(all_zero) == 0xffff;
        }
#endif
        for (; j < bk; j++) {
            uint16_t x;
            memcpy(&x, m + j * cs, 2);
            hidden &= x == ninf16;
            visible &= (x & 0x7fffu) == 0;
        }
        break;
    }
    }
    *hidden_io = hidden;
    *visible_io = visible;
}

static int fa_mask_tile(const fa_problem *p, const int64_t *e, int64_t row0, int64_t bq, int64_t k0, int64_t bk)
{
    if (p->mask_tiles) return fa_mask_tile_table(p, e, row0, bq, k0, bk);
    /* rows that share one mask row (a mask broadcast over rows and heads) are read once */
    const int64_t rows = p->mask_rs == 0 && (p->mask_hs == 0 || p->group == 1) ? 1 : bq;
    int hidden = 1, visible = 1;
    fa_vrow at = fa_vrow_at(row0, e[FA_E_LQ]);
    for (int64_t r = 0; r < rows; r++, fa_vrow_next(&at)) {
        fa_mask_row(p,
                    (const unsigned char *)p->mask + e[FA_E_MASK] + fa_vrow_bytes(&at, p->mask_rs, p->mask_hs) +
                        k0 * p->mask_cs,
                    bk, &hidden, &visible);
        if (!hidden && !visible) return FA_TILE_MIXED;
    }
    return hidden ? FA_TILE_HIDDEN : FA_TILE_VISIBLE;
}

/* What the members of a team classifying shared mask blocks share. */
typedef struct {
    const fa_problem *p;
    const int64_t *distinct;
    uint8_t *tables;
    int64_t n, per, nk, lq, lk; /* n: stripes (distinct masks x block rows); per = block rows x nk */
    int64_t next;
} fa_tables_run;

static void fa_tables_member(void *arg, fa_team *team, int member)
{
    (void)team, (void)member;
    fa_tables_run *r = (fa_tables_run *)arg;
    const fa_problem *p = r->p;
    const int64_t nq = r->per / r->nk;
    /* a stripe of block rows at a time, its mask rows read in address
     * order (reading a block's rows in turn, lk apart, runs at half the
     * bandwidth), each block's possible kinds in its table byte
     * (FA_TILE_HIDDEN | FA_TILE_VISIBLE bits, as the enum's values are)
     * until every block is mixed */
    for (int64_t u; (u = fa_team_next(&r->next, 1, r->n)) >= 0;) {
        const int64_t d = u / nq, r0 = u % nq * FA_TILE_BLOCK;
        uint8_t *t = r->tables + d * r->per + u % nq * r->nk;
        /* one row stands for all rows when the mask's rows broadcast (likewise keys) */
        const int64_t bq = p->mask_rs == 0 ? 1 : fa_min64(FA_TILE_BLOCK, r->lq - r0);
        const int64_t bk = p->mask_cs == 0 ? 1 : FA_TILE_BLOCK;
        const unsigned char *m = (const unsigned char *)p->mask + r->distinct[d] + r0 * p->mask_rs;
        int64_t open = r->nk;
        memset(t, FA_TILE_HIDDEN | FA_TILE_VISIBLE, (size_t)r->nk);
        for (int64_t i = 0; i < bq && open > 0; i++, m += p->mask_rs)
            for (int64_t kb = 0; kb < r->nk; kb++) {
                if (!t[kb]) continue;
                int hidden = (t[kb] & FA_TILE_HIDDEN) != 0, visible = (t[kb] & FA_TILE_VISIBLE) != 0;
                const int64_t k0 = kb * bk;
                fa_mask_row(p, m + k0 * p->mask_cs, fa_min64(bk, r->lk - k0), &hidden, &visible);
                t[kb] = (uint8_t)((hidden ? FA_TILE_HIDDEN : 0) | (visible ? FA_TILE_VISIBLE : 0));
                open -= !t[kb];
            }
        for (int64_t kb = 0; kb < r->nk; kb++) /* none left: mixed (a block cannot be both) */
            t[kb] = t[kb] == 0 ? FA_TILE_MIXED : t[kb] & FA_TILE_HIDDEN ? FA_TILE_HIDDEN : FA_TILE_VISIBLE;
    }
}

/* A mask that several entries share (broadcast over batch or heads) is
 * classified once per call instead of once per entry: a table of block
 * kinds for each distinct mask (as fastattn.block_mask builds), in a copy
 * of the problem (*local, with its own entry table *entries and the tables
 * *tables, both to free).  Returns 1 if it built them, 0 if not worth it
 * (no mask, a table already, masks not shared, differing lengths, per-head
 * masks within groups), -1 if out of memory. */
int fa_shared_mask_tables(const fa_problem *p, int num_threads, fa_problem *local, int64_t **entries,
                          uint8_t **tables)
{
    enum { MAX_DISTINCT = 64 };
    if (p->mask_kind == FA_MASK_NONE || p->mask_tiles || p->n_entries < 2 || (p->group > 1 && p->mask_hs != 0))
        return 0;
    int64_t distinct[MAX_DISTINCT], n_distinct = 0;
    const int64_t *e0 = p->entries;
    for (int64_t i = 0; i < p->n_entries; i++) {
        const int64_t *e = p->entries + i * FA_ENTRY_FIELDS;
        if (e[FA_E_LQ] != e0[FA_E_LQ] || e[FA_E_LK] != e0[FA_E_LK]) return 0;
        int64_t d = 0;
        while (d < n_distinct && distinct[d] != e[FA_E_MASK]) d++;
        if (d == n_distinct) {
            if (n_distinct == MAX_DISTINCT || 2 * (n_distinct + 1) > p->n_entries) return 0; /* shared by few */
            distinct[n_distinct++] = e[FA_E_MASK];
        }
    }
    const int64_t lq = e0[FA_E_LQ], lk = e0[FA_E_LK];
    const int64_t nq = p->mask_rs == 0 ? 1 : (lq + FA_TILE_BLOCK - 1) / FA_TILE_BLOCK;
    const int64_t nk = p->mask_cs == 0 ? 1 : (lk + FA_TILE_BLOCK - 1) / FA_TILE_BLOCK, per = nq * nk;
    if (lq == 0 || lk == 0) return 0;
    *tables = (uint8_t *)malloc((size_t)(n_distinct * per));
    *entries = (int64_t *)malloc((size_t)p->n_entries * FA_ENTRY_FIELDS * sizeof(int64_t));
    if (!*tables || !*entries) { /* the caller frees both whatever this returns */
        free(*tables);
        free(*entries);
        *tables = NULL;
        *entries = NULL;
        return -1;
    }
    fa_tables_run r = {p, distinct, *tables, n_distinct * nq, per, nk, lq, lk, 0}; /* a stripe each */
    fa_parallel(num_threads, fa_tables_member, &r);
    memcpy(*entries, p->entries, (size_t)p->n_entries * FA_ENTRY_FIELDS * sizeof(int64_t));
    for (int64_t i = 0; i < p->n_entries; i++) {
        int64_t *e = *entries + i * FA_ENTRY_FIELDS, d = 0;
        while (distinct[d] != e[FA_E_MASK]) d++;
        e[FA_E_TILES] = d * per;
    }
    *local = *p;
    local->entries = *entries;
    local->mask_tiles = *tables;
    local->tiles_rs = nq > 1 ? nk : 0;
    local->tiles_cs = nk > 1 ? 1 : 0;
    local->tiles_hs = 0;
    return 1;
}

/* Where key j of entry e lies: its page (0 unless k and v are paged) and
 * its row within that page. */
static inline void fa_key_place(const fa_problem *p, const int64_t *e, int64_t j, int64_t *page, int64_t *row)
{
    *page = 0;
    *row = j;
    if (p->pages) {
        *page = fa_page_of(p, e, j);
        *row = j % p->page_size;
    }
}

/* Byte offsets in k and in v of row `row` of page `page` of entry e
 * (fa_key_place). */
static inline void fa_key_offsets(const fa_problem *p, const int64_t *e, int64_t page, int64_t row, int64_t *ko,
                                  int64_t *vo)
{
    *ko = e[FA_E_K] + page * p->k_ps + row * p->k_rs;
    *vo = e[FA_E_V] + page * p->v_ps + row * p->v_rs;
}

/* Paged k and v: rebase the k and v offsets (and their scales') of ev, a
 * copy of entry e, onto the entry's page pi (its keys pi * page_size ..),
 * so that the tile operations find key j of that page at e[FA_E_K] + j *
 * k_rs (and so on). */
static void fa_page_rebase(const fa_problem *p, const int64_t *e, int64_t pi, int64_t *ev)
{
    const int64_t first = pi * p->page_size, page = p->pages[e[FA_E_PAGES] + pi];
    ev[FA_E_K] = e[FA_E_K] + page * p->k_ps - first * p->k_rs;
    ev[FA_E_V] = e[FA_E_V] + page * p->v_ps - first * p->v_rs;
    ev[FA_E_KS] = e[FA_E_KS] + page * p->ks_ps - first * p->ks_rs;
    ev[FA_E_VS] = e[FA_E_VS] + page * p->vs_ps - first * p->vs_rs;
}

/* A copy ev of entry e rebased onto the page of its key k0. */
static void fa_page_view(const fa_problem *p, const int64_t *e, int64_t k0, int64_t *ev)
{
    memcpy(ev, e, FA_ENTRY_FIELDS * sizeof *ev);
    fa_page_rebase(p, e, k0 / p->page_size, ev);
}

/* Ask for the K and V scales of rows row .. row + n - 1 of page `page` of
 * entry e (fa_key_place) in an 8-bit cache: each row's scales, all heads'
 * side by side in a bundle, lie ks_rs (vs_rs) bytes apart.  Always inlined
 * (see prefetch_row in fa_tile_impl.h: GCC deletes calls to a function that
 * only prefetches). */
static inline __attribute__((always_inline)) void fa_prefetch_scales(const fa_problem *p, const int64_t *e,
                                                                     int64_t page, int64_t row, int64_t n)
{
    if (!p->k_scales || n <= 0) return;
    const char *ks = (const char *)p->k_scales + e[FA_E_KS] + page * p->ks_ps + row * p->ks_rs;
    const char *vs = (const char *)p->v_scales + e[FA_E_VS] + page * p->vs_ps + row * p->vs_rs;
    for (int64_t b = 0; b < n * p->ks_rs; b += 64) __builtin_prefetch(ks + b, 0, 2);
    for (int64_t b = 0; b < n * p->vs_rs; b += 64) __builtin_prefetch(vs + b, 0, 2);
}

/* How far ahead a bundle's prefetch may reach, in bytes of K and V rows,
 * and the longest rows (K and V, all its entries) a bundle prefetches. */
#define FA_PREFETCH_BYTES (256 * 1024)
#define FA_PREFETCH_ROW_BYTES 4096

/* Tiles of a bundle whose rows are longer than FA_PREFETCH_ROW_BYTES hold
 * at most this many keys, or where a tile comes in segments, its segments
 * do: each entry's pass over a tile (segment) reads a slice of
 * every K and V row, one 4 KiB page per row, and the hardware prefetchers
 * follow a few tens of pages at a time (Intel's L2 streamer 32).  On a
 * Cascade Lake Xeon a float32 bundle of 8 heads of 128 (8 KB rows), one
 * sequence paged in blocks of 32: 0.75-0.87 of the time with tiles of 16
 * keys instead of 32, 0.75 for 16 sequences; tiles of 8: 0.90-1.15 of 16's;
 * tiles of 64 in segments of 16 (options and softmax once per 64 keys):
 * 0.94-0.98 of tiles of 16. */
#define FA_WIDE_BUNDLE_KEYS 16

/* Segments (pages) a decoding tile may span (fa_attention_item). */
#define FA_TILE_SEGS 8

/* A segment of a bundle's decoding tile holds at most this many bytes of
 * its K and V rows (all its entries), a page of more keys coming in several
 * segments.  On a Cascade Lake Xeon (16384 keys, 2 threads), against whole
 * pages as segments: a bfloat16 bundle of 8 heads of 128 (4 KB per key) in
 * pages of 32-128 0.69-0.81 of the time, an int8 one (2 KB) in pages of 64
 * and 128 0.84-0.90, a float32 one of 8 heads of 64 (4 KB) 0.78-0.82; half
 * as many bytes were 1.00-1.10 times slower than these. */
#define FA_SEGMENT_BYTES (64 * 1024)

/* Bytes of an element of each storage type. */
static const int64_t fa_dtype_bytes[FA_KV_DTYPE_COUNT] = {[FA_F32] = 4, [FA_F64] = 8, [FA_F16] = 2, [FA_BF16] = 2,
                                                         [FA_I8] = 1, [FA_E4M3] = 1, [FA_E5M2] = 1};

/* Does a thread gather the key tiles of this problem's prefill items into
 * contiguous rows (fa_attention_item)?  When k and v are paged, or their
 * rows lie further apart than their length (the heads of packed sequences
 * side by side): read in place, rows a power of two apart fall into a few
 * cache sets; elements of a row must be contiguous.  (Rows stored in
 * another type than q's are converted tile by tile anyway.) */
int fa_gathers(const fa_problem *p, int kind)
{
    const int64_t es = fa_dtype_bytes[p->kv_dtype];
    return kind == FA_KIND_ATTENTION && p->kv_dtype == p->dtype && p->k_cs == es && p->v_cs == es &&
           (p->pages || p->k_rs != p->d * es || p->v_rs != p->dv * es);
}

/* Fused attention over the keys of item `it`: its members are the entries
 * of its bundle (fa_item.bundle; one entry but for decoding from packed or
 * paged caches), rows [row0, row0 + bq) of each, or the query tiles of its
 * tile group (fa_item.tiles: rows row0 + m * FA_BQ ..), member m on scratch
 * w[m].  A split-KV item writes its unnormalised rows to its slots.  With
 * paged k and v a tile of a decoding item spans up to FA_TILE_SEGS pages,
 * in segments (at least one per page, each run on the entries rebased onto
 * its page: fa_page_rebase) that share the tile's options and softmax, as
 * does a decoding bundle's tile over packed sequences; a tile of a
 * prefill item, whose rows are read many times over, is gathered from its
 * pages or strided rows into `gather` (when fa_gathers: FA_BK rows of k,
 * then of v), once for every member, and read there, or else ends at its
 * page. */
static void fa_attention_item(const fa_problem *p, const fa_tile_ops *ops, const fa_item *it, void *const *w,
                              char *slots, int64_t slot_rows, int64_t slot_bytes, char *gather)
{
    const int nb = it->bundle, nm = it->bundle * it->tiles; /* one of them is 1 */
    const int64_t *e = p->entries + it->entry * FA_ENTRY_FIELDS; /* the bundle's first entry */
    const int64_t lq = e[FA_E_LQ], lk = e[FA_E_LK], rows = p->group * lq;
    const int softmax = p->weights == FA_WEIGHTS_SOFTMAX;
    int64_t row0[FA_BUNDLE_MAX] = {0}, bq[FA_BUNDLE_MAX] = {0}, mhi[FA_BUNDLE_MAX] = {0}, klo = 0, khi = 0, unused;
    for (int m = 0; m < nm; m++) { /* each member's rows and keys (a group's begin at one key) */
        row0[m] = it->row0 + (nb > 1 ? 0 : m * FA_BQ);
        bq[m] = fa_min64(FA_BQ, rows - row0[m]);
        int64_t lo;
        fa_block_range(p, lq, lk, row0[m], bq[m], &lo, &mhi[m], &unused, &unused);
        mhi[m] = fa_min64(mhi[m], it->k_hi);
        if (m == 0) klo = fa_max64(lo, it->k_lo);
        khi = fa_max64(khi, mhi[m]);
    }
    const int few = bq[0] <= ops->rows_max;
    const int paged = p->pages != NULL;
    int64_t ev[FA_BUNDLE_MAX][FA_ENTRY_FIELDS];
    const int64_t *te[FA_BUNDLE_MAX]; /* the entries as the tile operations see them */
    for (int m = 0; m < nm; m++) {
        te[m] = e + (nb > 1 ? m : 0) * FA_ENTRY_FIELDS;
        if (paged && klo < khi) { /* begin on the first page: where its rows sit within a vector holds for all */
            fa_page_view(p, te[m], klo, ev[m]);
            te[m] = ev[m];
        }
        ops->attn_begin(p, te[m], w[m], row0[m], bq[m]);
    }
    /* gathered tiles: the tile operations read a problem whose k and v are
     * the gathered rows, tile row j at offset 0 + (k0 + j) * rs of entry gv */
    const int gathered = !few && gather != NULL;
    const int64_t es = fa_dtype_bytes[p->kv_dtype], kb = p->d * es, vb = p->dv * es;
    fa_problem packed;
    int64_t gv[FA_ENTRY_FIELDS];
    const fa_problem *base = p;
    if (gathered) {
        packed = *p;
        packed.pages = NULL;
        packed.k = gather;
        packed.v = gather + FA_BK * kb;
        packed.k_rs = kb;
        packed.v_rs = vb;
        base = &packed;
        memcpy(gv, e, sizeof gv);
    }
    /* a mask is read per tile first: tiles it hides entirely are skipped,
     * tiles it leaves alone run as if unmasked (no bundle has a mask) */
    const int masked = p->mask_kind != FA_MASK_NONE;
    fa_problem unmasked;
    if (masked) {
        unmasked = *base;
        unmasked.mask_kind = FA_MASK_NONE;
    }
    /* decoding streams K and V once: ask for the rows two tiles ahead (one
     * is too late to hide the memory latency); a bundle, whose first entry
     * asks for the whole rows, two of its tiles (segments) ahead but at most
     * FA_PREFETCH_BYTES, and only while its rows are at most
     * FA_PREFETCH_ROW_BYTES of K and V: a float32 bundle of 8 heads of 128
     * (8 KB rows) ran 3-11% slower paged with the requests than without
     * (it streams whole rows in address order, which the hardware
     * prefetchers follow), an int8 one (2 KB) a quarter faster. */
    const int64_t *last = e + (nb - 1) * FA_ENTRY_FIELDS;
    const int64_t pf_kb = last[FA_E_K] - e[FA_E_K] + p->d * p->k_cs, pf_vb = last[FA_E_V] - e[FA_E_V] + p->dv * p->v_cs;
    const int wide = nb > 1 && pf_kb + pf_vb > FA_PREFETCH_ROW_BYTES; /* FA_WIDE_BUNDLE_KEYS at a time */
    /* decoding tiles come in segments, paged (spanning pages) or of a bundle */
    const int segmented = few && ops->tile_segments && (paged || nb > 1);
    const int64_t tile = !few ? FA_BK : wide && !segmented ? fa_min64(ops->rows_tile, FA_WIDE_BUNDLE_KEYS)
                                                           : ops->rows_tile;
    /* the most keys of a segment (paged: of a page) */
    const int64_t seg_keys = wide        ? FA_WIDE_BUNDLE_KEYS
                             : segmented ? fa_max64(1, FA_SEGMENT_BYTES / fa_max64(1, pf_kb + pf_vb))
                             : paged     ? p->page_size
                                         : tile;
    int64_t pf_ahead = 2 * FA_BK;
    if (nb > 1) {
        const int64_t step = fa_min64(tile, seg_keys);
        pf_ahead = fa_max64(step, fa_min64(2 * step, FA_PREFETCH_BYTES / fa_max64(1, pf_kb + pf_vb)));
    }
    const int prefetch = few && !wide;
    const fa_prefetch_plan pf_none = {NULL, NULL, 0, 0, 0, 0, 0};
    /* member m asks for its share of each row (whole cache lines), so that
     * the requests are spread over the bundle's work */
    const int64_t ks = fa_roundup64(pf_kb, 64 * nm) / nm, vs = fa_roundup64(pf_vb, 64 * nm) / nm;
    for (int64_t k0 = klo, bk; k0 < khi; k0 += bk) {
        bk = fa_min64(tile, khi - k0);
        /* the tile's segments: at least one per page it meets (a decoding
         * tile may span FA_TILE_SEGS pages, in segments of at most
         * FA_SEGMENT_BYTES of K and V rows; a wide bundle's segments hold at
         * most FA_WIDE_BUNDLE_KEYS keys; a prefill tile is one), each run on
         * the entries rebased onto its page; unpaged, a bundle's tile comes
         * in segments alike, any other is one */
        int nseg = 1;
        int64_t s0[FA_TILE_SEGS] = {k0}, sn[FA_TILE_SEGS] = {bk}, spi[FA_TILE_SEGS] = {0};
        if ((paged && !gathered) || segmented) {
            nseg = 0;
            const int segs = segmented ? FA_TILE_SEGS : 1;
            for (int64_t k = k0; k < k0 + bk && nseg < segs; k += sn[nseg++]) {
                const int64_t pi = paged ? k / p->page_size : 0;
                s0[nseg] = k;
                spi[nseg] = pi;
                sn[nseg] = fa_min64((paged ? fa_min64(k0 + bk, (pi + 1) * p->page_size) : k0 + bk) - k, seg_keys);
            }
            bk = s0[nseg - 1] + sn[nseg - 1] - k0;
        }
        /* each member's keys of the tile (a group's last tiles end before others)
         * and what its mask makes of them */
        const fa_problem *tp[FA_BUNDLE_MAX];
        int64_t mbk[FA_BUNDLE_MAX];
        int any = 0;
        for (int m = 0; m < nm; m++) {
            mbk[m] = fa_min64(bk, mhi[m] - k0);
            tp[m] = base;
            if (mbk[m] > 0 && masked) {
                const int kind = fa_mask_tile(p, e, row0[m], bq[m], k0, mbk[m]);
                if (kind == FA_TILE_HIDDEN) mbk[m] = 0;
                if (kind == FA_TILE_VISIBLE) tp[m] = &unmasked;
            }
            any |= mbk[m] > 0;
        }
        if (!any) continue;
        if (gathered) {
            for (int64_t j = 0; j < bk; j++) {
                int64_t page, row, ko, vo;
                fa_key_place(p, e, k0 + j, &page, &row);
                fa_key_offsets(p, e, page, row, &ko, &vo);
                memcpy(gather + j * kb, (const char *)p->k + ko, (size_t)kb);
                memcpy(gather + FA_BK * kb + j * vb, (const char *)p->v + vo, (size_t)vb);
            }
            gv[FA_E_K] = -k0 * kb;
            gv[FA_E_V] = -k0 * vb;
            for (int m = 0; m < nm; m++) te[m] = gv;
        }
        /* scores segment by segment, each for every member in turn (as the
         * rows of a bundle lie in memory), then each member's options and
         * weights, then P.V in the same order as the scores */
        for (int g = 0; g < nseg; g++) {
            const int64_t pf0 = s0[g] + pf_ahead;
            int64_t pf_n = prefetch ? fa_max64(0, fa_min64(nb > 1 ? sn[g] : FA_BK, khi - pf0)) : 0;
            int64_t pf_k = 0, pf_v = 0;
            if (pf_n > 0) {
                int64_t page, row;
                fa_key_place(p, e, pf0, &page, &row);
                fa_key_offsets(p, e, page, row, &pf_k, &pf_v);
                if (paged) pf_n = fa_min64(pf_n, p->page_size - row); /* up to its page's end */
                fa_prefetch_scales(p, e, page, row, pf_n);
            }
            for (int m = 0; m < nm; m++) {
                const int64_t n = fa_min64(sn[g], k0 + mbk[m] - s0[g]);
                if (n <= 0) continue;
                if (paged && !gathered) fa_page_rebase(p, e + (nb > 1 ? m : 0) * FA_ENTRY_FIELDS, spi[g], ev[m]);
                const fa_prefetch_plan pf = {(const char *)p->k + pf_k + m * ks, (const char *)p->v + pf_v + m * vs,
                                             p->k_rs, p->v_rs, fa_min64(ks, pf_kb - m * ks),
                                             fa_min64(vs, pf_vb - m * vs), pf_n};
                ops->attn_score_tile(tp[m], te[m], w[m], row0[m], bq[m], s0[g], n, s0[g] - k0,
                                     pf_n > 0 ? &pf : &pf_none);
            }
        }
        for (int m = 0; m < nm; m++)
            if (mbk[m] > 0) {
                ops->attn_options_tile(tp[m], te[m], w[m], row0[m], bq[m], k0, mbk[m]);
                ops->weights_tile(w[m], softmax, bq[m], mbk[m]);
                if (p->dropout_p > 0) ops->dropout_tile(tp[m], te[m], w[m], row0[m], bq[m], k0, mbk[m]);
            }
        for (int g = 0; g < nseg; g++)
            for (int m = 0; m < nm; m++) {
                const int64_t n = fa_min64(sn[g], k0 + mbk[m] - s0[g]);
                if (n <= 0) continue;
                if (paged && !gathered && nseg > 1)
                    fa_page_rebase(p, e + (nb > 1 ? m : 0) * FA_ENTRY_FIELDS, spi[g], ev[m]);
                ops->attn_pv_tile(tp[m], te[m], w[m], bq[m], s0[g], n, s0[g] - k0);
            }
    }
    for (int m = 0; m < nm; m++) {
        if (it->part >= 0)
            ops->store_partial(p, w[m], bq[m], slot_rows, slots + (it->part + (int64_t)m * it->nsplit) * slot_bytes);
        else
            ops->store_rows(p, e + (nb > 1 ? m : 0) * FA_ENTRY_FIELDS, w[m], row0[m], bq[m], softmax);
    }
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

/* The pack of query tile [row0, row0 + FA_BQ) of entry `entry` (bwd_pack). */
static inline char *fa_bwd_pack_of(const fa_bwd_dq *dq, int64_t entry, int64_t row0)
{
    return dq->packs + (dq->tile0[entry] + row0 / FA_BQ) * dq->pack_bytes;
}

/* The query tiles an entry's key block must have passed before the same
 * key block of an entry that shares its mask gradient adds the tile of
 * rows [row0, row0 + bq) (fa_bwd_keys_item): every tile that adds to a
 * gradient row these rows add to.  Rows that share one gradient row (a row
 * stride of 0): all tiles; heads that share theirs (a head stride of 0):
 * the tiles up to the last head's row of the tile's last position; else
 * the same tile. */
static int64_t fa_bwd_gmask_after(const fa_problem *p, int64_t lq, int64_t row0, int64_t bq)
{
    const int64_t rows = p->group * lq;
    if (p->gmask_rs == 0) return (rows + FA_BQ - 1) / FA_BQ;
    if (p->gmask_hs == 0 && p->group > 1) {
        const fa_vrow first = fa_vrow_at(row0, lq);
        const int64_t last = first.i + bq > lq ? lq - 1 : first.i + bq - 1; /* the tile's last position */
        return ((p->group - 1) * lq + last) / FA_BQ + 1;
    }
    return row0 / FA_BQ + 1;
}

/* Backward, key block k0 / FA_BK of entry `entry`: its dk and dv rows summed
 * over every query tile of the entry (all heads of a group) that sees them,
 * in order, by this one item, so no other item writes these rows; and each
 * such tile's dS K added to the tile's dq accumulator when its turn comes
 * (after the entry's earlier key blocks, so the sums do not depend on the
 * thread count), the last block storing the tile's dq.  A mask's gradient
 * that an earlier entry shares gets the tile's dS once that entry's item
 * for the same key block has passed the tile.  An item left undone (no
 * memory for a member's scratch) sets *status, and the items waiting for
 * its turns give up. */
static void fa_bwd_keys_item(const fa_problem *p, const fa_tile_ops *ops, const fa_bwd_dq *dq, const int *status,
                             int64_t entry, void *w, int64_t k0)
{
    const int64_t *e = p->entries + entry * FA_ENTRY_FIELDS;
    const int64_t lq = e[FA_E_LQ], lk = e[FA_E_LK], rows = p->group * lq, bk = fa_min64(FA_BK, lk - k0);
    const int64_t j = k0 / FA_BK, ld = dq->ld, row_bytes = ld * dq->elem_bytes;
    char *acc = dq->acc + dq->acc_row[entry] * row_bytes;
    int64_t *turns = dq->turns + dq->tile0[entry];
    /* a shared mask gradient: the tiles this item has passed, and those of the entry before it */
    const int64_t prev = dq->gprev ? dq->gprev[entry] : -1;
    int64_t *done = dq->gprev ? dq->done + dq->kb0[entry] + j : NULL;
    const int64_t *before = prev >= dq->entry0 ? dq->done + dq->kb0[prev] + j : NULL;
    ops->bwd_keys_begin(p, e, w, k0, bk);
    for (int64_t row0 = 0; row0 < rows; row0 += FA_BQ) {
        const int64_t bq = fa_min64(FA_BQ, rows - row0), ti = row0 / FA_BQ;
        int64_t first, last;
        fa_bwd_visits(p, lq, lk, row0, bq, &first, &last);
        if (j < first || j > last) {
            if (done) __atomic_store_n(done, ti + 1, __ATOMIC_RELEASE);
            continue;
        }
        if (before && !fa_team_wait(before, fa_bwd_gmask_after(p, lq, row0, bq), status)) return;
        ops->bwd_keys_tile(p, e, w, row0, bq, k0, bk, fa_bwd_pack_of(dq, entry, row0), dq->add_gmask);
        if (done) __atomic_store_n(done, ti + 1, __ATOMIC_RELEASE);
        int64_t *turn = turns + row0 / FA_BQ;
        char *tile = acc + row0 * row_bytes; /* the tile's dq accumulator */
        if (!fa_team_wait(turn, j - first, status)) return;
        if (j == first) memset(tile, 0, (size_t)(bq * row_bytes));
        ops->bwd_keys_dq(w, bq, bk, tile, ld);
        if (j == last) ops->bwd_dq_store(p, e, tile, ld, row0, bq);
        __atomic_store_n(turn, j - first + 1, __ATOMIC_RELEASE);
    }
    ops->bwd_keys_store(p, e, w, k0, bk);
}

/* What the members of a team running fa_run_items share. */
typedef struct {
    const fa_problem *p;
    const fa_tile_ops *ops;
    const fa_item *items;
    int64_t n_items, n_parts, slot_rows, slot_bytes;
    char *slots;
    int32_t *splits_done; /* split-KV: splits finished, at the first slot of each entry's (bundle's) row block */
    const fa_bwd_dq *dq;  /* the backward's dq accumulators */
    int kind;
    int status;
    int64_t next; /* the items handed out */
} fa_run;

/* Split-KV: the member that finishes the last split of an item's rows
 * merges their partials (in split order, so the result does not depend on
 * who merges).  No barrier: a member that never starts holds nobody up. */
static void fa_merge_if_last(const fa_run *r, const fa_item *it, void *w)
{
    const int64_t first = it->part - it->split;
    if (__atomic_add_fetch(&r->splits_done[first], 1, __ATOMIC_ACQ_REL) != it->nsplit) return;
    const fa_problem *p = r->p;
    for (int b = 0; b < it->bundle; b++) {
        const int64_t *e = p->entries + (it->entry + b) * FA_ENTRY_FIELDS;
        const int64_t bq = fa_min64(FA_BQ, p->group * e[FA_E_LQ] - it->row0);
        r->ops->merge_rows(p, e, w, r->slots, r->slot_rows, first + (int64_t)b * it->nsplit, it->nsplit, it->row0,
                           bq);
    }
}

static void fa_run_member(void *arg, fa_team *team, int member)
{
    (void)team, (void)member;
    const fa_fpmode mode = fa_flush_subnormals();
    fa_run *r = (fa_run *)arg;
    const fa_problem *p = r->p;
    const fa_tile_ops *ops = r->ops;
    const fa_item *items = r->items;
    const int kind = r->kind;
    const int bwd = kind == FA_KIND_BWD;
    const int bare = kind == FA_KIND_BWD_DELTA || kind == FA_KIND_BWD_PACK; /* items that need no scratch */
    /* scratch of entry 0, and of the other entries of bundles as they come */
    void *w[FA_BUNDLE_MAX] = {bare ? NULL : bwd ? ops->bwd_scratch_new(p) : ops->scratch_new(p)};
    int n_w = w[0] != NULL;
    char *gather = NULL;
    size_t gather_bytes = 0;
    if (fa_gathers(p, kind)) {
        const int64_t es = fa_dtype_bytes[p->kv_dtype];
        gather_bytes = (size_t)(FA_BK * (p->d + p->dv) * es + 1);
        gather = (char *)fa_scratch_take(&gather_bytes);
        if (!gather) n_w = 0;
    }
    for (int64_t t; (t = fa_team_next(&r->next, 1, r->n_items)) >= 0;) {
        const int members = items[t].bundle * items[t].tiles; /* scratch for each */
        for (; n_w > 0 && n_w < members; n_w++)
            if (!(w[n_w] = ops->scratch_new(p))) break;
        if (!bare && (n_w < members || n_w == 0)) {
            __atomic_store_n(&r->status, FA_ERR_NOMEM, __ATOMIC_RELAXED);
            continue;
        }
        const int64_t *e = p->entries + items[t].entry * FA_ENTRY_FIELDS;
        const int64_t row0 = items[t].row0, bq = fa_min64(FA_BQ, p->group * e[FA_E_LQ] - row0);
        switch (kind) {
        case FA_KIND_ATTENTION:
            fa_attention_item(p, ops, &items[t], w, r->slots, r->slot_rows, r->slot_bytes, gather);
            if (items[t].part >= 0) fa_merge_if_last(r, &items[t], w[0]);
            break;
        case FA_KIND_SCORES: fa_scores_item(p, ops, e, w[0], row0, bq); break;
        case FA_KIND_WSUM: fa_wsum_item(p, ops, e, w[0], row0, bq); break;
        case FA_KIND_BWD_DELTA: ops->bwd_delta(p, e, row0, bq); break;
        case FA_KIND_BWD_PACK: ops->bwd_pack(p, e, row0, bq, fa_bwd_pack_of(r->dq, items[t].entry, row0)); break;
        default: fa_bwd_keys_item(p, ops, r->dq, &r->status, items[t].entry, w[0], row0); break;
        }
    }
    for (int b = 0; b < FA_BUNDLE_MAX && w[b]; b++) (bwd && b == 0 ? ops->bwd_scratch_free : ops->scratch_free)(w[b]);
    fa_scratch_give(gather, gather_bytes);
    fa_restore_fpmode(mode);
}

int fa_run_items(const fa_problem *p, int kind, const fa_item *items, int64_t n_items, int64_t n_parts,
                 int num_threads, const fa_tile_ops *ops, const fa_bwd_dq *dq)
{
    if (n_items <= 0) return FA_OK;
    fa_run r = {p, ops, items, n_items, n_parts, 0, 0, NULL, NULL, dq, kind, FA_OK, 0};
    size_t slots_bytes = 0;
    if (n_parts > 0) {
        /* a partial slot: as many rows as the largest split item has (a
         * decoding head's few, not FA_BQ), then their max and sum */
        for (int64_t t = 0; t < n_items; t++)
            if (items[t].part >= 0) {
                const int64_t *e = p->entries + items[t].entry * FA_ENTRY_FIELDS;
                r.slot_rows = fa_max64(r.slot_rows, fa_min64(FA_BQ, p->group * e[FA_E_LQ] - items[t].row0));
            }
        r.slot_bytes = r.slot_rows * (fa_roundup64(p->dv, ops->width) + 2) * ops->elem_bytes;
        /* the partial slots, then a count of finished splits per slot */
        const uint64_t per_part = (uint64_t)r.slot_bytes + sizeof(int32_t);
        if ((uint64_t)n_parts > (uint64_t)SIZE_MAX / per_part) return FA_ERR_NOMEM;
        slots_bytes = (size_t)(n_parts * (int64_t)per_part);
        r.slots = (char *)fa_scratch_take(&slots_bytes);
        if (!r.slots) return FA_ERR_NOMEM;
        r.splits_done = (int32_t *)(r.slots + n_parts * r.slot_bytes);
        memset(r.splits_done, 0, (size_t)n_parts * sizeof(int32_t));
    }
    fa_parallel(num_threads, fa_run_member, &r);
    fa_scratch_give(r.slots, slots_bytes);
    return r.status;
}
