"""Type stubs for the compiled module fastattn._core (thin kernel wrappers)."""
from typing import Optional, Tuple

import numpy as np
import numpy.typing as npt

KIND_ATTENTION: int
KIND_SCORES: int
KIND_WSUM: int
DTYPE_F32: int
DTYPE_F64: int
DTYPE_F16: int
DTYPE_BF16: int
MASK_NONE: int
MASK_BOOL: int
MASK_F32: int
MASK_F64: int
WEIGHTS_SOFTMAX: int
WEIGHTS_DOT: int
ISA_COUNT: int
E_Q: int
E_K: int
E_V: int
E_OUT: int
E_MASK: int
E_LSE: int
E_LQ: int
E_LK: int
E_HEAD: int
ENTRY_FIELDS: int

def run(
    kind: int,
    dtype: int,
    isa: int,
    num_threads: int,
    entries: npt.NDArray[np.int64],
    d: int,
    dv: int,
    q: int,
    k: int,
    v: int,
    out: int,
    lse: int,
    strides: Tuple[int, int, int, int, int, int, int, int, int],
    group: int,
    head_strides: Tuple[int, int, int, int],
    mask_kind: int,
    mask: int,
    mask_rs: int,
    mask_cs: int,
    weights: int,
    scale: float,
    causal: bool,
    top_left: bool,
    window_left: int,
    window_right: int,
    softcap: float,
    alibi_slopes: Optional[npt.NDArray[np.float64]],
) -> None: ...
def exp_f32(isa: int, x: npt.NDArray[np.float32], y: npt.NDArray[np.float32]) -> None: ...
def cpu_isa() -> int: ...
def isa_name(isa: int) -> str: ...
def openmp_version() -> int: ...
def omp_max_threads() -> int: ...
def compiler() -> str: ...
