/*
 * fa_path_avx512.c - the AVX-512 (F, BW, DQ, VL) kernel path (x86-64 only).  Everything in this
 * file is compiled for that instruction set through a target pragma and is
 * only called once the dispatcher has checked CPUID and XGETBV.  The file
 * has no static initialisers.
 */
#include "fa_internal.h"

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

#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif

#endif /* FA_HAVE_X86_PATHS */
