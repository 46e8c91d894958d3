"""How a training run ended: the fields summary.json gains, and the lines train.py prints last.

Every outcome ends the same way (finished, diverged, interrupted, failed): status, steps, best
checkpoint with its step and validation CER/WER, run directory, MLflow run id with a link for the
UI, and how to open the UI; an interrupted run adds the exact command that resumes it, and a run
whose MLflow records could not all be sent says where they are kept and how to send them.
"""
from __future__ import annotations

import contextlib
import logging
import math
import shlex
from pathlib import Path
from typing import Any, Dict, Optional

from ds2exp.config import enum_value
from ds2exp.checkpoints.names import RunDir

log = logging.getLogger(__name__)

UI_ADDRESS = "http://127.0.0.1:5000"  # where `make ui` serves the project's store
# MLflow 3's UI opens every experiment in its GenAI view (traces, evaluations) unless the page's URL
# says `workflowType=machine_learning` or the browser stored "Model training" from the sidebar switch;
# the `mlflow.experimentKind` tag does not decide it. Every link ds2exp prints carries the parameter.
TRAINING_VIEW = "workflowType=machine_learning"
NOTE_TAG = "mlflow.note.content"  # the run's "Description" in the UI (Markdown)
NOTE_MAX = 4900  # the tracker cuts tag values at 5000 characters


def best_checkpoint(state, cfg) -> Optional[Dict[str, Any]]:
    """The run's best checkpoint (trainer.monitor decides): path, step, monitor, value, val CER/WER."""
    if not state.best:
        return None
    b = state.best[0]
    step = b.get("step")
    h = state.history
    at = [i for i, s in enumerate(h.get("val_step", [])) if s == step]
    val = {k: (h[f"val_{k}"][at[-1]] if at and len(h.get(f"val_{k}", [])) > at[-1] else None)
           for k in ("cer", "wer", "loss")}
    monitor = b.get("monitor") or str(cfg.trainer.get("monitor") or "val/wer")
    value = b.get("value", b.get(monitor.split("/")[-1], b.get("wer")))
    return {"path": b.get("path"), "step": step, "monitor": monitor, "value": value,
            "val_cer": b.get("val_cer", val["cer"]), "val_wer": b.get("val_wer", val["wer"]),
            "val_loss": b.get("val_loss", val["loss"])}


def experiment_id(tracker) -> Optional[str]:
    """The MLflow experiment of the tracker's run (None without MLflow or while the store is down)."""
    exp = getattr(tracker, "experiment_id", None)
    if exp is not None:
        return str(exp)
    uri, run_id = getattr(tracker, "tracking_uri", None), getattr(tracker, "run_id", None)
    if not uri or not run_id or getattr(tracker, "pending", 0):
        return None
    try:
        from mlflow.tracking import MlflowClient

        return str(MlflowClient(tracking_uri=str(uri)).get_run(run_id).info.experiment_id)
    except Exception as exc:  # noqa: BLE001 - the summary must not fail on a tracking hiccup
        log.info("could not look up the MLflow experiment of run %s: %s", run_id, exc)
        return None


def ui_base(tracking_uri: Optional[str]) -> str:
    """The UI that shows this store: the server itself for an http(s) store, else `make ui`'s."""
    uri = str(tracking_uri or "")
    if uri.startswith(("http://", "https://")):
        return uri.rstrip("/")
    return UI_ADDRESS


def run_link(tracking_uri: Optional[str], exp_id: Optional[str], run_id: Optional[str]) -> Optional[str]:
    if not exp_id or not run_id:
        return None
    return f"{ui_base(tracking_uri)}/#/experiments/{exp_id}/runs/{run_id}?{TRAINING_VIEW}"


def experiment_link(tracking_uri: Optional[str], exp_id: Optional[str]) -> Optional[str]:
    """The experiment's runs table, in the UI's training view."""
    if not exp_id:
        return None
    return f"{ui_base(tracking_uri)}/#/experiments/{exp_id}/runs?{TRAINING_VIEW}"


def ui_landing(db: Path, experiment_name: str = "ds2exp") -> str:
    """Where `make ui` sends a browser: the experiment's runs table in the training view, or (no run
    recorded yet) the experiment list. The SQLite store is read directly: importing MLflow would make
    `make ui` wait seconds longer before the server even starts."""
    import sqlite3

    exp_id = None
    try:
        with contextlib.closing(sqlite3.connect(f"{Path(db).resolve().as_uri()}?mode=ro", uri=True)) as con:
            row = con.execute("SELECT experiment_id FROM experiments WHERE name = ? AND lifecycle_stage = 'active'",
                              (experiment_name,)).fetchone()
        exp_id = str(row[0]) if row else None
    except sqlite3.Error:  # no store yet, or not MLflow's schema
        pass
    return experiment_link(UI_ADDRESS, exp_id) or f"{UI_ADDRESS}/#/experiments?{TRAINING_VIEW}"


