"""Learning-rate x batch-size report of a sweep: table, verdict, heatmap and loss curves.

    python -m ds2exp.sweeps.report multirun/<date>/<time>          # a Hydra sweep directory
    python -m ds2exp.sweeps.report <parent run id> [--tracking-uri URI]   # the sweep's MLflow parent run

Every `-m` sweep writes this report itself when it ends (ds2exp/sweeps/callback.py calls `load`,
`write` and `log_to_parent`); run it by hand for older sweep folders, for a sweep that was stopped, or
from another machine by run id.

A cell shows the job's final train loss (or `diverged@N`: the divergence policy stopped it at step
N; `exploded@N`: it finished, but its logged losses diverged from step N, see ds2exp/sweeps/judge.py;
`crashed`: the job raised), its best validation CER and its number of non-finite steps. Below the
tables: per batch size the largest lr that trained without divergence and the smallest that
diverged (the stability boundary), and the recommended setting (best validation CER among the
stable jobs). Files: `sweep_report.png` (heatmap), `sweep_losses.png` (every job's train loss) and
`sweep_report.txt`, beside the heatmap; also logged to the parent run (`report/`) when one is known,
which gets the verdict as its description and the boundary and recommendation as metrics and params.
Swept keys other than the two axes give one table per value.
"""
from __future__ import annotations

import argparse
import os
import re
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional, Tuple

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
        raise SystemExit(f"sweep report: {target} is neither a sweep directory nor an MLflow run id")
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


def main(argv: Optional[List[str]] = None) -> int:
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    ap = argparse.ArgumentParser(prog="python -m ds2exp.sweeps.report", description=__doc__.split("\n\n")[0],
                                 epilog="examples:\n  python -m ds2exp.sweeps.report multirun/2026-12-01/15-45-42\n"
                                        "  python -m ds2exp.sweeps.report 2b4be7b11439467aafee9eea80948c6f "
                                        "--tracking-uri http://127.0.0.1:5000",
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("target", help="a multirun sweep directory, or the MLflow run id of a sweep's parent run")
    ap.add_argument("--tracking-uri", default=None,
                    help="MLflow store (default: the jobs' own store for a directory; "
                         "$MLFLOW_TRACKING_URI or sqlite:///<project root>/mlflow.db for a run id)")
    ap.add_argument("--out", default=None, help="heatmap PNG (default: <sweep dir>/sweep_report.png)")
    ap.add_argument("--no-log", action="store_true", help="do not log the report to the parent run")
    args = ap.parse_args(argv)

    if not Path(args.target).is_dir() and not RUN_ID.match(args.target):
        print(f"sweep report: {args.target} is neither a directory nor an MLflow run id", file=sys.stderr)
        return 2
    from ds2exp.cli import check_argument_outputs

    check_argument_outputs(tracking_uri=args.tracking_uri, out_file=args.out)
    sweep = load(args.target, args.tracking_uri)
    files = write(sweep, Path(args.out) if args.out else None)
    text = files["text"].read_text()
    print(text, end="")
    print(f"heatmap: {files['heatmap']}")
    if "losses" in files:
        print(f"loss curves: {files['losses']}")
    print(f"report: {files['text']}")
    if not args.no_log:
        try:
            if log_to_parent(sweep, files, text):
                print(f"logged to MLflow parent run {sweep.parent_run_id} (report/)")
        except Exception as exc:  # the report is on disk; say why it is not in MLflow
            print(f"could not log to the parent run: {exc}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
