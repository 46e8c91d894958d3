"""The Optuna search (`train.py -m +sweep=optuna_lr`): its study in a real RDB store (SQLite, PostgreSQL),
resumed after a kill, shared by two processes; abandoned trials and a changed command (real stores)."""
from __future__ import annotations

import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import ROOT, wait_for
from tests.helpers.postgres import PostgresCluster, postgres_bin_dir
from bench.small_runs import MICRO_3_STEPS
from tests.helpers.processes import no_parent_env
from tests.helpers.tracking import free_port

STUDY = "ds2exp_optuna_lr"


def search_cmd(tmp_root: Path, data_dir: Path, sweep_dir: Path, *overrides: str):
    """`train.py -m +sweep=optuna_lr` on the micro model; `overrides` replace MICRO_3_STEPS' values of the same keys."""
    keys = {o.split("=", 1)[0] for o in overrides}
    tiny = [o for o in MICRO_3_STEPS if o.split("=", 1)[0] not in keys]
    return [sys.executable, str(ROOT / "train.py"), "-m", "+sweep=optuna_lr", f"paths.data_dir={data_dir}",
            f"hydra.sweep.dir={sweep_dir}", *tiny, *overrides]


def trial_states(db: Path):
    """{number: state} of the study's trials, read with sqlite3 while a sweep may be writing."""
    if not db.exists():
        return {}
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30) as conn:
            return dict(conn.execute("SELECT t.number, t.state FROM trials t JOIN studies s USING (study_id) "
                                     "WHERE s.study_name = ?", (STUDY,)).fetchall())
    except sqlite3.OperationalError:  # the sweep is still creating the tables
        return {}


def load_study(url: str):
    import optuna

    return optuna.load_study(study_name=STUDY, storage=url)


def test_abandoned_trials_are_failed_with_their_cause_and_another_command_is_refused(tmp_path):
    import optuna
    from optuna.distributions import FloatDistribution
    from optuna.trial import TrialState

    from ds2exp.sweeps.optuna_search import search_space
    from ds2exp.sweeps.optuna_study import StudyMismatch, fail_abandoned, identity, open_study

    preset = {"optimizer.lr": "tag(log, interval(1e-5, 1e-1))", "dataset.batch_size": "4,8"}
    space, fixed = search_space(preset, ["+sweep=optuna_lr", "dataset.batch_size=8", "paths.data_dir=/x",
                                         "trainer.max_steps=6"])
    assert space == {"optimizer.lr": FloatDistribution(1e-5, 1e-1, log=True)}  # one value on the command line wins
    assert fixed == ["dataset.batch_size=8", "+sweep=optuna_lr", "paths.data_dir=/x", "trainer.max_steps=6"]
    ident = identity(space, fixed, "val/cer", "minimize")
    assert "paths.data_dir" not in ident  # another machine's folders join the same study
    url = f"sqlite:///{tmp_path}/optuna.db"
    study, storage = open_study(STUDY, url, "minimize", None, ident, heartbeat_interval=60, grace_period=None)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    here = socket.gethostname()
    owners = [(here, dead.pid), (here, os.getpid()), ("another-machine", 4242)]
    for host, pid in owners:  # a killed process's trial, a live one here, and a live one elsewhere
        t = study.ask()
        t.set_user_attr("host", host)
        t.set_user_attr("pid", pid)
        storage.record_heartbeat(t._trial_id)
    assert fail_abandoned(study, storage) == [0]
    t0 = study.trials[0]
    assert t0.state == TrialState.FAIL and t0.user_attrs["failure"] == "interrupted"
    assert f"pid {dead.pid}" in t0.user_attrs["cause"]
    assert [t.state for t in study.trials[1:]] == [TrialState.RUNNING, TrialState.RUNNING]
    # no heartbeat for longer than the grace period: failed wherever it ran
    late = optuna.storages.RDBStorage(url, heartbeat_interval=1, grace_period=1)
    time.sleep(2.5)
    study2 = optuna.load_study(study_name=STUDY, storage=late)
    assert fail_abandoned(study2, late) == [1, 2]
    assert "no heartbeat from another-machine pid 4242" in study2.trials[2].user_attrs["cause"]
    # the same study from a command that trains something else: refused, naming the difference
    _, other = search_space({"optimizer.lr": "tag(log, interval(1e-5, 1e-1))"}, ["+sweep=optuna_lr",
                                                                                 "trainer.max_steps=60"])
    with pytest.raises(StudyMismatch, match="the study's dataset.batch_size=8 trainer.max_steps=6, this "
                       "command's trainer.max_steps=60"):
        open_study(STUDY, url, "minimize", None, identity(space, other, "val/cer", "minimize"), 60, None)


