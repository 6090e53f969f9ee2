"""Type stubs for the compiled module fastattn._core (thin kernel wrappers)."""
from typing import Any, Optional, Tuple

import numpy as np
import numpy.typing as npt

DTYPE_F32: int
DTYPE_F64: int
DTYPE_F16: int
DTYPE_BF16: int
DTYPE_I8: int
DTYPE_E4M3: int
DTYPE_E5M2: int
MASK_NONE: int
MASK_BOOL: int
MASK_F32: int
MASK_F64: int
WEIGHTS_SOFTMAX: int
WEIGHTS_DOT: int
E_Q: int
E_K: int
E_V: int
E_OUT: int
E_MASK: int
E_LSE: int
E_LQ: int
E_LK: int
E_HEAD: int
E_DOUT: int
E_DELTA: int
E_GQ: int
E_GK: int
E_GV: int
E_PAGES: int
E_KS: int
E_VS: int
E_TILES: int
E_DROP: int
E_DROP_ROW: int
E_DROP_KEY: int
E_GMASK: int
TILE_BLOCK: int
BLOCK_MIXED: int
BLOCK_HIDDEN: int
BLOCK_VISIBLE: int
ENTRY_FIELDS: int

class Rejected(RuntimeError): ...

class Problem:
    """fa_problem filled by name (addresses of element 0, byte strides)."""

    keep: Tuple[Any, ...]
    path: int
    n_entries: int
    def __init__(
        self,
        *,
        dtype: int,
        kv_dtype: int,
        path: int,
        num_threads: int,
        entries: npt.NDArray[np.int64],
        d: int,
        dv: int,
        group: int = 1,
        q: int = 0,
        q_rs: int = 0,
        q_cs: int = 0,
        q_hs: int = 0,
        k: int = 0,
        k_rs: int = 0,
        k_cs: int = 0,
        v: int = 0,
        v_rs: int = 0,
        v_cs: int = 0,
        out: int = 0,
        out_rs: int = 0,
        out_cs: int = 0,
        out_hs: int = 0,
        lse: int = 0,
        lse_rs: int = 0,
        lse_hs: int = 0,
        mask_kind: int = 0,
        mask: int = 0,
        mask_rs: int = 0,
        mask_cs: int = 0,
        mask_hs: int = 0,
        mask_tiles: int = 0,
        tiles_rs: int = 0,
        tiles_cs: int = 0,
        tiles_hs: int = 0,
        weights: int = 0,
        scale: float = 1.0,
        causal: bool = False,
        top_left: bool = False,
        q_shift: int = 0,
        window_left: int = -1,
        window_right: int = -1,
        softcap: float = 0.0,
        alibi_slopes: Optional[npt.NDArray[np.float64]] = None,
        sinks: Optional[npt.NDArray[np.float64]] = None,
        dropout_p: float = 0.0,
        dropout_seed: int = 0,
        pages: Optional[npt.NDArray[np.int32]] = None,
        page_size: int = 0,
        n_pages: int = 0,
        k_ps: int = 0,
        v_ps: int = 0,
        k_scales: int = 0,
        ks_rs: int = 0,
        ks_ps: int = 0,
        v_scales: int = 0,
        vs_rs: int = 0,
        vs_ps: int = 0,
        dout: int = 0,
        dout_rs: int = 0,
        dout_cs: int = 0,
        dout_hs: int = 0,
        delta: int = 0,
        delta_rs: int = 0,
        delta_hs: int = 0,
        gq: int = 0,
        gq_rs: int = 0,
        gq_cs: int = 0,
        gq_hs: int = 0,
        gk: int = 0,
        gk_rs: int = 0,
        gk_cs: int = 0,
        gv: int = 0,
        gv_rs: int = 0,
        gv_cs: int = 0,
        gmask: int = 0,
        gmask_rs: int = 0,
        gmask_cs: int = 0,
        gmask_hs: int = 0,
        keep: Tuple[Any, ...] = (),
    ) -> None: ...
    def rebased(
        self, *, num_threads: int, q: int, k: int, v: int, out: int, lse: int = 0, keep: Tuple[Any, ...] = ()
    ) -> "Problem": ...

def attention(problem: Problem) -> None: ...
def scores(problem: Problem) -> None: ...
def weighted_sum(problem: Problem) -> None: ...
def attention_backward(problem: Problem) -> None: ...
def exp_f32(path: int, x: npt.NDArray[np.float32], y: npt.NDArray[np.float32]) -> None: ...
def paths() -> Tuple[Tuple[str, str, str, bool], ...]: ...
def best_path() -> int: ...
def path_runs() -> Tuple[int, ...]: ...
def pool_threaded() -> bool: ...
def pool_workers() -> Tuple[int, int]: ...
def set_spin(ns: int) -> None: ...
def get_spin() -> int: ...
def set_blas_callback(setter: int, slot: int, server_threads: int, max_threads: int) -> None: ...
def blas_runs() -> int: ...
def set_host_openmp(parallel: int, thread_num: int) -> None: ...
def host_calls(max_threads: int) -> int: ...
def host_runs() -> int: ...
def compiler() -> str: ...
def address(a: np.ndarray) -> int: ...
