/*
 * fa_pool.c - fastattn's thread pool (see fa_pool.h).  POSIX threads; a
 * build without them (Windows) runs every team on the calling thread.
 */
#include "fa_pool.h"

#include <stdlib.h>
#include <string.h>

struct fa_team {
    fa_team_fn fn;
    void *arg;
    int size;
    int pending; /* workers still running the team's function */
};

int fa_team_size(const fa_team *team) { return team->size; }

int64_t fa_team_next(int64_t *counter, int64_t chunk, int64_t n)
{
    const int64_t i = __atomic_fetch_add(counter, chunk, __ATOMIC_RELAXED);
    return i < n ? i : -1;
}

static int64_t fa_spin_ns = FA_POOL_SPIN_DEFAULT_NS;

/* The host's OpenMP runtime (fa_pool_set_host_openmp). */
static fa_omp_parallel fa_host_parallel;
static fa_omp_thread_num fa_host_thread_num;
static _Thread_local int fa_host_threads; /* 0: this thread's teams run on the pool */
static int64_t fa_host_runs;

void fa_pool_set_spin(int64_t ns) { __atomic_store_n(&fa_spin_ns, ns < 0 ? 0 : ns, __ATOMIC_RELAXED); }
int64_t fa_pool_get_spin(void) { return __atomic_load_n(&fa_spin_ns, __ATOMIC_RELAXED); }

#if defined(_WIN32) || defined(FA_POOL_SERIAL)

static int fa_own_parallel(int want, fa_team_fn fn, void *arg)
{
    (void)want;
    fa_team solo = {fn, arg, 1, 0};
    fn(arg, &solo, 0);
    return 1;
}

int fa_pool_threaded(void) { return 0; }
int64_t fa_pool_withdrawn(void) { return 0; }
/* Items run in order here (the wait is over at once), but on a host's
 * OpenMP runtime (fa_parallel) a team's members run at the same time. */
int fa_team_wait(const int64_t *word, int64_t value, const int *abort)
{
    while (__atomic_load_n(word, __ATOMIC_ACQUIRE) < value)
        if (__atomic_load_n(abort, __ATOMIC_RELAXED)) return 0;
    return 1;
}
static void fa_pool_watch_fork(void) {}
int fa_pool_workers(void) { return 0; }
int fa_pool_sleeping(void) { return 0; }

/* OpenBLAS's jobs must run at once: no callback without threads */
fa_blas_callback fa_pool_blas_callback(int slot, const int *server_threads, int max_threads)
{
    (void)slot, (void)server_threads, (void)max_threads;
    return NULL;
}
int64_t fa_pool_blas_runs(void) { return 0; }

#else

#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <time.h>

/* Most workers the pool starts. */
#define FA_POOL_MAX 1024

static inline void fa_pause(void)
{
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    __asm__ __volatile__("yield");
#endif
}

static int64_t fa_now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

typedef struct fa_worker {
    /* the team offered by a caller; the worker takes it (-> fa_taken) or the
     * caller withdraws it (-> NULL), each by compare-and-swap; cleared by
     * the worker when done */
    fa_team *team;
    int member;
    int busy;     /* claimed by a caller (0 -> 1 by compare-and-swap), cleared when done */
    int sleeping; /* waiting on cond */
    pthread_mutex_t lock;
    pthread_cond_t cond;
} fa_worker;

static fa_team fa_taken_mark;
#define fa_taken (&fa_taken_mark)
static int64_t fa_withdrawn;

static fa_worker *fa_workers[FA_POOL_MAX];
static int fa_n_workers;
static pthread_mutex_t fa_pool_lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_mutex_t fa_blas_lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_once_t fa_pool_once = PTHREAD_ONCE_INIT;

/* A forked child has only the thread that forked: its pool starts empty,
 * and its teams stay off the host's OpenMP runtime (GNU's cannot run a
 * parallel region in a child forked after it ran one: it hangs). */
static void fa_pool_after_fork_child(void)
{
    memset(fa_workers, 0, sizeof fa_workers);
    fa_n_workers = 0;
    pthread_mutex_init(&fa_pool_lock, NULL);
    pthread_mutex_init(&fa_blas_lock, NULL);
    fa_host_parallel = NULL;
    fa_host_thread_num = NULL;
}

static void fa_pool_init(void) { pthread_atfork(NULL, NULL, fa_pool_after_fork_child); }
static void fa_pool_watch_fork(void) { pthread_once(&fa_pool_once, fa_pool_init); }

