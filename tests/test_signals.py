"""Real signals to a real training process (MindSpore running, an MLflow SQLite store in tmp_path).

SIGINT after step 5: exit 130, run_state interrupted, MLflow run KILLED, last.ckpt of the last
completed step, the printed `resume=` command; running that command continues the same MLflow run
to FINISHED. SIGTERM: exit 143. A second SIGINT exits at once and leaves a loadable checkpoint.
"""
from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import ROOT, wait_for
from bench.small_runs import SMALL
from tests.helpers.processes import start
from tests.helpers.tracking import max_logged_step, mlflow_client, runs_of

RUN = SMALL + ["trainer.max_steps=8", "trainer.eval_every=4", "trainer.log_every=1", "trainer.checkpoint_every=100"]


def _output(proc) -> str:
    return Path(proc.log_path).read_text(errors="replace")


def _state(run_dir: Path) -> dict:
    return json.loads((run_dir / "run_state.json").read_text())


def _ckpt_step(path: Path) -> int:
    from ds2exp.checkpoints.io import load_checkpoint

    return int(load_checkpoint(path).meta["step"])


def test_sigint_after_step_5_then_the_printed_resume_command_finishes_the_same_run(tmp_path, shared_data_dir):
    run_dir, db = tmp_path / "outputs" / "run", tmp_path / "mlflow.db"
    proc = start(tmp_path, shared_data_dir, run_dir, *RUN)
    wait_for(lambda: max_logged_step(db) >= 5, 1800, proc, "step 5 in the MLflow store")
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=300) == 130, _output(proc)[-3000:]
    out = _output(proc)

    state = _state(run_dir)
    assert state["status"] == "interrupted" and state["signal"] == "SIGINT"
    stopped = int(state["step"])
    assert 5 <= stopped < 8
    assert _ckpt_step(run_dir / "checkpoints" / "last.ckpt") == stopped  # the last completed step
    client = mlflow_client(f"sqlite:///{db}")
    (run,) = runs_of(client)
    assert run.info.status == "KILLED" and run.data.tags["ds2exp.status"] == "interrupted"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "interrupted" and summary["step"] == stopped
    assert f"interrupted at step {stopped} (SIGINT)" in out
    assert f"/#/experiments/{run.info.experiment_id}/runs/{run.info.run_id}" in out
    resume = re.search(r"^resume:\s+(python train\.py resume=\S+)", out, re.M)
    assert resume, out[-3000:]

    # the command exactly as printed (the venv's python for `python`), from the project root
    argv = [sys.executable] + shlex.split(resume.group(1))[1:] + [f"hydra.run.dir={tmp_path / 'invocation'}"]
    r = subprocess.run(argv, capture_output=True, text=True, cwd=ROOT, env={**os.environ, "DS2EXP_ROOT": str(tmp_path)},
                       timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    (after,) = runs_of(client)
    assert after.info.run_id == run.info.run_id and after.info.status == "FINISHED"
    assert after.data.tags["ds2exp.status"] == "finished"
    assert int(after.data.tags["ds2exp.resumed_from_step"]) == stopped
    assert max(m.step for m in client.get_metric_history(run.info.run_id, "train/loss")) == 8
    assert _state(run_dir)["status"] == "finished" and _ckpt_step(run_dir / "checkpoints" / "last.ckpt") == 8
    assert "status:          finished at step 8" in r.stdout
    assert f"runs/{run.info.run_id}" in r.stdout


@pytest.mark.slow
def test_sigterm_ends_the_run_interrupted_with_143(tmp_path, shared_data_dir):
    """logger=none: nothing to poll in a store; the checkpoint file says the run is under way."""
    run_dir = tmp_path / "outputs" / "run"
    proc = start(tmp_path, shared_data_dir, run_dir, *SMALL, "trainer.max_steps=40", "trainer.eval_every=100",
                 "trainer.checkpoint_every=2", "logger=none")
    wait_for(lambda: (run_dir / "checkpoints" / "last.ckpt").exists(), 1800, proc, "the first checkpoint")
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=300) == 143, _output(proc)[-3000:]
    out = _output(proc)
    state = _state(run_dir)
    assert state["status"] == "interrupted" and state["signal"] == "SIGTERM"
    assert _ckpt_step(run_dir / "checkpoints" / "last.ckpt") == int(state["step"]) < 40
    assert "(SIGTERM)" in out and "not recorded (logger=none)" in out
    assert "resume=" in out


@pytest.mark.slow
def test_a_second_sigint_exits_at_once_and_keeps_the_last_checkpoint(tmp_path, shared_data_dir):
    """After the first SIGINT the process finishes its step and then a validation of the whole dev
    split (eval_every=1), which leaves ample time to see its message and send the second one."""
    run_dir = tmp_path / "outputs" / "run"
    proc = start(tmp_path, shared_data_dir, run_dir, *SMALL, "trainer.max_steps=200", "trainer.eval_every=1",
                 "trainer.max_eval_utterances=null", "logger=none")
    wait_for(lambda: (run_dir / "checkpoints" / "last.ckpt").exists(), 1800, proc, "the first checkpoint")
    proc.send_signal(signal.SIGINT)
    wait_for(lambda: "finishing the current step" in _output(proc), 120, proc, "the first SIGINT's message")
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=120) == 130
    out = _output(proc)
    assert "second SIGINT: exiting now" in out and "==== ds2exp training" not in out
    assert _state(run_dir)["status"] == "running"  # no clean-up ran: resumable like a killed run
    from ds2exp.checkpoints.io import find_latest_checkpoint

    latest = find_latest_checkpoint(run_dir)
    assert latest is not None and _ckpt_step(latest) >= 1


@pytest.mark.slow
def test_sigint_to_a_data_parallel_run_stops_all_ranks_after_the_same_step(tmp_path, shared_data_dir):
    """The launcher passes the signal on to the msrun workers (msrun would SIGKILL them); rank 0 saves
    the step all ranks stopped after and marks the run interrupted; the launcher exits 130."""
    run_dir = tmp_path / "outputs" / "run"
    proc = start(tmp_path, shared_data_dir, run_dir, *SMALL, "hardware.num_devices=2", "trainer.max_steps=200",
                 "trainer.eval_every=1000", "trainer.checkpoint_every=2", "logger=none")
    wait_for(lambda: (run_dir / "checkpoints" / "last.ckpt").exists(), 1800, proc, "the first checkpoint")
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=300) == 130, _output(proc)[-3000:]
    state = _state(run_dir)
    assert state["status"] == "interrupted" and state["signal"] == "SIGINT"
    assert _ckpt_step(run_dir / "checkpoints" / "last.ckpt") == int(state["step"]) < 200
    assert re.search(r"SIGINT: passed on to [1-9]\d* data-parallel worker", _output(proc))
    assert f"interrupted at step {state['step']} (SIGINT)" in _output(proc)
    assert "stopped by a signal" in (run_dir / "msrun_logs" / "worker_1.log").read_text()
