"""Learning-rate x batch-size report of a sweep: a table on stdout and a heatmap PNG.

    python -m ds2exp.sweep_report multirun/<date>/<time>          # a Hydra sweep directory
    python -m ds2exp.sweep_report <parent run id> [--tracking-uri URI]   # the sweep's MLflow parent run

A cell shows the job's final train loss (or `diverged@N`: stopped by non-finite steps at step N,
or `crashed`: the job raised), its best validation CER and its number of non-finite steps. From a
sweep directory each job's summary.json and .hydra/overrides.yaml are read (the best CER comes from
the job's MLflow run, or from its last checkpoint when it had none); from a parent run id, the
child runs' params, metrics, tags and summary.json artifacts. The PNG is also logged to the parent
run when one is known (`report/`). Swept keys other than the two axes give one table per value.
"""
from __future__ import annotations

import argparse
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

import ds2exp  # noqa: F401  (protobuf implementation set before mlflow loads)

os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

ROWS, COLS = "optimizer.lr", "dataset.batch_size"
PARENT_FILE = "mlflow_parent_run_id.txt"
LEGEND = ("cell: train loss at the last step / best val CER % / non-finite steps;  diverged@N: stopped by non-finite "
          "steps at step N;  crashed: the job raised (error.txt);  -: no value")


@dataclass
class Job:
    name: str
    params: Dict[str, str]  # the swept keys' values (and the two axes)
    status: str  # finished | diverged | crashed | running | no result
    diverged_at: Optional[int] = None
    final_loss: Optional[float] = None
    best_cer: Optional[float] = None
    best_wer: Optional[float] = None
    nonfinite: Optional[int] = None
    nonfinite_at_least: bool = False  # diverged, and only a count logged before the last step is known
    patience: Optional[int] = None  # trainer.nonfinite_patience: a diverged job had at least this many
    error: Optional[str] = None
    cause: Optional[str] = None  # diverged: the diagnosis' cause (and first non-finite layer group)
    run_id: Optional[str] = None
    extra: Dict[str, str] = field(default_factory=dict)


@dataclass
class Sweep:
    label: str
    jobs: List[Job]
    parent_run_id: Optional[str] = None
    tracking_uri: Optional[str] = None
    default_out: Optional[Path] = None


# ---------------------------------------------------------------------------------------------- reading

def _num(x: Any) -> Optional[float]:
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return v


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


def _client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def _best_cer_from_mlflow(client, run_id: str) -> Optional[float]:
    values = [m.value for m in client.get_metric_history(run_id, "val/cer") if math.isfinite(m.value)]
    return min(values) if values else None


def _best_cer_from_checkpoint(job_dir: Path) -> Optional[float]:
    ckpt = job_dir / "checkpoints" / "last.ckpt"
    if not ckpt.is_file():
        return None
    try:
        from ds2exp.training.checkpoint import load_checkpoint

        values = [v for v in load_checkpoint(ckpt).meta.get("history", {}).get("val_cer", []) if _finite(v) is not None]
    except Exception:
        return None
    return min(values) if values else None


def _job_sort_key(p: Path) -> Tuple[int, str]:
    return (int(p.name), "") if p.name.isdigit() else (sys.maxsize, p.name)


def _read_yaml(path: Path) -> Any:
    from omegaconf import OmegaConf

    return OmegaConf.to_container(OmegaConf.load(path), resolve=False)