/* The next team of worker w: spin for the pool's spin time, then sleep. */
static fa_team *fa_wait_team(fa_worker *w)
{
    fa_team *t = __atomic_load_n(&w->team, __ATOMIC_ACQUIRE);
    if (t) return t;
    const int64_t spin = fa_pool_get_spin();
    if (spin > 0) {
        const int64_t start = fa_now_ns();
        for (unsigned i = 1;; i++) {
            fa_pause();
            if ((t = __atomic_load_n(&w->team, __ATOMIC_ACQUIRE))) return t;
            if ((i & 63) == 0 && fa_now_ns() - start > spin) break;
        }
    }
    /* The caller stores team, then reads sleeping; this stores sleeping,
     * then reads team (both sequentially consistent): one sees the other. */
    pthread_mutex_lock(&w->lock);
    __atomic_store_n(&w->sleeping, 1, __ATOMIC_SEQ_CST);
    while (!(t = __atomic_load_n(&w->team, __ATOMIC_SEQ_CST))) pthread_cond_wait(&w->cond, &w->lock);
    __atomic_store_n(&w->sleeping, 0, __ATOMIC_RELAXED);
    pthread_mutex_unlock(&w->lock);
    return t;
}

static void *fa_worker_main(void *arg)
{
    fa_worker *w = (fa_worker *)arg;
    for (;;) {
        fa_team *t = fa_wait_team(w);
        /* the offer may have been withdrawn (and another made) meanwhile:
         * whatever team is offered when the swap succeeds is this one's */
        if (!__atomic_compare_exchange_n(&w->team, &t, fa_taken, 0, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE)) continue;
        t->fn(t->arg, t, w->member);
        /* idle before the caller may return: t is not touched after the decrement */
        __atomic_store_n(&w->team, NULL, __ATOMIC_RELAXED);
        __atomic_store_n(&w->busy, 0, __ATOMIC_RELEASE);
        __atomic_fetch_sub(&t->pending, 1, __ATOMIC_RELEASE);
    }
    return NULL;
}

/* Starts a worker, already claimed (busy); NULL if it cannot.  Called with
 * fa_pool_lock held. */
static fa_worker *fa_start_worker(void)
{
    if (fa_n_workers >= FA_POOL_MAX) return NULL;
    fa_worker *w = (fa_worker *)aligned_alloc(64, (sizeof(fa_worker) + 63) / 64 * 64);
    if (!w) return NULL;
    memset(w, 0, sizeof *w);
    w->busy = 1;
    pthread_mutex_init(&w->lock, NULL);
    pthread_cond_init(&w->cond, NULL);
    /* workers take no signals: they stay with the threads that expect them */
    sigset_t all, saved;
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &saved);
    pthread_t thread;
    pthread_attr_t attr;
    pthread_attr_init(&attr);
    pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
    const int failed = pthread_create(&thread, &attr, fa_worker_main, w);
    pthread_attr_destroy(&attr);
    pthread_sigmask(SIG_SETMASK, &saved, NULL);
    if (failed) {
        pthread_cond_destroy(&w->cond);
        pthread_mutex_destroy(&w->lock);
        free(w);
        return NULL;
    }
    __atomic_store_n(&fa_workers[fa_n_workers], w, __ATOMIC_RELEASE);
    __atomic_store_n(&fa_n_workers, fa_n_workers + 1, __ATOMIC_RELEASE);
    return w;
}

/* Claims up to `want` idle workers into got[]; starts new ones while the
 * pool has fewer than `grow_to` workers.  Returns how many it claimed. */
static int fa_claim(fa_worker **got, int have, int want, int grow_to)
{
    const int total = __atomic_load_n(&fa_n_workers, __ATOMIC_ACQUIRE);
    for (int i = 0; i < total && have < want; i++) {
        fa_worker *w = __atomic_load_n(&fa_workers[i], __ATOMIC_ACQUIRE);
        int idle = 0;
        if (w && __atomic_load_n(&w->busy, __ATOMIC_RELAXED) == 0 &&
            __atomic_compare_exchange_n(&w->busy, &idle, 1, 0, __ATOMIC_SEQ_CST, __ATOMIC_RELAXED))
            got[have++] = w;
    }
    if (have < want && total < grow_to) {
        pthread_mutex_lock(&fa_pool_lock);
        while (have < want && fa_n_workers < grow_to) {
            fa_worker *w = fa_start_worker();
            if (!w) break;
            got[have++] = w;
        }
        pthread_mutex_unlock(&fa_pool_lock);
    }
    return have;
}

