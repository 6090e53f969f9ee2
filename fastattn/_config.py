"""Library-wide settings: thread count and kernel path.

Kernel paths are chosen by capability: each path of this build declares its
architecture and the CPU features it needs (csrc/fa_dispatch.c), the
default is the best one this CPU supports, and FASTATTN_ISA or set_isa()
name another.
"""
import contextlib
import os
import sys

from fastattn import _core, _validate

_num_threads = None  # set_num_threads() value; None = follow the environment
_environment_threads = 1  # the environment's default, read at import and by set_num_threads(None)


def _usable_cpus():
    """CPUs this process may run on (respects affinity masks and containers)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def set_num_threads(n):
    """Set the default number of threads for fastattn calls (None: follow the environment).

    Parameters
    ----------
    n : int or None
        Threads per call, >= 1.  ``None`` restores the default:
        ``OMP_NUM_THREADS`` when set (its first entry), otherwise every CPU
        this process may run on, both read again now (as at import; calls
        do not read them, as OpenMP runtimes read ``OMP_NUM_THREADS`` once).
        ``threadpoolctl.threadpool_limits`` sets it too (user_api
        ``"fastattn"``).
    """
    global _num_threads, _environment_threads
    if n is None:
        _num_threads, _environment_threads = None, _env_threads() or _usable_cpus()
    else:
        _num_threads = _validate.count(n, "n")


def _env_threads():
    """OMP_NUM_THREADS's first entry, if it is a positive integer."""
    value = os.environ.get("OMP_NUM_THREADS", "").split(",")[0].strip()
    return int(value) if value.isdigit() and int(value) > 0 else None


def get_num_threads():
    """Threads a call uses when it does not pass ``num_threads``."""
    if not _core.pool_threaded():
        return 1
    if _num_threads is not None:
        return _num_threads
    return _environment_threads


set_num_threads(None)  # the environment's default, once


def resolve_threads(num_threads):
    """Threads for one call (validating num_threads)."""
    return get_num_threads() if num_threads is None else _validate.count(num_threads, "num_threads")


# The kernel paths of this build, in order of preference: (name, architecture,
# CPU features needed, whether this CPU has them).
PATHS = _core.paths()
ISA_NAMES = tuple(p[0] for p in PATHS)


def _path_index(name, what):
    """Index of the kernel path called `name`; ValueError if this build has no
    such path or this CPU cannot run it."""
    if not isinstance(name, str):
        raise TypeError(f"{what} must be a str, got {type(name).__name__}")
    key = name.strip().lower()
    if key not in ISA_NAMES:
        raise ValueError(f"{what} must name a kernel path of this build ({', '.join(ISA_NAMES)}), got {name!r}")
    index = ISA_NAMES.index(key)
    if not PATHS[index][3]:
        raise ValueError(f"{what}: kernel path {key!r} needs CPU features this CPU lacks "
                         f"({PATHS[index][2]}); this CPU runs {', '.join(available_isas())}")
    return index


def available_isas():
    """Kernel paths this CPU supports, the portable one first, the preferred one last."""
    return [p[0] for p in PATHS if p[3]]


def _env_path():
    value = os.environ.get("FASTATTN_ISA", "").strip()
    return _path_index(value, "FASTATTN_ISA") if value else None


_env_choice = _env_path()  # an unknown or unsupported FASTATTN_ISA fails the import, naming it
_choice = None  # set_isa() value (index); None = FASTATTN_ISA or the best path


def path_index():
    """Index of the kernel path calls run on now."""
    if _choice is not None:
        return _choice
    return _core.best_path() if _env_choice is None else _env_choice


def get_isa():
    """The kernel path calls use now, e.g. 'avx512', 'avx2' or 'generic'."""
    return ISA_NAMES[path_index()]


def set_isa(name):
    """Run calls on the kernel path `name` (see available_isas()); None restores the default.

    The default is the path named by the ``FASTATTN_ISA`` environment
    variable, else the best path this CPU supports.  A name this build has no
    path for, or a path whose CPU features this CPU lacks, is a ValueError.
    """
    global _choice
    _choice = None if name is None else _path_index(name, "isa")


@contextlib.contextmanager
def use_isa(name):
    """Context manager: run the enclosed calls on kernel path `name`."""
    global _choice
    saved = _choice
    set_isa(name)
    try:
        yield
    finally:
        _choice = saved


def path_runs():
    """Kernel calls that have run on each path, by name (for tests that check
    which path executed)."""
    return dict(zip(ISA_NAMES, _core.path_runs()))


def show_config(file=None):
    """Print the version, build, thread pool and kernel-path configuration."""
    from fastattn import __version__, _threads

    pool = _threads.thread_pool_info()
    lines = [
        f"fastattn {__version__}",
        f"  python          {sys.version.split()[0]}",
        f"  compiler        {_core.compiler()}",
        f"  threads         {get_num_threads()} (usable CPUs: {_usable_cpus()}, "
        f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')})",
        f"  thread pool     {'POSIX threads' if _core.pool_threaded() else 'none (serial build)'}; "
        f"{pool['workers']} workers started, idle workers spin {pool['spin_time'] * 1e6:g} us",
        f"  OpenBLAS shared {', '.join(pool['blas_shared']) or 'none'}",
        f"  torch's threads {pool['torch_openmp'] or 'not used'}",
        f"  kernel path     {get_isa()} (FASTATTN_ISA={os.environ.get('FASTATTN_ISA', 'unset')})",
        "  paths of this build (architecture; CPU features needed; runs on this CPU):",
    ]
    for name, arch, features, ok in PATHS:
        lines.append(f"    {name:<12}  {arch}; {features or 'none'}; {'yes' if ok else 'no'}")
    print("\n".join(lines), file=file)
