# cython: language_level=3, boundscheck=False, wraparound=False
"""Thin wrappers over the C kernels (csrc/fastattn.h).

Everything here trusts its caller, fastattn._problem, which builds every
Problem from validated arrays.  A Problem is an fa_problem filled by name;
each operation has its own entry point, which releases the GIL for the
whole kernel call and turns status codes into exceptions.
"""
from cpython.object cimport PyObject
from libc.stdint cimport int32_t, int64_t, uint64_t, uintptr_t
from fastattn._capi cimport *


# The head of numpy's PyArrayObject: after the object header, the pointer to
# element 0.  numpy keeps this layout public and stable (1.x and 2.x), and
# reading it directly costs nanoseconds where __array_interface__ costs
# microseconds, a large part of a small call.
cdef extern from *:
    """
    typedef struct { PyObject_HEAD char *data; } fastattn_ndarray_head;
    """
    ctypedef struct fastattn_ndarray_head:
        char *data


cdef object _ndarray = None


def address(a):
    """Address of element 0 of the numpy array a (TypeError for anything else)."""
    global _ndarray
    if _ndarray is None:
        import numpy
        _ndarray = numpy.ndarray
    if not isinstance(a, _ndarray):
        raise TypeError(f"address() needs a numpy.ndarray, got {type(a).__name__}")
    return <uintptr_t>(<fastattn_ndarray_head *><PyObject *>a).data

DTYPE_F32 = FA_F32
DTYPE_F64 = FA_F64
DTYPE_F16 = FA_F16
DTYPE_BF16 = FA_BF16
DTYPE_I8 = FA_I8
DTYPE_E4M3 = FA_E4M3
DTYPE_E5M2 = FA_E5M2
MASK_NONE = FA_MASK_NONE
MASK_BOOL = FA_MASK_BOOL
MASK_F32 = FA_MASK_F32
MASK_F64 = FA_MASK_F64
MASK_F16 = FA_MASK_F16
MASK_BF16 = FA_MASK_BF16
WEIGHTS_SOFTMAX = FA_WEIGHTS_SOFTMAX
WEIGHTS_DOT = FA_WEIGHTS_DOT

# Column indices of the entry table.
E_Q = FA_E_Q
E_K = FA_E_K
E_V = FA_E_V
E_OUT = FA_E_OUT
E_MASK = FA_E_MASK
E_LSE = FA_E_LSE
E_LQ = FA_E_LQ
E_LK = FA_E_LK
E_HEAD = FA_E_HEAD
E_DOUT = FA_E_DOUT
E_DELTA = FA_E_DELTA
E_GQ = FA_E_GQ
E_GK = FA_E_GK
E_GV = FA_E_GV
E_PAGES = FA_E_PAGES
E_KS = FA_E_KS
E_VS = FA_E_VS
E_TILES = FA_E_TILES
E_DROP = FA_E_DROP
E_DROP_ROW = FA_E_DROP_ROW
E_DROP_KEY = FA_E_DROP_KEY
E_GMASK = FA_E_GMASK
TILE_BLOCK = FA_TILE_BLOCK
BLOCK_MIXED = FA_BLOCK_MIXED
BLOCK_HIDDEN = FA_BLOCK_HIDDEN
BLOCK_VISIBLE = FA_BLOCK_VISIBLE
ENTRY_FIELDS = FA_ENTRY_FIELDS


class Rejected(RuntimeError):
    """The kernel found the problem inconsistent (FA_ERR_INVALID) before
    touching any memory: a planned call whose new arrays fail the kernel's
    own checks (a page id out of range) goes through the full checks."""


cdef int _check(int status) except -1:
    if status == FA_OK:
        return 0
    if status == FA_ERR_NOMEM:
        raise MemoryError("fastattn: could not allocate kernel scratch memory")
    if status == FA_ERR_ISA:
        raise RuntimeError("fastattn: the requested kernel path is not usable on this CPU")
    if status == FA_ERR_UNSUPPORTED:
        raise TypeError("fastattn: no kernel for this combination of element types")
    if status == FA_ERR_INVALID:
        raise Rejected(f"fastattn: kernel rejected the problem (status {status})")
    raise RuntimeError(f"fastattn: kernel rejected the problem (status {status})")


