"""Hydra sweeps: one MLflow parent run per sweep, crashed/diverged jobs, the sweep report (real runs)."""
from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import open_dict
import yaml

from tests.helpers import ROOT
from bench.small_runs import MICRO_3_STEPS
from tests.helpers.processes import no_parent_env
from tests.helpers.tracking import sweep_runs


def sweep(tmp_root: Path, data_dir: Path, *overrides: str, name: str = "s"):
    """(sweep dir, stdout) of a real `python train.py -m ...`."""
    sweep_dir = tmp_root / "multirun" / name
    r = subprocess.run([sys.executable, str(ROOT / "train.py"), "-m", f"paths.data_dir={data_dir}",
                        f"hydra.sweep.dir={sweep_dir}", *MICRO_3_STEPS, *overrides],
                       capture_output=True, text=True, cwd=ROOT, env=no_parent_env(tmp_root), timeout=1500)
    assert r.returncode == 0, r.stderr[-4000:]
    return sweep_dir, r.stdout


@pytest.fixture
def report(monkeypatch, capsys):
    """`python -m ds2exp.sweeps.report TARGET --out PNG`, run in this process (saves the imports)."""
    from ds2exp.sweeps.report import main as report_main

    def _report(tmp_root: Path, target: str, out: Path) -> str:
        monkeypatch.setenv("DS2EXP_ROOT", str(tmp_root))
        capsys.readouterr()
        assert report_main([target, "--out", str(out)]) == 0
        assert out.is_file() and out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        return capsys.readouterr().out

    return _report


def table_cells(stdout: str):
    """{(lr, batch): cell} of every table in the report."""
    cells = {}
    lines = stdout.splitlines()
    for i, line in enumerate(lines):
        if not line.startswith("optimizer.lr \\ dataset.batch_size"):
            continue
        cols = [c.strip() for c in line.split("|")[1:]]
        assert set(lines[i + 1]) <= {"-", "+"}  # the rule under the header
        for row in lines[i + 2:]:
            if not row.strip() or row.startswith(("[", "job ", "heatmap")):
                break
            parts = [c.strip() for c in row.split("|")]
            assert len(parts) == len(cols) + 1, row  # aligned: one cell per column
            for col, cell in zip(cols, parts[1:]):
                if cell:
                    cells[(parts[0], col)] = cell
    return cells


