"""fastattn's thread pool, seen from Python: how long idle workers spin,
sharing the pool with OpenBLAS, and threadpoolctl support.

fastattn runs its kernels on its own pool of POSIX threads (csrc/fa_pool.c).
An idle worker spins for a short, bounded time and then sleeps, so fastattn
does not keep cores busy after a call.  numpy's OpenBLAS keeps its own
workers spinning for about 0.1 s after each threaded call (2^28 cycles),
long enough to take cores from whatever runs next; fastattn therefore hands
OpenBLAS its pool (``openblas_set_threads_callback_function``, OpenBLAS >=
0.3.27): numpy's matrix products and fastattn's kernels then run on one set
of threads and never fight over cores.
"""
import ctypes
import os
import re

from fastattn import _config, _core

# How OpenBLAS builds name their functions: plain, and the symbol-renamed
# builds numpy and scipy bundle (64-bit and 32-bit integers).
_NAMINGS = (("", ""), ("", "64_"), ("scipy_", ""), ("scipy_", "64_"))
_SLOTS = 4  # OpenBLAS libraries that can share the pool at once (FA_POOL_BLAS_SLOTS)

_shared = {}  # path of each OpenBLAS sharing the pool -> (setter address, slot)
_MAX_THREADS = re.compile(r"MAX_THREADS=(\d+)")
_VERSION = re.compile(r"OpenBLAS (\d+)\.(\d+)\.(\d+)")


def set_spin_time(seconds):
    """Set how long an idle fastattn worker spins before it sleeps.

    Parameters
    ----------
    seconds : float
        >= 0 (default 1e-4).  Longer keeps workers ready for calls that
        follow each other closely (decoding loops); shorter returns the
        cores sooner to other thread pools and processes.  0 sleeps at once.
    """
    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)):
        raise TypeError(f"seconds must be a real number, got {type(seconds).__name__}")
    if not seconds >= 0 or seconds > 10:
        raise ValueError(f"seconds must be in [0, 10], got {seconds!r}")
    _core.set_spin(int(round(seconds * 1e9)))


def get_spin_time():
    """Seconds an idle fastattn worker spins before it sleeps."""
    return _core.get_spin() / 1e9


def _loaded_libraries():
    """Paths of the shared libraries loaded in this process."""
    try:
        with open("/proc/self/maps") as f:
            fields = (line.split(None, 5) for line in f)
            return sorted({x[5].strip() for x in fields if len(x) == 6 and x[5].startswith("/")})
    except OSError:
        pass
    try:  # elsewhere (macOS), threadpoolctl knows where the BLAS libraries are
        from threadpoolctl import threadpool_info
    except ImportError:
        return []
    return [lib["filepath"] for lib in threadpool_info()]


def _openblas(lib):
    """(setter address, address of blas_num_threads, MAX_THREADS) of a loaded
    OpenBLAS that can run its threaded jobs on the pool, else None."""
    for prefix, suffix in _NAMINGS:
        setter = getattr(lib, f"{prefix}openblas_set_threads_callback_function{suffix}", None)
        config = getattr(lib, f"{prefix}openblas_get_config{suffix}", None)
        if setter is not None and config is not None:
            break
    else:
        return None
    config.restype = ctypes.c_char_p
    text = (config() or b"").decode("ascii", "replace")
    version, max_threads = _VERSION.search(text), _MAX_THREADS.search(text)
    if not version or not max_threads or tuple(map(int, version.groups())) < (0, 3, 27):
        return None
    try:  # its own workers: the first blas_num_threads - 1 thread numbers
        servers = ctypes.addressof(ctypes.c_int.in_dll(lib, "blas_num_threads"))
    except ValueError:
        return None
    return ctypes.cast(setter, ctypes.c_void_p).value, servers, int(max_threads.group(1))


def _openblas_libraries():
    """{path: _openblas(...)} for each loaded OpenBLAS that can share the pool."""
    found = {}
    for path in _loaded_libraries():
        if "openblas" not in os.path.basename(path).lower():
            continue
        try:
            info = _openblas(ctypes.CDLL(path))
        except OSError:
            continue
        if info is not None:
            found[path] = info
    return found