/* A team of `want` threads, or fewer unless `exact`: then it waits for
 * workers until it has them all, and for each to run.  Otherwise a worker
 * that has not started when the caller's own share is done has its offer
 * withdrawn (the caller has claimed the last item by then): a worker that
 * sleeps, or whose core another program's threads hold, delays nobody. */
static int fa_pool_run(int want, int exact, fa_team_fn fn, void *arg)
{
    fa_team t = {fn, arg, 1, 0};
    if (want > FA_POOL_MAX) want = FA_POOL_MAX;
    if (want <= 1) {
        fn(arg, &t, 0);
        return 1;
    }
    pthread_once(&fa_pool_once, fa_pool_init);
    fa_worker *got[FA_POOL_MAX];
    int n = fa_claim(got, 0, want - 1, exact ? FA_POOL_MAX : want - 1);
    while (exact && n < want - 1) {
        sched_yield();
        n = fa_claim(got, n, want - 1, FA_POOL_MAX);
    }
    t.size = n + 1;
    t.pending = n;
    for (int m = 1; m <= n; m++) {
        fa_worker *w = got[m - 1];
        w->member = m;
        __atomic_store_n(&w->team, &t, __ATOMIC_SEQ_CST);
        if (__atomic_load_n(&w->sleeping, __ATOMIC_SEQ_CST)) {
            pthread_mutex_lock(&w->lock);
            pthread_cond_signal(&w->cond);
            pthread_mutex_unlock(&w->lock);
        }
    }
    fn(arg, &t, 0);
    if (!exact) {
        int withdrawn = 0;
        for (int m = 1; m <= n; m++) {
            fa_worker *w = got[m - 1];
            fa_team *offered = &t;
            if (__atomic_compare_exchange_n(&w->team, &offered, NULL, 0, __ATOMIC_ACQ_REL, __ATOMIC_RELAXED)) {
                __atomic_store_n(&w->busy, 0, __ATOMIC_RELEASE);
                withdrawn++;
            }
        }
        if (withdrawn) {
            __atomic_fetch_sub(&t.pending, withdrawn, __ATOMIC_RELAXED);
            __atomic_add_fetch(&fa_withdrawn, withdrawn, __ATOMIC_RELAXED);
        }
    }
    for (unsigned i = 1; __atomic_load_n(&t.pending, __ATOMIC_ACQUIRE) > 0; i++) {
        fa_pause();
        if ((i & 1023) == 0) sched_yield();
    }
    return n + 1;
}

static int fa_own_parallel(int want, fa_team_fn fn, void *arg) { return fa_pool_run(want, 0, fn, arg); }

int fa_pool_threaded(void) { return 1; }
int64_t fa_pool_withdrawn(void) { return __atomic_load_n(&fa_withdrawn, __ATOMIC_RELAXED); }

int fa_team_wait(const int64_t *word, int64_t value, const int *abort)
{
    for (unsigned i = 1; __atomic_load_n(word, __ATOMIC_ACQUIRE) < value; i++) {
        if (__atomic_load_n(abort, __ATOMIC_RELAXED)) return 0;
        fa_pause();
        if ((i & 1023) == 0) sched_yield();
    }
    return 1;
}
int fa_pool_workers(void) { return __atomic_load_n(&fa_n_workers, __ATOMIC_ACQUIRE); }

int fa_pool_sleeping(void)
{
    int n = 0;
    const int total = fa_pool_workers();
    for (int i = 0; i < total; i++) {
        fa_worker *w = __atomic_load_n(&fa_workers[i], __ATOMIC_ACQUIRE);
        n += w && __atomic_load_n(&w->sleeping, __ATOMIC_RELAXED);
    }
    return n;
}

typedef struct {
    void (*dojob)(int, void *, int);
    char *jobdata;
    size_t elsize;
    int dojob_data, first;
} fa_blas_jobs;

static void fa_blas_member(void *arg, fa_team *team, int member)
{
    (void)team;
    const fa_blas_jobs *j = (const fa_blas_jobs *)arg;
    j->dojob(j->first + member, j->jobdata + (size_t)member * j->elsize, j->dojob_data);
}