def test_lr_batch_sweep_gives_its_verdict_and_names_its_runs(tmp_path, shared_data_dir, report):
    # lr=1e3 drives the losses to ~1e5-1e9 and keeps them finite. With the trainer's explosion detection
    # off (as in sweeps made before it existed) those runs end FINISHED with no divergence tag: the report
    # must judge them diverged from their losses. log_every=1: MLflow has every step's loss, as the
    # checkpoint history has, so the report from the run id names the same steps as from the folder.
    sweep_dir, stdout = sweep(tmp_path, shared_data_dir, "optimizer.lr=1e-4,1e3", "dataset.batch_size=2,4",
                              "trainer.divergence.enabled=false", "trainer.log_every=1")
    client, parents, children = sweep_runs(tmp_path)
    assert len(parents) == 1 and len(children) == 4
    parent = parents[0]
    pid = parent.info.run_id
    assert parent.info.status == "FINISHED"
    assert parent.info.run_name == "sweep lr x bs s"  # the swept keys' short names and the sweep folder's name
    # the verdict on the parent run's page: its description, the boundary and the recommendation as metrics/params
    note = parent.data.tags["mlflow.note.content"]
    assert note.startswith("```\n4 jobs: 2 finished, 2 diverged, 0 crashed\nStability boundary per dataset.batch_size")
    assert "Recommended: optimizer.lr=0.0001 dataset.batch_size=" in note and "exploded@" in note
    assert {k: v for k, v in parent.data.metrics.items() if k.startswith("boundary/")} == {
        f"boundary/bs_{bs}/{k}": v for bs in ("2", "4")
        for k, v in (("largest_stable_lr", 1e-4), ("smallest_diverged_lr", 1e3))}
    assert parent.data.params["recommended.optimizer.lr"] == "0.0001"
    assert parent.data.params["recommended.dataset.batch_size"] in ("2", "4")
    assert parent.data.metrics["recommended/best_val_cer"] >= 0 and parent.data.metrics["jobs/diverged"] == 2
    assert all("None" not in r.data.tags.values() for r in children + [parent])
    assert parent.data.tags["ds2exp.sweep.optimizer.lr"] == "1e-4,1e3"
    assert parent.data.tags["ds2exp.sweep.dataset.batch_size"] == "2,4"
    assert (sweep_dir / "mlflow_parent_run_id.txt").read_text().strip() == pid
    assert all(r.data.tags.get("mlflow.parentRunId") == pid for r in children)
    assert all(r.info.status == "FINISHED" and r.data.tags.get("ds2exp.status") != "diverged" for r in children)
    # names a person can read, and the swept keys as params
    names = {r.info.run_name: r for r in children}
    assert set(names) == {"lr=1e-4 bs=2", "lr=1e-4 bs=4", "lr=1e3 bs=2", "lr=1e3 bs=4"}
    assert names["lr=1e3 bs=4"].data.params["optimizer.lr"] == "1000.0"
    assert names["lr=1e3 bs=4"].data.params["dataset.batch_size"] == "4"
    exp = client.get_experiment(parent.info.experiment_id)
    assert exp.tags.get("mlflow.experimentKind") == "custom_model_development"

    # the plan, printed before the first job
    assert "sweep: 4 jobs (optimizer.lr x 2; dataset.batch_size x 2); each stops at trainer.max_steps=" in stdout
    # the verdict, printed at the end of the sweep and written into the sweep folder without another command
    assert "4 jobs: 2 finished, 2 diverged, 0 crashed" in stdout
    for bs in ("2", "4"):
        assert (f"dataset.batch_size={bs}: largest stable lr 0.0001, smallest diverged lr 1000 -> boundary "
                f"between 0.0001 and 1000") in stdout
    assert "Recommended: optimizer.lr=0.0001 dataset.batch_size=" in stdout
    assert f"heatmap: {sweep_dir / 'sweep_report.png'}" in stdout
    for f in ("sweep_report.png", "sweep_losses.png"):
        assert (sweep_dir / f).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "Stability boundary per dataset.batch_size" in (sweep_dir / "sweep_report.txt").read_text()
    cells = table_cells(stdout)
    assert all(cells[("1000", bs)].startswith("exploded@") for bs in ("2", "4")), cells
    for bs in ("2", "4"):
        loss, cer, nonfinite = (x.strip() for x in cells[("0.0001", bs)].split("/"))
        assert float(loss) > 0 and 0 <= float(cer) and nonfinite == "0"
    assert stdout.count("exploded: loss_explosion, judged from the logged losses") == 2
    # jobs.csv: number -> name -> overrides -> status -> run id
    with open(sweep_dir / "jobs.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["num"] for r in rows] == ["0", "1", "2", "3"]
    assert {r["name"]: r["mlflow_run_id"] for r in rows} == {n: r.info.run_id for n, r in names.items()}
    assert {r["name"]: r["status"] for r in rows if r["name"].startswith("lr=1e3")} == {
        "lr=1e3 bs=2": "diverged", "lr=1e3 bs=4": "diverged"}
    assert all("optimizer.lr=" in r["overrides"] and (sweep_dir / r["num"]).is_dir() for r in rows)
    # the callback logged the report to the parent run
    arts = {a.path for a in client.list_artifacts(pid, "report")}
    assert {"report/sweep_report.png", "report/sweep_losses.png", "report/sweep_report.txt",
            "report/jobs.csv"} <= arts

    # by hand, from the folder and from the parent run id: the same tables
    out_dir = report(tmp_path, str(sweep_dir), tmp_path / "from_dir.png")
    out_run = report(tmp_path, pid, tmp_path / "from_run.png")
    for out in (out_dir, out_run):
        assert "4 jobs: 2 finished, 2 diverged, 0 crashed" in out
        assert "cell: train loss at the last step / best val CER % / non-finite steps" in out
        assert set(table_cells(out)) == {("0.0001", "2"), ("0.0001", "4"), ("1000", "2"), ("1000", "4")}
        assert "Recommended: optimizer.lr=0.0001" in out
    assert table_cells(out_dir) == table_cells(out_run) == cells  # the two sources agree with the sweep's own


def test_a_job_returns_its_run_s_value_and_nan_when_the_run_diverged_or_crashed(tmp_path):
    """What run_sweep_job hands the sweeper, from the RunOutcome of the job's run (in-process, no Hydra)."""
    import math

    from ds2exp.cli import check_overrides
    from ds2exp.sweeps.job_runner import run_sweep_job
    from ds2exp.training.ending import RunOutcome

    cfg = check_overrides([f"paths.root_dir={tmp_path}", "logger=none"])
    assert run_sweep_job(cfg, lambda c: RunOutcome("finished", 58.12)) == 58.12
    assert math.isnan(run_sweep_job(cfg, lambda c: RunOutcome("diverged", 58.12, 21)))  # its best value is not used
    assert math.isnan(run_sweep_job(cfg, lambda c: RunOutcome("finished", float("nan"))))  # never evaluated

    def crash(c):
        raise RuntimeError("boom")

    assert math.isnan(run_sweep_job(cfg, crash))


@pytest.mark.slow
def test_crashed_and_diverged_jobs_do_not_stop_the_sweep(tmp_path, shared_data_dir, report):
    # max_duration=0.5 s filters out every utterance: the job raises DatasetError at runtime (the
    # config itself is valid). lr=1e8 makes the gradients NaN at step 2: the job diverges.
    sweep_dir, stdout = sweep(tmp_path, shared_data_dir, "optimizer.lr=1e-4,1e8", "dataset.batch_size=4",
                              "dataset.max_duration=0.5,16.7", "trainer.nonfinite_patience=1")
    client, parents, children = sweep_runs(tmp_path)
    assert len(parents) == 1 and parents[0].info.status == "FINISHED" and len(children) == 4
    by = {(r.data.params["optimizer.lr"], r.data.params["dataset.max_duration"]): r for r in children}
    for lr in ("0.0001", "100000000.0"):
        crashed = by[(lr, "0.5")]
        assert crashed.info.status == "FAILED" and "DatasetError" in crashed.data.tags["ds2exp.error"]
        assert crashed.data.tags["mlflow.parentRunId"] == parents[0].info.run_id
        assert (Path(crashed.data.tags["ds2exp.run_dir"]) / "error.txt").is_file()
    assert by[("0.0001", "16.7")].info.status == "FINISHED"
    diverged = by[("100000000.0", "16.7")]
    assert diverged.info.status == "FAILED" and int(diverged.data.tags["diverged_at_step"]) >= 1

    out = report(tmp_path, str(sweep_dir), tmp_path / "r.png")
    assert "4 jobs: 1 finished, 1 diverged, 2 crashed" in out
    assert "[dataset.max_duration=0.5]" in out and "[dataset.max_duration=16.7]" in out
    assert f"diverged@{diverged.data.tags['diverged_at_step']}" in out and out.count("| crashed") == 2
    assert "crashed: the train split is empty after filtering" in out  # a DatasetError's message is the whole story
    assert "job 3 (lr=1e8 max_duration=16.7) diverged at step" in stdout
    assert "Recommended: optimizer.lr=0.0001" in stdout
    assert "dataset.batch_size=4: largest stable lr 0.0001, smallest diverged lr 1e+08" in stdout


@pytest.mark.slow
def test_optuna_trial_that_diverges_fails_with_its_cause_one_that_lags_is_pruned(tmp_path, shared_data_dir):
    import optuna

    # The preset's lr interval narrowed to a choice; trial n draws with seed + n, and seed 1056 draws
    # 3e-3, 1e-7, 1e8, 1e-7. trainer.monitor=val/loss, validated at step 2 of 3: once the 3e-3 trial is
    # complete (the pruner's n_startup_trials=1), a 1e-7 trial's val/loss at step 2 is above the median
    # of the completed ones there and it is pruned; 1e8 makes the gradients NaN at step 2 (patience 1).
    sweep_dir, stdout = sweep(tmp_path, shared_data_dir, "+sweep=optuna_lr", "hydra.sweeper.n_trials=4",
                              "optimizer.lr=choice(3e-3,1e-7,1e8)", "dataset.batch_size=4",
                              "trainer.nonfinite_patience=1", "trainer.monitor=val/loss", "trainer.eval_every=2",
                              "hydra.sweeper.pruner.n_startup_trials=1", "hydra.sweeper.sampler.seed=1056")
    study = optuna.load_study(study_name="ds2exp_optuna_lr", storage=f"sqlite:///{tmp_path}/optuna.db")
    trials = study.trials
    assert [(t.params["optimizer.lr"], t.state.name) for t in trials] == [
        (3e-3, "COMPLETE"), (1e-7, "PRUNED"), (1e8, "FAIL"), (1e-7, "PRUNED")]
    client, parents, children = sweep_runs(tmp_path)
    assert len(parents) == 1 and len(children) == 4
    assert all(r.data.tags["mlflow.parentRunId"] == parents[0].info.run_id for r in children)
    by_trial = {int(r.data.tags["ds2exp.optuna.trial"]): r for r in children}
    assert {n: r.info.run_name for n, r in by_trial.items()} == {0: "lr=3e-3", 1: "lr=1e-7", 2: "lr=1e8", 3: "lr=1e-7"}
    # the objective: the best val/loss of the run, as the trial's MLflow run logged it
    val_loss = {n: {m.step: m.value for m in client.get_metric_history(r.info.run_id, "val/loss")}
                for n, r in by_trial.items()}
    assert trials[0].value == pytest.approx(min(val_loss[0].values()))
    # diverged: FAILED, its cause as the run's diagnosis gave it; the study went on
    diverged = trials[2]
    assert diverged.user_attrs["failure"] == "diverged" and diverged.user_attrs["diverged_at_step"] == 2
    assert diverged.user_attrs["cause"] == by_trial[2].data.tags["divergence_cause"]
    assert by_trial[2].info.status == "FAILED"
    # pruned at its first validation from the value it reported there, and ended as a finished run
    pruned = trials[1]
    assert pruned.intermediate_values == {2: pytest.approx(val_loss[1][2])}
    assert pruned.user_attrs["pruned_at_step"] == 2 and by_trial[1].data.tags["ds2exp.optuna.pruned_at_step"] == "2"
    summary = json.loads((sweep_dir / "1" / "summary.json").read_text())
    assert (summary["status"], summary["stop_reason"], summary["step"]) == ("finished", "pruned", 2)
    assert by_trial[1].info.status == "FINISHED"
    # what the end prints: the study, the best trial, the grid sweeps' verdict, where the study is
    assert "optuna study ds2exp_optuna_lr: 4 of 4 trials: 1 complete, 2 pruned, 1 failed" in stdout
    assert f"trial 2 FAILED (optimizer.lr=1e8): diverged: {diverged.user_attrs['cause']}" in stdout
    assert f"best: trial 0, val/loss {trials[0].value:.4g}: optimizer.lr=0.003" in stdout
    assert "dataset.batch_size=4: largest stable lr 0.003, smallest diverged lr 1e+08" in stdout
    assert f"study: ds2exp_optuna_lr in sqlite:///{tmp_path}/optuna.db;" in stdout
    result = yaml.safe_load((sweep_dir / "optimization_results.yaml").read_text())
    assert result["best_params"] == {"optimizer.lr": 0.003} and result["states"] == {
        "COMPLETE": 1, "PRUNED": 2, "FAIL": 1}


@pytest.mark.slow
def test_optuna_trial_that_crashes_fails_with_its_error_and_the_study_goes_on(tmp_path, shared_data_dir):
    import optuna

    # dataset.max_duration=0.5 s filters out every utterance: each job raises DatasetError at runtime
    sweep_dir, stdout = sweep(tmp_path, shared_data_dir, "+sweep=optuna_lr", "hydra.sweeper.n_trials=2",
                              "dataset.max_duration=0.5")
    study = optuna.load_study(study_name="ds2exp_optuna_lr", storage=f"sqlite:///{tmp_path}/optuna.db")
    assert [t.state.name for t in study.trials] == ["FAIL", "FAIL"]
    for t in study.trials:
        assert t.user_attrs["failure"] == "crashed"
        assert t.user_attrs["cause"].startswith("the train split is empty")  # the run's one-line error
    _, parents, children = sweep_runs(tmp_path)
    assert len(children) == 2 and all(r.info.status == "FAILED" for r in children)
    assert sorted(r.data.tags["ds2exp.optuna.trial"] for r in children) == ["0", "1"]
    assert "optuna study ds2exp_optuna_lr: 2 of 2 trials: 0 complete, 0 pruned, 2 failed" in stdout
    assert "best: none yet (no trial completed)" in stdout


def test_preset_sweeps_carry_a_budget_and_say_it_before_the_first_job():
    from ds2exp.cli import check_overrides
    from ds2exp.sweeps.callback import _sweep_tags, _swept_from_tags
    from ds2exp.sweeps.plan import describe

    def plan(*overrides):
        cfg = check_overrides(list(overrides), with_hydra=True)
        with open_dict(cfg):
            cfg.hydra.overrides.task = [o for o in overrides if not o.startswith("+sweep")]
        tags = _sweep_tags(cfg, "sweep")
        return cfg, describe(cfg, {k: tags[f"ds2exp.sweep.{k}"] for k in _swept_from_tags(tags)})

    cfg, text = plan("+sweep=nan_lr_batch")
    assert cfg.trainer.max_steps == 150 and cfg.trainer.max_minutes == 3
    assert text.startswith("sweep: 12 jobs (optimizer.lr x 4; dataset.batch_size x 3); each stops at "
                           "trainer.max_steps=150, trainer.max_minutes=3"), text
    assert "at most about 36 minutes" in text
    _, text = plan("+sweep=nan_lr_batch", "dataset.batch_size=8", "trainer.max_steps=30")
    assert text.startswith("sweep: 4 jobs (optimizer.lr x 4); each stops at trainer.max_steps=30"), text
    _, text = plan("optimizer.lr=1e-4,1e-3")  # no preset, no limit: said before it starts
    assert "no step or time limit" in text


def test_sweep_presets_pass_preflight_and_their_values_are_checked(tmp_path, monkeypatch):
    from ds2exp.cli import ConfigError, check_overrides

    check_overrides(["+sweep=nan_lr_batch"])
    cfg = check_overrides(["+sweep=optuna_lr"], with_hydra=True)
    assert cfg.hydra.sweeper._target_ == "hydra_plugins.ds2exp_optuna_sweeper.sweeper.Ds2expOptunaSweeper"
    assert (cfg.hydra.sweeper.n_trials, cfg.trainer.max_steps, cfg.trainer.max_minutes) == (12, 200, 3)
    with pytest.raises(ConfigError, match="dataset.batch_size=0 is not allowed"):  # the preset's values are checked
        check_overrides(["+sweep=optuna_lr", "dataset.batch_size=choice(4,0)"])
    conf = tmp_path / "conf"
    shutil.copytree(ROOT / "conf", conf)
    (conf / "sweep" / "bad.yaml").write_text("# @package _global_\nhydra:\n  sweeper:\n    params:\n"
                                             "      dataset.batch_size: 4,0\n")
    monkeypatch.setenv("DS2EXP_CONFIG_DIR", str(conf))
    with pytest.raises(ConfigError, match="dataset.batch_size=0 is not allowed"):
        check_overrides(["+sweep=bad"])
    check_overrides(["+sweep=bad", "dataset.batch_size=4,8"])  # the command line replaces the preset's list


def test_job_in_another_process_finds_the_parent_id_in_the_sweep_dir(tmp_path, monkeypatch):
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf, open_dict

    from ds2exp.cli import compose_config
    from ds2exp.sweeps.callback import ENV_PARENT, PARENT_FILE, MlflowSweepCallback

    cfg = compose_config([], return_hydra_config=True)
    with open_dict(cfg):
        cfg.hydra.mode = "MULTIRUN"
        cfg.hydra.sweep.dir = str(tmp_path)
    (tmp_path / PARENT_FILE).write_text("0123abcd\n")
    monkeypatch.setenv(ENV_PARENT, "")  # empty: not exported; removed again after the test
    HydraConfig.instance().set_config(cfg)
    try:
        MlflowSweepCallback().on_job_start(OmegaConf.masked_copy(cfg, ["logger"]), task_function=None)
        assert os.environ[ENV_PARENT] == "0123abcd"
    finally:
        HydraConfig.instance().cfg = None


@pytest.mark.slow
def test_a_killed_grid_sweep_run_again_runs_only_what_is_missing_under_one_parent(tmp_path, synth_data_dir):
    """SIGKILL while the second of three jobs trains, then the same command: the first job is not run
    again, the second resumes from its checkpoint, the third runs; one parent run, one verdict."""
    import signal

    from tests.helpers import wait_for

    sweep_dir = tmp_path / "multirun" / "s"
    cmd = [sys.executable, str(ROOT / "train.py"), "-m", f"paths.data_dir={synth_data_dir}",
           f"hydra.sweep.dir={sweep_dir}", *[o for o in MICRO_3_STEPS if not o.startswith("trainer.max_steps")],
           "trainer.max_steps=40", "trainer.checkpoint_every=2", "trainer.eval_every=20", "dataset.batch_size=4",
           "optimizer.lr=1e-4,3e-4,1e-3"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=no_parent_env(tmp_path), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_for(lambda: (sweep_dir / "0" / "summary.json").is_file()
                 and (sweep_dir / "1" / "checkpoints" / "last.ckpt").is_file(), 900, proc, "job 1's first checkpoint")
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    first = (sweep_dir / "0" / "summary.json").stat().st_mtime_ns
    r = subprocess.run(cmd, cwd=ROOT, env=no_parent_env(tmp_path), capture_output=True, text=True, timeout=1500)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "job 0: finished in an earlier run of this sweep; not run again" in r.stdout
    assert "job 1: interrupted in an earlier run of this sweep; resuming it" in r.stdout
    assert (sweep_dir / "0" / "summary.json").stat().st_mtime_ns == first
    assert "resuming from" in (sweep_dir / "1" / "train.log").read_text()
    assert r.stdout.count("Recommended:") == 1 and "3 jobs: 3 finished" in r.stdout
    client, parents, children = sweep_runs(tmp_path)
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert len(children) == 3 and all(c.info.status == "FINISHED" for c in children)
    assert {c.data.tags.get("mlflow.parentRunId") for c in children} == {parents[0].info.run_id}
