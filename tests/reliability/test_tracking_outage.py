"""The MLflow store is unreachable, goes down mid-run, or its client dies: training goes on, records wait
in the run's spool and reach the store later, in order, nothing lost."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest

from tests.helpers import ROOT, wait_for
from bench.small_runs import SMALL
from tests.helpers.processes import run, start, train_env
from tests.helpers.tracking import MlflowServer, free_port, history, mlflow_client, runs_of


@pytest.mark.slow
def test_tracking_store_unreachable_training_goes_on_and_the_spool_is_sent_later(tmp_path, synth_data_dir):
    """Nothing listens at the tracking URI for the whole run: training finishes normally, every record
    waits in the run's spool, and `python -m ds2exp.tracking.resilient` sends it once a store is there."""
    run_dir = tmp_path / "outputs" / "run"
    uri = f"http://127.0.0.1:{free_port()}"
    env = train_env(tmp_path, DS2EXP_TRACKING_RETRY_S="0.5", DS2EXP_TRACKING_DRAIN_S="1")
    r = run(tmp_path, synth_data_dir, run_dir, *SMALL, "trainer.max_steps=6", "trainer.log_every=1",
            "trainer.eval_every=3", f"logger.tracking_uri={uri}", env=env)
    out = r.stdout + r.stderr
    assert f"MLflow at {uri} is unavailable" in out and "training goes on" in out
    assert "records could not be sent" in out and "python -m ds2exp.tracking.resilient" in out
    assert json.loads((run_dir / "run_state.json").read_text())["status"] == "finished"
    from ds2exp.tracking.resilient import read_spool

    spool = read_spool(run_dir / "tracking_spool.jsonl")
    ops = [op["op"] for op in spool]
    assert ops[0] == "start" and ops[-1] == "end" and "params" in ops
    assert sorted(op["step"] for op in spool if op["op"] == "metrics" and "train/loss" in op["metrics"]) == \
        [1, 2, 3, 4, 5, 6]

    late = f"sqlite:///{tmp_path / 'late.db'}"
    f = subprocess.run([sys.executable, "-m", "ds2exp.tracking.resilient", str(run_dir), "--tracking-uri", late],
                       capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert f.returncode == 0, f.stdout + f.stderr
    assert f"sent {len(spool)} of {len(spool)} records" in f.stdout
    assert not (run_dir / "tracking_spool.jsonl").exists()
    client = mlflow_client(late)
    [found] = runs_of(client)
    assert found.info.status == "FINISHED" and found.data.params["optimizer.lr"] == "0.0003"
    assert sorted(history(client, found.info.run_id, "train/loss")) == [1, 2, 3, 4, 5, 6]
    assert sorted(history(client, found.info.run_id, "val/wer")) == [3, 6]
    assert "config" in {a.path for a in client.list_artifacts(found.info.run_id)}


@pytest.mark.slow
def test_mlflow_server_down_at_start_and_killed_mid_run_nothing_is_lost(tmp_path, synth_data_dir):
    """The training starts before its MLflow server answers; the server is then SIGKILLed mid-run and
    restarted on the same port and store. Every logged step is on the server afterwards.
    The trainer is paused (SIGSTOP) while the server starts, is killed and restarts, so that it is still
    training at each of those moments however long a server takes to start: a step budget, not a clock,
    ends the run."""
    from ds2exp.tracking.resilient import read_spool

    steps = 100
    server = MlflowServer(tmp_path / "server", free_port())
    run_dir = tmp_path / "outputs" / "run"
    spool = run_dir / "tracking_spool.jsonl"
    env = train_env(tmp_path, DS2EXP_TRACKING_RETRY_S="1", DS2EXP_TRACKING_RETRY_MAX_S="2",
                    DS2EXP_TRACKING_DRAIN_S="300")
    trainer = start(tmp_path, synth_data_dir, run_dir, *SMALL, f"trainer.max_steps={steps}", "trainer.log_every=1",
                    "trainer.eval_every=40", "trainer.checkpoint_every=20", f"logger.tracking_uri={server.url}",
                    env=env)

    def spooled_steps():
        return sorted(op["step"] for op in read_spool(spool) if op["op"] == "metrics" and "train/loss" in op["metrics"])

    try:
        # down at start: the trainer runs, spooling, before the server is even launched
        wait_for(spooled_steps, 240, trainer, "a step in the spool (server down)")
        os.kill(trainer.pid, signal.SIGSTOP)
        server.start()
        server.wait_healthy()
        os.kill(trainer.pid, signal.SIGCONT)
        client = mlflow_client(server.url)
        wait_for(lambda: not spool.exists(), 120, trainer, "the spool sent")
        os.kill(trainer.pid, signal.SIGSTOP)
        sent = history(client, runs_of(client)[0].info.run_id, "train/loss")
        assert sent and max(sent) < steps, f"all {steps} steps done before the server was killed: raise `steps`"
        server.kill()  # mid-run: the trainer goes on logging straight to it
        os.kill(trainer.pid, signal.SIGCONT)
        during = wait_for(spooled_steps, 120, trainer, "a step in the spool (server killed)")
        os.kill(trainer.pid, signal.SIGSTOP)
        assert trainer.poll() is None and min(during) >= max(sent), (sorted(sent), during)  # trained on
        server.start()
        server.wait_healthy()
        os.kill(trainer.pid, signal.SIGCONT)
        assert trainer.wait(timeout=600) == 0
        log = trainer.log_path.read_text()
        # both outages noticed and over (a request timing out on a busy machine may add one: each ends)
        assert log.count("is unavailable") == log.count("answers again;") >= 2, log[-5000:]
        summary = json.loads((run_dir / "summary.json").read_text())
        assert summary["stop_reason"] == "max_steps" and int(summary["step"]) == steps
        [found] = runs_of(client)
        assert found.info.status == "FINISHED"
        assert sorted(history(client, found.info.run_id, "train/loss")) == list(range(1, steps + 1))
        assert not spool.exists()
        assert not (run_dir / "tracking_rejected.jsonl").exists()
    finally:
        if trainer.poll() is None:
            trainer.kill()
        server.kill()


def test_spool_left_by_a_dead_process_is_sent_first_by_the_next_one(tmp_path):
    """Process 1 logs while the store is down and dies without `end()`; process 2 (a resume) adopts
    its spool: one run, steps in order, nothing lost. A record the store refuses for good is kept in
    tracking_rejected.jsonl and does not hold back the others."""
    from ds2exp.tracking.resilient import ResilientTracker, read_spool

    down = f"http://127.0.0.1:{free_port()}"
    first = ResilientTracker(down, "ds2exp", tmp_path, run_name="r", retry_s=60)
    first.log_params({"optimizer.lr": 0.1})
    for step in (1, 2, 3):
        first.log_metrics({"train/loss": 10.0 - step}, step)
    assert first.run_id is None and [op["op"] for op in read_spool(tmp_path / "tracking_spool.jsonl")] == [
        "start", "params", "metrics", "metrics", "metrics"]
    del first  # killed: no end(), the spool stays

    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    second = ResilientTracker(store, "ds2exp", tmp_path, run_name="r", adopt_spool=True)
    # The adopted records go first: the run they start is the one this tracker logs to. A call sends
    # spooled records for at most 5 s (training must not wait), and creating a fresh SQLite store
    # alone can take longer on a loaded machine, so the rest is drained here without a time limit.
    assert second.run_id is not None
    assert second.drain(600) and second.pending == 0
    for step in (4, 5):
        second.log_metrics({"train/loss": 10.0 - step}, step)
    second.log_artifact(tmp_path / "gone.json")  # refused for good: the file does not exist
    second.log_metrics({"train/loss": 4.0}, 6)
    second.end()
    client = mlflow_client(store)
    [found] = runs_of(client)
    assert found.info.status == "FINISHED" and found.data.params["optimizer.lr"] == "0.1"
    assert {s: v for s, v in history(client, found.info.run_id, "train/loss").items()} == {
        s: [10.0 - s] for s in range(1, 7)}
    rejected = read_spool(tmp_path / "tracking_rejected.jsonl")
    assert [r["op"] for r in rejected] == ["artifact"] and "no longer exists" in rejected[0]["error"]
    assert not (tmp_path / "tracking_spool.jsonl").exists()
    assert json.loads((tmp_path / "tracking_state.json").read_text())["run_id"] == found.info.run_id
