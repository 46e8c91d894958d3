"""How a training run ends: summary.json fields and the printed end-of-run summary.

In-process: the summary of every outcome, built from a real composed config and a real TrainState.
Real processes (slow): a finished run without MLflow and evaluate.py's beam-search progress bar; a
diverged run (lr=1e3) that exits 1 and says where and why.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.helpers import ROOT
from bench.small_runs import SMALL
from tests.helpers.processes import run


def _cfg(tmp_path, *overrides):
    from ds2exp.cli import check_overrides

    return check_overrides([f"paths.root_dir={tmp_path}", "trainer.max_steps=40", *overrides])


def _state(step=40):
    from ds2exp.training.state import TrainState

    s = TrainState(step=step)
    s.history.update(val_step=[20, 40], val_cer=[97.0, 58.12], val_wer=[100.0, 96.5], val_loss=[200.0, 120.0])
    s.best = [{"monitor": "val/cer", "value": 58.12, "step": 40, "wer": 96.5,
               "path": "/r/checkpoints/best-step0000040-cer58.12.ckpt"}]
    return s


def _tracker(cfg, run_dir):
    from ds2exp.tracking import make_tracker

    return make_tracker(cfg.logger, run_name="summary-test", spool_dir=run_dir)


def _lines(text):
    return {ln.split(":", 1)[0].strip(): ln.split(":", 1)[1].strip() for ln in text.splitlines()[1:] if ":" in ln}


def test_summary_of_each_outcome(tmp_path):
    from ds2exp.training.summary import build, format_summary, note

    # (the MLflow lines of a real run are checked on real processes in tests/test_signals.py: a fresh
    # SQLite store takes half a minute to create on a busy machine)
    cfg = _cfg(tmp_path, "logger=none")
    tracker = _tracker(cfg, tmp_path / "run")
    finished = build("finished", {"stop_reason": "max_steps"}, _state(), cfg, tmp_path / "run", tracker)
    assert finished["status"] == "finished" and finished["mlflow_url"] is None
    assert finished["best_checkpoint"] == {"path": "/r/checkpoints/best-step0000040-cer58.12.ckpt", "step": 40,
                                           "monitor": "val/cer", "value": 58.12, "val_cer": 58.12, "val_wer": 96.5,
                                           "val_loss": 120.0}
    text = format_summary(finished)
    lines = _lines(text)
    assert text.splitlines()[0].startswith("==== ds2exp training: finished")
    assert lines["status"] == "finished at step 40 (trainer.max_steps reached)" and lines["steps"] == "40 of 40"
    assert "step 40: val/cer 58.12% (val CER 58.12%, WER 96.50%)" in text
    assert lines["MLflow"] == "not recorded (logger=none)" and lines["run directory"] == str(tmp_path / "run")

    diag = {"stop_reason": "diverged", "cause": "loss_explosion", "first_bad_step": 2, "diverged_at_step": 21,
            "step": 21, "summary": "loss 1.6e9 is 1e7x the median of the last good steps"}
    diverged = build("diverged", diag, _state(21), cfg, tmp_path / "run", tracker)
    assert (diverged["cause"], diverged["first_bad_step"], diverged["diverged_at_step"]) == ("loss_explosion", 2, 21)
    assert _lines(format_summary(diverged))["status"] == "diverged at step 21: loss_explosion, first bad step 2"
    # the MLflow run description: the summary, then the diagnosis, as Markdown code blocks within the tag limit
    (tmp_path / "run").mkdir(parents=True, exist_ok=True)
    (tmp_path / "run" / "diagnosis.txt").write_text("loss 1.6e9\n\ncause: loss_explosion\n" + "x" * 9000)
    text = note(diverged)
    assert text.startswith("```\n==== ds2exp training: diverged") and "status:          diverged at step 21" in text
    assert "\n**Diagnosis** (diagnosis.txt)\n\n```\nloss 1.6e9\n\ncause: loss_explosion\n" in text
    assert text.endswith("(cut here: the whole text is in the run's artifacts)\n```\n") and len(text) <= 5000

    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    (tmp_path / "run" / "checkpoints" / "last.ckpt").write_bytes(b"x")
    stopped = build("interrupted", {"stop_reason": "interrupted", "signal": "SIGINT"}, _state(7), cfg,
                    tmp_path / "run", tracker)
    text = format_summary(stopped)
    assert _lines(text)["status"] == "interrupted at step 7 (SIGINT)"
    assert f"resume:          python train.py resume={tmp_path / 'run'}  (continues the same MLflow run)" in text

    # a server that does not answer: no link, and the last line says where the records wait and how to send them
    from tests.helpers.tracking import free_port

    down = _cfg(tmp_path, f"logger.tracking_uri=http://127.0.0.1:{free_port()}")
    offline = _tracker(down, tmp_path / "offline")
    offline.log_metrics({"train/loss": 1.0}, 1)
    assert offline.run_id is None and offline.pending == 2
    spooled = build("finished", {"stop_reason": "max_steps"}, _state(), down, tmp_path / "offline", offline)
    text = format_summary(spooled, offline.pending, offline.spool_path)
    assert "/#/experiments/" not in text and "not created yet" in text
    assert text.splitlines()[-1].startswith("MLflow records spooled: 2 could not be sent")
    assert text.splitlines()[-1].endswith(f"python -m ds2exp.tracking.resilient {tmp_path / 'offline'}")

    failed = build("failed", {"error": "RuntimeError: boom"}, _state(3), cfg, tmp_path / "run", None)
    assert _lines(format_summary(failed))["status"] == "failed at step 3: RuntimeError: boom"


def test_a_data_parallel_run_stopped_by_the_rank_watch_gets_the_summary_every_run_gets(tmp_path):
    """The launcher writes summary.json of a run whose rank died through ending.write_summary: the fields of
    any failed run's summary, the best checkpoint from rank 0's last.ckpt, the link to rank 0's MLflow run."""
    from ds2exp.checkpoints.io import save_checkpoint
    from ds2exp.training.rank_watch import failed_summary
    from ds2exp.training.summary import build, format_summary, run_link
    from tests.helpers.models import tiny_model

    cfg = _cfg(tmp_path)
    run_dir = tmp_path / "run"
    best = run_dir / "checkpoints" / "best-step0000004-cer58.12.ckpt"
    best.parent.mkdir(parents=True)
    best.write_bytes(b"x")
    gone = {"path": str(run_dir / "checkpoints" / "best-step0000002-cer60.00.ckpt"), "step": 2}
    save_checkpoint(run_dir / "checkpoints" / "last.ckpt", tiny_model(), meta={"step": 6, "config": {}, "best": [
        gone, {"path": str(best), "step": 4, "monitor": "val/cer", "value": 58.12, "val_cer": 58.12,
               "val_wer": 96.5, "val_loss": 120.0}]})
    error = "data-parallel rank 1 (pid 42) was killed by SIGKILL"

    summary = failed_summary(run_dir, cfg, 7, error, "abc123", "4")
    assert json.loads((run_dir / "summary.json").read_text()) == summary
    assert set(summary) == set(build("failed", {"stop_reason": "error", "error": error}, None, cfg, run_dir, None))
    assert (summary["status"], summary["stop_reason"], summary["error"], summary["step"]) == ("failed", "error",
                                                                                              error, 7)
    assert summary["best_checkpoint"] == {"path": str(best), "step": 4, "monitor": "val/cer", "value": 58.12,
                                          "val_cer": 58.12, "val_wer": 96.5, "val_loss": 120.0}
    assert summary["mlflow_url"] == run_link(str(cfg.logger.tracking_uri), "4", "abc123")
    assert summary["max_steps"] == 40 and summary["run_dir"] == str(run_dir)
    assert _lines(format_summary(summary))["status"] == f"failed at step 7: {error}"

    (run_dir / "checkpoints" / "last.ckpt").unlink()  # nothing left by rank 0: no best checkpoint, no run
    bare = failed_summary(run_dir, cfg, None, error, None, None)
    assert bare["best_checkpoint"] is None and bare["mlflow_url"] is None and bare["step"] is None


