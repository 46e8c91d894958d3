"""Experiment tracking: MLflow (SQLite store by default, a server when given) or nothing.

The trainer talks to a `Tracker`; `NullTracker` keeps `logger=none` runs free of MLflow.
`ds2exp.tracking.make_tracker` picks the tracker for a config.
Runs are driven through `MlflowClient` with explicit run ids (not the fluent API's global
active run) so that sweep parents, resumed runs and evaluation runs are all explicit.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Dict, Mapping, Optional


log = logging.getLogger(__name__)

# MLflow 3's UI opens an experiment without this tag in its GenAI (traces) view; this value, from the
# UI's ExperimentKind enum, opens it in the "Model training" view with the runs table and charts.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"


def flatten(d: Mapping, prefix: str = "") -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


class Tracker:
    run_id: Optional[str] = None

    def log_params(self, params: Mapping[str, Any]) -> None: ...
    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None: ...
    def set_tags(self, tags: Mapping[str, Any]) -> None: ...
    def log_text(self, text: str, artifact_file: str) -> None: ...
    def log_artifact(self, path: str | Path, artifact_path: Optional[str] = None) -> None: ...
    def log_dict(self, obj: Any, artifact_file: str) -> None: ...
    def end(self, status: str = "FINISHED") -> None: ...


class NullTracker(Tracker):
    """logger=none: nothing is recorded."""


def _local_path_of(uri: str) -> Optional[Path]:
    if uri.startswith("sqlite:///"):
        return Path(uri[len("sqlite:///"):])
    return None


class MlflowTracker(Tracker):
    def __init__(self, tracking_uri: str, experiment_name: str, run_name: Optional[str] = None,
                 run_id: Optional[str] = None, parent_run_id: Optional[str] = None,
                 tags: Optional[Mapping[str, Any]] = None, start: bool = True):
        import mlflow
        from mlflow.tracking import MlflowClient

        self._mlflow = mlflow
        db = _local_path_of(tracking_uri)
        if db is not None:
            db.parent.mkdir(parents=True, exist_ok=True)
        self.tracking_uri = tracking_uri
        # A new SQLite store announces its schema migration at INFO on the console ("Creating initial
        # MLflow database tables...", "Updating database tables"): nothing the user can act on.
        logging.getLogger("mlflow.store.db.utils").setLevel(logging.WARNING)
        self.client = MlflowClient(tracking_uri=tracking_uri)
        exp = self.client.get_experiment_by_name(experiment_name)
        if exp is None:
            artifact_location = None
            if db is not None:
                # keep artifacts beside the SQLite file, not under Hydra's working directory
                artifact_location = (db.parent / "mlartifacts").resolve().as_uri()
            try:
                self.experiment_id = self.client.create_experiment(experiment_name, artifact_location=artifact_location,
                                                                   tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND})
            except Exception:  # created concurrently by a parallel sweep job
                self.experiment_id = self.client.get_experiment_by_name(experiment_name).experiment_id
        else:
            self.experiment_id = exp.experiment_id
            if EXPERIMENT_KIND_TAG not in (exp.tags or {}):  # a kind the user chose is left alone
                self.client.set_experiment_tag(self.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
        if start:
            self.start_run(run_name, run_id, parent_run_id, tags)

    def start_run(self, run_name: Optional[str] = None, run_id: Optional[str] = None,
                  parent_run_id: Optional[str] = None, tags: Optional[Mapping[str, Any]] = None) -> str:
        """Create a run, or reopen `run_id` (status RUNNING again); returns its id."""
        all_tags = {k: str(v) for k, v in (tags or {}).items() if v is not None}  # never the text "None"
        if parent_run_id:
            all_tags["mlflow.parentRunId"] = parent_run_id
        if run_id:
            self.run_id = run_id
            self.client.update_run(run_id, status="RUNNING")
            if all_tags:
                self.set_tags(all_tags)
        else:
            run = self.client.create_run(self.experiment_id, run_name=run_name, tags=all_tags)
            self.run_id = run.info.run_id
        return self.run_id

    def log_params(self, params: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        existing = self.client.get_run(self.run_id).data.params
        items = [Param(k, str(v)[:6000]) for k, v in params.items() if k not in existing]
        for i in range(0, len(items), 100):
            self.client.log_batch(self.run_id, params=items[i:i + 100])

    def log_metrics(self, metrics: Mapping[str, float], step: int, timestamp_ms: Optional[int] = None) -> None:
        import time

        from mlflow.entities import Metric

        ts = int(time.time() * 1000) if timestamp_ms is None else int(timestamp_ms)
        items = [Metric(k, float(v), ts, int(step)) for k, v in metrics.items() if v is not None]
        if items:
            self.client.log_batch(self.run_id, metrics=items)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        from mlflow.entities import RunTag

        self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)[:5000]) for k, v in tags.items() if v is not None])

    def log_text(self, text: str, artifact_file: str) -> None:
        self.client.log_text(self.run_id, text, artifact_file)

    def log_artifact(self, path: str | Path, artifact_path: Optional[str] = None) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path)

    def log_dict(self, obj: Any, artifact_file: str) -> None:
        self.log_text(json.dumps(obj, indent=1, default=str), artifact_file)

    def end(self, status: str = "FINISHED") -> None:
        self.client.set_terminated(self.run_id, status=status)
