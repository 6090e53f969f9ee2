/*
 * fa_path_generic.c - the portable kernel path: plain C, no instruction-set
 * assumptions, built on every platform.
 */
#include "fa_tile.h"

#define FA_VEC_ISA 0
#define FA_PATH_NAME generic
#include "fa_path_instances.h"

/* The tile operations of this path, by element type (fa_tile.h). */
const fa_tile_ops fa_ops_f32_generic = {
    .name = "f32_generic", .elem_bytes = sizeof(float), .width = fa_width_f32_generic,
    .rows_max = fa_rows_max_f32_generic, .rows_tile = FA_BK,
    .scratch_new = fa_scratch_new_f32_generic,
    .scratch_free = fa_scratch_free_f32_generic,
    .attn_begin = fa_attn_begin_f32_generic,
    .attn_score_tile = fa_attn_score_tile_f32_generic,
    .weights_tile = fa_weights_tile_f32_generic,
    .attn_pv_tile = fa_attn_pv_tile_f32_generic,
    .store_rows = fa_store_rows_f32_generic,
    .store_partial = fa_store_partial_f32_generic,
    .merge_rows = fa_merge_rows_f32_generic,
    .scores_begin = fa_scores_begin_f32_generic,
    .scores_tile = fa_scores_tile_f32_generic,
    .wsum_begin = fa_wsum_begin_f32_generic,
    .wsum_tile = fa_wsum_tile_f32_generic,
    .bwd_scratch_new = fa_bwd_scratch_new_f32_generic,
    .bwd_scratch_free = fa_bwd_scratch_free_f32_generic,
    .bwd_keys_begin = fa_bwd_keys_begin_f32_generic,
    .bwd_keys_tile = fa_bwd_keys_tile_f32_generic,
    .bwd_keys_dq = fa_bwd_keys_dq_f32_generic,
    .bwd_keys_store = fa_bwd_keys_store_f32_generic,
    .bwd_dq_store = fa_bwd_dq_store_f32_generic,
    .bwd_delta = fa_bwd_delta_f32_generic,
};

const fa_tile_ops fa_ops_f64_generic = {
    .name = "f64_generic", .elem_bytes = sizeof(double), .width = fa_width_f64_generic,
    .rows_max = fa_rows_max_f64_generic, .rows_tile = FA_BK,
    .scratch_new = fa_scratch_new_f64_generic,
    .scratch_free = fa_scratch_free_f64_generic,
    .attn_begin = fa_attn_begin_f64_generic,
    .attn_score_tile = fa_attn_score_tile_f64_generic,
    .weights_tile = fa_weights_tile_f64_generic,
    .attn_pv_tile = fa_attn_pv_tile_f64_generic,
    .store_rows = fa_store_rows_f64_generic,
    .store_partial = fa_store_partial_f64_generic,
    .merge_rows = fa_merge_rows_f64_generic,
    .scores_begin = fa_scores_begin_f64_generic,
    .scores_tile = fa_scores_tile_f64_generic,
    .wsum_begin = fa_wsum_begin_f64_generic,
    .wsum_tile = fa_wsum_tile_f64_generic,
    .bwd_scratch_new = fa_bwd_scratch_new_f64_generic,
    .bwd_scratch_free = fa_bwd_scratch_free_f64_generic,
    .bwd_keys_begin = fa_bwd_keys_begin_f64_generic,
    .bwd_keys_tile = fa_bwd_keys_tile_f64_generic,
    .bwd_keys_dq = fa_bwd_keys_dq_f64_generic,
    .bwd_keys_store = fa_bwd_keys_store_f64_generic,
    .bwd_dq_store = fa_bwd_dq_store_f64_generic,
    .bwd_delta = fa_bwd_delta_f64_generic,
};

const fa_tile_ops fa_ops_f16_generic = {
    .name = "f16_generic", .elem_bytes = sizeof(float), .width = fa_width_f16_generic,
    .rows_max = fa_rows_max_f16_generic, .rows_tile = FA_BK,
    .scratch_new = fa_scratch_new_f16_generic,
    .scratch_free = fa_scratch_free_f16_generic,
    .attn_begin = fa_attn_begin_f16_generic,
    .attn_score_tile = fa_attn_score_tile_f16_generic,
    .weights_tile = fa_weights_tile_f16_generic,
    .attn_pv_tile = fa_attn_pv_tile_f16_generic,
    .store_rows = fa_store_rows_f16_generic,
    .store_partial = fa_store_partial_f16_generic,
    .merge_rows = fa_merge_rows_f16_generic,
    .scores_begin = fa_scores_begin_f16_generic,
    .scores_tile = fa_scores_tile_f16_generic,
    .wsum_begin = fa_wsum_begin_f16_generic,
    .wsum_tile = fa_wsum_tile_f16_generic,
    .bwd_scratch_new = fa_bwd_scratch_new_f16_generic,
    .bwd_scratch_free = fa_bwd_scratch_free_f16_generic,
    .bwd_keys_begin = fa_bwd_keys_begin_f16_generic,
    .bwd_keys_tile = fa_bwd_keys_tile_f16_generic,
    .bwd_keys_dq = fa_bwd_keys_dq_f16_generic,
    .bwd_keys_store = fa_bwd_keys_store_f16_generic,
    .bwd_dq_store = fa_bwd_dq_store_f16_generic,
    .bwd_delta = fa_bwd_delta_f16_generic,
};

const fa_tile_ops fa_ops_bf16_generic = {
    .name = "bf16_generic", .elem_bytes = sizeof(float), .width = fa_width_bf16_generic,
    .rows_max = fa_rows_max_bf16_generic, .rows_tile = FA_BK,
    .scratch_new = fa_scratch_new_bf16_generic,
    .scratch_free = fa_scratch_free_bf16_generic,
    .attn_begin = fa_attn_begin_bf16_generic,
    .attn_score_tile = fa_attn_score_tile_bf16_generic,
    .weights_tile = fa_weights_tile_bf16_generic,
    .attn_pv_tile = fa_attn_pv_tile_bf16_generic,
    .store_rows = fa_store_rows_bf16_generic,
    .store_partial = fa_store_partial_bf16_generic,
    .merge_rows = fa_merge_rows_bf16_generic,
    .scores_begin = fa_scores_begin_bf16_generic,
    .scores_tile = fa_scores_tile_bf16_generic,
    .wsum_begin = fa_wsum_begin_bf16_generic,
    .wsum_tile = fa_wsum_tile_bf16_generic,
    .bwd_scratch_new = fa_bwd_scratch_new_bf16_generic,
    .bwd_scratch_free = fa_bwd_scratch_free_bf16_generic,
    .bwd_keys_begin = fa_bwd_keys_begin_bf16_generic,
    .bwd_keys_tile = fa_bwd_keys_tile_bf16_generic,
    .bwd_keys_dq = fa_bwd_keys_dq_bf16_generic,
    .bwd_keys_store = fa_bwd_keys_store_bf16_generic,
    .bwd_dq_store = fa_bwd_dq_store_bf16_generic,
    .bwd_delta = fa_bwd_delta_bf16_generic,
};