cdef class Problem:
    """One kernel problem: the fields of fa_problem, set by name.

    Addresses (q, k, v, out, lse, mask; for the backward dout, delta and the
    gradients gq, gk, gv, gmask) are of element 0 of each array;
    strides are in bytes (rs: rows, cs: columns, hs: heads of a group,
    ps: pages of a paged k or v, whose page table is `pages`).
    `keep` holds the arrays those addresses point into, so they live as long
    as the problem does.
    """
    cdef fa_problem p
    cdef const int64_t[:, ::1] _entries
    cdef const double[::1] _slopes
    cdef const double[::1] _sinks
    cdef const int32_t[::1] _pages
    cdef readonly object keep

    def __init__(self, *, int dtype, int kv_dtype, int path, int num_threads,
                 const int64_t[:, ::1] entries, int64_t d, int64_t dv, int64_t group=1,
                 uintptr_t q=0, int64_t q_rs=0, int64_t q_cs=0, int64_t q_hs=0,
                 uintptr_t k=0, int64_t k_rs=0, int64_t k_cs=0,
                 uintptr_t v=0, int64_t v_rs=0, int64_t v_cs=0,
                 uintptr_t out=0, int64_t out_rs=0, int64_t out_cs=0, int64_t out_hs=0,
                 uintptr_t lse=0, int64_t lse_rs=0, int64_t lse_hs=0,
                 int mask_kind=FA_MASK_NONE, uintptr_t mask=0, int64_t mask_rs=0, int64_t mask_cs=0,
                 int64_t mask_hs=0, uintptr_t mask_tiles=0, int64_t tiles_rs=0, int64_t tiles_cs=0,
                 int64_t tiles_hs=0, int weights=FA_WEIGHTS_SOFTMAX, double scale=1.0, bint causal=False,
                 bint top_left=False, int64_t q_shift=0, int64_t window_left=-1, int64_t window_right=-1, double softcap=0.0,
                 const double[::1] alibi_slopes=None, const double[::1] sinks=None,
                 double dropout_p=0.0, uint64_t dropout_seed=0,
                 const int32_t[::1] pages=None, int64_t page_size=0, int64_t n_pages=0,
                 int64_t k_ps=0, int64_t v_ps=0,
                 uintptr_t k_scales=0, int64_t ks_rs=0, int64_t ks_ps=0,
                 uintptr_t v_scales=0, int64_t vs_rs=0, int64_t vs_ps=0,
                 uintptr_t dout=0, int64_t dout_rs=0, int64_t dout_cs=0, int64_t dout_hs=0,
                 uintptr_t delta=0, int64_t delta_rs=0, int64_t delta_hs=0,
                 uintptr_t gq=0, int64_t gq_rs=0, int64_t gq_cs=0, int64_t gq_hs=0,
                 uintptr_t gk=0, int64_t gk_rs=0, int64_t gk_cs=0,
                 uintptr_t gv=0, int64_t gv_rs=0, int64_t gv_cs=0,
                 uintptr_t gmask=0, int64_t gmask_rs=0, int64_t gmask_cs=0, int64_t gmask_hs=0, keep=()):
        if entries.shape[1] != FA_ENTRY_FIELDS:
            raise ValueError("entry table has the wrong number of columns")
        self._entries = entries
        self._slopes = alibi_slopes
        self.keep = keep
        self.p.dtype = dtype
        self.p.kv_dtype = kv_dtype
        self.p.path = path
        self.p.num_threads = num_threads
        self.p.n_entries = entries.shape[0]
        self.p.entries = &entries[0, 0] if entries.shape[0] > 0 else NULL
        self.p.d = d
        self.p.dv = dv
        self.p.group = group
        self.p.q = <const void *>q
        self.p.q_rs, self.p.q_cs, self.p.q_hs = q_rs, q_cs, q_hs
        self.p.k = <const void *>k
        self.p.k_rs, self.p.k_cs = k_rs, k_cs
        self.p.v = <const void *>v
        self.p.v_rs, self.p.v_cs = v_rs, v_cs
        self.p.out = <void *>out
        self.p.out_rs, self.p.out_cs, self.p.out_hs = out_rs, out_cs, out_hs
        self.p.lse = <void *>lse
        self.p.lse_rs, self.p.lse_hs = lse_rs, lse_hs
        self.p.mask_kind = mask_kind
        self.p.mask = <const void *>mask
        self.p.mask_rs, self.p.mask_cs, self.p.mask_hs = mask_rs, mask_cs, mask_hs
        self.p.mask_tiles = <const uint8_t *>mask_tiles
        self.p.tiles_rs, self.p.tiles_cs, self.p.tiles_hs = tiles_rs, tiles_cs, tiles_hs
        self.p.weights = weights
        self.p.scale = scale
        self.p.causal = causal
        self.p.top_left = top_left
        self.p.q_shift = q_shift
        self.p.window_left = window_left
        self.p.window_right = window_right
        self.p.softcap = softcap
        self.p.alibi_slopes = &alibi_slopes[0] if alibi_slopes is not None and alibi_slopes.shape[0] > 0 else NULL
        self._sinks = sinks
        self.p.sinks = &sinks[0] if sinks is not None and sinks.shape[0] > 0 else NULL
        self.p.dropout_p = dropout_p
        self.p.dropout_seed = dropout_seed
        self._pages = pages
        self.p.pages = &pages[0] if pages is not None and pages.shape[0] > 0 else NULL
        self.p.page_size, self.p.n_pages, self.p.k_ps, self.p.v_ps = page_size, n_pages, k_ps, v_ps
        self.p.k_scales = <const float *>k_scales
        self.p.v_scales = <const float *>v_scales
        self.p.ks_rs, self.p.ks_ps, self.p.vs_rs, self.p.vs_ps = ks_rs, ks_ps, vs_rs, vs_ps
        self.p.dout = <const void *>dout
        self.p.dout_rs, self.p.dout_cs, self.p.dout_hs = dout_rs, dout_cs, dout_hs
        self.p.delta = <const void *>delta
        self.p.delta_rs, self.p.delta_hs = delta_rs, delta_hs
        self.p.gq = <void *>gq
        self.p.gq_rs, self.p.gq_cs, self.p.gq_hs = gq_rs, gq_cs, gq_hs
        self.p.gk = <void *>gk
        self.p.gk_rs, self.p.gk_cs = gk_rs, gk_cs
        self.p.gv = <void *>gv
        self.p.gv_rs, self.p.gv_cs = gv_rs, gv_cs
        self.p.gmask = <void *>gmask
        self.p.gmask_rs, self.p.gmask_cs, self.p.gmask_hs = gmask_rs, gmask_cs, gmask_hs

    def rebased(self, *, int num_threads, uintptr_t q, uintptr_t k, uintptr_t v, uintptr_t out, uintptr_t lse=0,
                const int64_t[:, ::1] entries=None, const int32_t[::1] pages=None, uintptr_t k_scales=0,
                uintptr_t v_scales=0, keep=()):
        """This problem on other arrays of the same layouts: a copy with the
        addresses of q, k, v, out and lse (and the thread count) replaced,
        and where given the entry table (as many entries), the page table
        and the scales.  A model calls attention with the same layouts over
        and over, and filling a problem field by field costs more than a
        small call."""
        cdef Problem c = Problem.__new__(Problem)
        c.p = self.p
        c._entries, c._slopes, c._sinks, c._pages = self._entries, self._slopes, self._sinks, self._pages
        if entries is not None:
            if entries.shape[0] != self.p.n_entries or entries.shape[1] != FA_ENTRY_FIELDS:
                raise ValueError("a rebased problem keeps its number of entries")
            c._entries = entries
            c.p.entries = &entries[0, 0] if entries.shape[0] > 0 else NULL
        if pages is not None:
            c._pages = pages
            c.p.pages = &pages[0] if pages.shape[0] > 0 else NULL
        if k_scales:
            c.p.k_scales = <const float *>k_scales
        if v_scales:
            c.p.v_scales = <const float *>v_scales
        c.keep = keep
        c.p.num_threads = num_threads
        c.p.q, c.p.k, c.p.v = <const void *>q, <const void *>k, <const void *>v
        c.p.out, c.p.lse = <void *>out, <void *>lse
        return c

    @property
    def path(self):
        return self.p.path

    @property
    def n_entries(self):
        return self.p.n_entries


