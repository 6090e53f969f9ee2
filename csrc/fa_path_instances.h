/*
 * fa_path_instances.h - instantiates the kernels of one path for float and
 * double.  The including file defines FA_VEC_ISA (and enables the matching
 * instruction set) first.
 */
#define FA_T float
#define FA_T_IS_FLOAT 1
#define FA_SUFFIX FA_CAT(f32, FA_PATH_NAME)
#include "fa_vec.h"
#include "fa_kernel_impl.h"
#undef FA_T
#undef FA_T_IS_FLOAT
#undef FA_SUFFIX

#define FA_T double
#define FA_T_IS_FLOAT 0
#define FA_SUFFIX FA_CAT(f64, FA_PATH_NAME)
#include "fa_vec.h"
#include "fa_kernel_impl.h"
#undef FA_T
#undef FA_T_IS_FLOAT
#undef FA_SUFFIX
