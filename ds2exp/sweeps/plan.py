"""What a sweep is about to run: its job count and each job's budget, printed before the first job."""
from __future__ import annotations

import math
from typing import Dict, List, Optional, Tuple

from omegaconf import DictConfig, OmegaConf


def _values(key: str, value: str) -> Optional[int]:
    """How many values `key=value` sweeps over; None when they are sampled (interval, tag(log, ...))."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        ov = OverridesParser.create().parse_overrides([f"{key}={value}"])[0]
        return len(list(ov.sweep_string_iterator())) if ov.is_sweep_override() else 1
    except Exception:  # noqa: BLE001 - interval() and tagged sweeps are sampled, not listed
        return None


def job_count(config: DictConfig, swept: Dict[str, str]) -> Tuple[Optional[int], List[str]]:
    """(jobs, per-key description). Optuna-style sweepers run `hydra.sweeper.n_trials`."""
    parts, total = [], 1
    for key, value in swept.items():
        n = _values(key, value)
        parts.append(f"{key} {'sampled' if n is None else f'x {n}'}")
        total = None if n is None or total is None else total * n
    trials = OmegaConf.select(config, "hydra.sweeper.n_trials", default=None)
    if trials is not None:
        return int(trials), parts
    return total, parts


def budget(config: DictConfig) -> Tuple[str, Optional[float]]:
    """(what stops each job, its minutes when a time limit is set)."""
    t = config.trainer
    limits = []
    if int(t.max_steps) > 0:
        limits.append(f"trainer.max_steps={int(t.max_steps)}")
    if t.max_minutes is not None:
        limits.append(f"trainer.max_minutes={t.max_minutes:g}")
    limits.append(f"trainer.max_epochs={int(t.max_epochs)}")
    return ", ".join(limits) + " (whichever comes first)", (float(t.max_minutes) if t.max_minutes is not None
                                                           else None)


def describe(config: DictConfig, swept: Dict[str, str]) -> str:
    """The lines printed when a sweep starts."""
    jobs, parts = job_count(config, swept)
    what, minutes = budget(config)
    count = f"{'?' if jobs is None else jobs} job{'' if jobs == 1 else 's'}"
    lines = [f"sweep: {count} ({'; '.join(parts) or 'no swept key'}); each stops at {what}"]
    if minutes is not None and jobs is not None:
        lines.append(f"sweep: at most about {math.ceil(jobs * minutes)} minutes of training in all, one job at a "
                     f"time")
    elif int(config.trainer.max_steps) <= 0:
        lines.append("sweep: no step or time limit: every job trains trainer.max_epochs full epochs; add "
                     "trainer.max_steps=N or trainer.max_minutes=M to bound it")
    return "\n".join(lines)
