"""The kernels' one settings object, their worker threads and the timing hook.

``settings.use_numba``   compiled numba kernels (default when numba imports; ``DS2EXP_NO_NUMBA=1``
                         or ``set_numba_enabled(False)`` selects the numpy fallback).
``settings.use_native`` the C++ RNN recurrences of kernels/native.py (default where a C++ compiler
                         builds them; ``DS2EXP_NO_NATIVE=1`` or ``set_native_enabled(False)``: numba/numpy).
``settings.threads``     worker threads the kernels may use (``DS2EXP_RNN_THREADS``, else
                         ``OMP_NUM_THREADS``, else the cores this process may run on).
``settings.timing_hook`` ``hook(name, wall_s, cpu_s)`` after every call of a ``@kernel`` entry
                         point (the step bench sums them), or None.

Results never depend on ``threads``: work is cut into the same pieces whatever the thread count
(one per RNN direction; a fixed number of batch chunks for a weight gradient), each piece is
computed by the same code, and partial sums are combined in a fixed order. Threads only decide
how many pieces run at once. numpy's BLAS (OpenBLAS) orders a product's sums by its own thread
count, so the first kernel call pins it to one thread for the process (``pin_blas_threads``) and the
kernels split their BLAS products themselves.
"""
from __future__ import annotations

import importlib
import functools
import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Iterable, Optional

import numpy as np

try:  # pragma: no cover - exercised implicitly
    importlib.import_module("numba")
    HAVE_NUMBA = True
except ImportError:  # also raised by a numba built for another numpy
    HAVE_NUMBA = False

log = logging.getLogger(__name__)


def _default_threads() -> int:
    for var in ("DS2EXP_RNN_THREADS", "OMP_NUM_THREADS"):
        value = os.environ.get(var, "")
        if value.isdigit() and int(value) > 0:
            return int(value)
    try:
        return len(os.sched_getaffinity(0))  # what taskset allows, not what the machine has
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


@dataclass
class KernelSettings:
    use_numba: bool
    threads: int
    # the C++ recurrences of kernels/native.py for RNN layers built from now on (when they build)
    use_native: bool = True
    timing_hook: Optional[Callable[[str, float, float], None]] = None
    # numba's kernels beat OpenBLAS at these small row counts (measured: B=8, H=256: 130 us vs
    # 300 us a step; B=2, H=1024: 1.4 ms vs 4 ms); above this batch size BLAS is as fast.
    numba_max_rows: int = 32
    # Both RNN directions share one numpy loop (half the Python per-step overhead) while their two
    # W_hh fit in cache together; above this size each direction runs its own loop so that its W_hh
    # stays in L3 (measured, B=2 H=1024: 0.87 ms a step for two sequential directions vs 1.34 ms).
    joint_directions_max_bytes: int = 16 << 20


settings = KernelSettings(use_numba=HAVE_NUMBA and os.environ.get("DS2EXP_NO_NUMBA", "") in ("", "0"),
                          threads=_default_threads(),
                          use_native=os.environ.get("DS2EXP_NO_NATIVE", "") in ("", "0"))
_thread_listeners: list = []


def on_threads_changed(fn: Callable[[int], None]) -> None:
    """Call fn(threads) whenever set_threads changes the thread count (the C++ kernels' own copy)."""
    _thread_listeners.append(fn)


def set_numba_enabled(flag: bool) -> bool:
    """Turn the numba kernels on/off (numpy fallback); returns the previous setting."""
    old = settings.use_numba
    settings.use_numba = bool(flag) and HAVE_NUMBA
    return old


def set_threads(n: Optional[int]) -> int:
    """Worker threads for the kernels (None or 0: the default); returns the previous setting."""
    old = settings.threads
    settings.threads = int(n) if n and int(n) > 0 else _default_threads()
    for fn in _thread_listeners:
        fn(settings.threads)
    return old


_pool: Optional[ThreadPoolExecutor] = None
_pool_size = 0
_pool_lock = threading.Lock()


def run_tasks(tasks: Iterable, fn: Callable) -> None:
    """fn(task) for every task, up to ``settings.threads`` at a time; a task's failure re-raises here."""
    global _pool, _pool_size
    tasks = list(tasks)
    workers = min(settings.threads, len(tasks))
    if workers < 2:
        for task in tasks:
            fn(task)
        return
    with _pool_lock:
        if _pool is None or _pool_size != workers:
            if _pool is not None:
                _pool.shutdown(wait=False)
            _pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="ds2exp-kernel")
            _pool_size = workers
        pool = _pool
    for future in [pool.submit(_quietly, fn, task) for task in tasks]:
        future.result()


# numpy's floating-point error state is per thread: the pool's threads need it set too (see kernel())
_QUIET = {"invalid": "ignore", "over": "ignore", "divide": "ignore"}


def _quietly(fn, task):
    with np.errstate(**_QUIET):
        return fn(task)


_blas_pinned = False


def pin_blas_threads() -> None:
    """Run numpy's BLAS on one thread from now on (once per process).

    OpenBLAS splits a product across its threads in a way that changes the order of the sums: the
    recurrent weight gradient of a run on 2 threads differed in the last bit from one on 1
    (OMP_NUM_THREADS=1 vs 2, measured), enough for a resumed run to drift from an uninterrupted one.
    MindSpore's own ops do not use it."""
    global _blas_pinned
    if _blas_pinned:
        return
    _blas_pinned = True
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover - a dependency of a dependency
        log.warning("threadpoolctl is not installed: numpy's BLAS keeps its threads, and results may "
                    "differ in the last bits between thread settings")
        return
    threadpool_limits(limits=1, user_api="blas")


def kernel(name: str):
    """Decorator for a kernel entry point: reports each call's wall and process-CPU time to
    ``settings.timing_hook``, and runs it with numpy's floating-point warnings off.

    The warnings are off because a diverging run feeds Inf/NaN through these products ("invalid
    value encountered in matmul"); the values propagate as IEEE says, and the trainer's non-finite
    policy (ds2exp.training) is what tells the user, once, with the step and the layer group.
    """
    def wrap(fn):
        @functools.wraps(fn)
        def call(*args, **kwargs):
            pin_blas_threads()
            hook = settings.timing_hook
            with np.errstate(**_QUIET):
                if hook is None:
                    return fn(*args, **kwargs)
                t0, c0 = time.perf_counter(), time.process_time()
                try:
                    return fn(*args, **kwargs)
                finally:
                    hook(name, time.perf_counter() - t0, time.process_time() - c0)
        return call
    return wrap