def test_link_and_ui_hint_follow_the_store(tmp_path):
    from ds2exp.config import PACKAGE_DIR
    from ds2exp.training.summary import run_link, ui_hint, ui_landing

    # every link opens MLflow 3's training view, not its default GenAI view
    assert (run_link("http://mlflow.lab:8080/", "3", "r1")
            == "http://mlflow.lab:8080/#/experiments/3/runs/r1?workflowType=machine_learning")
    assert (run_link(f"sqlite:///{tmp_path}/mlflow.db", "3", "r1")
            == "http://127.0.0.1:5000/#/experiments/3/runs/r1?workflowType=machine_learning")
    assert run_link("sqlite:///x.db", None, "r1") is None
    # `make ui`: the experiment's runs table once it exists, else the experiment list
    import sqlite3

    db = tmp_path / "mlflow.db"
    assert ui_landing(db) == "http://127.0.0.1:5000/#/experiments?workflowType=machine_learning"
    assert not db.exists()
    with sqlite3.connect(db) as con:
        con.execute("CREATE TABLE experiments (experiment_id INTEGER, name TEXT, lifecycle_stage TEXT)")
        con.executemany("INSERT INTO experiments VALUES (?, ?, ?)", [(0, "Default", "active"), (4, "ds2exp", "active")])
    assert ui_landing(db) == "http://127.0.0.1:5000/#/experiments/4/runs?workflowType=machine_learning"
    assert ui_hint(f"sqlite:///{PACKAGE_DIR.parent / 'mlflow.db'}") == "open the UI with: make ui"


