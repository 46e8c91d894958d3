"""Learning-rate x batch-size report of a sweep: table, verdict, heatmap and loss curves.

    python -m ds2exp.sweep_report multirun/<date>/<time>          # a Hydra sweep directory
    python -m ds2exp.sweep_report <parent run id> [--tracking-uri URI]   # the sweep's MLflow parent run

Every `-m` sweep writes this report itself when it ends (ds2exp/sweeps/callback.py); run it
by hand for older sweep folders, for a sweep that was stopped, or from another machine by run id.

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
import sys
from pathlib import Path
from typing import List, Optional

from ds2exp.sweeps.report import RUN_ID, load, log_to_parent, write

os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m ds2exp.sweep_report", description=__doc__.split("\n\n")[0],
                                 epilog="examples:\n  python -m ds2exp.sweep_report multirun/2026-12-01/15-45-42\n"
                                        "  python -m ds2exp.sweep_report 2b4be7b11439467aafee9eea80948c6f "
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
        print(f"sweep_report: {args.target} is neither a directory nor an MLflow run id", file=sys.stderr)
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
