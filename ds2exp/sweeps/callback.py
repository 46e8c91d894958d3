"""One MLflow parent run per Hydra sweep (`python train.py -m ...`), and the sweep's verdict at its end.

Registered in conf/train.yaml under `hydra.callbacks`. In MULTIRUN mode:

- `on_multirun_start` finds the swept keys (for the jobs' run names, ds2exp/sweeps/names.py) and opens
  the parent run (named after the sweep, `sweep lr x bs 02-24-02`: names.sweep_name; tags
  `ds2exp.kind=sweep`, the sweep's overrides and sweeper params) through the same spooling
  `ResilientTracker` as training runs, with its spool in the sweep directory: a store that does not
  answer costs the sweep one probe, not minutes, and the jobs start at once. As soon as the parent
  exists its id is exported as `$DS2EXP_PARENT_RUN_ID` (jobs started later put it on their run as
  `mlflow.parentRunId`) and written to `<sweep dir>/mlflow_parent_run_id.txt` (read in `on_job_start`
  by launchers whose jobs run in other processes).
- Before and after every job the parent's spool is retried (when due); once the parent exists, jobs
  whose runs were created without it are linked to it (`mlflow.parentRunId` set on their runs), and
  `jobs.csv` (number, name, overrides, status, MLflow run id) is rewritten beside the job folders.
- `on_multirun_end` sends what jobs left in their spools (store down when they ended), links every
  job, prints the report (ds2exp/sweeps/report.py: table, stability boundary per batch size,
  recommended setting) with its paths, writes `sweep_report.png`, `sweep_losses.png` and
  `sweep_report.txt` into the sweep directory and logs them to the parent run (`report/`), with the
  verdict as its description and the stability boundary, the recommended setting and its best CER as
  params and metrics (report.parent_records), then closes the parent as FINISHED. A sweep that dies on
  the way leaves it FAILED (atexit).

Single runs are left alone; with `logger=none` only the names, `jobs.csv` and the report are made.
"""
from __future__ import annotations

import atexit
import json
import logging
import os
from pathlib import Path
from typing import Any, Dict, List, Optional

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

ENV_PARENT = "DS2EXP_PARENT_RUN_ID"
PARENT_FILE = "mlflow_parent_run_id.txt"
_SWEEP_FUNCTIONS = ("choice(", "range(", "interval(", "tag(", "glob(")

log = logging.getLogger(__name__)


def _backend(config: DictConfig) -> str:
    b = OmegaConf.select(config, "logger.backend", default="none")
    return str(getattr(b, "value", b))


def is_sweep_value(value: str) -> bool:
    """`1e-4,1e-3` or `choice(...)`/`range(...)`... sweep; `[1,2]` or `{a:1,b:2}` are one value."""
    v = value.strip()
    if v.startswith(_SWEEP_FUNCTIONS):
        return True
    depth = 0
    for ch in v:
        depth += ch in "[{("
        depth -= ch in "]})"
        if ch == "," and depth == 0:
            return True
    return False


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
    if OmegaConf.select(hydra, "sweeper.study_name") is not None:  # an Optuna search: where its study is
        from ds2exp.sweeps.optuna_study import shown, study_location

        name, url = study_location(config)
        tags.update({"ds2exp.optuna.study": name, "ds2exp.optuna.storage": shown(url)})
    swept: Dict[str, str] = {str(k): str(v) for k, v in (params or {}).items()}
    for o in task:  # the command line wins over the preset's params, as in the sweeper
        key, _, value = o.partition("=")
        if is_sweep_value(value):
            swept[key.lstrip("+~")] = value
        else:  # one value on the command line replaces the preset's list
            swept.pop(key.lstrip("+~"), None)
    for key, value in swept.items():
        tags[f"ds2exp.sweep.{key}"] = value
    return tags


def _swept_from_tags(tags: Dict[str, str]) -> List[str]:
    meta = ("ds2exp.sweep.overrides", "ds2exp.sweep.params", "ds2exp.sweep.sweeper")
    return [k[len("ds2exp.sweep."):] for k in tags if k.startswith("ds2exp.sweep.") and k not in meta]


def _job_dirs(sweep_dir: Path) -> List[Path]:
    dirs = [p for p in sweep_dir.iterdir() if (p / ".hydra" / "overrides.yaml").is_file()] if sweep_dir.is_dir() else []
    return sorted(dirs, key=lambda p: (not p.name.isdigit(), int(p.name) if p.name.isdigit() else 0, p.name))


def _read_json(path: Path) -> Dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _job_run_id(job_dir: Path) -> Optional[str]:
    return (_read_json(job_dir / "run_state.json").get("mlflow_run_id")
            or _read_json(job_dir / "tracking_state.json").get("run_id"))


