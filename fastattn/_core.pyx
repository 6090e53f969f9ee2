# cython: language_level=3, boundscheck=False, wraparound=False
"""Thin wrappers over the C kernels.

Everything here trusts its caller (fastattn._api), which has validated every
array, shape, stride and option.  The wrappers fill one fa_problem, release
the GIL for the whole kernel call and turn status codes into exceptions.
"""
from libc.stdint cimport int64_t, uintptr_t
from fastattn._capi cimport *

KIND_ATTENTION = 0
KIND_SCORES = 1
KIND_WSUM = 2

DTYPE_F32 = FA_F32
DTYPE_F64 = FA_F64
DTYPE_F16 = FA_F16
DTYPE_BF16 = FA_BF16
MASK_NONE = FA_MASK_NONE
MASK_BOOL = FA_MASK_BOOL
MASK_F32 = FA_MASK_F32
MASK_F64 = FA_MASK_F64
WEIGHTS_SOFTMAX = FA_WEIGHTS_SOFTMAX
WEIGHTS_DOT = FA_WEIGHTS_DOT
ISA_COUNT = FA_ISA_COUNT

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
ENTRY_FIELDS = FA_ENTRY_FIELDS


cdef int _check(int status) except -1:
    if status == FA_OK:
        return 0
    if status == FA_ERR_NOMEM:
        raise MemoryError("fastattn: could not allocate kernel scratch memory")
    if status == FA_ERR_ISA:
        raise RuntimeError("fastattn: the requested instruction set is not usable on this CPU")
    raise RuntimeError(f"fastattn: kernel rejected the problem (status {status})")


def run(int kind, int dtype, int isa, int num_threads, const int64_t[:, ::1] entries,
        int64_t d, int64_t dv,
        uintptr_t q, uintptr_t k, uintptr_t v, uintptr_t out, uintptr_t lse,
        tuple strides, int64_t group, tuple head_strides,
        int mask_kind, uintptr_t mask, int64_t mask_rs, int64_t mask_cs,
        int weights, double scale, bint causal, bint top_left, int64_t window_left, int64_t window_right,
        double softcap, const double[::1] alibi_slopes):
    """Run one kernel. strides = (q_rs, q_cs, k_rs, k_cs, v_rs, v_cs, out_rs, out_cs, lse_rs)
    and head_strides = (q_hs, out_hs, lse_hs, mask_hs), all in bytes; addresses are those
    of element 0 of each array."""
    cdef fa_problem p
    cdef int status
    if entries.shape[1] != FA_ENTRY_FIELDS:
        raise ValueError("entry table has the wrong number of columns")
    p.dtype = dtype
    p.isa = isa
    p.num_threads = num_threads
    p.n_entries = entries.shape[0]
    p.entries = &entries[0, 0] if entries.shape[0] > 0 else NULL
    p.d = d
    p.dv = dv
    p.q = <const void *>q
    p.k = <const void *>k
    p.v = <const void *>v
    p.out = <void *>out
    p.lse = <void *>lse
    p.q_rs, p.q_cs, p.k_rs, p.k_cs, p.v_rs, p.v_cs, p.out_rs, p.out_cs, p.lse_rs = strides
    p.group = group
    p.q_hs, p.out_hs, p.lse_hs, p.mask_hs = head_strides
    p.mask_kind = mask_kind
    p.mask = <const void *>mask
    p.mask_rs = mask_rs
    p.mask_cs = mask_cs
    p.weights = weights
    p.scale = scale
    p.causal = causal
    p.top_left = top_left
    p.window_left = window_left
    p.window_right = window_right
    p.softcap = softcap
    p.alibi_slopes = &alibi_slopes[0] if alibi_slopes is not None and alibi_slopes.shape[0] > 0 else NULL
    if p.n_entries == 0:
        return
    with nogil:
        if kind == 0:
            status = fa_attention(&p)
        elif kind == 1:
            status = fa_scores(&p)
        else:
            status = fa_weighted_sum(&p)
    _check(status)


def exp_f32(int isa, const float[::1] x, float[::1] y):
    """y = exp(x) with the softmax exponential of path `isa` (for accuracy tests)."""
    if x.shape[0] != y.shape[0]:
        raise ValueError("x and y differ in length")
    if x.shape[0] == 0:
        return
    cdef int status
    with nogil:
        status = fa_exp_f32(isa, &x[0], &y[0], x.shape[0])
    _check(status)


def cpu_isa():
    """Index of the best path this CPU and OS support."""
    return fa_cpu_isa()


def isa_name(int isa):
    return fa_isa_name(isa).decode()


def openmp_version():
    """The OpenMP version the extension was built with (yyyymm), 0 if serial."""
    return fa_openmp_enabled()


def omp_max_threads():
    """omp_get_max_threads(): follows OMP_NUM_THREADS and omp_set_num_threads."""
    return fa_omp_max_threads()


def compiler():
    return fa_compiler().decode()
