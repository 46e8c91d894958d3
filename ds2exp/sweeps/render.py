"""The sweep report: text (tables and verdict), the lr x batch-size heatmap and the loss curves."""
from __future__ import annotations

import math
from collections import OrderedDict
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from ds2exp.sweeps.jobs import COLS, ROWS, Job, Sweep, _finite, _num, axis_sort
from ds2exp.sweeps.judge import recommendation_line, verdict_lines

LEGEND = ("cell: train loss at the last step / best val CER % / non-finite steps;  diverged@N: stopped by the "
          "divergence policy at step N;  exploded@N: finished, but its losses diverged from step N;  "
          "crashed: the job raised (error.txt);  -: no value")


def _fmt(x: Optional[float], digits: int = 4) -> str:
    if x is None:
        return "-"
    if not math.isfinite(x):
        return str(x)
    return f"{x:.{digits}g}"


def head(job: Job) -> str:
    if job.status == "diverged":
        if job.judged_by == "losses":
            return f"exploded@{job.first_bad_step}"
        return f"diverged@{job.diverged_at}"
    return job.status if job.status != "finished" else _fmt(job.final_loss)


def cell_text(job: Job) -> str:
    if job.status in ("crashed", "running", "killed", "no result"):
        return job.status
    nf = "-" if job.nonfinite is None else (">=" if job.nonfinite_at_least else "") + str(int(job.nonfinite))
    cer = "-" if job.best_cer is None else f"{job.best_cer:.1f}"
    return f"{head(job)} / {cer} / {nf}"


def representative(js: List[Job]) -> Job:
    """The job a cell shows when several share it: the finished one with the lowest final loss."""
    order = {"finished": 0, "diverged": 1, "crashed": 2}
    return min(js, key=lambda j: (order.get(j.status, 3), _finite(j.final_loss) or math.inf))


def axis_label(v: str) -> str:
    x = _num(v)
    return f"{x:g}" if x is not None else v


def groups(jobs: List[Job]) -> "OrderedDict[str, List[Job]]":
    out: "OrderedDict[str, List[Job]]" = OrderedDict()
    for j in jobs:
        out.setdefault("  ".join(f"{k}={v}" for k, v in j.extra.items()), []).append(j)
    return out


def grid(jobs: List[Job]) -> Tuple[List[str], List[str], Dict[Tuple[str, str], List[Job]]]:
    rows = axis_sort([j.params[ROWS] for j in jobs])
    cols = axis_sort([j.params[COLS] for j in jobs])
    cells: Dict[Tuple[str, str], List[Job]] = {}
    for j in jobs:
        cells.setdefault((j.params[ROWS], j.params[COLS]), []).append(j)
    return rows, cols, cells


def format_table(jobs: List[Job]) -> str:
    rows, cols, cells = grid(jobs)
    body = []
    for r in rows:
        line = [axis_label(r)]
        for c in cols:
            js = cells.get((r, c), [])
            line.append(cell_text(representative(js)) + (f" (x{len(js)})" if len(js) > 1 else "") if js else "")
        body.append(line)
    header = [f"{ROWS} \\ {COLS}"] + [axis_label(c) for c in cols]
    widths = [max(len(x[i]) for x in [header] + body) for i in range(len(header))]

    def fmt_row(row: List[str]) -> str:
        return " | ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))

    return "\n".join([fmt_row(header), "-+-".join("-" * w for w in widths)] + [fmt_row(b) for b in body])


def status_counts(sweep: Sweep) -> "OrderedDict[str, int]":
    counts = OrderedDict((s, 0) for s in ("finished", "diverged", "crashed"))
    for j in sweep.jobs:
        counts[j.status] = counts.get(j.status, 0) + 1
    return counts


def counts_line(sweep: Sweep) -> str:
    return f"{len(sweep.jobs)} jobs: " + ", ".join(f"{n} {s}" for s, n in status_counts(sweep).items())


def report_text(sweep: Sweep) -> str:
    out = [f"Sweep {sweep.label}", counts_line(sweep), LEGEND, ""] + _tables_and_causes(sweep) + [""]
    return "\n".join(out + verdict(sweep)).rstrip() + "\n"


def _tables_and_causes(sweep: Sweep) -> List[str]:
    """One table per combination of the other swept keys, then a line per diverged or crashed job."""
    out: List[str] = []
    for title, jobs in groups(sweep.jobs).items():
        if title:
            out.append(f"[{title}]")
        out.append(format_table(jobs))
        out.append("")
    for j in sweep.jobs:
        name = f"job {j.name}" + (f" ({j.label})" if j.label else "")
        if j.status == "diverged" and j.judged_by == "losses":
            out.append(f"{name} exploded: {j.cause}")
        elif j.status == "diverged":
            first = (f", first anomalous step {j.first_bad_step}"
                     if j.first_bad_step is not None and str(j.first_bad_step) != str(j.diverged_at) else "")
            out.append(f"{name} diverged at step {j.diverged_at}{first}" + (f": {j.cause}" if j.cause else ""))
        elif j.status == "crashed" and j.error:
            out.append(f"{name} crashed: {j.error}")
    return out


