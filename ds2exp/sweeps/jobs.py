"""Read a sweep: one `Job` per job, from its directory or from its MLflow parent run.

From a sweep directory each job's `.hydra/overrides.yaml`, `summary.json`, `run_state.json` and
`error.txt` are read; the loss of every step comes from the job's last checkpoint (its history), the
best validation CER from the job's MLflow run (else the checkpoint). From a parent run id: the child
runs' params, tags, metrics (`train/loss`, `val/cer`) and summary.json artifacts.
Whether a job diverged is decided afterwards by `ds2exp.sweeps.judge`.
"""
from __future__ import annotations

import json
import math
import os
import re
import sys
import tempfile
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from ds2exp.sweeps.names import parse_overrides, run_name, sweep_name

ROWS, COLS = "optimizer.lr", "dataset.batch_size"
PARENT_FILE = "mlflow_parent_run_id.txt"
_META_TAGS = ("ds2exp.sweep.overrides", "ds2exp.sweep.params", "ds2exp.sweep.sweeper")


@dataclass
class Job:
    name: str  # the job's folder (its number)
    params: Dict[str, str]  # the swept keys' values (and the two axes)
    status: str  # finished | diverged | crashed | running | killed | no result
    label: str = ""  # readable name from the swept overrides, e.g. "lr=1e-3 bs=8"
    diverged_at: Optional[Any] = None  # the step where the divergence policy stopped the run
    first_bad_step: Optional[int] = None  # the first anomalous step (tags/summary or the loss judgement)
    judged_by: Optional[str] = None  # diverged: "run" (its own tags/summary) or "losses" (judge.py)
    final_loss: Optional[float] = None
    best_cer: Optional[float] = None
    best_wer: Optional[float] = None
    nonfinite: Optional[int] = None
    nonfinite_at_least: bool = False  # diverged, and only a count logged before the last step is known
    patience: Optional[int] = None  # trainer.nonfinite_patience: a diverged job had at least this many
    error: Optional[str] = None
    cause: Optional[str] = None  # diverged: the diagnosis' cause (and first non-finite layer group)
    run_id: Optional[str] = None
    dir: Optional[str] = None
    overrides: List[str] = field(default_factory=list)
    losses: List[Tuple[int, float]] = field(default_factory=list)  # (step, train loss), as logged
    extra: Dict[str, str] = field(default_factory=dict)


@dataclass
class Sweep:
    label: str  # the report's first line: where the sweep is (its folder, or its parent run)
    jobs: List[Job]
    name: str = ""  # `sweep lr x bs 02-24-02` (names.sweep_name): the parent run's name and the heatmap's title
    parent_run_id: Optional[str] = None
    tracking_uri: Optional[str] = None
    dir: Optional[Path] = None
    default_out: Optional[Path] = None


def _num(x: Any) -> Optional[float]:
    try:
        return float(x)
    except (TypeError, ValueError):
        return None


def _int(x: Any) -> Optional[int]:
    v = _num(x)
    return int(v) if v is not None and math.isfinite(v) else None


def _finite(x: Any) -> Optional[float]:
    v = _num(x)
    return v if v is not None and math.isfinite(v) else None


def canon(v: Any) -> str:
    """One spelling per value, so that `1e-4` (an override) and `0.0001` (a logged param) meet."""
    text = str(v)
    x = _num(text)
    if x is None:
        return text
    if re.fullmatch(r"[+-]?\d+", text.strip()):
        return str(int(text))
    return repr(x)


def default_tracking_uri() -> str:
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    from ds2exp.config import project_root

    return f"sqlite:///{project_root()}/mlflow.db"