def from_directory(sweep_dir: Path, tracking_uri: Optional[str] = None) -> Sweep:
    sweep_dir = Path(sweep_dir).resolve()
    job_dirs = sorted((p for p in sweep_dir.iterdir() if (p / ".hydra" / "overrides.yaml").is_file()),
                      key=_job_sort_key)
    if not job_dirs:
        raise SystemExit(f"{sweep_dir}: no Hydra job directories (<n>/.hydra/overrides.yaml) found")
    parent_file = sweep_dir / PARENT_FILE
    parent = parent_file.read_text().strip() if parent_file.is_file() else None
    jobs: List[Job] = []
    uri = tracking_uri
    clients: Dict[str, Any] = {}
    for d in job_dirs:
        overrides = OrderedDict()
        for o in _read_yaml(d / ".hydra" / "overrides.yaml") or []:
            key, _, value = str(o).partition("=")
            overrides[key.lstrip("+~")] = value
        params = dict(overrides)
        cfg = None
        for key in (ROWS, COLS):
            if key not in params:
                cfg = cfg or _read_yaml(d / ".hydra" / "config.yaml")
                node: Any = cfg
                for part in key.split("."):
                    node = node.get(part) if isinstance(node, dict) else None
                params[key] = str(node)
        job = Job(name=d.name, params=params, status="no result")
        cfg = cfg or _read_yaml(d / ".hydra" / "config.yaml")
        job.patience = _int((cfg.get("trainer") or {}).get("nonfinite_patience"))
        job_uri = uri
        if job_uri is None and (d / "resolved_config.yaml").is_file():
            logger = (_read_yaml(d / "resolved_config.yaml") or {}).get("logger", {})
            if str(logger.get("backend")) == "mlflow":
                job_uri = logger.get("tracking_uri")
        summary_path = d / "summary.json"
        if summary_path.is_file():
            s = json.loads(summary_path.read_text())
            job.run_id = s.get("mlflow_run_id")
            job.nonfinite = s.get("nonfinite_steps")
            wers = [b["wer"] for b in s.get("best") or [] if _finite(b.get("wer")) is not None]
            job.best_wer = min(wers) if wers else None
            if s.get("stop_reason") == "nonfinite":
                job.status, job.diverged_at = "diverged", s.get("step")
                job.cause = _cause(s.get("cause"), s.get("first_nonfinite_group") or s.get("first_bad_group"))
            else:
                job.status, job.final_loss = "finished", _num(s.get("last_loss"))
        elif (d / "error.txt").is_file():
            lines = [ln for ln in (d / "error.txt").read_text().splitlines() if ln.strip()]
            job.status, job.error = "crashed", lines[-1] if lines else "?"
        from_mlflow = False
        if job.run_id and job_uri:
            try:
                client = clients.get(job_uri) or clients.setdefault(job_uri, _client(job_uri))
                job.best_cer = _best_cer_from_mlflow(client, job.run_id)
                if job.nonfinite is None:
                    _nonfinite_from_mlflow(client, job)
                uri, from_mlflow = uri or job_uri, True
            except Exception:  # store moved or unreachable: the checkpoint still has the history
                job.best_cer = None
        if not from_mlflow and job.status in ("finished", "diverged"):
            job.best_cer = _best_cer_from_checkpoint(d)
        jobs.append(job)
    _mark_extra(jobs)
    if parent and uri is None:  # e.g. every job crashed before writing its config
        uri = default_tracking_uri()
    return Sweep(label=str(sweep_dir), jobs=jobs, parent_run_id=parent, tracking_uri=uri,
                 default_out=sweep_dir / "sweep_report.png")


def _cause(cause: Optional[str], group: Optional[str]) -> Optional[str]:
    if not cause or cause == "unknown":
        return f"first non-finite layer group {group}" if group and group != "None" else None
    return cause + (f" (first non-finite layer group {group})" if group and group != "None" else "")


def _download_json(client, run_id: str, path: str) -> Optional[Dict[str, Any]]:
    try:
        with tempfile.TemporaryDirectory() as tmp:
            local = client.download_artifacts(run_id, path, tmp)
            return json.loads(Path(local).read_text())
    except Exception:
        return None


