"""Timing for the bench children: warm-up then timed steps (or one per STEP line on stdin, when the
parent alternates two children), and the lines a child reports them on."""
from __future__ import annotations

import json
import statistics
import sys
import time
from typing import Any, Callable, List, Tuple


def median(ts: List[float]) -> float:
    return float(statistics.median(ts))


def timeit(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def emit(tag: str, payload: Any = None) -> None:
    print(tag if payload is None else f"{tag} {json.dumps(payload)}", flush=True)


def timed_steps(args, step: Callable[[], Any]) -> Tuple[List[float], float]:
    """Warm-up, then the timed steps: --steps of them, or with --interactive one per STEP line on
    stdin (the parent alternates two such processes) until END."""
    t0 = time.perf_counter()
    for _ in range(args.warmup):
        step()
    warm = time.perf_counter() - t0
    ts: List[float] = []
    if args.interactive:
        emit("BENCH_READY")
        for line in sys.stdin:
            if line.strip() == "END":
                break
            t0 = time.perf_counter()
            step()
            ts.append(time.perf_counter() - t0)
            emit("BENCH_STEP", ts[-1])
    else:
        for _ in range(args.steps):
            t0 = time.perf_counter()
            step()
            ts.append(time.perf_counter() - t0)
    return ts, warm
