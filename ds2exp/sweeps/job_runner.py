"""What one job of a sweep returns, and what happens when it crashes.

In MULTIRUN mode `train.py` runs `run_sweep_job()`. The job's MLflow run is named by its swept
overrides (`lr=1e-3 bs=8`, ds2exp/sweeps/names.py) unless `logger.run_name` is given. An exception
inside the job is logged, written to `<job dir>/error.txt`, its MLflow run is marked FAILED (a
FAILED run is created, with the job's overrides as params, when the job died before it had one, e.g.
an empty data split) and the job returns a failure value instead of raising, so the sweep goes on.
A job whose run diverged returns the failure value too, even when an earlier evaluation had a value.
The failure value is NaN; the Optuna sweeper (hydra_plugins/ds2exp_optuna_sweeper) reads why from the
job's folder (`summary.json`, `error.txt`) and records the trial as FAILED with that cause.
"""
from __future__ import annotations

import json
import logging
import math
import os
import traceback
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Dict, Optional

from omegaconf import DictConfig, OmegaConf

if TYPE_CHECKING:
    from ds2exp.training.ending import RunOutcome

log = logging.getLogger("ds2exp.sweep")


def _hydra():
    try:
        from hydra.core.hydra_config import HydraConfig

        return HydraConfig.get()
    except (ImportError, ValueError):
        return None


def in_multirun() -> bool:
    hc = _hydra()
    if hc is None:
        return False
    from hydra.types import RunMode

    return hc.mode == RunMode.MULTIRUN


def failure_value() -> float:
    return float("nan")


def _job_dir() -> Optional[Path]:
    hc = _hydra()
    return Path(hc.runtime.output_dir) if hc is not None else None


def job_run_name() -> Optional[str]:
    """The job's readable name from its swept overrides, e.g. `lr=1e-3 bs=8` (ds2exp/sweeps/names.py)."""
    from ds2exp.sweeps.names import parse_overrides, run_name, swept_keys

    hc = _hydra()
    if hc is None:
        return None
    name = run_name(parse_overrides(hc.overrides.task), swept_keys(Path(hc.sweep.dir)))
    return name or None


def _name_run(cfg: DictConfig) -> None:
    """Name the job's MLflow run by its overrides unless `logger.run_name` is set."""
    from omegaconf import open_dict, read_write

    if OmegaConf.select(cfg, "logger.run_name") is not None:
        return
    name = job_run_name()
    if name:
        with read_write(cfg), open_dict(cfg):
            cfg.logger.run_name = name


def _record_crash(cfg: DictConfig, job_dir: Optional[Path], exc: BaseException) -> None:
    """Mark the job's MLflow run FAILED; create one if the job died before it had a run."""
    backend = str(getattr(cfg.logger.backend, "value", cfg.logger.backend))
    if backend == "none":
        return
    from mlflow.tracking import MlflowClient

    from ds2exp.tracking import trial_hook
    from ds2exp.tracking.mlflow_tracker import MlflowTracker

    client = MlflowClient(tracking_uri=str(cfg.logger.tracking_uri))
    exp = client.get_experiment_by_name(str(cfg.logger.experiment_name))
    error = f"{type(exc).__name__}: {exc}"[:4000]
    if exp is not None and job_dir is not None:
        runs = client.search_runs([exp.experiment_id],
                                  filter_string=f"tags.`ds2exp.run_dir` = '{job_dir}'", max_results=1)
        if runs:  # run.py already ended it as FAILED
            client.set_tag(runs[0].info.run_id, "ds2exp.error", error)
            return
    hc = _hydra()
    overrides = list(hc.overrides.task) if hc is not None else []
    tracker = MlflowTracker(str(cfg.logger.tracking_uri), str(cfg.logger.experiment_name),
                            run_name=cfg.logger.run_name or (job_dir.name if job_dir else None),
                            parent_run_id=os.environ.get("DS2EXP_PARENT_RUN_ID"),
                            tags={**trial_hook.run_tags(), "ds2exp.run_dir": str(job_dir), "ds2exp.error": error})
    params = {}
    for o in overrides:
        key, _, value = o.partition("=")
        params[key.lstrip("+~")] = value
    for key in ("optimizer.lr", "dataset.batch_size"):  # the report's axes, even when not overridden
        params.setdefault(key, _select(cfg, key))
    tracker.log_params(params)
    tracker.log_text("".join(traceback.format_exception(type(exc), exc, exc.__traceback__)), "error.txt")
    tracker.end("FAILED")


def _select(cfg: DictConfig, key: str) -> Any:
    return OmegaConf.select(cfg, key)


def _earlier_run(cfg: DictConfig, job_dir: Optional[Path]) -> Dict[str, Any]:
    """What an earlier run of this same job left in its folder (a sweep run again with the same
    hydra.sweep.dir): its run_state and summary, when its config is this job's."""
    from ds2exp.training.recovery import config_fingerprint, read_run_state

    if job_dir is None or not (job_dir / "run_state.json").is_file():
        return {}
    state = read_run_state(job_dir)
    if state.get("config_fingerprint") != config_fingerprint(cfg):
        return {}
    try:
        summary = json.loads((job_dir / "summary.json").read_text())
    except (OSError, ValueError):
        summary = {}
    return {"state": state, "summary": summary}


def run_sweep_job(cfg: DictConfig, train: Callable[[DictConfig], RunOutcome]) -> float:
    """Run one sweep job with `train` (ds2exp.training.run.train_run: its RunOutcome); returns the run's
    value, or `failure_value()` if it crashed or diverged. A job an earlier run of the sweep finished (or
    diverged in) is not run again; one it left interrupted is resumed from its checkpoint."""
    from omegaconf import open_dict, read_write

    from ds2exp.checkpoints.names import RunDir

    job_dir = _job_dir()
    _name_run(cfg)
    earlier = _earlier_run(cfg, job_dir)
    status = earlier.get("summary", {}).get("status") or earlier.get("state", {}).get("status")
    if status in ("finished", "diverged"):
        print(f"job {job_dir.name}: {status} in an earlier run of this sweep; not run again", flush=True)
        best = (earlier["summary"].get("best_checkpoint") or {}).get("value") if status == "finished" else None
        return float(best) if isinstance(best, (int, float)) and math.isfinite(best) else failure_value()
    if status in ("interrupted", "running") and RunDir(job_dir).has_training_state():
        print(f"job {job_dir.name}: interrupted in an earlier run of this sweep; resuming it", flush=True)
        with read_write(cfg), open_dict(cfg):
            cfg.resume = str(job_dir)
    try:
        result = train(cfg)
    except Exception as exc:  # KeyboardInterrupt still ends the sweep
        log.exception("job %s failed; the sweep goes on", job_dir)
        if job_dir is not None:
            job_dir.mkdir(parents=True, exist_ok=True)
            (job_dir / "error.txt").write_text("".join(traceback.format_exception(type(exc), exc, exc.__traceback__)))
        try:
            _record_crash(cfg, job_dir, exc)
        except Exception as track_exc:
            log.warning("could not record the failure in MLflow: %s", track_exc)
        return failure_value()
    if result.outcome == "diverged":
        log.warning("job %s diverged at step %s: reported to the sweeper as failed", job_dir,
                    result.diverged_at_step)
        return failure_value()
    if not math.isfinite(result.value):
        return failure_value()
    return float(result.value)