@pytest.mark.slow
def test_killed_study_resumes_up_to_n_trials_in_one_store(tmp_path, synth_data_dir):
    sweep_dir = tmp_path / "multirun" / "study"
    cmd = search_cmd(tmp_path, synth_data_dir, sweep_dir, "hydra.sweeper.n_trials=4", "trainer.max_steps=6",
                     "trainer.eval_every=3", "dataset.batch_size=4")
    db = tmp_path / "optuna.db"  # beside mlflow.db (logger.tracking_uri=sqlite:///<DS2EXP_ROOT>/mlflow.db)
    log = open(tmp_path / "first.log", "wb")
    proc = subprocess.Popen(cmd, cwd=ROOT, env=no_parent_env(tmp_path), stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        # two trials done, the third one training (its job folder has its run_state.json)
        wait_for(lambda: (list(trial_states(db).values()).count("COMPLETE") >= 2
                          and (sweep_dir / "2" / "run_state.json").exists()) or time.sleep(0.3), 900, proc,
                 "two trials done and a third training")
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the whole process group, as a lost machine would stop
        proc.wait(timeout=60)
        log.close()
    killed = trial_states(db)
    assert sorted(killed.items()) == [(0, "COMPLETE"), (1, "COMPLETE"), (2, "RUNNING")], killed

    r = subprocess.run(cmd, cwd=ROOT, env=no_parent_env(tmp_path), capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert sorted(trial_states(db).items()) == [(0, "COMPLETE"), (1, "COMPLETE"), (2, "FAIL"), (3, "COMPLETE")]
    study = load_study(f"sqlite:///{db}")
    killed_trial = study.trials[2]
    assert killed_trial.user_attrs["failure"] == "interrupted" and f"pid {proc.pid}" in killed_trial.user_attrs["cause"]
    out = r.stdout
    assert f"optuna: study {STUDY} in sqlite:///{db}: 3 of 4 trials so far, continuing" in out
    assert "optuna: trial 2 marked FAILED: interrupted" in out
    assert f"optuna study {STUDY}: 4 of 4 trials: 3 complete, 0 pruned, 1 failed" in out
    best = study.best_trial
    assert f"best: trial {best.number}, val/cer {best.value:.4g}: optimizer.lr={best.params['optimizer.lr']!r}" in out
    assert f"study: {STUDY} in sqlite:///{db};" in out
    assert "Stability boundary per dataset.batch_size" in out  # the grid sweeps' report, over the study's folder
    # one folder per trial number in the one sweep folder, the resumed run's job is trial 3
    assert sorted(p.name for p in sweep_dir.iterdir() if (p / ".hydra").is_dir()) == ["0", "1", "2", "3"]
    # the same command once more: the study is complete, nothing runs
    r = subprocess.run(cmd, cwd=ROOT, env=no_parent_env(tmp_path), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and "4 of 4 trials already; nothing to run" in r.stdout, r.stderr[-3000:]
    assert len(trial_states(db)) == 4


@pytest.mark.slow
@pytest.mark.postgres
def test_two_processes_share_one_study_on_postgresql(tmp_path, synth_data_dir):
    bin_dir = postgres_bin_dir()
    if bin_dir is None:
        pytest.skip("PostgreSQL server binaries (initdb, postgres) not found (make test-postgres installs them)")
    pytest.importorskip("psycopg", reason="psycopg: SQLAlchemy's PostgreSQL driver (pip install -e '.[postgres]')")
    cluster = PostgresCluster(bin_dir, tmp_path / "pg", free_port()).start()
    try:
        url = cluster.createdb("optuna")
        procs = []
        for name in ("a", "b"):  # two machines: each its own folders and MLflow store, one study
            root = tmp_path / name
            root.mkdir()
            cmd = search_cmd(root, synth_data_dir, root / "multirun", "hydra.sweeper.n_trials=4",
                             f"hydra.sweeper.storage={url}", "trainer.max_steps=4", "trainer.eval_every=2",
                             "dataset.batch_size=4")
            procs.append(subprocess.Popen(cmd, cwd=ROOT, env=no_parent_env(root), stdout=subprocess.PIPE,
                                          stderr=subprocess.STDOUT, text=True))
        outs = [p.communicate(timeout=1200)[0] for p in procs]
        assert [p.returncode for p in procs] == [0, 0], "\n".join(o[-3000:] for o in outs)
        study = load_study(url)
        trials = study.trials
        # each process ran its own trials; together the study's n_trials (one more when both asked at once)
        assert 4 <= len(trials) <= 5 and all(t.state.name in ("COMPLETE", "PRUNED") for t in trials)
        by_pid = {}
        for t in trials:
            by_pid.setdefault(t.user_attrs["pid"], []).append(t.number)
        assert sorted(by_pid) == sorted(p.pid for p in procs) and all(by_pid.values()), by_pid
        for p, root in zip(procs, (tmp_path / "a", tmp_path / "b")):  # job folder = trial number, no overlap
            jobs = {int(d.name) for d in (root / "multirun").iterdir() if (d / ".hydra").is_dir()}
            assert jobs == set(by_pid[p.pid])
        assert len({t.params["optimizer.lr"] for t in trials}) == len(trials)  # seed + trial number: distinct draws
        for out in outs:
            assert "optuna: study ds2exp_optuna_lr in postgresql://ds2exp@127.0.0.1:" in out
    finally:
        cluster.stop()
