/*
 * fa_path_avx512bf16.c - the AVX-512 path with AVX512-BF16 (x86-64 only):
 * bfloat16 attention whose products run on vdpbf16ps (fa_tile_bf16dp.h).
 * The other element types on this path use the AVX-512 path's tables
 * (fa_dispatch.c).
 * Compiled for that instruction set through a target pragma and only called
 * once the dispatcher has checked CPUID and XGETBV.  No static initialisers.
 */
#include "fa_tile.h"

#if FA_HAVE_X86_PATHS

#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx512bf16,avx2,fma,f16c"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512dq,avx512vl,avx512bf16,avx2,fma,f16c")
#endif

#include <stdint.h>

#define FA_VEC_ISA 2
#define FA_PATH_NAME avx512bf16
#define FA_T float
#define FA_T_IS_FLOAT 1
#define FA_S uint16_t
#define FA_S_KIND 2
#define FA_SUFFIX FA_CAT(bf16, FA_PATH_NAME)
#define FA_TILE_EXTRA "fa_tile_bf16dp.h"
#include "fa_vec.h"
#include "fa_tile_impl.h"

/* bfloat16 attention on vdpbf16ps: the template's bfloat16 operations
 * (compiled here for this instruction set) with fa_tile_bf16dp.h's in place
 * of begin, score tile and P.V; decoding items take 16 keys per tile
 * (interleaving K and V reads more finely measured faster). */
const fa_tile_ops fa_ops_bf16_avx512bf16 = {
    .name = "bf16_avx512bf16", .elem_bytes = sizeof(float), .width = fa_width_bf16_avx512bf16,
    .rows_max = fa_rows_max_bf16_avx512bf16, .rows_tile = 16,
    .scratch_new = fa_scratch_new_bf16_avx512bf16,
    .scratch_free = fa_scratch_free_bf16_avx512bf16,
    .attn_begin = fa_attn_begin_dp_bf16_avx512bf16,
    .attn_score_tile = fa_attn_score_tile_dp_bf16_avx512bf16,
    .attn_options_tile = fa_attn_options_tile_bf16_avx512bf16,
    .weights_tile = fa_weights_tile_bf16_avx512bf16,
    .dropout_tile = fa_dropout_tile_bf16_avx512bf16,
    .attn_pv_tile = fa_attn_pv_tile_dp_bf16_avx512bf16,
    .store_rows = fa_store_rows_bf16_avx512bf16,
    .store_partial = fa_store_partial_bf16_avx512bf16,
    .merge_rows = fa_merge_rows_bf16_avx512bf16,
    .scores_begin = fa_scores_begin_bf16_avx512bf16,
    .scores_tile = fa_scores_tile_bf16_avx512bf16,
    .wsum_begin = fa_wsum_begin_bf16_avx512bf16,
    .wsum_tile = fa_wsum_tile_bf16_avx512bf16,
    .bwd_pack_bytes = fa_bwd_pack_bytes_bf16_avx512bf16,
    .bwd_pack = fa_bwd_pack_bf16_avx512bf16,
    .bwd_scratch_new = fa_bwd_scratch_new_bf16_avx512bf16,
    .bwd_scratch_free = fa_bwd_scratch_free_bf16_avx512bf16,
    .bwd_keys_begin = fa_bwd_keys_begin_bf16_avx512bf16,
    .bwd_keys_tile = fa_bwd_keys_tile_bf16_avx512bf16,
    .bwd_keys_dq = fa_bwd_keys_dq_bf16_avx512bf16,
    .bwd_keys_store = fa_bwd_keys_store_bf16_avx512bf16,
    .bwd_dq_store = fa_bwd_dq_store_bf16_avx512bf16,
    .bwd_delta = fa_bwd_delta_bf16_avx512bf16,
};

#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif

#endif /* FA_HAVE_X86_PATHS */
