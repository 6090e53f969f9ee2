"""Library-wide settings: thread count and kernel path (instruction set)."""
import contextlib
import os
import sys
import warnings

from fastattn import _core

ISA_NAMES = tuple(_core.isa_name(i) for i in range(_core.ISA_COUNT))

_num_threads = None  # set_num_threads() value; None = follow the environment

# GNU OpenMP cannot start threads in a child forked from a process whose
# OpenMP thread pool exists: the child would hang in its first parallel
# region.  So a child forked after fastattn has run threaded runs serially.
_pool_started = False
_forked_child = False


def _after_fork_in_child():
    global _forked_child
    if _pool_started:
        _forked_child = True


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
_isa_cap = None  # set_isa() value (index); None = the FASTATTN_ISA cap or the best


def _usable_cpus():
    """CPUs this process may run on (respects affinity masks and containers)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _check_thread_count(n, name):
    if isinstance(n, bool) or not isinstance(n, int):
        try:
            import operator

            n = operator.index(n)
        except TypeError:
            raise TypeError(f"{name} must be an int, got {type(n).__name__}") from None
    if n < 1:
        raise ValueError(f"{name} must be >= 1, got {n}")
    return n


def set_num_threads(n):
    """Set the default number of threads for fastattn calls (None: follow the environment).

    Parameters
    ----------
    n : int or None
        Threads per call, >= 1.  ``None`` restores the default, which follows
        ``OMP_NUM_THREADS`` and threadpoolctl limits and otherwise uses every
        CPU this process may run on.
    """
    global _num_threads
    _num_threads = None if n is None else _check_thread_count(n, "n")


def get_num_threads():
    """Threads a call uses when it does not pass ``num_threads``."""
    if _forked_child:
        return 1
    if _num_threads is not None:
        return _num_threads
    n = _core.omp_max_threads()
    if "OMP_NUM_THREADS" not in os.environ:
        n = min(n, _usable_cpus())
    return max(1, n)


def resolve_threads(num_threads):
    """Threads for one call (validating num_threads), noting when the pool starts."""
    global _pool_started
    n = get_num_threads() if num_threads is None else _check_thread_count(num_threads, "num_threads")
    if _forked_child:
        return 1
    if n > 1:
        _pool_started = True
    return n


def _isa_index(name, what):
    if not isinstance(name, str):
        raise TypeError(f"{what} must be a str, got {type(name).__name__}")
    try:
        return ISA_NAMES.index(name.lower())
    except ValueError:
        raise ValueError(f"{what} must be one of {', '.join(ISA_NAMES)}, got {name!r}") from None


def _env_isa_cap():
    value = os.environ.get("FASTATTN_ISA", "").strip()
    if not value:
        return None
    try:
        return _isa_index(value, "FASTATTN_ISA")
    except ValueError as exc:
        warnings.warn(f"{exc}; ignoring it", RuntimeWarning, stacklevel=3)
        return None


_env_cap = _env_isa_cap()


def available_isas():
    """Kernel paths this CPU supports, from the portable one up."""
    return list(ISA_NAMES[: _core.cpu_isa() + 1])


def isa_index():
    best = _core.cpu_isa()
    cap = _isa_cap if _isa_cap is not None else _env_cap
    return best if cap is None else min(best, cap)


def get_isa():
    """The kernel path calls use now: 'avx512', 'avx2' or 'generic'."""
    return ISA_NAMES[isa_index()]


def set_isa(name):
    """Cap the kernel path ('generic', 'avx2', 'avx512'); None restores the default.

    The default is the best path the CPU supports, capped by the
    ``FASTATTN_ISA`` environment variable.  Asking for a path the CPU lacks is
    a ValueError.
    """
    global _isa_cap
    if name is None:
        _isa_cap = None
        return
    index = _isa_index(name, "isa")
    if index > _core.cpu_isa():
        raise ValueError(f"isa {name!r} is not supported by this CPU (available: {', '.join(available_isas())})")
    _isa_cap = index


@contextlib.contextmanager
def use_isa(name):
    """Context manager: run the enclosed calls on kernel path `name`."""
    global _isa_cap
    saved = _isa_cap
    set_isa(name)
    try:
        yield
    finally:
        _isa_cap = saved


def show_config(file=None):
    """Print the version, build, OpenMP and kernel-path configuration."""
    from fastattn import __version__

    omp = _core.openmp_version()
    lines = [
        f"fastattn {__version__}",
        f"  python          {sys.version.split()[0]}",
        f"  compiler        {_core.compiler()}",
        f"  OpenMP          {('version ' + str(omp)) if omp else 'not available (serial build)'}",
        f"  threads         {get_num_threads()} (usable CPUs: {_usable_cpus()}, "
        f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')})",
        f"  kernel path     {get_isa()} (CPU supports: {', '.join(available_isas())}; "
        f"FASTATTN_ISA={os.environ.get('FASTATTN_ISA', 'unset')})",
    ]
    print("\n".join(lines), file=file)
