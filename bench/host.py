"""The host line every bench table is printed with: CPU model, cores, vector extensions, Python, load."""
from __future__ import annotations

import os
import platform


def machine() -> str:
    """CPU model, the cores this process may use, the vector extensions that matter, Python."""
    cpu, flags = "unknown CPU", set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name") and cpu == "unknown CPU":
                    cpu = line.split(":", 1)[1].strip()
                elif line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    isa = [x for x in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if x in flags]
    return (f"{cpu}, {len(os.sched_getaffinity(0))} cores ({'/'.join(isa) or 'no AVX2'}), "
            f"Python {platform.python_version()}")


def where() -> str:
    """The machine and its load now: printed with every table."""
    return f"[{machine()}; load {os.getloadavg()[0]:.1f}]"


def cores() -> int:
    return len(os.sched_getaffinity(0))
