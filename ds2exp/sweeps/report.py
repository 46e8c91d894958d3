"""A sweep's report: load and judge a sweep (a sweep directory or its MLflow parent run id), write the
text, heatmap and loss curves, log them to the parent run. `python -m ds2exp.sweep_report` is its
command line; the sweep callback writes it when a sweep ends.
"""
from __future__ import annotations

import re
import tempfile
import time
from pathlib import Path
from typing import Dict, Optional, Tuple

from ds2exp.sweeps.jobs import (COLS, ROWS, Sweep, _num, client_for, default_tracking_uri, from_directory,
                                from_parent_run)
from ds2exp.sweeps.judge import boundaries, judge, recommend
from ds2exp.sweeps.render import groups, heatmap, loss_curves, parent_note, report_text, status_counts

RUN_ID = re.compile(r"^[0-9a-f]{32}$")


def load(target: str, tracking_uri: Optional[str] = None, with_mlflow: bool = True) -> Sweep:
    """A judged sweep from a sweep directory or a parent run id."""
    path = Path(target)
    if path.is_dir():
        sweep = from_directory(path, tracking_uri, with_mlflow=with_mlflow)
    elif RUN_ID.match(target):
        sweep = from_parent_run(target, tracking_uri or default_tracking_uri())
    else:
        raise SystemExit(f"sweep_report: {target} is neither a sweep directory nor an MLflow run id")
    judge(sweep)
    return sweep


def write(sweep: Sweep, png: Optional[Path] = None) -> Dict[str, Path]:
    """Write the heatmap (`png`, default beside the sweep), the loss curves and the text beside it."""
    png = Path(png) if png else sweep.default_out
    text = report_text(sweep)
    files = {"heatmap": heatmap(sweep, png)}
    curves = loss_curves(sweep, png.with_name("sweep_losses.png" if png.name == "sweep_report.png"
                                              else png.stem + "_losses.png"))
    if curves is not None:
        files["losses"] = curves
    files["text"] = png.with_suffix(".txt")
    files["text"].write_text(text)
    return files


def log_files(log_artifact, log_text, files: Dict[str, Path], text: str) -> None:
    """Log the report under `report/` with fixed names, whatever the local file names are."""
    names = {"heatmap": "sweep_report.png", "losses": "sweep_losses.png"}
    with tempfile.TemporaryDirectory() as tmp:
        for kind, name in names.items():
            if kind in files:
                fixed = Path(tmp) / name
                fixed.write_bytes(Path(files[kind]).read_bytes())
                log_artifact(str(fixed), "report")
    log_text(text, "report/sweep_report.txt")


_NOT_IN_A_KEY = re.compile(r"[^A-Za-z0-9_\-. :/]")  # what MLflow refuses in a param or metric name


def parent_records(sweep: Sweep) -> Tuple[Dict[str, str], Dict[str, str], Dict[str, float]]:
    """(tags, params, metrics) of the sweep's parent run, so that its page and the runs table show the
    verdict: the description (tag `mlflow.note.content`), the recommended setting as params, and as
    metrics the stability boundary per batch size (`boundary/bs_4/largest_stable_lr`,
    `.../smallest_diverged_lr`; per value of the other swept keys when there are several), the
    recommended job's best validation CER and the number of jobs per status."""
    from ds2exp.sweeps.names import short_key
    from ds2exp.training.summary import NOTE_TAG

    params: Dict[str, str] = {}
    metrics: Dict[str, float] = {}
    best = recommend(sweep.jobs)
    if best is None:
        params["recommended"] = "none (no job trained without diverging)"
    else:
        params.update({f"recommended.{k}": str(v) for k, v in [(ROWS, best.params[ROWS]), (COLS, best.params[COLS]),
                                                                *best.extra.items()]})
        params["recommended.run"] = best.label or best.name
        if best.run_id:
            params["recommended.run_id"] = best.run_id
        if best.best_cer is not None:
            metrics["recommended/best_val_cer"] = float(best.best_cer)
    for title, jobs in groups(sweep.jobs).items():
        where = "/".join(f"{short_key(k)}_{v}" for k, v in jobs[0].extra.items()) if title else ""
        for bs, b in boundaries(jobs).items():
            prefix = _NOT_IN_A_KEY.sub("_", f"boundary/{where + '/' if where else ''}{short_key(COLS)}_{bs}/")
            for key in ("largest_stable", "smallest_diverged"):
                if _num(b[key]) is not None:
                    metrics[f"{prefix}{key}_lr"] = float(b[key])
    metrics.update({f"jobs/{status}": float(n) for status, n in status_counts(sweep).items()})
    return {NOTE_TAG: parent_note(sweep)}, params, metrics


def log_to_parent(sweep: Sweep, files: Dict[str, Path], text: str) -> bool:
    if not sweep.parent_run_id or not sweep.tracking_uri:
        return False
    from mlflow.entities import Metric, Param, RunTag

    client = client_for(sweep.tracking_uri)
    rid = sweep.parent_run_id
    log_files(lambda p, a: client.log_artifact(rid, p, a), lambda t, f: client.log_text(rid, t, f), files, text)
    tags, params, metrics = parent_records(sweep)
    logged = client.get_run(rid).data.params  # a param once logged cannot change
    client.log_batch(rid, tags=[RunTag(k, v) for k, v in tags.items()],
                     params=[Param(k, v) for k, v in params.items() if k not in logged],
                     metrics=[Metric(k, v, int(time.time() * 1000), 0) for k, v in metrics.items()])
    return True
