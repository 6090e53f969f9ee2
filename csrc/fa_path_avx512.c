/*
 * fa_path_avx512.c - the AVX-512 (F, BW, DQ, VL) kernel path (x86-64 only).  Everything in this
 * file is compiled for that instruction set through a target pragma and is
 * only called once the dispatcher has checked CPUID and XGETBV.  The file
 * has no static initialisers.
 */
#include "fa_tile.h"

#if FA_HAVE_X86_PATHS

#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx2,fma,f16c"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512dq,avx512vl,avx2,fma,f16c")
#endif

#define FA_VEC_ISA 2
#define FA_PATH_NAME avx512
#include "fa_path_instances.h"

/* The tile operations of this path, by element type (fa_tile.h). */
const fa_tile_ops fa_ops_f32_avx512 = {
    .name = "f32_avx512", .elem_bytes = sizeof(float), .width = fa_width_f32_avx512,
    .rows_max = fa_rows_max_f32_avx512, .rows_tile = FA_BK, .tile_segments = 1,
    .scratch_new = fa_scratch_new_f32_avx512,
    .scratch_free = fa_scratch_free_f32_avx512,
    .attn_begin = fa_attn_begin_f32_avx512,
    .attn_score_tile = fa_attn_score_tile_f32_avx512,
    .attn_options_tile = fa_attn_options_tile_f32_avx512,
    .weights_tile = fa_weights_tile_f32_avx512,
    .dropout_tile = fa_dropout_tile_f32_avx512,
    .attn_pv_tile = fa_attn_pv_tile_f32_avx512,
    .store_rows = fa_store_rows_f32_avx512,
    .store_partial = fa_store_partial_f32_avx512,
    .merge_rows = fa_merge_rows_f32_avx512,
    .scores_begin = fa_scores_begin_f32_avx512,
    .scores_tile = fa_scores_tile_f32_avx512,
    .wsum_begin = fa_wsum_begin_f32_avx512,
    .wsum_tile = fa_wsum_tile_f32_avx512,
    .bwd_pack_bytes = fa_bwd_pack_bytes_f32_avx512,
    .bwd_pack = fa_bwd_pack_f32_avx512,
    .bwd_scratch_new = fa_bwd_scratch_new_f32_avx512,
    .bwd_scratch_free = fa_bwd_scratch_free_f32_avx512,
    .bwd_keys_begin = fa_bwd_keys_begin_f32_avx512,
    .bwd_keys_tile = fa_bwd_keys_tile_f32_avx512,
    .bwd_keys_dq = fa_bwd_keys_dq_f32_avx512,
    .bwd_keys_store = fa_bwd_keys_store_f32_avx512,
    .bwd_dq_store = fa_bwd_dq_store_f32_avx512,
    .bwd_delta = fa_bwd_delta_f32_avx512,
};

const fa_tile_ops fa_ops_f64_avx512 = {
    .name = "f64_avx512", .elem_bytes = sizeof(double), .width = fa_width_f64_avx512,
    .rows_max = fa_rows_max_f64_avx512, .rows_tile = FA_BK, .tile_segments = 1,
    .scratch_new = fa_scratch_new_f64_avx512,
    .scratch_free = fa_scratch_free_f64_avx512,
    .attn_begin = fa_attn_begin_f64_avx512,
    .attn_score_tile = fa_attn_score_tile_f64_avx512,
    .attn_options_tile = fa_attn_options_tile_f64_avx512,
    .weights_tile = fa_weights_tile_f64_avx512,
    .dropout_tile = fa_dropout_tile_f64_avx512,
    .attn_pv_tile = fa_attn_pv_tile_f64_avx512,
    .store_rows = fa_store_rows_f64_avx512,
    .store_partial = fa_store_partial_f64_avx512,
    .merge_rows = fa_merge_rows_f64_avx512,
    .scores_begin = fa_scores_begin_f64_avx512,
    .scores_tile = fa_scores_tile_f64_avx512,
    .wsum_begin = fa_wsum_begin_f64_avx512,
    .wsum_tile = fa_wsum_tile_f64_avx512,
    .bwd_pack_bytes = fa_bwd_pack_bytes_f64_avx512,
    .bwd_pack = fa_bwd_pack_f64_avx512,
    .bwd_scratch_new = fa_bwd_scratch_new_f64_avx512,
    .bwd_scratch_free = fa_bwd_scratch_free_f64_avx512,
    .bwd_keys_begin = fa_bwd_keys_begin_f64_avx512,
    .bwd_keys_tile = fa_bwd_keys_tile_f64_avx512,
    .bwd_keys_dq = fa_bwd_keys_dq_f64_avx512,
    .bwd_keys_store = fa_bwd_keys_store_f64_avx512,
    .bwd_dq_store = fa_bwd_dq_store_f64_avx512,
    .bwd_delta = fa_bwd_delta_f64_avx512,
};