/* One OpenBLAS library's numbering of its per-thread state. */
typedef struct {
    const int *server_threads;
    int max_threads;
} fa_blas_lib;

static fa_blas_lib fa_blas_libs[FA_POOL_BLAS_SLOTS];
static int64_t fa_blas_runs;

int64_t fa_pool_blas_runs(void) { return __atomic_load_n(&fa_blas_runs, __ATOMIC_RELAXED); }

static void fa_blas_run(const fa_blas_lib *lib, void (*dojob)(int, void *, int), int numjobs, size_t elsize,
                        void *jobdata, int dojob_data)
{
    if (numjobs <= 0) return;
    /* one set of jobs at a time, as OpenBLAS's own server runs them: they
     * share its per-thread state */
    pthread_mutex_lock(&fa_blas_lock);
    const int servers = lib->server_threads ? __atomic_load_n(lib->server_threads, __ATOMIC_RELAXED) : 0;
    const int first = servers > 1 && servers - 1 + numjobs <= lib->max_threads ? servers - 1 : 0;
    fa_blas_jobs jobs = {dojob, (char *)jobdata, elsize, dojob_data, first};
    fa_pool_run(numjobs, 1, fa_blas_member, &jobs);
    __atomic_add_fetch(&fa_blas_runs, 1, __ATOMIC_RELAXED);
    pthread_mutex_unlock(&fa_blas_lock);
}

/* OpenBLAS only asks for synchronous runs (sync = 1). */
#define FA_BLAS_CALLBACK(n)                                                                                          \
    static void fa_blas_callback_##n(int sync, void (*dojob)(int, void *, int), int numjobs, size_t elsize,          \
                                     void *jobdata, int dojob_data)                                                  \
    {                                                                                                                \
        (void)sync;                                                                                                  \
        fa_blas_run(&fa_blas_libs[n], dojob, numjobs, elsize, jobdata, dojob_data);                                  \
    }
FA_BLAS_CALLBACK(0)
FA_BLAS_CALLBACK(1)
FA_BLAS_CALLBACK(2)
FA_BLAS_CALLBACK(3)

fa_blas_callback fa_pool_blas_callback(int slot, const int *server_threads, int max_threads)
{
    static const fa_blas_callback callbacks[FA_POOL_BLAS_SLOTS] = {fa_blas_callback_0, fa_blas_callback_1,
                                                                   fa_blas_callback_2, fa_blas_callback_3};
    if (slot < 0 || slot >= FA_POOL_BLAS_SLOTS) return NULL;
    fa_blas_libs[slot].server_threads = server_threads;
    fa_blas_libs[slot].max_threads = max_threads;
    return callbacks[slot];
}

#endif

/* ---- teams on the host's OpenMP threads ---------------------------------- */

void fa_pool_set_host_openmp(fa_omp_parallel parallel, fa_omp_thread_num thread_num)
{
    if (!parallel || !thread_num) parallel = NULL, thread_num = NULL;
    fa_pool_watch_fork();
    __atomic_store_n(&fa_host_thread_num, thread_num, __ATOMIC_RELEASE);
    __atomic_store_n(&fa_host_parallel, parallel, __ATOMIC_RELEASE);
}

int fa_pool_host_calls(int max_threads)
{
    const int was = fa_host_threads;
    fa_host_threads = max_threads > 0 ? max_threads : 0;
    return was;
}

int64_t fa_pool_host_runs(void) { return __atomic_load_n(&fa_host_runs, __ATOMIC_RELAXED); }

/* A team in a host region, with the runtime it started on (the runtime
 * may be changed meanwhile). */
typedef struct {
    fa_team team;
    fa_omp_thread_num thread_num;
} fa_host_team;

static void fa_host_member(void *data)
{
    fa_host_team *h = (fa_host_team *)data;
    const int member = h->thread_num();
    /* a region nested in another one runs on one thread: member 0 */
    if (member >= 0 && member < h->team.size) h->team.fn(h->team.arg, &h->team, member);
}

