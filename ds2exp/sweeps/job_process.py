"""Make a sweep job that a launcher runs in a worker process behave like a plain `python train.py` run.

`hydra/launcher=joblib` runs each job in a loky worker, and loky sets the worker's global multiprocessing
start method to "loky". Every process the job starts then inherits that name: the spawned workers of
the synthetic corpus build (ds2exp/data/synth.py) and the audio checks of the LibriSpeech preparation
(ds2exp/data/librispeech.py) would die at start-up with `ValueError: cannot find context for 'loky'` (a
context that exists only inside loky's own workers), failing the first sweep on a fresh data folder.
`MlflowSweepCallback.on_job_start` calls `reset_inherited_start_method()` in the job's process before
the job runs, which puts back the platform's default, as in a plain run.
"""
from __future__ import annotations

import multiprocessing

# start methods that only a launcher's worker knows; anything else is left as the user set it
_LAUNCHER_ONLY = {"loky", "loky_init_main"}


def reset_inherited_start_method() -> bool:
    """Reset a launcher-only global start method to the platform default; True if it was reset."""
    method = multiprocessing.get_start_method(allow_none=True)
    if method not in _LAUNCHER_ONLY:
        return False
    multiprocessing.set_start_method(None, force=True)
    return True
