"""One MLflow parent run per Hydra sweep (`python train.py -m ...`).

Registered in conf/train.yaml under `hydra.callbacks`. In MULTIRUN mode `on_multirun_start`
creates a parent run named after the sweep directory (tags `ds2exp.kind=sweep`, the sweep's
overrides and sweeper params), exports its id as `$DS2EXP_PARENT_RUN_ID` before any job starts
(`make_tracker` puts it on every job's run as `mlflow.parentRunId`) and writes it to
`<sweep dir>/mlflow_parent_run_id.txt`. Jobs started by a launcher in other processes that did
not inherit the variable read that file in `on_job_start`. `on_multirun_end` closes the parent
as FINISHED; a sweep that dies on the way leaves it FAILED (atexit). Single runs and
`logger=none` are left alone.
"""
from __future__ import annotations

import atexit
import json
import logging
import os
from pathlib import Path
from typing import Any, Dict, Optional

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

ENV_PARENT = "DS2EXP_PARENT_RUN_ID"
PARENT_FILE = "mlflow_parent_run_id.txt"

log = logging.getLogger(__name__)


def _backend(config: DictConfig) -> str:
    b = OmegaConf.select(config, "logger.backend", default="none")
    return str(getattr(b, "value", b))


def _sweep_tags(config: DictConfig, sweep_dir: str) -> Dict[str, str]:
    hydra = config.hydra
    task = [str(o) for o in (OmegaConf.select(hydra, "overrides.task") or [])]
    params = OmegaConf.select(hydra, "sweeper.params")
    params = OmegaConf.to_container(params) if params is not None else {}
    tags: Dict[str, str] = {"ds2exp.kind": "sweep", "ds2exp.sweep_dir": sweep_dir,
                            "ds2exp.sweep.overrides": " ".join(task),
                            "ds2exp.sweep.sweeper": str(OmegaConf.select(hydra, "sweeper._target_") or "")}
    if params:
        tags["ds2exp.sweep.params"] = json.dumps(params)
    swept: Dict[str, str] = {str(k): str(v) for k, v in (params or {}).items()}
    for o in task:  # the command line wins over the preset's params, as in the sweeper
        key, _, value = o.partition("=")
        if "," in value or "(" in value:
            swept[key.lstrip("+~")] = value
    for key, value in swept.items():
        tags[f"ds2exp.sweep.{key}"] = value
    return tags


class MlflowSweepCallback(Callback):
    def __init__(self, **_: Any) -> None:
        self.parent_run_id: Optional[str] = None
        self._client = None
        self._previous_env: Optional[str] = None
        self._closed = True

    # ------------------------------------------------------------------ sweep process
    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        if _backend(config) == "none":
            return
        from ds2exp.tracking.mlflow_tracker import MlflowTracker

        sweep_dir = str(config.hydra.sweep.dir)
        sweep_abs = Path(sweep_dir).resolve()
        tracker = MlflowTracker(str(config.logger.tracking_uri), str(config.logger.experiment_name),
                                run_name=sweep_dir, tags=_sweep_tags(config, str(sweep_abs)))
        self._client, self.parent_run_id = tracker.client, tracker.run_id
        self._previous_env = os.environ.get(ENV_PARENT)
        os.environ[ENV_PARENT] = self.parent_run_id
        sweep_abs.mkdir(parents=True, exist_ok=True)
        (sweep_abs / PARENT_FILE).write_text(self.parent_run_id + "\n")
        self._closed = False
        atexit.register(self._close, "FAILED")
        log.info("MLflow sweep parent run %s (%s)", self.parent_run_id, config.logger.tracking_uri)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        self._close("FINISHED")

    def _close(self, status: str) -> None:
        if self._closed or self._client is None:
            return
        self._closed = True
        try:
            self._client.set_terminated(self.parent_run_id, status=status)
        except Exception as exc:  # never hide the sweep's own outcome behind a tracking error
            log.warning("could not close MLflow parent run %s: %s", self.parent_run_id, exc)
        if self._previous_env is None:
            os.environ.pop(ENV_PARENT, None)
        else:
            os.environ[ENV_PARENT] = self._previous_env

    # ------------------------------------------------------------------ job process
    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        """Launchers that run jobs in fresh processes: take the parent id from the sweep dir."""
        from ds2exp.tracking.job_process import reset_inherited_start_method

        reset_inherited_start_method()  # joblib's loky workers (see job_process.py)
        if os.environ.get(ENV_PARENT) or _backend(config) == "none":
            return
        try:
            from hydra.core.hydra_config import HydraConfig
            from hydra.types import RunMode

            hc = HydraConfig.get()
            if hc.mode != RunMode.MULTIRUN:
                return
            path = Path(hc.sweep.dir) / PARENT_FILE
        except (ImportError, ValueError, AttributeError):
            return
        if path.is_file():
            os.environ[ENV_PARENT] = path.read_text().strip()