def verdict(sweep: Sweep) -> List[str]:
    """The stability boundary per batch size and the recommended setting (per table, then overall)."""
    out: List[str] = []
    parts = groups(sweep.jobs)
    for title, jobs in parts.items():
        lines = verdict_lines(jobs)
        out.extend([f"[{title}] {lines[0]}"] + lines[1:] if title else lines)
    if len(parts) > 1:
        out.append(recommendation_line(sweep.jobs, "Recommended over the whole sweep"))
    return out


def parent_note(sweep: Sweep) -> str:
    """The sweep parent run's description (Markdown): the verdict first, where the run's page shows it
    without scrolling, then the tables with each diverged or crashed job's cause."""
    from ds2exp.training.summary import NOTE_MAX, code_block

    text = code_block("\n".join([counts_line(sweep), *verdict(sweep)]), NOTE_MAX // 2)
    head = "\nJobs (the legend, heatmap and loss curves are in the artifacts under `report/`):\n\n"
    return text + head + code_block("\n".join(_tables_and_causes(sweep)), NOTE_MAX - len(text) - len(head))


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def heatmap(sweep: Sweep, path: Path) -> Path:
    import numpy as np
    from matplotlib.colors import LogNorm, Normalize

    plt = _plt()
    parts = list(groups(sweep.jobs).items())
    losses = [j.final_loss for j in sweep.jobs if j.status == "finished" and _finite(j.final_loss) is not None]
    positive = [x for x in losses if x > 0]
    norm = (LogNorm(min(positive), max(positive)) if positive and len(positive) == len(losses)
            and max(positive) > min(positive) else Normalize(min(losses, default=0), max(losses, default=1)))
    first_rows, first_cols, _ = grid(parts[0][1])
    w = max(4.5, 1.9 * len(first_cols) + 2.5)
    h = max(3.0, 0.8 * len(first_rows) + 1.8)
    fig, axes = plt.subplots(1, len(parts), figsize=(w * len(parts), h), squeeze=False)
    cmap = plt.get_cmap("viridis").with_extremes(bad="white")
    im = None
    for ax, (title, jobs) in zip(axes[0], parts):
        rows, cols, cells = grid(jobs)
        data = np.full((len(rows), len(cols)), np.nan)
        for (r, c), js in cells.items():
            good = [j.final_loss for j in js if j.status == "finished" and _finite(j.final_loss) is not None]
            if good:
                data[rows.index(r), cols.index(c)] = min(good)
        im = ax.imshow(np.ma.masked_invalid(data), cmap=cmap, norm=norm, aspect="auto")
        for (r, c), js in cells.items():
            i, k = rows.index(r), cols.index(c)
            j = representative(js)
            if j.status == "diverged":
                ax.add_patch(plt.Rectangle((k - 0.5, i - 0.5), 1, 1, color="#d62728"))
                text, color = head(j), "white"
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
        ax.set_xticks(range(len(cols)), [axis_label(c) for c in cols])
        ax.set_yticks(range(len(rows)), [axis_label(r) for r in rows])
        ax.set_xlabel(COLS)
        ax.set_ylabel(ROWS)
        ax.set_title(title or "final train loss; red: diverged or exploded, grey: crashed", fontsize=9)
    if im is not None and losses:
        fig.colorbar(im, ax=axes[0].tolist(), label="final train loss")
    title = sweep.name or sweep.label
    fig.suptitle(title if len(title) < 90 else "..." + title[-87:], fontsize=9, y=1.04)
    return _save(fig, path)


def loss_curves(sweep: Sweep, path: Path) -> Optional[Path]:
    """Every job's train loss against the step on one log-scale chart; diverged jobs dashed, their first
    anomalous step marked."""
    jobs = [j for j in sweep.jobs if j.losses]
    if not jobs:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(8.5, 4.8))
    for j in jobs:
        steps = [s for s, v in j.losses if math.isfinite(v) and v > 0]
        values = [v for s, v in j.losses if math.isfinite(v) and v > 0]
        label = f"{j.name}: {j.label or j.name}" + (" (diverged)" if j.status == "diverged" else "")
        line, = ax.plot(steps, values, lw=1.2, ls="--" if j.status == "diverged" else "-", label=label,
                        marker="." if len(steps) < 12 else None)
        bad = j.first_bad_step if j.first_bad_step is not None else _num(j.diverged_at)
        if j.status == "diverged" and bad is not None and steps:
            k = min(range(len(steps)), key=lambda i: abs(steps[i] - float(bad)))
            ax.plot([steps[k]], [values[k]], "x", color=line.get_color(), ms=9, mew=2)
    ax.set_yscale("log")
    ax.set(xlabel="step", ylabel="train CTC loss (log)", title="train loss per job (x: first anomalous step)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7, loc="best", ncol=2 if len(jobs) > 8 else 1)
    fig.tight_layout()
    return _save(fig, path)


def _save(fig, path: Path) -> Path:
    plt = _plt()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return path