int fa_parallel(int want, fa_team_fn fn, void *arg)
{
    const fa_omp_parallel host = fa_host_threads ? __atomic_load_n(&fa_host_parallel, __ATOMIC_ACQUIRE) : NULL;
    /* (read after host: cleared first, so a runtime being unset gives NULL) */
    const fa_omp_thread_num thread_num = host ? __atomic_load_n(&fa_host_thread_num, __ATOMIC_ACQUIRE) : NULL;
    if (thread_num && want > fa_host_threads) want = fa_host_threads;
    if (!thread_num || want <= 1) return fa_own_parallel(want, fn, arg);
    /* The region has all the host's threads, members past `want` idle: a
     * smaller one would make GNU's runtime end its surplus threads, and
     * the host's next region start them again. */
    fa_host_team h = {{fn, arg, want, 0}, thread_num};
    host(fa_host_member, &h, (unsigned)fa_host_threads, 0);
    __atomic_add_fetch(&fa_host_runs, 1, __ATOMIC_RELAXED);
    return want;
}

/* ---- scratch blocks kept from one call to the next ---------------------- */

typedef struct {
    void *block[FA_SCRATCH_CACHE_SLOTS];
    size_t bytes[FA_SCRATCH_CACHE_SLOTS];
    size_t total;
    int registered; /* for the thread-exit destructor */
} fa_scratch_cache;

static _Thread_local fa_scratch_cache fa_cache;

static size_t fa_scratch_size(size_t bytes) { return bytes == 0 ? 64 : (bytes + 63) & ~(size_t)63; }

static void fa_cache_release(fa_scratch_cache *c)
{
    for (int i = 0; i < FA_SCRATCH_CACHE_SLOTS; i++) {
        free(c->block[i]);
        c->block[i] = NULL;
    }
    c->total = 0;
}

#if defined(_WIN32) || defined(FA_POOL_SERIAL)
static void fa_cache_register(fa_scratch_cache *c) { c->registered = 1; }
#else
static pthread_key_t fa_cache_key;
static pthread_once_t fa_cache_once = PTHREAD_ONCE_INIT;
static int fa_cache_key_ok;
static void fa_cache_at_exit(void *c) { fa_cache_release((fa_scratch_cache *)c); }
static void fa_cache_key_init(void) { fa_cache_key_ok = pthread_key_create(&fa_cache_key, fa_cache_at_exit) == 0; }
/* Frees the cache when the thread exits; where that cannot be arranged the
 * thread keeps nothing (registered stays 0). */
static void fa_cache_register(fa_scratch_cache *c)
{
    pthread_once(&fa_cache_once, fa_cache_key_init);
    c->registered = fa_cache_key_ok && pthread_setspecific(fa_cache_key, c) == 0;
}
#endif

void *fa_scratch_take(size_t *bytes)
{
    fa_scratch_cache *c = &fa_cache;
    int best = -1; /* the smallest cached block that is big enough */
    for (int i = 0; i < FA_SCRATCH_CACHE_SLOTS; i++)
        if (c->block[i] && c->bytes[i] >= *bytes && (best < 0 || c->bytes[i] < c->bytes[best])) best = i;
    if (best >= 0) {
        void *b = c->block[best];
        c->block[best] = NULL;
        c->total -= c->bytes[best];
        *bytes = c->bytes[best];
        return b;
    }
    if (*bytes > SIZE_MAX - 64) return NULL;
    *bytes = fa_scratch_size(*bytes);
    return aligned_alloc(64, *bytes);
}

void fa_scratch_give(void *block, size_t bytes)
{
    if (!block) return;
    fa_scratch_cache *c = &fa_cache;
    const size_t size = bytes;
    if (!c->registered) fa_cache_register(c);
    int slot = -1, smallest = -1;
    for (int i = 0; i < FA_SCRATCH_CACHE_SLOTS; i++) {
        if (!c->block[i]) {
            if (slot < 0) slot = i;
        } else if (smallest < 0 || c->bytes[i] < c->bytes[smallest]) {
            smallest = i;
        }
    }
    /* full: the block replaces the smallest one if it is bigger */
    if (slot < 0 && smallest >= 0 && c->bytes[smallest] < size) {
        free(c->block[smallest]);
        c->total -= c->bytes[smallest];
        c->block[smallest] = NULL;
        slot = smallest;
    }
    if (!c->registered || slot < 0 || size > FA_SCRATCH_CACHE_BYTES - c->total) {
        free(block);
        return;
    }
    c->block[slot] = block;
    c->bytes[slot] = size;
    c->total += size;
}

int fa_scratch_cached(size_t *bytes)
{
    int n = 0;
    for (int i = 0; i < FA_SCRATCH_CACHE_SLOTS; i++) n += fa_cache.block[i] != NULL;
    if (bytes) *bytes = fa_cache.total;
    return n;
}
