# Declarations of the C interface in csrc/fastattn.h, written once.
from libc.stdint cimport int32_t, int64_t, uint8_t, uint64_t

cdef extern from "fastattn.h" nogil:
    enum:
        FA_OK
        FA_ERR_NOMEM
        FA_ERR_INVALID
        FA_ERR_ISA
        FA_ERR_UNSUPPORTED
        FA_F32
        FA_F64
        FA_F16
        FA_BF16
        FA_I8
        FA_E4M3
        FA_E5M2
        FA_MASK_NONE
        FA_MASK_BOOL
        FA_MASK_F32
        FA_MASK_F64
        FA_MASK_F16
        FA_MASK_BF16
        FA_WEIGHTS_SOFTMAX
        FA_WEIGHTS_DOT
        FA_E_Q
        FA_E_K
        FA_E_V
        FA_E_OUT
        FA_E_MASK
        FA_E_LSE
        FA_E_LQ
        FA_E_LK
        FA_E_HEAD
        FA_E_DOUT
        FA_E_DELTA
        FA_E_GQ
        FA_E_GK
        FA_E_GV
        FA_E_PAGES
        FA_E_KS
        FA_E_VS
        FA_E_TILES
        FA_E_DROP
        FA_E_DROP_ROW
        FA_E_DROP_KEY
        FA_E_GMASK
        FA_TILE_BLOCK
        FA_BLOCK_MIXED
        FA_BLOCK_HIDDEN
        FA_BLOCK_VISIBLE
        FA_ENTRY_FIELDS

    ctypedef struct fa_problem:
        int dtype
        int kv_dtype
        int path
        int num_threads
        int64_t n_entries
        const int64_t *entries
        int64_t d
        int64_t dv
        int64_t group
        int64_t q_hs, out_hs, lse_hs, mask_hs
        const void *q
        const void *k
        const void *v
        void *out
        void *lse
        int64_t q_rs, q_cs, k_rs, k_cs, v_rs, v_cs, out_rs, out_cs, lse_rs
        int mask_kind
        const void *mask
        int64_t mask_rs, mask_cs
        const uint8_t *mask_tiles
        int64_t tiles_rs, tiles_cs, tiles_hs
        int weights
        double scale
        int causal
        int top_left
        int64_t q_shift
        int64_t window_left, window_right
        double softcap
        const double *alibi_slopes
        const double *sinks
        double dropout_p
        uint64_t dropout_seed
        const int32_t *pages
        int64_t page_size, n_pages, k_ps, v_ps
        const float *k_scales
        const float *v_scales
        int64_t ks_rs, ks_ps, vs_rs, vs_ps
        const void *dout
        const void *delta
        void *gq
        void *gk
        void *gv
        int64_t dout_rs, dout_cs, dout_hs, delta_rs, delta_hs
        int64_t gq_rs, gq_cs, gq_hs, gk_rs, gk_cs, gv_rs, gv_cs
        void *gmask
        int64_t gmask_rs, gmask_cs, gmask_hs

    int fa_attention(const fa_problem *p)
    int fa_scores(const fa_problem *p)
    int fa_weighted_sum(const fa_problem *p)
    int fa_attention_backward(const fa_problem *p)
    int fa_path_count()
    const char *fa_path_name(int path)
    const char *fa_path_arch(int path)
    const char *fa_path_features(int path)
    int fa_path_supported(int path)
    int fa_best_path()
    int64_t fa_path_runs(int path)
    const char *fa_compiler()
    int fa_exp_f32(int path, const float *x, float *y, int64_t n)


cdef extern from "fa_pool.h" nogil:
    int fa_pool_threaded()
    int fa_pool_workers()
    int fa_pool_sleeping()
    void fa_pool_set_spin(int64_t ns)
    int64_t fa_pool_get_spin()
    ctypedef void (*fa_blas_callback)(int sync, void (*dojob)(int, void *, int) noexcept nogil, int numjobs,
                                      size_t elsize, void *jobdata, int dojob_data) noexcept nogil
    fa_blas_callback fa_pool_blas_callback(int slot, const int *server_threads, int max_threads)
    int64_t fa_pool_blas_runs()
    ctypedef void (*fa_omp_parallel)(void (*fn)(void *) noexcept nogil, void *data, unsigned num_threads,
                                     unsigned flags) noexcept nogil
    ctypedef int (*fa_omp_thread_num)() noexcept nogil
    void fa_pool_set_host_openmp(fa_omp_parallel parallel, fa_omp_thread_num thread_num)
    int fa_pool_host_calls(int max_threads)
    int64_t fa_pool_host_runs()
