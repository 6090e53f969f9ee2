/*
 * fa_path_instances.h - instantiates the tile operations (fa_tile_impl.h)
 * of one path for each element type: float and double, and the 16-bit
 * storage types float16 and bfloat16 (computed in float).  The including
 * file defines FA_VEC_ISA and FA_PATH_NAME (and enables the matching
 * instruction set) first, and registers the operations in its tables.
 *   FA_T       compute type;   FA_S  storage type of q, k, v, w and out
 *   FA_S_KIND  0: FA_S is FA_T, 1: float16, 2: bfloat16
 */
#include <stdint.h>

#define FA_T float
#define FA_T_IS_FLOAT 1
#define FA_S float
#define FA_S_KIND 0
#define FA_SUFFIX FA_CAT(f32, FA_PATH_NAME)
#include "fa_vec.h"
#include "fa_tile_impl.h"
#undef FA_SUFFIX
#undef FA_S
#undef FA_S_KIND

#define FA_S uint16_t
#define FA_S_KIND 1
#define FA_SUFFIX FA_CAT(f16, FA_PATH_NAME)
#include "fa_tile_impl.h"
#undef FA_SUFFIX
#undef FA_S_KIND

#define FA_S_KIND 2
#define FA_SUFFIX FA_CAT(bf16, FA_PATH_NAME)
#include "fa_tile_impl.h"
#undef FA_SUFFIX
#undef FA_S_KIND
#undef FA_S
#undef FA_T
#undef FA_T_IS_FLOAT

#define FA_T double
#define FA_T_IS_FLOAT 0
#define FA_S double
#define FA_S_KIND 0
#define FA_SUFFIX FA_CAT(f64, FA_PATH_NAME)
#include "fa_vec.h"
#include "fa_tile_impl.h"
#undef FA_T
#undef FA_T_IS_FLOAT
#undef FA_S
#undef FA_S_KIND
#undef FA_SUFFIX