ctypedef int (*_operation)(const fa_problem *p) noexcept nogil


cdef _run(_operation op, Problem problem):
    cdef int status
    if problem.p.n_entries == 0:
        return
    with nogil:
        status = op(&problem.p)
    _check(status)


def attention(Problem problem not None):
    """Fused attention (fa_attention)."""
    _run(fa_attention, problem)


def scores(Problem problem not None):
    """The score matrix with every option applied (fa_scores)."""
    _run(fa_scores, problem)


def weighted_sum(Problem problem not None):
    """out = w v, w through the q fields (fa_weighted_sum)."""
    _run(fa_weighted_sum, problem)


def attention_backward(Problem problem not None):
    """The gradients of fused attention (fa_attention_backward)."""
    _run(fa_attention_backward, problem)


def exp_f32(int path, const float[::1] x, float[::1] y):
    """y = exp(x) with the softmax exponential of kernel path `path` (for accuracy tests)."""
    if x.shape[0] != y.shape[0]:
        raise ValueError("x and y differ in length")
    if x.shape[0] == 0:
        return
    cdef int status
    with nogil:
        status = fa_exp_f32(path, &x[0], &y[0], x.shape[0])
    _check(status)


def paths():
    """The kernel paths of this build, in order of preference: a tuple of
    (name, architecture, CPU features needed, supported by this CPU)."""
    return tuple(
        (fa_path_name(i).decode(), fa_path_arch(i).decode(), fa_path_features(i).decode(),
         bool(fa_path_supported(i)))
        for i in range(fa_path_count())
    )


