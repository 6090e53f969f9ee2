/*
 * fa_path_generic.c - the portable kernel path: plain C, no instruction-set
 * assumptions, built on every platform.
 */
#include "fa_internal.h"

#define FA_VEC_ISA 0
#define FA_PATH_NAME generic
#include "fa_path_instances.h"