_OPENMP_RUNTIMES = ("libgomp", "libiomp", "libomp")  # GCC's, Intel's and LLVM's
_host_openmp = None  # the OpenMP runtime fastattn.torch's calls run on (fastattn.torch.share_threads)


def _openmp_runtime(prefer=None):
    """(path, address of GOMP_parallel, address of omp_get_thread_num) of a
    loaded OpenMP runtime, one under the folder `prefer` first; else None."""
    paths = [p for p in _loaded_libraries() if os.path.basename(p).lower().startswith(_OPENMP_RUNTIMES)]
    if prefer:
        paths.sort(key=lambda p: not p.startswith(os.path.join(prefer, "")))
    for path in paths:
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        parallel = getattr(lib, "GOMP_parallel", None)
        thread_num = getattr(lib, "omp_get_thread_num", None)
        if parallel is not None and thread_num is not None:
            return (path, ctypes.cast(parallel, ctypes.c_void_p).value,
                    ctypes.cast(thread_num, ctypes.c_void_p).value)
    return None


def share_blas_threads(enable=True):
    """Run OpenBLAS's threaded work on fastattn's thread pool (or stop).

    fastattn does this when it is imported, for every OpenBLAS loaded by
    then that supports it (OpenBLAS >= 0.3.27, as numpy's wheels bundle);
    set the environment variable ``FASTATTN_SHARE_BLAS=0`` to keep OpenBLAS
    on its own threads from the start.  Call it again after loading another
    OpenBLAS (scipy's) to share that one too.

    Parameters
    ----------
    enable : bool
        True: hand the pool to every loaded OpenBLAS that accepts it.
        False: give each one its own threads back.

    Returns
    -------
    list of str
        Paths of the OpenBLAS libraries that run on fastattn's pool now.
    """
    if not isinstance(enable, bool):
        raise TypeError(f"enable must be a bool, got {type(enable).__name__}")
    if enable and _core.pool_threaded():
        for path, (setter, servers, max_threads) in _openblas_libraries().items():
            slot = _shared[path][1] if path in _shared else len(_shared)
            if slot < _SLOTS:
                _core.set_blas_callback(setter, slot, servers, max_threads)
                _shared[path] = (setter, slot)
    elif not enable:
        for setter, _ in _shared.values():
            _core.set_blas_callback(setter, -1, 0, 0)
        _shared.clear()
    return sorted(_shared)


def thread_pool_info():
    """The state of fastattn's thread pool.

    Returns
    -------
    dict
        ``workers`` (threads started so far, besides the callers),
        ``sleeping`` (of those, asleep now), ``spin_time`` (seconds an idle
        worker spins before sleeping), ``blas_shared`` (paths of the
        OpenBLAS libraries whose threaded work runs on this pool),
        ``blas_runs`` (sets of OpenBLAS jobs it has run), ``torch_openmp``
        (path of the OpenMP runtime on whose threads calls through
        ``fastattn.torch`` run, or None: see
        :func:`fastattn.torch.share_threads`) and ``torch_runs`` (calls
        run there so far).
    """
    workers, sleeping = _core.pool_workers()
    return {"workers": workers, "sleeping": sleeping, "spin_time": get_spin_time(),
            "blas_shared": sorted(_shared), "blas_runs": _core.blas_runs(), "torch_openmp": _host_openmp,
            "torch_runs": _core.host_runs()}


def _register_with_threadpoolctl():
    """Let threadpoolctl see and limit fastattn's pool (threadpool_limits,
    threadpool_info), as user_api "fastattn"."""
    try:
        import threadpoolctl
    except ImportError:
        return
    if not hasattr(threadpoolctl, "register"):  # threadpoolctl < 3.5
        return

    class FastattnController(threadpoolctl.LibController):
        user_api = "fastattn"
        internal_api = "fastattn"
        filename_prefixes = ("_core",)
        check_symbols = ("fa_pool_set_spin",)

        def get_num_threads(self):
            return _config.get_num_threads()

        def set_num_threads(self, num_threads):
            _config.set_num_threads(num_threads)

        def get_version(self):
            from fastattn import __version__
            return __version__

    threadpoolctl.register(FastattnController)


def _at_import():
    if os.environ.get("FASTATTN_SHARE_BLAS", "1").strip() not in ("0", "false", "no", "off"):
        share_blas_threads(True)
    _register_with_threadpoolctl()
