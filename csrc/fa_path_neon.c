/*
 * fa_path_neon.c - the AArch64 Advanced SIMD (NEON) path: float32 on 4-lane
 * vectors, float64 on 2, float16 and bfloat16 storage converted to float32
 * as rows are loaded (fa_vec.h, FA_VEC_ISA 3).  Every AArch64 CPU has NEON,
 * so the path needs no target pragma and no CPU check beyond the
 * architecture; on other architectures this file is empty.
 */
#include "fa_tile.h"

#if defined(__aarch64__)

#define FA_VEC_ISA 3
#define FA_PATH_NAME neon
#include "fa_path_instances.h"

/* The tile operations of this path, by element type (fa_tile.h). */
const fa_tile_ops fa_ops_f32_neon = {
    .name = "f32_neon", .elem_bytes = sizeof(float), .width = fa_width_f32_neon,
    .rows_max = fa_rows_max_f32_neon, .rows_tile = FA_BK, .tile_segments = 1,
    .scratch_new = fa_scratch_new_f32_neon,
    .scratch_free = fa_scratch_free_f32_neon,
    .attn_begin = fa_attn_begin_f32_neon,
    .attn_score_tile = fa_attn_score_tile_f32_neon,
    .attn_options_tile = fa_attn_options_tile_f32_neon,
    .weights_tile = fa_weights_tile_f32_neon,
    .dropout_tile = fa_dropout_tile_f32_neon,
    .attn_pv_tile = fa_attn_pv_tile_f32_neon,
    .store_rows = fa_store_rows_f32_neon,
    .store_partial = fa_store_partial_f32_neon,
    .merge_rows = fa_merge_rows_f32_neon,
    .scores_begin = fa_scores_begin_f32_neon,
    .scores_tile = fa_scores_tile_f32_neon,
    .wsum_begin = fa_wsum_begin_f32_neon,
    .wsum_tile = fa_wsum_tile_f32_neon,
    .bwd_pack_bytes = fa_bwd_pack_bytes_f32_neon,
    .bwd_pack = fa_bwd_pack_f32_neon,
    .bwd_scratch_new = fa_bwd_scratch_new_f32_neon,
    .bwd_scratch_free = fa_bwd_scratch_free_f32_neon,
    .bwd_keys_begin = fa_bwd_keys_begin_f32_neon,
    .bwd_keys_tile = fa_bwd_keys_tile_f32_neon,
    .bwd_keys_dq = fa_bwd_keys_dq_f32_neon,
    .bwd_keys_store = fa_bwd_keys_store_f32_neon,
    .bwd_dq_store = fa_bwd_dq_store_f32_neon,
    .bwd_delta = fa_bwd_delta_f32_neon,
};

const fa_tile_ops fa_ops_f64_neon = {
    .name = "f64_neon", .elem_bytes = sizeof(double), .width = fa_width_f64_neon,
    .rows_max = fa_rows_max_f64_neon, .rows_tile = FA_BK, .tile_segments = 1,
    .scratch_new = fa_scratch_new_f64_neon,
    .scratch_free = fa_scratch_free_f64_neon,
    .attn_begin = fa_attn_begin_f64_neon,
    .attn_score_tile = fa_attn_score_tile_f64_neon,
    .attn_options_tile = fa_attn_options_tile_f64_neon,
    .weights_tile = fa_weights_tile_f64_neon,
    .dropout_tile = fa_dropout_tile_f64_neon,
    .attn_pv_tile = fa_attn_pv_tile_f64_neon,
    .store_rows = fa_store_rows_f64_neon,
    .store_partial = fa_store_partial_f64_neon,
    .merge_rows = fa_merge_rows_f64_neon,
    .scores_begin = fa_scores_begin_f64_neon,
    .scores_tile = fa_scores_tile_f64_neon,
    .wsum_begin = fa_wsum_begin_f64_neon,
    .wsum_tile = fa_wsum_tile_f64_neon,
    .bwd_pack_bytes = fa_bwd_pack_bytes_f64_neon,
    .bwd_pack = fa_bwd_pack_f64_neon,
    .bwd_scratch_new = fa_bwd_scratch_new_f64_neon,
    .bwd_scratch_free = fa_bwd_scratch_free_f64_neon,
    .bwd_keys_begin = fa_bwd_keys_begin_f64_neon,
    .bwd_keys_tile = fa_bwd_keys_tile_f64_neon,
    .bwd_keys_dq = fa_bwd_keys_dq_f64_neon,
    .bwd_keys_store = fa_bwd_keys_store_f64_neon,
    .bwd_dq_store = fa_bwd_dq_store_f64_neon,
    .bwd_delta = fa_bwd_delta_f64_neon,
};

