"""fastattn: fast CPU attention kernels.

Blocked, fused, multithreaded C kernels for attention under a numpy API.
``fastattn.reference`` holds plain numpy float64 implementations of every
function, for checking results.
"""
__version__ = "0.1.0"

try:
    from fastattn import _core  # noqa: F401  (the compiled kernels)
except ImportError as exc:  # pragma: no cover - depends on how fastattn was installed
    raise ImportError(
        "fastattn's compiled extension fastattn._core is not importable from "
        f"{__path__[0]}: build it in place with `pip install -e .`, or, if fastattn is "
        "installed, run Python outside the source directory"
    ) from exc

from fastattn._api import (
    attention,
    attention_backward,
    attention_paged,
    attention_varlen,
    attention_varlen_backward,
    merge,
    scores,
    cache_write,
    weighted_sum,
)
from fastattn._linear import linear_attention
from fastattn._masks import BlockMask, block_mask, block_mask_from_function
from fastattn._config import (
    available_isas,
    get_isa,
    get_num_threads,
    set_isa,
    set_num_threads,
    show_config,
    use_isa,
)
from fastattn import _threads
from fastattn._threads import get_spin_time, set_spin_time, share_blas_threads, thread_pool_info

_threads._at_import()  # share the pool with OpenBLAS, register with threadpoolctl

__all__ = [
    "attention",
    "attention_backward",
    "attention_paged",
    "attention_varlen",
    "attention_varlen_backward",
    "block_mask",
    "block_mask_from_function",
    "BlockMask",
    "cache_write",
    "merge",
    "linear_attention",
    "scores",
    "weighted_sum",
    "available_isas",
    "get_isa",
    "set_isa",
    "use_isa",
    "get_num_threads",
    "set_num_threads",
    "show_config",
    "get_spin_time",
    "set_spin_time",
    "share_blas_threads",
    "thread_pool_info",
    "__version__",
]