@pytest.mark.slow
def test_finished_run_without_mlflow_prints_its_summary_and_evaluate_shows_beam_progress(tmp_path,
                                                                                          shared_data_dir):
    run_dir = tmp_path / "outputs" / "run"
    r = run(tmp_path, shared_data_dir, run_dir, *SMALL, "trainer.max_steps=4", "trainer.eval_every=2",
            "logger=none")
    assert "status:          finished at step 4 (trainer.max_steps reached)" in r.stdout
    assert "MLflow:          not recorded (logger=none)" in r.stdout and f"run directory:   {run_dir}" in r.stdout
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["best_checkpoint"]["step"] in (2, 4)
    assert json.loads((run_dir / "run_state.json").read_text())["status"] == "finished"

    e = subprocess.run([sys.executable, str(ROOT / "evaluate.py"), f"paths.data_dir={shared_data_dir}",
                        f"hydra.run.dir={tmp_path}/outputs/eval", "dataset.max_utterances=12", f"checkpoint={run_dir}",
                        "decoder=beam", "decoder.beam_width=4", "logger=none", "model.conv_channels=4"],
                       capture_output=True, text=True, cwd=ROOT, env={**os.environ, "DS2EXP_ROOT": str(tmp_path)},
                       timeout=600)
    assert e.returncode == 0, e.stderr[-3000:]
    assert "(beam): 100%" in e.stderr and "utt" in e.stderr


@pytest.mark.slow
def test_diverged_run_exits_1_and_says_where_and_why(tmp_path, shared_data_dir):
    run_dir = tmp_path / "outputs" / "run"
    r = run(tmp_path, shared_data_dir, run_dir, *SMALL, "optimizer.lr=1e3", "trainer.max_steps=40",
            "trainer.nonfinite=stop", "trainer.eval_every=20", check=False)
    assert r.returncode == 1, r.stdout[-2000:] + r.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "diverged" and summary["cause"] and summary["diverged_at_step"] <= 40
    assert f"status:          diverged at step {summary['diverged_at_step']}: {summary['cause']}" in r.stdout
    assert json.loads((run_dir / "run_state.json").read_text())["status"] == "diverged"