def from_parent_run(parent_run_id: str, tracking_uri: str) -> Sweep:
    client = _client(tracking_uri)
    try:
        parent = client.get_run(parent_run_id)
    except Exception as exc:
        raise SystemExit(f"no MLflow run {parent_run_id} in {tracking_uri}: {exc}")
    swept = [k[len("ds2exp.sweep."):] for k in parent.data.tags if k.startswith("ds2exp.sweep.")
             and k not in ("ds2exp.sweep.overrides", "ds2exp.sweep.params", "ds2exp.sweep.sweeper")]
    children = client.search_runs([parent.info.experiment_id],
                                  filter_string=f"tags.`mlflow.parentRunId` = '{parent_run_id}'",
                                  max_results=10000, order_by=["attributes.start_time ASC"])
    if not children:
        raise SystemExit(f"MLflow run {parent_run_id} has no child runs")
    jobs: List[Job] = []
    for run in children:
        p, tags, metrics = run.data.params, run.data.tags, run.data.metrics
        run_dir = tags.get("ds2exp.run_dir")
        name = Path(run_dir).name if run_dir else (tags.get("mlflow.runName") or run.info.run_id[:8])
        params = {k: p.get(k, "?") for k in dict.fromkeys([ROWS, COLS, *swept])}
        job = Job(name=name, params=params, status="finished", run_id=run.info.run_id,
                  patience=_int(p.get("trainer.nonfinite_patience")))
        job.best_cer = _best_cer_from_mlflow(client, run.info.run_id)
        wers = [m.value for m in client.get_metric_history(run.info.run_id, "val/wer") if math.isfinite(m.value)]
        job.best_wer = min(wers) if wers else None
        status = run.info.status
        if tags.get("diverged_at_step") is not None:
            job.status, job.diverged_at = "diverged", tags["diverged_at_step"]
            job.cause = _cause(tags.get("divergence_cause"), tags.get("first_nonfinite_group"))
        elif status == "FAILED":
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
                if job.final_loss is None:
                    job.final_loss = metrics.get("train/loss")
        if job.nonfinite is None and job.status != "crashed":
            _nonfinite_from_mlflow(client, job)
        jobs.append(job)
    _mark_extra(jobs)
    sweep_dir = parent.data.tags.get("ds2exp.sweep_dir")
    default_out = (Path(sweep_dir) / "sweep_report.png" if sweep_dir and Path(sweep_dir).is_dir()
                   else Path(f"sweep_report_{parent_run_id[:8]}.png"))
    label = f"{parent.info.run_name or sweep_dir}  (MLflow parent run {parent_run_id})"
    return Sweep(label=label, jobs=jobs, parent_run_id=parent_run_id, tracking_uri=tracking_uri,
                 default_out=default_out)


def _nonfinite_from_mlflow(client, job: Job) -> None:
    """The last logged `train/nonfinite_steps`. A diverged run stops before logging its last step,
    which was non-finite itself: then the count is only known to be at least one more."""
    history = client.get_metric_history(job.run_id, "train/nonfinite_steps")
    if not history:
        return
    last = max(history, key=lambda m: (m.step, m.timestamp))
    job.nonfinite = int(last.value)
    if job.status == "diverged" and _num(job.diverged_at) is not None and last.step < int(job.diverged_at):
        job.nonfinite += 1
        job.nonfinite_at_least = True


def _mark_extra(jobs: List[Job]) -> None:
    """Swept keys other than the two axes: those whose value differs between jobs."""
    for j in jobs:
        j.params = {k: canon(v) for k, v in j.params.items()}
        if j.status == "diverged" and not j.nonfinite_at_least and j.nonfinite is None:
            j.nonfinite, j.nonfinite_at_least = max(1, j.patience or 1), True
        elif j.nonfinite_at_least and j.patience:
            j.nonfinite = max(j.nonfinite or 0, j.patience)
    keys = [k for k in dict.fromkeys(k for j in jobs for k in j.params) if k not in (ROWS, COLS)]
    varying = [k for k in keys if len({j.params.get(k) for j in jobs}) > 1]
    for j in jobs:
        j.extra = {k: j.params.get(k, "?") for k in varying}


# ---------------------------------------------------------------------------------------------- table

def _fmt(x: Optional[float], digits: int = 4) -> str:
    if x is None:
        return "-"
    if not math.isfinite(x):
        return str(x)
    return f"{x:.{digits}g}"


def cell_text(job: Job) -> str:
    if job.status == "diverged":
        head = f"diverged@{job.diverged_at}"
    elif job.status in ("crashed", "running", "killed", "no result"):
        return job.status
    else:
        head = _fmt(job.final_loss)
    nf = "-" if job.nonfinite is None else (">=" if job.nonfinite_at_least else "") + str(int(job.nonfinite))
    cer = "-" if job.best_cer is None else f"{job.best_cer:.1f}"
    return f"{head} / {cer} / {nf}"


