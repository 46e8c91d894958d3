"""Experiment tracking: `make_tracker(cfg.logger, ...)` gives the tracker a command logs to.

`mlflow_tracker` talks to MLflow (and defines the `Tracker` interface and `NullTracker`);
`resilient` wraps it so that an MLflow outage never stops training; `plots` draws the curves;
`trial_hook` links a hyperparameter search to the run of its trial (validation values in, prune decisions out).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Optional

if TYPE_CHECKING:
    from ds2exp.tracking.mlflow_tracker import Tracker


def make_tracker(logger_cfg, run_name: Optional[str] = None, run_id: Optional[str] = None,
                 parent_run_id: Optional[str] = None, tags: Optional[Mapping[str, Any]] = None,
                 spool_dir: Optional[str | Path] = None, adopt_spool: bool = False) -> "Tracker":
    """The tracker for `logger_cfg`. With `spool_dir` (a training run's directory) MLflow calls go
    through `ResilientTracker`: an unavailable store never stops training and nothing is lost."""
    from ds2exp.tracking.mlflow_tracker import MlflowTracker, NullTracker
    from ds2exp.tracking.resilient import ResilientTracker

    backend = str(getattr(logger_cfg.backend, "value", logger_cfg.backend))
    if backend == "none":
        return NullTracker()
    parent = parent_run_id or os.environ.get("DS2EXP_PARENT_RUN_ID")
    from ds2exp.tracking import trial_hook

    tags = {**trial_hook.run_tags(), **(tags or {})}  # a search's trial: its study and trial number
    if spool_dir is not None:
        return ResilientTracker(logger_cfg.tracking_uri, logger_cfg.experiment_name, spool_dir, run_name=run_name,
                                run_id=run_id, parent_run_id=parent, tags=tags, adopt_spool=adopt_spool)
    return MlflowTracker(logger_cfg.tracking_uri, logger_cfg.experiment_name, run_name=run_name, run_id=run_id,
                         parent_run_id=parent, tags=tags)