const fa_tile_ops fa_ops_f16_avx512 = {
    .name = "f16_avx512", .elem_bytes = sizeof(float), .width = fa_width_f16_avx512,
    .rows_max = fa_rows_max_f16_avx512, .rows_tile = FA_BK, .tile_segments = 1,
    .scratch_new = fa_scratch_new_f16_avx512,
    .scratch_free = fa_scratch_free_f16_avx512,
    .attn_begin = fa_attn_begin_f16_avx512,
    .attn_score_tile = fa_attn_score_tile_f16_avx512,
    .attn_options_tile = fa_attn_options_tile_f16_avx512,
    .weights_tile = fa_weights_tile_f16_avx512,
    .dropout_tile = fa_dropout_tile_f16_avx512,
    .attn_pv_tile = fa_attn_pv_tile_f16_avx512,
    .store_rows = fa_store_rows_f16_avx512,
    .store_partial = fa_store_partial_f16_avx512,
    .merge_rows = fa_merge_rows_f16_avx512,
    .scores_begin = fa_scores_begin_f16_avx512,
    .scores_tile = fa_scores_tile_f16_avx512,
    .wsum_begin = fa_wsum_begin_f16_avx512,
    .wsum_tile = fa_wsum_tile_f16_avx512,
    .bwd_pack_bytes = fa_bwd_pack_bytes_f16_avx512,
    .bwd_pack = fa_bwd_pack_f16_avx512,
    .bwd_scratch_new = fa_bwd_scratch_new_f16_avx512,
    .bwd_scratch_free = fa_bwd_scratch_free_f16_avx512,
    .bwd_keys_begin = fa_bwd_keys_begin_f16_avx512,
    .bwd_keys_tile = fa_bwd_keys_tile_f16_avx512,
    .bwd_keys_dq = fa_bwd_keys_dq_f16_avx512,
    .bwd_keys_store = fa_bwd_keys_store_f16_avx512,
    .bwd_dq_store = fa_bwd_dq_store_f16_avx512,
    .bwd_delta = fa_bwd_delta_f16_avx512,
};

const fa_tile_ops fa_ops_bf16_avx512 = {
    .name = "bf16_avx512", .elem_bytes = sizeof(float), .width = fa_width_bf16_avx512,
    .rows_max = fa_rows_max_bf16_avx512, .rows_tile = FA_BK, .tile_segments = 1,
    .scratch_new = fa_scratch_new_bf16_avx512,
    .scratch_free = fa_scratch_free_bf16_avx512,
    .attn_begin = fa_attn_begin_bf16_avx512,
    .attn_score_tile = fa_attn_score_tile_bf16_avx512,
    .attn_options_tile = fa_attn_options_tile_bf16_avx512,
    .weights_tile = fa_weights_tile_bf16_avx512,
    .dropout_tile = fa_dropout_tile_bf16_avx512,
    .attn_pv_tile = fa_attn_pv_tile_bf16_avx512,
    .store_rows = fa_store_rows_bf16_avx512,
    .store_partial = fa_store_partial_bf16_avx512,
    .merge_rows = fa_merge_rows_bf16_avx512,
    .scores_begin = fa_scores_begin_bf16_avx512,
    .scores_tile = fa_scores_tile_bf16_avx512,
    .wsum_begin = fa_wsum_begin_bf16_avx512,
    .wsum_tile = fa_wsum_tile_bf16_avx512,
    .bwd_pack_bytes = fa_bwd_pack_bytes_bf16_avx512,
    .bwd_pack = fa_bwd_pack_bf16_avx512,
    .bwd_scratch_new = fa_bwd_scratch_new_bf16_avx512,
    .bwd_scratch_free = fa_bwd_scratch_free_bf16_avx512,
    .bwd_keys_begin = fa_bwd_keys_begin_bf16_avx512,
    .bwd_keys_tile = fa_bwd_keys_tile_bf16_avx512,
    .bwd_keys_dq = fa_bwd_keys_dq_bf16_avx512,
    .bwd_keys_store = fa_bwd_keys_store_bf16_avx512,
    .bwd_dq_store = fa_bwd_dq_store_bf16_avx512,
    .bwd_delta = fa_bwd_delta_bf16_avx512,
};

#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif

#endif /* FA_HAVE_X86_PATHS */