def representative(js: List[Job]) -> Job:
    """The job a cell shows when several share it: the finished one with the lowest final loss."""
    order = {"finished": 0, "diverged": 1, "crashed": 2}
    return min(js, key=lambda j: (order.get(j.status, 3), _finite(j.final_loss) or math.inf))


def _axis_sort(values: Sequence[str]) -> List[str]:
    return sorted(set(values), key=lambda v: (_num(v) is None, _num(v) or 0.0, v))


def _axis_label(v: str) -> str:
    x = _num(v)
    return f"{x:g}" if x is not None else v


def groups(jobs: List[Job]) -> "OrderedDict[str, List[Job]]":
    out: "OrderedDict[str, List[Job]]" = OrderedDict()
    for j in jobs:
        out.setdefault("  ".join(f"{k}={v}" for k, v in j.extra.items()), []).append(j)
    return out


def grid(jobs: List[Job]) -> Tuple[List[str], List[str], Dict[Tuple[str, str], List[Job]]]:
    rows = _axis_sort([j.params[ROWS] for j in jobs])
    cols = _axis_sort([j.params[COLS] for j in jobs])
    cells: Dict[Tuple[str, str], List[Job]] = {}
    for j in jobs:
        cells.setdefault((j.params[ROWS], j.params[COLS]), []).append(j)
    return rows, cols, cells


def format_table(jobs: List[Job]) -> str:
    rows, cols, cells = grid(jobs)
    corner = f"{ROWS} \\ {COLS}"
    body = []
    for r in rows:
        line = [_axis_label(r)]
        for c in cols:
            js = cells.get((r, c), [])
            line.append(cell_text(representative(js)) + (f" (x{len(js)})" if len(js) > 1 else "") if js else "")
        body.append(line)
    header = [corner] + [_axis_label(c) for c in cols]
    widths = [max(len(x[i]) for x in [header] + body) for i in range(len(header))]
    def fmt_row(row: List[str]) -> str:
        return " | ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))

    lines = [fmt_row(header), "-+-".join("-" * w for w in widths)] + [fmt_row(b) for b in body]
    return "\n".join(lines)


def report_text(sweep: Sweep) -> str:
    counts = OrderedDict((s, 0) for s in ("finished", "diverged", "crashed"))
    for j in sweep.jobs:
        counts[j.status] = counts.get(j.status, 0) + 1
    out = [f"Sweep {sweep.label}",
           f"{len(sweep.jobs)} jobs: " + ", ".join(f"{n} {s}" for s, n in counts.items()),
           LEGEND, ""]
    for title, jobs in groups(sweep.jobs).items():
        if title:
            out.append(f"[{title}]")
        out.append(format_table(jobs))
        out.append("")
    for j in sweep.jobs:
        if j.status == "diverged":
            out.append(f"job {j.name} diverged at step {j.diverged_at}" + (f": {j.cause}" if j.cause else ""))
        elif j.status == "crashed" and j.error:
            out.append(f"job {j.name} crashed: {j.error}")
    return "\n".join(out).rstrip() + "\n"


# ---------------------------------------------------------------------------------------------- heatmap