def client_for(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def _history(client, run_id: str, key: str) -> List[Tuple[int, float]]:
    return sorted((int(m.step), float(m.value)) for m in client.get_metric_history(run_id, key))


def _best(points: List[Tuple[int, float]]) -> Optional[float]:
    values = [v for _, v in points if math.isfinite(v)]
    return min(values) if values else None


def _checkpoint_history(job_dir: Path) -> Dict[str, list]:
    for name in ("last.ckpt", "last.prev.ckpt"):
        ckpt = job_dir / "checkpoints" / name
        if not ckpt.is_file():
            continue
        try:
            from ds2exp.checkpoints.io import load_checkpoint

            return load_checkpoint(ckpt).meta.get("history") or {}
        except Exception as exc:  # a damaged checkpoint: the report goes on without its history
            print(f"sweep report: {ckpt} not readable ({type(exc).__name__}); its losses are left out",
                  file=sys.stderr)
    return {}


def _job_sort_key(p: Path) -> Tuple[int, str]:
    return (int(p.name), "") if p.name.isdigit() else (sys.maxsize, p.name)


def _read_yaml(path: Path) -> Any:
    from omegaconf import OmegaConf

    return OmegaConf.to_container(OmegaConf.load(path), resolve=False)


def _read_json(path: Path) -> Dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _cfg_value(cfg: Dict[str, Any], key: str) -> Any:
    node: Any = cfg
    for part in key.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return node


def _swept(sweep_dir: Path) -> List[str]:
    from ds2exp.sweeps.names import SWEPT_FILE

    data = _read_json(sweep_dir / SWEPT_FILE) if (sweep_dir / SWEPT_FILE).is_file() else None
    return [str(k) for k in data] if isinstance(data, list) else []


def _apply_summary(job: Job, s: Dict[str, Any]) -> None:
    """summary.json: `status`/`diverged_at_step`/`first_bad_step`/`cause`."""
    job.run_id = job.run_id or s.get("mlflow_run_id")
    job.nonfinite = s.get("nonfinite_steps", job.nonfinite)
    wers = [b["wer"] for b in s.get("best") or [] if _finite(b.get("wer")) is not None]
    job.best_wer = min(wers) if wers else job.best_wer
    job.first_bad_step = _int(s.get("first_bad_step")) if s.get("first_bad_step") is not None else job.first_bad_step
    if s.get("status") == "diverged":
        job.status, job.judged_by = "diverged", "run"
        job.diverged_at = s.get("diverged_at_step", s.get("step"))
        job.cause = _cause(s.get("cause"), s.get("first_nonfinite_group") or s.get("first_bad_group"))
    elif s.get("status") in ("interrupted", "failed"):
        job.status = "killed" if s.get("status") == "interrupted" else "crashed"
        job.error = s.get("error") or job.error
    else:
        job.status, job.final_loss = "finished", _num(s.get("last_loss"))


def from_directory(sweep_dir: Path, tracking_uri: Optional[str] = None, with_mlflow: bool = True) -> Sweep:
    """`with_mlflow=False`: files only (no store queries), e.g. while the store may be down."""
    sweep_dir = Path(sweep_dir).resolve()
    job_dirs = sorted((p for p in sweep_dir.iterdir() if (p / ".hydra" / "overrides.yaml").is_file()),
                      key=_job_sort_key)
    if not job_dirs:
        raise SystemExit(f"{sweep_dir}: no Hydra job directories (<n>/.hydra/overrides.yaml) found")
    parent_file = sweep_dir / PARENT_FILE
    parent = parent_file.read_text().strip() if parent_file.is_file() else None
    swept = _swept(sweep_dir)
    jobs: List[Job] = []
    uri = tracking_uri
    clients: Dict[str, Any] = {}
    for d in job_dirs:
        overrides = [str(o) for o in _read_yaml(d / ".hydra" / "overrides.yaml") or []]
        params = dict(parse_overrides(overrides))
        cfg = _read_yaml(d / ".hydra" / "config.yaml") if (d / ".hydra" / "config.yaml").is_file() else {}
        for key in (ROWS, COLS):
            params.setdefault(key, str(_cfg_value(cfg, key)))
        job = Job(name=d.name, params=params, status="no result", dir=str(d), overrides=overrides,
                  label=run_name(parse_overrides(overrides), swept or _varying_keys(sweep_dir, job_dirs)))
        job.patience = _int(_cfg_value(cfg, "trainer.nonfinite_patience"))
        job_uri = uri
        resolved = d / "resolved_config.yaml"
        if job_uri is None and resolved.is_file():
            logger = (_read_yaml(resolved) or {}).get("logger", {})
            if str(logger.get("backend")) == "mlflow":
                job_uri = logger.get("tracking_uri")
        state = _read_json(d / "run_state.json")
        tracking = _read_json(d / "tracking_state.json")
        job.run_id = state.get("mlflow_run_id") or tracking.get("run_id")
        if (d / "summary.json").is_file():
            _apply_summary(job, _read_json(d / "summary.json"))
        if (d / "error.txt").is_file() and job.status in ("no result", "crashed") and not job.error:
            lines = [ln for ln in (d / "error.txt").read_text().splitlines() if ln.strip()]
            job.status, job.error = "crashed", lines[-1] if lines else "?"
        elif state.get("status") == "running":
            job.status = "running"
        history: Dict[str, list] = {}
        if job.status in ("finished", "diverged"):
            history = _checkpoint_history(d)
            job.losses = [(int(s), float(v)) for s, v in zip(history.get("step", []), history.get("loss", []))]
        from_mlflow = False
        if with_mlflow and job.run_id and job_uri:
            try:
                client = clients.get(job_uri) or clients.setdefault(job_uri, client_for(job_uri))
                job.best_cer = _best(_history(client, job.run_id, "val/cer"))
                if not job.losses:
                    job.losses = _history(client, job.run_id, "train/loss")
                if job.nonfinite is None:
                    _nonfinite_from_mlflow(client, job)
                uri, from_mlflow = uri or job_uri, True
            except Exception as exc:  # store moved or unreachable: the checkpoint still has the history
                print(f"sweep report: MLflow store {job_uri} not read for job {d.name} ({type(exc).__name__})",
                      file=sys.stderr)
        if not from_mlflow and history:
            job.best_cer = _best(list(zip(history.get("val_step", []), history.get("val_cer", []))))
        jobs.append(job)
    mark_extra(jobs)
    if parent and uri is None:  # e.g. every job crashed before writing its config
        uri = default_tracking_uri()
    return Sweep(label=str(sweep_dir), jobs=jobs, parent_run_id=parent, tracking_uri=uri, dir=sweep_dir,
                 default_out=sweep_dir / "sweep_report.png",
                 name=sweep_name(swept or _varying_keys(sweep_dir, job_dirs), sweep_dir))


def _varying_keys(sweep_dir: Path, job_dirs: List[Path]) -> List[str]:
    """Sweeps made before `swept_keys.json` existed: the override keys whose values differ between jobs."""
    cache = getattr(_varying_keys, "_cache", {})
    if sweep_dir not in cache:
        values: Dict[str, set] = OrderedDict()
        for d in job_dirs:
            for k, v in parse_overrides(_read_yaml(d / ".hydra" / "overrides.yaml") or []).items():
                values.setdefault(k, set()).add(v)
        cache[sweep_dir] = [k for k, vs in values.items() if len(vs) > 1]
        _varying_keys._cache = cache  # type: ignore[attr-defined]
    return cache[sweep_dir]


def _cause(cause: Optional[str], group: Optional[str]) -> Optional[str]:
    if not cause or cause == "unknown":
        return f"first non-finite layer group {group}" if group and group != "None" else None
    return cause + (f" (first non-finite layer group {group})" if group and group != "None" else "")


def _download_json(client, run_id: str, path: str) -> Optional[Dict[str, Any]]:
    try:
        with tempfile.TemporaryDirectory() as tmp:
            local = client.download_artifacts(run_id, path, tmp)
            return json.loads(Path(local).read_text())
    except Exception:  # no such artifact (the run crashed before writing it)
        return None


def from_parent_run(parent_run_id: str, tracking_uri: str) -> Sweep:
    client = client_for(tracking_uri)
    try:
        parent = client.get_run(parent_run_id)
    except Exception as exc:
        raise SystemExit(f"no MLflow run {parent_run_id} in {tracking_uri}: {exc}")
    swept = [k[len("ds2exp.sweep."):] for k in parent.data.tags if k.startswith("ds2exp.sweep.")
             and k not in _META_TAGS]
    children = client.search_runs([parent.info.experiment_id],
                                  filter_string=f"tags.`mlflow.parentRunId` = '{parent_run_id}'",
                                  max_results=10000, order_by=["attributes.start_time ASC"])
    if not children:
        raise SystemExit(f"MLflow run {parent_run_id} has no child runs")
    jobs: List[Job] = []
    for run in children:
        p, tags = run.data.params, run.data.tags
        run_dir = tags.get("ds2exp.run_dir")
        name = Path(run_dir).name if run_dir else (tags.get("mlflow.runName") or run.info.run_id[:8])
        params = {k: p.get(k, "?") for k in dict.fromkeys([ROWS, COLS, *swept])}
        job = Job(name=name, params=params, status="finished", run_id=run.info.run_id, dir=run_dir,
                  label=tags.get("mlflow.runName") or run_name(params, swept),
                  patience=_int(p.get("trainer.nonfinite_patience")))
        job.best_cer = _best(_history(client, run.info.run_id, "val/cer"))
        job.best_wer = _best(_history(client, run.info.run_id, "val/wer"))
        job.losses = _history(client, run.info.run_id, "train/loss")
        job.first_bad_step = _int(tags.get("first_bad_step"))
        status = run.info.status
        if tags.get("ds2exp.status") == "diverged" or tags.get("diverged_at_step") is not None:
            job.status, job.judged_by = "diverged", "run"
            job.diverged_at = tags.get("diverged_at_step")
            job.cause = _cause(tags.get("divergence_cause"), tags.get("first_nonfinite_group"))
        elif status == "FAILED" or tags.get("ds2exp.status") == "failed":
            job.status, job.error = "crashed", tags.get("ds2exp.error")
        elif status in ("RUNNING", "SCHEDULED"):
            job.status = "running"
        elif status == "KILLED":
            job.status = "killed"
        if job.status in ("finished", "diverged"):
            s = _download_json(client, run.info.run_id, "summary.json") or {}
            job.nonfinite = s.get("nonfinite_steps")
            if job.status == "finished":
                job.final_loss = _num(s.get("last_loss"))
                if job.final_loss is None and job.losses:
                    job.final_loss = job.losses[-1][1]
        if job.nonfinite is None and job.status != "crashed":
            _nonfinite_from_mlflow(client, job)
        jobs.append(job)
    mark_extra(jobs)
    sweep_dir = parent.data.tags.get("ds2exp.sweep_dir")
    local = Path(sweep_dir) if sweep_dir and Path(sweep_dir).is_dir() else None
    default_out = local / "sweep_report.png" if local else Path(f"sweep_report_{parent_run_id[:8]}.png")
    label = f"{parent.info.run_name or sweep_dir}  (MLflow parent run {parent_run_id})"
    name = sweep_name(swept, sweep_dir) if sweep_dir else (parent.info.run_name or f"sweep {parent_run_id[:8]}")
    return Sweep(label=label, jobs=jobs, parent_run_id=parent_run_id, tracking_uri=tracking_uri, dir=local,
                 default_out=default_out, name=name)


def _nonfinite_from_mlflow(client, job: Job) -> None:
    """The last logged `train/nonfinite_steps`. A diverged run stops before logging its last step,
    which was non-finite itself: then the count is only known to be at least one more."""
    history = client.get_metric_history(job.run_id, "train/nonfinite_steps")
    if not history:
        return
    last = max(history, key=lambda m: (m.step, m.timestamp))
    job.nonfinite = int(last.value)
    if job.status == "diverged" and _num(job.diverged_at) is not None and last.step < int(float(job.diverged_at)):
        job.nonfinite += 1
        job.nonfinite_at_least = True


def mark_extra(jobs: List[Job]) -> None:
    """Swept keys other than the two axes: those whose value differs between jobs."""
    for j in jobs:
        j.params = {k: canon(v) for k, v in j.params.items()}
        if j.status == "diverged" and not j.nonfinite_at_least and j.nonfinite is None and j.judged_by == "run":
            j.nonfinite, j.nonfinite_at_least = max(1, j.patience or 1), True
        elif j.nonfinite_at_least and j.patience:
            j.nonfinite = max(j.nonfinite or 0, j.patience)
    keys = [k for k in dict.fromkeys(k for j in jobs for k in j.params) if k not in (ROWS, COLS)]
    varying = [k for k in keys if len({j.params.get(k) for j in jobs}) > 1]
    for j in jobs:
        j.extra = {k: j.params.get(k, "?") for k in varying}


def axis_sort(values: Sequence[str]) -> List[str]:
    """Axis values (lrs, batch sizes) in numeric order, non-numbers last."""
    return sorted(set(values), key=lambda v: (_num(v) is None, _num(v) or 0.0, v))