def ui_hint(tracking_uri: Optional[str]) -> str:
    uri = str(tracking_uri or "")
    if uri.startswith(("http://", "https://")):
        return f"the MLflow server at {uri.rstrip('/')} shows it"
    from ds2exp.config import PACKAGE_DIR

    checkout = PACKAGE_DIR.parent  # `make ui` serves the checkout's own store
    if uri == f"sqlite:///{checkout / 'mlflow.db'}" and (checkout / "Makefile").is_file():
        return "open the UI with: make ui"
    return f"open the UI with: mlflow ui --backend-store-uri {shlex.quote(uri)} --port 5000"


def resume_command(run_dir: Path) -> str:
    return f"python train.py resume={shlex.quote(str(run_dir))}"


def build(outcome: str, base: Dict[str, Any], state, cfg, run_dir: Path, tracker) -> Dict[str, Any]:
    """summary.json for a run that ended with `outcome` (ds2exp.training.ending.ENDINGS); `base` carries what the
    trainer or the divergence diagnosis returned (stop_reason, cause, first_bad_step, ...), and without a
    `state` the step and best checkpoint known otherwise."""
    backend = enum_value(cfg.logger.backend)
    uri = str(cfg.logger.tracking_uri) if backend != "none" else None
    run_id = getattr(tracker, "run_id", None)
    exp_id = experiment_id(tracker) if uri else None
    first_bad = base.get("first_bad_step", getattr(state, "first_bad_step", None) if state is not None else None)
    diverged_at = base.get("diverged_at_step", base.get("step")) if outcome == "diverged" else None
    out = {**base, "status": outcome, "step": state.step if state is not None else base.get("step"),
           "first_bad_step": first_bad, "diverged_at_step": diverged_at,
           "cause": base.get("cause") if outcome == "diverged" else None,
           "best_checkpoint": best_checkpoint(state, cfg) if state is not None else base.get("best_checkpoint"),
           "best": list(state.best) if state is not None else [], "run_dir": str(run_dir),
           "mlflow_run_id": run_id, "mlflow_experiment_id": exp_id, "tracking_uri": uri,
           "mlflow_url": run_link(uri, exp_id, run_id), "max_steps": int(cfg.trainer.max_steps)}
    if outcome == "interrupted":
        out["resume_command"] = resume_command(run_dir) if _has_checkpoint(run_dir) else None
    return out


def _has_checkpoint(run_dir: Path) -> bool:
    return RunDir(run_dir).has_training_state()


def _pct(x) -> str:
    return f"{x:.2f}%" if isinstance(x, (int, float)) and math.isfinite(x) else "-"


def _status_line(s: Dict[str, Any]) -> str:
    st, step = s["status"], s.get("step")
    if st == "finished":
        why = {"max_steps": "trainer.max_steps", "max_minutes": "trainer.max_minutes",
               "max_epochs": "trainer.max_epochs"}.get(s.get("stop_reason"), s.get("stop_reason") or "")
        text = f"finished at step {step}" + (" (pruned by the hyperparameter search)" if why == "pruned"
                                             else f" ({why} reached)" if why else "")
        if s.get("first_bad_step") is not None:
            text += f"; anomalous steps skipped, the first at step {s['first_bad_step']}"
        return text
    if st == "diverged":
        text = f"diverged at step {s.get('diverged_at_step')}: {s.get('cause') or 'unknown cause'}"
        if s.get("first_bad_step") is not None:
            text += f", first bad step {s['first_bad_step']}"
        return text
    where = f"at step {step}" if step is not None else "before training started"
    if st == "interrupted":
        return f"interrupted {where} ({s.get('signal', 'signal')})"
    return f"failed {where}: {s.get('error', 'error')}"


