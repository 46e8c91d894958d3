"""Hydra launchers: local parallel sweeps (joblib) and SLURM (submitit), composed and run for real."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.helpers import ROOT
from bench.small_runs import MICRO_3_STEPS
from tests.helpers.processes import no_parent_env
from tests.helpers.tracking import sweep_runs

pytest.importorskip("hydra_plugins.hydra_joblib_launcher")
pytest.importorskip("hydra_plugins.hydra_submitit_launcher")

JOBLIB = "hydra_plugins.hydra_joblib_launcher.joblib_launcher.JoblibLauncher"
SLURM = "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"


def launcher(*overrides: str):
    from ds2exp.cli import compose_config

    return compose_config(list(overrides), return_hydra_config=True).hydra.launcher


def test_joblib_launcher_composes_with_the_train_config_and_passes_preflight():
    from ds2exp.cli import ConfigError, check_overrides

    cfg = launcher("hydra/launcher=joblib", "hydra.launcher.n_jobs=2")
    assert cfg._target_ == JOBLIB and cfg.n_jobs == 2 and cfg.prefer == "processes"
    assert launcher("hydra/launcher=basic")._target_.endswith("BasicLauncher")  # the default is unchanged
    check_overrides(["hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "optimizer.lr=1e-4,1e-3"])
    # the preflight names bad launcher settings in one line, like any other key
    with pytest.raises(ConfigError, match=r"unknown config key 'hydra.launcher.n_jobz'"):
        check_overrides(["hydra/launcher=joblib", "hydra.launcher.n_jobz=2"])
    with pytest.raises(ConfigError, match=r"hydra/launcher=jobli is not an option; allowed: .*joblib, slurm_gpu"):
        check_overrides(["hydra/launcher=jobli"])


def test_slurm_launchers_compose_and_the_preset_becomes_these_sbatch_flags(tmp_path, monkeypatch):
    import submitit
    from hydra.utils import instantiate

    from ds2exp.cli import ConfigError, check_overrides

    plain = launcher("hydra/launcher=submitit_slurm", "hydra.launcher.partition=long", "hydra.launcher.timeout_min=90")
    assert plain._target_ == SLURM and plain.partition == "long" and plain.timeout_min == 90
    assert plain.gpus_per_node is None and plain.tasks_per_node == 1

    overrides = ["hydra/launcher=slurm_gpu", "hardware=gpu", "hydra.launcher.partition=gpu-a100",
                 f"hydra.sweep.dir={tmp_path / 'sweep'}"]
    check_overrides(overrides + ["optimizer.lr=1e-4,1e-3"])
    with pytest.raises(ConfigError, match=r"unknown config key 'hydra.launcher.gpus_per_nod'"):
        check_overrides(["hydra/launcher=slurm_gpu", "hydra.launcher.gpus_per_nod=2"])
    cfg = launcher(*overrides)
    assert cfg._target_ == SLURM  # extends submitit_slurm
    assert (cfg.partition, cfg.timeout_min, cfg.gpus_per_node) == ("gpu-a100", 720, 1)
    assert (cfg.tasks_per_node, cfg.nodes) == (1, 1)
    assert (cfg.cpus_per_task, cfg.mem_gb, cfg.array_parallelism) == (8, 64, 16)
    assert cfg.submitit_folder == f"{tmp_path / 'sweep'}/.submitit/%j"
    assert launcher("hydra/launcher=slurm_gpu").partition is None  # the cluster's default partition

    # The plugin's own launch() turns the config into submitit parameters; stop it at submission and
    # read the sbatch script it would send. SlurmExecutor only checks that `srun` exists.
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "srun").write_text("#!/bin/sh\nexit 1\n")
    (tmp_path / "bin" / "srun").chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    from ds2exp.cli import compose_config

    full = compose_config(overrides, return_hydra_config=True)
    slurm = instantiate(full.hydra.launcher)
    slurm.setup(hydra_context=None, task_function=None, config=full)
    executors = []
    monkeypatch.setattr(submitit.AutoExecutor, "map_array", lambda self, fn, *args: executors.append(self) or [])
    assert slurm.launch([["optimizer.lr=1e-3"]], initial_job_idx=0) == []
    script = executors[0]._executor._make_submission_file_text("python -u -m submitit.core._submit X", "uid")
    for flag in ("--partition=gpu-a100", "--time=720", "--gpus-per-node=1", "--ntasks-per-node=1", "--nodes=1",
                 "--cpus-per-task=8", "--mem=64GB", "--signal=USR2@120"):
        assert f"#SBATCH {flag}\n" in script, script
    assert f"--output={tmp_path / 'sweep'}/.submitit/%j/" in script


LOKY_CHILD = """
import multiprocessing, sys
if __name__ == "__main__":
    from joblib.externals.loky.backend import context  # noqa: F401  (registers the "loky" start method)
    multiprocessing.set_start_method("loky", force=True)  # the global start method inside a loky worker
    if sys.argv[1] == "reset":
        from ds2exp.sweeps.job_process import reset_inherited_start_method
        assert reset_inherited_start_method()
    p = multiprocessing.get_context("spawn").Process(target=print, args=("child ran",))  # as ds2exp.data.synth
    p.start()
    p.join(60)
    sys.exit(p.exitcode)
