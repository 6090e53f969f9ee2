/*
 * fa_omp.h - the one place that touches the OpenMP runtime.  A build
 * without OpenMP gets serial stand-ins and the parallel pragmas are ignored.
 */
#ifndef FA_OMP_H
#define FA_OMP_H

#ifdef _OPENMP
#include <omp.h>
static inline int fa_omp_enabled(void) { return _OPENMP; }
static inline int fa_omp_threads(void) { return omp_get_max_threads(); }
#else
static inline int fa_omp_enabled(void) { return 0; }
static inline int fa_omp_threads(void) { return 1; }
#endif

#endif /* FA_OMP_H */