def best_path():
    """Index of the best path this CPU and OS support."""
    return fa_best_path()


def path_runs():
    """Kernel calls that ran on each path so far (a tuple, by path index)."""
    return tuple(fa_path_runs(i) for i in range(fa_path_count()))


def pool_threaded():
    """True if calls can run on more than one thread (a POSIX threads build)."""
    return bool(fa_pool_threaded())


def pool_workers():
    """Workers the thread pool has started, and how many of them sleep now."""
    return fa_pool_workers(), fa_pool_sleeping()


def set_spin(int64_t ns):
    """How long (nanoseconds) an idle worker spins before it sleeps."""
    fa_pool_set_spin(ns)


def get_spin():
    return fa_pool_get_spin()


ctypedef void (*blas_callback_setter)(fa_blas_callback callback) noexcept nogil


def set_blas_callback(uintptr_t setter, int slot, uintptr_t server_threads, int max_threads):
    """Call OpenBLAS's openblas_set_threads_callback_function (at address
    `setter`) with the pool's callback for `slot` (OpenBLAS's
    blas_num_threads at address `server_threads`, its MAX_THREADS), or, for
    slot -1, with NULL to give OpenBLAS its own threads back."""
    cdef fa_blas_callback callback = NULL
    if slot >= 0:
        callback = fa_pool_blas_callback(slot, <const int *>server_threads, max_threads)
        if callback == NULL:
            raise ValueError(f"no callback slot {slot}")
    (<blas_callback_setter>setter)(callback)


def blas_runs():
    """Sets of OpenBLAS jobs the pool has run."""
    return fa_pool_blas_runs()


def set_host_openmp(uintptr_t parallel, uintptr_t thread_num):
    """The addresses of a loaded OpenMP runtime's GOMP_parallel and
    omp_get_thread_num, on whose threads host_calls routes teams (0, 0:
    none)."""
    fa_pool_set_host_openmp(<fa_omp_parallel>parallel, <fa_omp_thread_num>thread_num)


def host_calls(int max_threads):
    """Teams of this thread's later calls run on the host's OpenMP threads,
    at most max_threads each (0: on the pool).  Returns the previous value."""
    return fa_pool_host_calls(max_threads)


def host_runs():
    """Teams run on the host's OpenMP threads so far."""
    return fa_pool_host_runs()


def compiler():
    return fa_compiler().decode()
