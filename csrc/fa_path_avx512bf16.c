/*
 * fa_path_avx512bf16.c - the AVX-512 path with AVX512-BF16 (x86-64 only):
 * bfloat16 attention whose products run on vdpbf16ps.  The other element
 * types at this level use the AVX-512 path's kernels (fa_dispatch.c).
 * Compiled for that instruction set through a target pragma and only called
 * once the dispatcher has checked CPUID and XGETBV.  No static initialisers.
 */
#include "fa_internal.h"

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
#define FA_BF16_DP 1
#define FA_SUFFIX FA_CAT(bf16, FA_PATH_NAME)
#include "fa_vec.h"
#include "fa_kernel_impl.h"

#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif

#endif /* FA_HAVE_X86_PATHS */
