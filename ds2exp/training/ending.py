"""How a training run ends, in one place: for each outcome its run_state.json status, its MLflow status
and train.py's exit status (`ENDINGS`), and what is written and printed on the way out.

Every outcome ends the same way: run_state.json, summary.json, the MLflow run ended with the summary
(and a diagnosis) as its description, the summary printed. A failure adds one `error:` line on the
console; its traceback goes to train.log and the MLflow run's `error/traceback.txt`.
"""
from __future__ import annotations

import json
import logging
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, NamedTuple, Optional

from ds2exp.atomic import atomic_write_text
from ds2exp.training import recovery
from ds2exp.training import summary as run_summary

log = logging.getLogger("ds2exp.train")


class Ending(NamedTuple):
    mlflow_status: str
    exit_status: Optional[int]  # None: the signal's (130 SIGINT, 143 SIGTERM)


# outcome (also run_state.json's status and the ds2exp.status tag) -> how the run ends
ENDINGS = {
    "finished": Ending("FINISHED", 0),
    "diverged": Ending("FAILED", 1),
    "failed": Ending("FAILED", 1),
    "interrupted": Ending("KILLED", None),
}

# Errors whose message is the whole story; anything else is named by its type.
_EXPECTED_ERRORS = ("CheckpointError", "RunDirBusy", "DatasetError", "ManifestError", "ConfigValueError")


@dataclass
class RunOutcome:
    outcome: str  # finished or diverged (an interrupt raises TrainingInterrupted, a failure its exception)
    value: float  # the best value of trainer.monitor over the run: what a hyperparameter search optimises
    diverged_at_step: Optional[int] = None  # the step the divergence policy stopped a diverged run at

    @property
    def exit_status(self) -> int:
        return int(ENDINGS[self.outcome].exit_status)


def one_line_error(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if type(exc).__name__ in _EXPECTED_ERRORS else f"{type(exc).__name__}: {text}"


def log_traceback(exc: BaseException) -> None:
    """The traceback into the log files (Hydra's train.log), not onto the console."""
    record = log.makeRecord(log.name, logging.ERROR, __file__, 0, "run failed: %s", (one_line_error(exc),),
                            (type(exc), exc, exc.__traceback__))
    for handler in logging.getLogger().handlers + log.handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)


def write_summary(outcome: str, base: Dict[str, Any], trainer, cfg, run_dir: Path, tracker,
                  write: bool = True) -> Dict[str, Any]:
    """summary.json for this outcome (written when `write`; a failing disk only costs a warning)."""
    report = run_summary.build(outcome, base, trainer.state if trainer is not None else None, cfg, run_dir,
                               tracker)
    if write:
        try:
            atomic_write_text(run_dir / "summary.json", json.dumps(report, indent=1, default=str))
        except OSError as exc:
            log.warning("could not write %s: %s", run_dir / "summary.json", exc)
    return report


def print_summary(report: Dict[str, Any], tracker) -> None:
    print("\n" + run_summary.format_summary(report, getattr(tracker, "pending", 0),
                                            getattr(tracker, "spool_path", None)), flush=True)


def record_divergence(run, d: Dict[str, Any]) -> Dict[str, Any]:
    """Tags, diagnosis.json and diagnosis.txt of a run the divergence policy stopped; returns its summary."""
    from ds2exp.training.diagnosis import format_text

    tracker, run_dir = run.tracker, run.run_dir
    d.setdefault("diverged_at_step", d.get("step"))
    d.setdefault("first_bad_step", d.get("step"))
    if run.audit is not None:  # what the audit knows of the bad batch's utterances
        for u in d.get("batch") or []:
            u["hazards"] = run.audit.hazards_of(u["id"])
    tags = {"diverged_at_step": d["diverged_at_step"], "first_bad_step": d["first_bad_step"],
            "divergence_cause": d.get("cause", "unknown"), "first_nonfinite_group": d.get("first_nonfinite_group")}
    tracker.set_tags({k: v for k, v in tags.items() if v is not None})  # a loss explosion names no group
    (run_dir / "diagnosis.json").write_text(json.dumps(d, indent=1, default=str))
    tracker.log_artifact(run_dir / "diagnosis.json")
    if "cause" in d:
        (run_dir / "diagnosis.txt").write_text(format_text(d))
        tracker.log_artifact(run_dir / "diagnosis.txt")
    log.error("training stopped: %s", d.get("summary"))
    return {"stop_reason": "diverged", **d}


