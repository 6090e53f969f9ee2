/*
 * fa_pool.h - fastattn's thread pool: the one place that starts threads.
 *
 * A call runs as a team: the calling thread is member 0 and idle pool
 * workers join it.  A worker that finishes waits for its next team by
 * spinning for a bounded time (fa_pool_set_spin, default
 * FA_POOL_SPIN_DEFAULT_NS) and then sleeps on a condition variable, so an
 * idle fastattn never keeps cores from the code that runs after it.  The
 * same pool can run another library's parallel jobs (OpenBLAS's threads
 * callback, fa_pool_blas_callback), so that numpy's matrix products and
 * fastattn's kernels share one set of threads instead of two pools spinning
 * against each other.
 *
 * Teams may be smaller than asked for (workers busy in another caller's
 * team), and a member may never run: once the caller has run its own share,
 * it withdraws the team from workers that have not started it (asleep, or
 * waiting for a core that another program's threads hold), rather than wait
 * for them.  So a team's function must claim its work dynamically (every
 * member, the caller included, runs until no work is left), must not wait
 * for other members (no barriers), and its results must not depend on the
 * member count; fastattn's do not (work is claimed item by item and every
 * item is computed the same way whoever runs it).
 */
#ifndef FA_POOL_H
#define FA_POOL_H

#include <stddef.h>
#include <stdint.h>

typedef struct fa_team fa_team;
typedef void (*fa_team_fn)(void *arg, fa_team *team, int member);

/* Runs fn(arg, team, m) for the caller (m = 0) and for every member m of
 * a team of at most `want` threads (idle workers, started as needed up to
 * want - 1) that starts before the caller's fn returns; returns when all
 * that started have returned.  Returns the number of members offered. */
int fa_parallel(int want, fa_team_fn fn, void *arg);

/* Members offered (member numbers are below it). */
int fa_team_size(const fa_team *team);

/* Claims the next `chunk` indices of a shared counter (a dynamic schedule):
 * returns the first, or -1 once `n` is reached. */
int64_t fa_team_next(int64_t *counter, int64_t chunk, int64_t n);

/* Waits until *word (a count that other members raise, written with release
 * order) reaches value, or *abort is nonzero (a member gave up: returns 0 then, else 1).
 * Only for an ordering of items handed out by fa_team_next in which an item
 * waits on earlier items alone: the earliest unfinished item then never
 * waits, so the team cannot deadlock while every item runs, and a serial
 * build, running the items in order, never waits at all. */
int fa_team_wait(const int64_t *word, int64_t value, const int *abort);

/* How long an idle worker spins before it sleeps (nanoseconds, >= 0). */
#define FA_POOL_SPIN_DEFAULT_NS 100000
void fa_pool_set_spin(int64_t ns);
int64_t fa_pool_get_spin(void);

/* 1 if teams can have more than one thread (a POSIX threads build). */
int fa_pool_threaded(void);

/* Workers started so far (for tests and show_config), how many are asleep
 * now, and how many offers to join a team were withdrawn so far. */
int fa_pool_workers(void);
int fa_pool_sleeping(void);
int64_t fa_pool_withdrawn(void);

/* OpenBLAS's threads callback (openblas_set_threads_callback_function, in
 * OpenBLAS >= 0.3.27) runs dojob(thread, jobdata + i * elsize, dojob_data)
 * for each of numjobs jobs, all at once (OpenBLAS's jobs wait for each
 * other).  `thread` indexes OpenBLAS's per-thread state (MAX_THREADS
 * entries), whose first *server_threads - 1 entries belong to OpenBLAS's own
 * workers; a worker that finds its entry in use at its timeout never goes to
 * sleep, so the jobs are numbered from *server_threads - 1 on when they fit
 * under max_threads (from 0 otherwise, as OpenBLAS itself would).
 * fa_pool_blas_callback returns the callback for one OpenBLAS library (slot
 * < FA_POOL_BLAS_SLOTS), NULL for a slot out of range. */
#define FA_POOL_BLAS_SLOTS 4
typedef void (*fa_blas_callback)(int sync, void (*dojob)(int, void *, int), int numjobs, size_t elsize, void *jobdata,
                                 int dojob_data);
fa_blas_callback fa_pool_blas_callback(int slot, const int *server_threads, int max_threads);

/* Sets of OpenBLAS jobs the pool has run. */
int64_t fa_pool_blas_runs(void);

/* The other way round: teams run on another library's OpenMP threads (the
 * host program's, e.g. PyTorch's, which spin for a while after each of its
 * parallel regions and would otherwise hold the cores the pool's workers
 * wait for).  fa_pool_set_host_openmp takes that runtime's GOMP_parallel
 * (the entry point GCC's OpenMP code calls; LLVM's and Intel's runtimes
 * export it too) and omp_get_thread_num (NULL: none).  fa_pool_host_calls(n)
 * with n > 0 routes the teams of the calling thread's later calls there, at
 * most n threads each (the host's own thread count), 0 back to the pool; it
 * returns the previous setting.  A team there has exactly min(want, n)
 * members, or runs on member 0 alone where the runtime gives a nested
 * region one thread; its region has n threads (the rest return at once),
 * since GNU's runtime ends the threads a smaller region leaves out and the
 * host's next region would have to start them again.  A child process
 * forked after this call runs its teams on the pool (GNU's runtime hangs in
 * a region started in a child forked after it ran one).  fa_pool_host_runs
 * counts the teams run there. */
typedef void (*fa_omp_parallel)(void (*fn)(void *), void *data, unsigned num_threads, unsigned flags);
typedef int (*fa_omp_thread_num)(void);
void fa_pool_set_host_openmp(fa_omp_parallel parallel, fa_omp_thread_num thread_num);
int fa_pool_host_calls(int max_threads);
int64_t fa_pool_host_runs(void);

/* Scratch blocks kept from one call to the next.  A kernel call takes its
 * threads' scratch (often over a megabyte: a few hundred kilobytes per
 * bundled entry) with fa_scratch_take and gives it back with
 * fa_scratch_give; each thread keeps what it gave back (up to
 * FA_SCRATCH_CACHE_SLOTS blocks and FA_SCRATCH_CACHE_BYTES in all, freed
 * when the thread exits), so the next call reuses memory already mapped
 * instead of asking the system for fresh pages and faulting them in (which
 * cost a small call more than its arithmetic).  fa_scratch_take returns a
 * 64-byte aligned block of at least *bytes bytes (NULL if out of memory)
 * and sets *bytes to its size, which fa_scratch_give takes back with it. */
#define FA_SCRATCH_CACHE_SLOTS 24
#define FA_SCRATCH_CACHE_BYTES ((size_t)16 << 20)
void *fa_scratch_take(size_t *bytes);
void fa_scratch_give(void *block, size_t bytes); /* NULL is ignored */
/* Blocks this thread's cache holds now, and their bytes (tests). */
int fa_scratch_cached(size_t *bytes);

#endif /* FA_POOL_H */