def heatmap(sweep: Sweep, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.colors import LogNorm, Normalize

    parts = list(groups(sweep.jobs).items())
    losses = [j.final_loss for j in sweep.jobs if j.status == "finished" and _finite(j.final_loss) is not None]
    positive = [x for x in losses if x > 0]
    norm = (LogNorm(min(positive), max(positive)) if positive and len(positive) == len(losses)
            and max(positive) > min(positive) else Normalize(min(losses, default=0), max(losses, default=1)))
    ncol = len(parts)
    first_rows, first_cols, _ = grid(parts[0][1])
    w = max(4.5, 1.9 * len(first_cols) + 2.5)
    h = max(3.0, 0.8 * len(first_rows) + 1.8)
    fig, axes = plt.subplots(1, ncol, figsize=(w * ncol, h), squeeze=False)
    cmap = plt.get_cmap("viridis").with_extremes(bad="white")
    im = None
    for ax, (title, jobs) in zip(axes[0], parts):
        rows, cols, cells = grid(jobs)
        data = np.full((len(rows), len(cols)), np.nan)
        for (r, c), js in cells.items():
            i, k = rows.index(r), cols.index(c)
            good = [j.final_loss for j in js if j.status == "finished" and _finite(j.final_loss) is not None]
            if good:
                data[i, k] = min(good)
        im = ax.imshow(np.ma.masked_invalid(data), cmap=cmap, norm=norm, aspect="auto")
        for (r, c), js in cells.items():
            i, k = rows.index(r), cols.index(c)
            j = representative(js)
            if j.status == "diverged":
                ax.add_patch(plt.Rectangle((k - 0.5, i - 0.5), 1, 1, color="#d62728"))
                text, color = f"diverged@{j.diverged_at}", "white"
            elif j.status != "finished":
                ax.add_patch(plt.Rectangle((k - 0.5, i - 0.5), 1, 1, color="#9e9e9e"))
                text, color = j.status, "black"
            else:
                text, color = _fmt(j.final_loss, 3), "white"
                v = _finite(j.final_loss)
                if v is not None and norm(v) > 0.6:
                    color = "black"
            cer = f"\nCER {j.best_cer:.1f}" if j.best_cer is not None else ""
            nf = f"\nnon-finite {'>=' if j.nonfinite_at_least else ''}{int(j.nonfinite)}" if j.nonfinite else ""
            ax.text(k, i, text + cer + nf + (f"\n({len(js)} jobs)" if len(js) > 1 else ""),
                    ha="center", va="center", fontsize=8, color=color)
        ax.set_xticks(range(len(cols)), [_axis_label(c) for c in cols])
        ax.set_yticks(range(len(rows)), [_axis_label(r) for r in rows])
        ax.set_xlabel(COLS)
        ax.set_ylabel(ROWS)
        ax.set_title(title or "final train loss; red: diverged, grey: crashed", fontsize=9)
    if im is not None and losses:
        fig.colorbar(im, ax=axes[0].tolist(), label="final train loss")
    fig.suptitle(sweep.label if len(sweep.label) < 90 else "..." + sweep.label[-87:], fontsize=9, y=1.04)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return path


def log_to_parent(sweep: Sweep, png: Path, text: str) -> bool:
    if not sweep.parent_run_id or not sweep.tracking_uri:
        return False
    client = _client(sweep.tracking_uri)
    with tempfile.TemporaryDirectory() as tmp:  # one name in the run, whatever --out was
        fixed = Path(tmp) / "sweep_report.png"
        fixed.write_bytes(Path(png).read_bytes())
        client.log_artifact(sweep.parent_run_id, str(fixed), "report")
    client.log_text(sweep.parent_run_id, text, "report/sweep_report.txt")
    return True


# ---------------------------------------------------------------------------------------------- CLI

_RUN_ID = re.compile(r"^[0-9a-f]{32}$")


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m ds2exp.sweep_report", description=__doc__.split("\n\n")[0])
    ap.add_argument("target", help="a multirun sweep directory, or the MLflow run id of a sweep's parent run")
    ap.add_argument("--tracking-uri", default=None,
                    help="MLflow store (default: the jobs' own store for a directory; "
                         "$MLFLOW_TRACKING_URI or sqlite:///<project root>/mlflow.db for a run id)")
    ap.add_argument("--out", default=None, help="heatmap PNG (default: <sweep dir>/sweep_report.png)")
    ap.add_argument("--no-log", action="store_true", help="do not log the report to the parent run")
    args = ap.parse_args(argv)

    target = Path(args.target)
    if target.is_dir():
        sweep = from_directory(target, args.tracking_uri)
    elif _RUN_ID.match(args.target):
        sweep = from_parent_run(args.target, args.tracking_uri or default_tracking_uri())
    else:
        print(f"sweep_report: {args.target} is neither a directory nor an MLflow run id", file=sys.stderr)
        return 2
    text = report_text(sweep)
    print(text, end="")
    png = heatmap(sweep, Path(args.out) if args.out else sweep.default_out)
    print(f"heatmap: {png}")
    if not args.no_log:
        try:
            if log_to_parent(sweep, png, text):
                print(f"logged to MLflow parent run {sweep.parent_run_id} (report/)")
        except Exception as exc:
            print(f"could not log to the parent run: {exc}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