def finish(run, outcome: str, summary: Dict[str, Any]) -> Dict[str, Any]:
    """A run that finished or diverged: artifacts, the MLflow run ended, run_state.json, the summary printed."""
    report = _close(run.trainer, run.tracker, run.cfg, run.run_dir, summary, outcome)
    run.tracker.end(ENDINGS[outcome].mlflow_status)
    recovery.write_run_state(run.run_dir, status=outcome, mlflow_run_id=run.tracker.run_id,
                             step=run.trainer.state.step)
    print_summary(report, run.tracker)
    return report


def end_failed(run, exc: BaseException) -> None:
    """A crash after the run was set up in part: run_state failed, the error and its traceback in MLflow,
    the MLflow run FAILED, and the summary printed (train_command prints the `error:` line)."""
    error = one_line_error(exc)[:2000]
    recovery.write_run_state(run.run_dir, status="failed", error=error)
    report = write_summary("failed", {"stop_reason": "error", "error": error}, run.trainer, run.cfg, run.run_dir,
                           run.tracker)
    if run.tracker is not None:
        run.tracker.set_tags({"ds2exp.status": "failed", "ds2exp.error": error, **run_summary.note_tags(report)})
        run.tracker.log_text("".join(traceback.format_exception(type(exc), exc, exc.__traceback__)),
                             "error/traceback.txt")
        run.tracker.end(ENDINGS["failed"].mlflow_status)
    print_summary(report, run.tracker)
    if isinstance(exc, Exception):
        exc.summary_printed = True  # type: ignore[attr-defined]


def end_interrupted(run, exc) -> None:
    """A run a signal stopped: run_state interrupted, summary.json, MLflow KILLED, the summary printed."""
    from ds2exp.training.signals import signal_name

    trainer, tracker = run.trainer, run.tracker
    base = {"stop_reason": "interrupted", "signal": signal_name(exc.signum)}
    step = trainer.state.step if trainer is not None else None
    log.warning("%s: stopped %s%s", base["signal"], f"at step {step}" if step is not None else "during set-up",
                f"; checkpoint {exc.checkpoint}" if exc.checkpoint else "")
    recovery.write_run_state(run.run_dir, status="interrupted", step=step, signal=base["signal"],
                             **({"mlflow_run_id": tracker.run_id} if tracker is not None and tracker.run_id else {}))
    if trainer is not None:
        report = _close(trainer, tracker, run.cfg, run.run_dir, base, "interrupted")
    else:
        report = write_summary("interrupted", {**base, "step": None}, None, run.cfg, run.run_dir, tracker)
        if tracker is not None:
            tracker.set_tags(run_summary.note_tags(report))
    if tracker is not None:
        tracker.end(ENDINGS["interrupted"].mlflow_status)
    print_summary(report, tracker)


def report_failure(exc: BaseException, cfg, run_dir: Path) -> int:
    """train.py's last word on a failure: the summary (when the run had none printed yet: it failed before
    it was set up), one `error:` line; the traceback to the log file. Returns the exit status."""
    log_traceback(exc)
    if not getattr(exc, "summary_printed", False):
        base = {"stop_reason": "error", "error": one_line_error(exc), "step": None}
        print_summary(write_summary("failed", base, None, cfg, run_dir, None, write=run_dir.is_dir()), None)
    print(f"error: {one_line_error(exc)}", file=sys.stderr, flush=True)
    return int(ENDINGS["failed"].exit_status)


def _close(trainer, tracker, cfg, run_dir: Path, summary: Dict[str, Any], outcome: str) -> Dict[str, Any]:
    """summary.json, curves, artifacts and the ds2exp.status tag of a run that ended with `outcome`;
    returns the summary."""
    from ds2exp.tracking.plots import plot_curves

    s = trainer.state
    summary = write_summary(outcome, summary, trainer, cfg, run_dir, tracker)
    tags = {"ds2exp.status": outcome, **run_summary.note_tags(summary)}  # summary and diagnosis: the description
    if summary.get("first_bad_step") is not None:
        tags["first_bad_step"] = summary["first_bad_step"]
    tracker.set_tags(tags)
    png = plot_curves(s.history, run_dir / "curves.png", s.first_bad_step, summary.get("diverged_at_step"))
    if png is not None:
        tracker.log_artifact(png, "plots")
    failures = trainer.train_loader.failures
    if failures:  # audio that broke after preparation: skipped batch entries, listed by reason
        log.warning("%d training utterances could not be loaded and were skipped", len(failures))
        tracker.log_dict(failures, "data/load_failures_train.json")
        tracker.log_metrics({"data/load_failures": len(failures)}, s.step)
    tracker.log_artifact(run_dir / "summary.json")
    # an interrupted run uploads its best checkpoint when it is resumed and ends
    if outcome != "interrupted" and s.best and cfg.logger.log_checkpoint and Path(s.best[0]["path"]).exists():
        tracker.log_artifact(s.best[0]["path"], "checkpoints")
    return summary