"""


def test_a_job_in_a_loky_worker_can_start_processes_after_the_reset(tmp_path):
    """Without the reset, a process started by a job in a loky worker dies at start-up (the first sweep on
    a fresh data folder builds the corpus with such processes)."""
    script = tmp_path / "loky_child.py"
    script.write_text(LOKY_CHILD)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    broken = subprocess.run([sys.executable, str(script), "none"], capture_output=True, text=True, env=env, timeout=120)
    assert broken.returncode != 0 and "cannot find context for 'loky'" in broken.stderr
    fixed = subprocess.run([sys.executable, str(script), "reset"], capture_output=True, text=True, env=env, timeout=120)
    assert fixed.returncode == 0 and fixed.stdout.strip() == "child ran", fixed.stderr[-3000:]


@pytest.mark.slow
def test_joblib_sweep_runs_two_jobs_in_parallel_processes_under_one_parent_run(tmp_path, shared_data_dir):
    sweep_dir = tmp_path / "multirun" / "joblib"
    proc = subprocess.Popen([sys.executable, str(ROOT / "train.py"), "-m", "hydra/launcher=joblib",
                             "hydra.launcher.n_jobs=2", f"paths.data_dir={shared_data_dir}",
                             f"hydra.sweep.dir={sweep_dir}", *MICRO_3_STEPS, "trainer.log_every=1",
                             "optimizer.lr=1e-4,1e-3"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT,
                            env=no_parent_env(tmp_path))
    out, _ = proc.communicate(timeout=400)
    assert proc.returncode == 0, out[-6000:]
    assert "Joblib.Parallel(n_jobs=2" in out

    client, parents, children = sweep_runs(tmp_path)
    assert len(parents) == 1 and len(children) == 2
    parent = parents[0]
    assert parent.info.status == "FINISHED"
    assert {r.data.tags.get("mlflow.parentRunId") for r in children} == {parent.info.run_id}
    assert {r.data.params["optimizer.lr"] for r in children} == {"0.0001", "0.001"}
    for r in children:
        assert r.info.status == "FINISHED"
        assert [m.step for m in client.get_metric_history(r.info.run_id, "train/loss")] == [1, 2, 3]

    # Each job ran in its own joblib worker process: two pids, neither of them the sweep's own process.
    # (Whether the two also overlapped in time depends on how fast each worker starts; not asserted.)
    pids = {json.loads((sweep_dir / str(n) / "run_state.json").read_text())["pid"] for n in (0, 1)}
    assert len(pids) == 2 and proc.pid not in pids, pids


@pytest.mark.slow
def test_submitit_local_sweep_runs_the_jobs_through_submitit(tmp_path, shared_data_dir):
    """The submitit launcher's own path (pickled job, run by `python -m submitit.core._submit` in a fresh
    process), with the local executor instead of sbatch/srun: what a SLURM node runs, minus SLURM."""
    sweep_dir = tmp_path / "multirun" / "submitit"
    r = subprocess.run([sys.executable, str(ROOT / "train.py"), "-m", "hydra/launcher=submitit_local",
                        "hydra.launcher.timeout_min=10", f"paths.data_dir={shared_data_dir}",
                        f"hydra.sweep.dir={sweep_dir}", *MICRO_3_STEPS, "trainer.log_every=1",
                        "optimizer.lr=1e-4,1e-3"],
                       capture_output=True, text=True, cwd=ROOT, env=no_parent_env(tmp_path), timeout=400)
    assert r.returncode == 0, r.stderr[-6000:]
    client, parents, children = sweep_runs(tmp_path)
    assert len(parents) == 1 and parents[0].info.status == "FINISHED" and len(children) == 2
    for run in children:
        assert run.info.status == "FINISHED" and run.data.tags["mlflow.parentRunId"] == parents[0].info.run_id
        assert [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")] == [1, 2, 3]
    assert list((sweep_dir / ".submitit").glob("*/*_submitted.pkl"))  # submitit's own job files