def format_summary(s: Dict[str, Any], pending_records: int = 0, spool: Optional[Path] = None) -> str:
    """The end-of-run lines (`s` as `build` returns it)."""
    rows = [("status", _status_line(s))]
    if s["status"] == "diverged" and s.get("summary"):
        rows.append(("", str(s["summary"])))
        batch = s.get("batch") or []
        if batch:
            named = [u["id"] + (f" ({', '.join(u['hazards'])})" if u.get("hazards") else "") for u in batch[:6]]
            rows.append(("bad batch", ", ".join(named) + (f", and {len(batch) - 6} more" if len(batch) > 6 else "")))
        diag = Path(s["run_dir"]) / "diagnosis.txt"
        if diag.exists() or (Path(s["run_dir"]) / "diagnosis.json").exists():
            rows.append(("", f"diagnosis: {diag if diag.exists() else diag.with_suffix('.json')}"))
    max_steps = s.get("max_steps")
    rows.append(("steps", f"{s.get('step') or 0}" + (f" of {max_steps}" if max_steps and max_steps > 0 else "")))
    b = s.get("best_checkpoint")
    if b:
        rows.append(("best checkpoint", str(b["path"])))
        value = b.get("value")
        shown = _pct(value) if str(b.get("monitor")) in ("val/cer", "val/wer") else (
            f"{value:.4g}" if isinstance(value, (int, float)) else "-")
        rows.append(("", f"step {b.get('step')}: {b.get('monitor')} {shown} "
                         f"(val CER {_pct(b.get('val_cer'))}, WER {_pct(b.get('val_wer'))})"))
    else:
        rows.append(("best checkpoint", "none (no validation has run yet)"))
    rows.append(("run directory", str(s["run_dir"])))
    if s.get("tracking_uri") is None:
        rows.append(("MLflow", "not recorded (logger=none)"))
    elif s.get("mlflow_run_id"):
        rows.append(("MLflow run", str(s["mlflow_run_id"]) + (f" (experiment {s['mlflow_experiment_id']})"
                                                               if s.get("mlflow_experiment_id") else "")))
        if s.get("mlflow_url"):
            rows.append(("", s["mlflow_url"]))
        rows.append(("", ui_hint(s.get("tracking_uri"))))
    elif pending_records:
        rows.append(("MLflow run", f"not created yet ({s.get('tracking_uri')} did not answer)"))
    else:
        rows.append(("MLflow run", "none (the run stopped before its MLflow run was created)"))
    if s["status"] == "interrupted":
        cmd = s.get("resume_command")
        rows.append(("resume", cmd + "  (continues the same MLflow run)" if cmd else
                     "no checkpoint was written yet: start the run again (or use trainer.auto_resume=true)"))
    width = max(len(k) for k, _ in rows) + 2
    lines = [f"==== ds2exp training: {s['status']} " + "=" * 40]
    lines += [f"{(k + ':') if k else '':<{width}}{v}" for k, v in rows]
    if pending_records:
        where = spool or Path(s["run_dir"]) / "tracking_spool.jsonl"
        lines.append(f"MLflow records spooled: {pending_records} could not be sent to {s.get('tracking_uri')} "
                     f"and are kept in {where}; a resumed run sends them first, or run: "
                     f"python -m ds2exp.tracking.resilient {shlex.quote(str(s['run_dir']))}")
    return "\n".join(lines)


def code_block(text: str, limit: int) -> str:
    """`text` as a Markdown code block of at most `limit` characters: the UI renders a description as
    Markdown, and aligned columns (and `*`, `_`, `#` in paths and causes) survive only in a code block."""
    body = text.rstrip("\n")
    room = limit - len("```\n\n```\n")
    if len(body) > room:
        cut = "\n... (cut here: the whole text is in the run's artifacts)"
        body = body[:max(0, room - len(cut))].rsplit("\n", 1)[0] + cut
    return f"```\n{body}\n```\n"


def note(s: Dict[str, Any]) -> str:
    """The MLflow run description (tag `mlflow.note.content`): the end-of-run summary and, for a diverged
    run, its diagnosis (diagnosis.txt), so that the run's page says how it ended and why."""
    diag = Path(s["run_dir"]) / "diagnosis.txt"
    with_diagnosis = s["status"] == "diverged" and diag.is_file()
    text = code_block(format_summary(s), NOTE_MAX // 2 if with_diagnosis else NOTE_MAX)
    if with_diagnosis:
        try:
            head = "\n**Diagnosis** (diagnosis.txt)\n\n"
            text += head + code_block(diag.read_text(), NOTE_MAX - len(text) - len(head))
        except OSError as exc:
            log.info("could not read %s for the run description: %s", diag, exc)
    return text


def note_tags(s: Dict[str, Any]) -> Dict[str, str]:
    return {NOTE_TAG: note(s)}


def print_saved_summary(run_dir: Path) -> None:
    """Print the summary a run wrote to summary.json (the data-parallel launcher's last word)."""
    import json

    try:
        report = json.loads((Path(run_dir) / "summary.json").read_text())
    except (OSError, ValueError):
        print(f"[ds2exp] no summary in {run_dir} (the run ended before writing one)", flush=True)
        return
    if "status" in report:
        print("\n" + format_summary(report), flush=True)
