"""A sweep's report: load and judge a sweep (a sweep directory or its MLflow parent run id), write the
text, heatmap and loss curves, log them to the parent run. `python -m ds2exp.sweep_report` is its
command line; the sweep callback writes it when a sweep ends.
"""
from __future__ import annotations

import re
import tempfile
from pathlib import Path
from typing import Dict, Optional

from ds2exp.sweeps.jobs import Sweep, client_for, default_tracking_uri, from_directory, from_parent_run
from ds2exp.sweeps.judge import judge
from ds2exp.sweeps.render import heatmap, loss_curves, report_text

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


def log_to_parent(sweep: Sweep, files: Dict[str, Path], text: str) -> bool:
    if not sweep.parent_run_id or not sweep.tracking_uri:
        return False
    client = client_for(sweep.tracking_uri)
    rid = sweep.parent_run_id
    log_files(lambda p, a: client.log_artifact(rid, p, a), lambda t, f: client.log_text(rid, t, f), files, text)
    return True
