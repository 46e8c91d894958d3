"""The C++ RNN layer kernels (kernels/native/recurrence.cc), built once per machine for MindSpore's aot Custom ops.

``library()`` compiles the source with the system C++ compiler (``-O3 -march=native -fopenmp``) into
the user's cache (``$DS2EXP_CACHE_DIR``, else ``$XDG_CACHE_HOME/ds2exp``, else ``~/.cache/ds2exp``),
keyed by the source, the compiler and the CPU's instruction sets, and returns the library's path; where
no compiler works it logs why once and returns None, and the RNN layers run the numba/numpy kernels
(``ds2exp.kernels.rnn``) instead. ``DS2EXP_NO_NATIVE=1`` or ``set_native_enabled(False)`` chooses
those too. MindSpore's own compile step for aot sources builds without optimisation or OpenMP, which
is why the library is built here and handed to ``ops.Custom`` as ``path.so:function``. The library
links the GEMM of the oneDNN that the MindSpore wheel ships (``mindspore/lib/libdnnl.so.2``); without
it the numba/numpy kernels run.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import importlib.util
import logging
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Optional

from ds2exp.kernels.settings import on_threads_changed, settings

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("native") / "recurrence.cc"
FLAGS = ["-std=gnu++17", "-O3", "-march=native", "-fopenmp", "-fPIC", "-shared"]


def cache_dir() -> Path:
    if os.environ.get("DS2EXP_CACHE_DIR"):
        return Path(os.environ["DS2EXP_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "ds2exp"


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return line
    except OSError:
        pass
    return ""


def _onednn_flags() -> list:
    """Linker flags for oneDNN's GEMM (the projections and the weight gradients) from the MindSpore wheel,
    or [] where the wheel ships none."""
    spec = importlib.util.find_spec("mindspore")
    if spec is None or spec.origin is None:
        return []
    lib = Path(spec.origin).parent / "lib"
    if not (lib / "libdnnl.so.2").is_file():
        return []
    return [f"-L{lib}", "-l:libdnnl.so.2", f"-Wl,-rpath,{lib}"]


def _split_setting() -> str:
    """How the recurrence shares a layer among threads: "directions" (the default: with no more threads
    than directions, one direction per thread) or "units" (one direction at a time, every thread on
    its hidden units); ``DS2EXP_RNN_SPLIT`` chooses, for measuring one against the other."""
    value = os.environ.get("DS2EXP_RNN_SPLIT", "directions") or "directions"
    if value not in ("directions", "units"):
        log.warning("DS2EXP_RNN_SPLIT=%r is neither 'directions' nor 'units': using 'directions'", value)
        return "directions"
    return value


def _compiler() -> Optional[str]:
    return os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")


def build(cxx: Optional[str], directory: Path) -> Optional[str]:
    """Compile the recurrences with `cxx` into `directory` unless built there already; load the library
    and hand it the kernel thread count. Returns its path, or None (logged) where that fails."""
    if cxx is None:
        log.warning("no C++ compiler (g++, c++ or $CXX): the RNN recurrences run the numba/numpy kernels")
        return None
    onednn = _onednn_flags()
    if not onednn:
        log.warning("the installed MindSpore ships no oneDNN (mindspore/lib/libdnnl.so.2): the RNN recurrences "
                    "run the numba/numpy kernels")
        return None
    try:
        version = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=30).stdout
        key = hashlib.sha256("\0".join([SOURCE.read_text(), " ".join(FLAGS + onednn), version, _cpu_flags()])
                             .encode())
        out = Path(directory) / f"recurrence-{key.hexdigest()[:16]}.so"
        if not out.is_file():
            out.parent.mkdir(parents=True, exist_ok=True)
            # another process (a data-parallel rank) may build the same file: each writes its own
            # temporary file and renames it into place, which is atomic
            fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
            os.close(fd)
            try:
                # the libraries after the source that needs them
                proc = subprocess.run([cxx, *FLAGS, "-o", tmp, str(SOURCE), *onednn], capture_output=True, text=True,
                                      timeout=300)
                if proc.returncode != 0:
                    log.warning("building %s failed (%s); the RNN recurrences run the numba/numpy kernels:\n%s",
                                SOURCE.name, cxx, proc.stderr[-2000:])
                    return None
                os.replace(tmp, out)
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
        lib = ctypes.CDLL(str(out))  # the same handle MindSpore's aot loader opens
        lib.ds2_set_threads.argtypes = [ctypes.c_int]
        lib.ds2_set_threads(settings.threads)
        lib.ds2_set_split_directions(int(_split_setting() == "directions"))
        on_threads_changed(lib.ds2_set_threads)
        log.info("RNN layers: C++ kernels %s (%d threads)", out, settings.threads)
        return str(out)
    except (OSError, subprocess.SubprocessError) as exc:
        log.warning("the C++ RNN kernels are unavailable (%s); the RNN recurrences run the numba/numpy kernels",
                    exc)
        return None


@functools.lru_cache(maxsize=None)
def _built() -> Optional[str]:
    return build(_compiler(), cache_dir())


def library() -> Optional[str]:
    """Path of the built C++ recurrence library, or None where it is turned off or cannot be built."""
    return _built() if settings.use_native else None


def kernel_seconds() -> dict:
    """Wall seconds this process has spent in the C++ recurrences, forward and backward (the step
    bench's timers for them; the numba/numpy kernels report through ``settings.timing_hook``)."""
    path = _built() if _built.cache_info().currsize else None
    if path is None:
        return {}
    lib = ctypes.CDLL(path)
    lib.ds2_kernel_seconds.restype = ctypes.c_double
    return {"rnn_fwd": lib.ds2_kernel_seconds(0), "rnn_bwd": lib.ds2_kernel_seconds(1)}


def set_native_enabled(flag: bool) -> bool:
    """Turn the C++ recurrences on/off for RNN layers built from now on; returns the previous setting."""
    old = settings.use_native
    settings.use_native = bool(flag)
    return old