const fa_tile_ops fa_ops_f16_neon = {
    .name = "f16_neon", .elem_bytes = sizeof(float), .width = fa_width_f16_neon,
    .rows_max = fa_rows_max_f16_neon, .rows_tile = FA_BK, .tile_segments = 1,
    .scratch_new = fa_scratch_new_f16_neon,
    .scratch_free = fa_scratch_free_f16_neon,
    .attn_begin = fa_attn_begin_f16_neon,
    .attn_score_tile = fa_attn_score_tile_f16_neon,
    .attn_options_tile = fa_attn_options_tile_f16_neon,
    .weights_tile = fa_weights_tile_f16_neon,
    .dropout_tile = fa_dropout_tile_f16_neon,
    .attn_pv_tile = fa_attn_pv_tile_f16_neon,
    .store_rows = fa_store_rows_f16_neon,
    .store_partial = fa_store_partial_f16_neon,
    .merge_rows = fa_merge_rows_f16_neon,
    .scores_begin = fa_scores_begin_f16_neon,
    .scores_tile = fa_scores_tile_f16_neon,
    .wsum_begin = fa_wsum_begin_f16_neon,
    .wsum_tile = fa_wsum_tile_f16_neon,
    .bwd_pack_bytes = fa_bwd_pack_bytes_f16_neon,
    .bwd_pack = fa_bwd_pack_f16_neon,
    .bwd_scratch_new = fa_bwd_scratch_new_f16_neon,
    .bwd_scratch_free = fa_bwd_scratch_free_f16_neon,
    .bwd_keys_begin = fa_bwd_keys_begin_f16_neon,
    .bwd_keys_tile = fa_bwd_keys_tile_f16_neon,
    .bwd_keys_dq = fa_bwd_keys_dq_f16_neon,
    .bwd_keys_store = fa_bwd_keys_store_f16_neon,
    .bwd_dq_store = fa_bwd_dq_store_f16_neon,
    .bwd_delta = fa_bwd_delta_f16_neon,
};

const fa_tile_ops fa_ops_bf16_neon = {
    .name = "bf16_neon", .elem_bytes = sizeof(float), .width = fa_width_bf16_neon,
    .rows_max = fa_rows_max_bf16_neon, .rows_tile = FA_BK, .tile_segments = 1,
    .scratch_new = fa_scratch_new_bf16_neon,
    .scratch_free = fa_scratch_free_bf16_neon,
    .attn_begin = fa_attn_begin_bf16_neon,
    .attn_score_tile = fa_attn_score_tile_bf16_neon,
    .attn_options_tile = fa_attn_options_tile_bf16_neon,
    .weights_tile = fa_weights_tile_bf16_neon,
    .dropout_tile = fa_dropout_tile_bf16_neon,
    .attn_pv_tile = fa_attn_pv_tile_bf16_neon,
    .store_rows = fa_store_rows_bf16_neon,
    .store_partial = fa_store_partial_bf16_neon,
    .merge_rows = fa_merge_rows_bf16_neon,
    .scores_begin = fa_scores_begin_bf16_neon,
    .scores_tile = fa_scores_tile_bf16_neon,
    .wsum_begin = fa_wsum_begin_bf16_neon,
    .wsum_tile = fa_wsum_tile_bf16_neon,
    .bwd_pack_bytes = fa_bwd_pack_bytes_bf16_neon,
    .bwd_pack = fa_bwd_pack_bf16_neon,
    .bwd_scratch_new = fa_bwd_scratch_new_bf16_neon,
    .bwd_scratch_free = fa_bwd_scratch_free_bf16_neon,
    .bwd_keys_begin = fa_bwd_keys_begin_bf16_neon,
    .bwd_keys_tile = fa_bwd_keys_tile_bf16_neon,
    .bwd_keys_dq = fa_bwd_keys_dq_bf16_neon,
    .bwd_keys_store = fa_bwd_keys_store_bf16_neon,
    .bwd_dq_store = fa_bwd_dq_store_bf16_neon,
    .bwd_delta = fa_bwd_delta_bf16_neon,
};

#endif /* __aarch64__ */