def scan_jobs(sweep_dir: Path) -> List[Dict[str, Any]]:
    """jobs.csv rows from the job folders' files alone (no store queries; statuses as the runs wrote them)."""
    from ds2exp.sweeps.names import parse_overrides, run_name, swept_keys

    swept = swept_keys(sweep_dir)
    rows = []
    for d in _job_dirs(sweep_dir):
        overrides = [str(o) for o in (OmegaConf.to_container(OmegaConf.load(d / ".hydra" / "overrides.yaml")) or [])]
        state = _read_json(d / "run_state.json")
        summary = _read_json(d / "summary.json")
        status = summary.get("status") or state.get("status") or ("crashed" if (d / "error.txt").is_file() else "")
        rows.append({"num": d.name, "name": run_name(parse_overrides(overrides), swept),
                     "overrides": " ".join(overrides), "status": status or "no result",
                     "mlflow_run_id": _job_run_id(d) or "", "dir": str(d)})
    return rows


class MlflowSweepCallback(Callback):
    def __init__(self, **_: Any) -> None:
        self.parent_run_id: Optional[str] = None
        self.tracker = None  # the parent run's ResilientTracker, in the sweep process only
        self.sweep_dir: Optional[Path] = None
        self.report_files: Dict[str, Path] = {}
        self._previous_env: Dict[str, Optional[str]] = {}
        self._linked: set = set()
        self._closed = True

    def __getstate__(self) -> Dict[str, Any]:
        """Launchers that run jobs in other processes (joblib, submitit) pickle the callbacks: the parent
        run's tracker (its spool file, its client) stays in the sweep process; jobs there read the
        parent id from the environment or the sweep dir."""
        state = self.__dict__.copy()
        state["tracker"] = None
        return state

    # ------------------------------------------------------------------ sweep process
    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        from ds2exp.sweeps.names import ENV_SWEPT, publish_swept, sweep_name

        self.sweep_dir = Path(str(config.hydra.sweep.dir)).resolve()
        log.info("sweep %s: starting", self.sweep_dir)
        tags = _sweep_tags(config, str(self.sweep_dir))
        from ds2exp.sweeps.plan import describe

        print(describe(config, {k: tags[f"ds2exp.sweep.{k}"] for k in _swept_from_tags(tags)}), flush=True)
        self._previous_env = {k: os.environ.get(k) for k in (ENV_PARENT, ENV_SWEPT)}
        publish_swept(_swept_from_tags(tags), self.sweep_dir)
        self._closed = False
        atexit.register(self._close, "FAILED")
        if _backend(config) == "none":
            return
        from ds2exp.tracking.resilient import ResilientTracker

        os.environ.pop(ENV_PARENT, None)  # this sweep's parent, not an outer one
        # The same hydra.sweep.dir again continues the sweep: its jobs that ended are not run again
        # (job_runner.py) and the parent run it already has goes on, so there is one parent, one verdict.
        earlier = self.sweep_dir / PARENT_FILE
        parent_id = earlier.read_text().strip() if earlier.is_file() else None
        if parent_id:
            print(f"sweep: continuing {self.sweep_dir} (MLflow parent run {parent_id})", flush=True)
        self.tracker = ResilientTracker(str(config.logger.tracking_uri), str(config.logger.experiment_name),
                                        self.sweep_dir, run_name=sweep_name(_swept_from_tags(tags), self.sweep_dir),
                                        run_id=parent_id, tags=tags, adopt_spool=bool(parent_id))
        if self._publish_parent():
            log.info("MLflow sweep parent run %s (%s)", self.parent_run_id, config.logger.tracking_uri)
        else:
            log.warning("MLflow at %s does not answer: the jobs start now; the sweep's parent run is created, "
                        "and the jobs' runs are linked to it, when it answers", config.logger.tracking_uri)

    def _publish_parent(self) -> bool:
        """Once the parent run exists: its id in the environment and the sweep dir. True if it exists."""
        if self.tracker is None or not self.tracker.run_id:
            return False
        if self.parent_run_id != self.tracker.run_id:
            self.parent_run_id = self.tracker.run_id
            os.environ[ENV_PARENT] = self.parent_run_id
            (self.sweep_dir / PARENT_FILE).write_text(self.parent_run_id + "\n")
        return True

    def _sync(self) -> None:
        """Retry the parent's spool when due; once the parent exists, link the jobs' runs to it."""
        if self.tracker is None:
            return
        self.tracker.retry()
        if not self._publish_parent():
            return
        for d in _job_dirs(self.sweep_dir):
            rid = _job_run_id(d)
            if rid and rid != self.parent_run_id and rid not in self._linked:
                self.tracker.set_tags({"mlflow.parentRunId": self.parent_run_id}, run_id=rid)
                self._linked.add(rid)

    def _write_jobs_csv(self, rows=None) -> None:
        from ds2exp.sweeps.names import write_jobs_csv

        try:
            write_jobs_csv(self.sweep_dir, rows if rows is not None else scan_jobs(self.sweep_dir))
        except (OSError, ValueError) as exc:
            log.warning("could not write %s/jobs.csv: %s", self.sweep_dir, exc)

    def _send_job_spools(self) -> None:
        """Records jobs kept while the store was down (their own end-of-run wait ran out): send them now."""
        from ds2exp.tracking.resilient import SPOOL_NAME, _Replayer, read_state

        for d in _job_dirs(self.sweep_dir):
            if not (d / SPOOL_NAME).is_file():
                continue
            state = read_state(d)
            if not state.get("tracking_uri"):
                continue
            replay = _Replayer(state["tracking_uri"], state.get("experiment_name") or "ds2exp", d, state.get("run_id"))
            if replay.drain(10.0):
                log.info("job %s: %d tracking records sent after the store came back", d.name, replay.sent_from_spool)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        if self.sweep_dir is None:
            return
        if self.tracker is not None:
            self._sync()
            if self.tracker.pending == 0:
                self._send_job_spools()
                self._sync()
        try:
            self._report(config)
        except Exception as exc:  # the sweep's jobs are done; a report problem must not hide them
            log.warning("sweep report failed (%s: %s); run: python -m ds2exp.sweeps.report %s",
                        type(exc).__name__, exc, self.sweep_dir)
            self._write_jobs_csv()
        self._close("FINISHED")

    def _report(self, config: DictConfig) -> None:
        from ds2exp.sweeps import report as sweep_report

        uri = str(config.logger.tracking_uri) if _backend(config) != "none" else None
        store_answers = self.tracker is not None and self.tracker.pending == 0
        sweep = sweep_report.load(str(self.sweep_dir), uri, with_mlflow=store_answers)
        files = sweep_report.write(sweep)
        self.report_files = files
        text = files["text"].read_text()
        by_num = {j.name: j for j in sweep.jobs}
        rows = scan_jobs(self.sweep_dir)
        for row in rows:  # the judged status: a job that finished with an exploded loss is diverged
            job = by_num.get(row["num"])
            if job is not None:
                row["status"] = job.status
        self._write_jobs_csv(rows)
        print("\n" + text, end="", flush=True)
        print(f"sweep report: {files['text']}\nheatmap: {files['heatmap']}"
              + (f"\nloss curves: {files['losses']}" if "losses" in files else "")
              + f"\njobs: {self.sweep_dir / 'jobs.csv'}", flush=True)
        if self.tracker is not None:
            for kind in ("heatmap", "losses"):
                if kind in files:
                    self.tracker.log_artifact(files[kind], "report")
            self.tracker.log_text(text, "report/sweep_report.txt")
            self.tracker.log_artifact(self.sweep_dir / "jobs.csv", "report")
            tags, params, metrics = sweep_report.parent_records(sweep)  # the verdict on the parent run's page
            self.tracker.set_tags(tags)
            self.tracker.log_params(params)
            self.tracker.log_metrics(metrics, 0)
            if self.parent_run_id:
                from ds2exp.training.summary import experiment_id, run_link

                link = run_link(uri, experiment_id(self.tracker), self.parent_run_id)
                print(f"MLflow parent run {self.parent_run_id} (report/)" + (f": {link}" if link else ""), flush=True)

    def _close(self, status: str) -> None:
        if self._closed:
            return
        self._closed = True
        if self.tracker is not None:
            self.tracker.end(status)  # waits up to DS2EXP_TRACKING_DRAIN_S for a store that is down
            if self.tracker.pending:
                print(f"the store did not answer: the sweep's tracking records are kept in {self.sweep_dir}; "
                      f"send them with: python -m ds2exp.tracking.resilient {self.sweep_dir}", flush=True)
        for key, value in self._previous_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value

    # ------------------------------------------------------------------ job process
    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        """Link as early as possible; launchers that run jobs in fresh processes: take the parent id
        from the sweep dir."""
        from ds2exp.sweeps.job_process import reset_inherited_start_method

        reset_inherited_start_method()  # joblib's loky workers (see job_process.py)
        if self.tracker is not None:  # the sweep's own process (basic launcher)
            self._sync()
            return
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

    def on_job_end(self, config: DictConfig, job_return: Any = None, **kwargs: Any) -> None:
        if self.tracker is not None:
            self._sync()
        sweep_dir = self.sweep_dir
        if sweep_dir is None:
            try:
                from hydra.core.hydra_config import HydraConfig
                from hydra.types import RunMode

                hc = HydraConfig.get()
                if hc.mode != RunMode.MULTIRUN:  # a single run leaves nothing under multirun/
                    return
                sweep_dir = Path(hc.sweep.dir).resolve()
            except (ImportError, ValueError, AttributeError):
                return
        self.sweep_dir = sweep_dir
        self._write_jobs_csv()
