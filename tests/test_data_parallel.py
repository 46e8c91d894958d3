"""Data-parallel training on MindSpore's launcher (msrun), two real processes on this CPU."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from tests.helpers import ROOT, wait_for
from bench.small_runs import MICRO_BATCH4
from tests.helpers.processes import train, train_cmd, train_env
from tests.helpers.tracking import max_logged_step, mlflow_client, mlflow_runs, runs_of

MSRUN = [sys.executable, "-m", "mindspore.parallel.cluster.run"]


def _msrun_env():
    # msrun starts each worker as plain `python`: this interpreter's folder must come first on PATH
    return {**os.environ, "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")}


def test_sharding_gives_each_rank_equal_disjoint_batches():
    from ds2exp.data.dataset import BucketBatchSampler, Example

    class _U:
        def __init__(self, i):
            self.id = f"u{i}"

    rng = np.random.default_rng(0)
    examples = [Example(_U(i), [1], int(f)) for i, f in enumerate(rng.integers(100, 800, 203))]
    for world in (2, 3, 4):
        for batch_size in (1, 4, 7):
            for epoch in (0, 1, 5):
                shards = [BucketBatchSampler(examples, batch_size, 4, 11, rank=r, world=world).epoch_batches(epoch)
                          for r in range(world)]
                assert len({len(s) for s in shards}) == 1  # the same number of steps on every rank
                seen = [i for s in shards for b in s for i in b]
                assert len(seen) == len(set(seen))  # no utterance twice in an epoch, across all ranks
                full = BucketBatchSampler(examples, batch_size, 4, 11).epoch_batches(epoch)
                left_out = len(full) - sum(len(s) for s in shards)
                assert 0 <= left_out < world  # only the remainder that cannot be shared evenly


def test_launch_command_runs_this_script_under_msrun(tmp_path):
    from ds2exp.training.distributed import launch_command

    cmd = launch_command(ROOT / "train.py", ["hardware.num_devices=2", "hydra.run.dir=elsewhere", "optimizer.lr=1"],
                         2, tmp_path, 12345)
    assert cmd[:3] == MSRUN
    assert {"--worker_num=2", "--local_worker_num=2", "--master_port=12345", "--join=True",
            f"--log_dir={tmp_path / 'msrun_logs'}"} <= set(cmd)
    # every rank gets the same run directory, whatever the command line said
    assert cmd[-1] == f"hydra.run.dir={tmp_path}" and "hydra.run.dir=elsewhere" not in cmd
    assert cmd[cmd.index(str(ROOT / "train.py")) + 1:-1] == ["hardware.num_devices=2", "optimizer.lr=1"]


@pytest.mark.slow
def test_two_process_step_equals_one_process_step_with_double_batch(tmp_path):
    """One data-parallel step on 2 processes with batch B each == one step on 1 process with batch 2B."""
    single, parallel = tmp_path / "single.npz", tmp_path / "parallel.npz"
    dp_step = str(ROOT / "tests" / "helpers" / "dp_step.py")
    r = subprocess.run([sys.executable, dp_step, str(single), "3"], capture_output=True, text=True, cwd=ROOT,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    from ds2exp.training.distributed import free_port

    r = subprocess.run([*MSRUN, "--worker_num=2", "--local_worker_num=2", f"--master_port={free_port()}",
                        f"--log_dir={tmp_path / 'logs'}", "--join=True", dp_step,
                        str(parallel), "3", "2"], capture_output=True, text=True, cwd=ROOT, env=_msrun_env(),
                       timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "rank 1/2" in (tmp_path / "logs" / "worker_1.log").read_text()
    a, b = np.load(single), np.load(parallel)
    assert set(a.files) == set(b.files) and len(a.files) > 10
    assert abs(float(a["loss"]) - float(b["loss"])) <= 1e-5 * abs(float(a["loss"]))
    for name in a.files:
        if name in ("loss", "grad_norm"):
            continue
        step_1p, step_2p = a[name], b[name]
        assert np.abs(step_1p).max() > 0, name  # the step moved this parameter
        assert np.abs(step_1p - step_2p).max() <= 1e-5 * max(1.0, float(np.abs(step_1p).max())), name


def test_train_py_data_parallel_run(tmp_path, shared_data_dir):
    """`train.py hardware.num_devices=2`: msrun, 2 ranks, one MLflow run and checkpoints written by rank 0,
    and a NaN gradient on rank 1 only makes both ranks skip that step."""
    r = train(tmp_path, shared_data_dir, *MICRO_BATCH4, "hardware.num_devices=2", "trainer.max_steps=6",
              "trainer.eval_every=3", "trainer.log_every=1", "trainer.inject_nan_grad_steps=[2]",
              "trainer.inject_nan_grad_rank=1", timeout=600)
    run_dir = tmp_path / "outputs" / "run"
    assert "data-parallel: 2 workers via msrun" in r.stdout
    logs = run_dir / "msrun_logs"
    assert "data-parallel rank 1/2" in (logs / "worker_1.log").read_text()
    client, runs = mlflow_runs(tmp_path)
    assert len(runs) == 1  # rank 1 logs nothing
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert run.data.tags["ds2exp.data_parallel_ranks"] == "2"
    assert run.data.tags["ds2exp.global_batch_size"] == str(2 * 4)
    bad = client.get_metric_history(run.info.run_id, "train/nonfinite_steps")
    # rank 0's own gradients were finite at step 3 (0-based 2); it skipped because rank 1's were not
    assert [(m.step, m.value) for m in bad][:4] == [(1, 0), (2, 0), (3, 1), (4, 1)]
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val/wer")] == [3, 6]
    ckpts = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert "last.ckpt" in ckpts and any(n.startswith("best-") for n in ckpts)
    assert (run_dir / "summary.json").is_file()


def test_data_parallel_config_errors(tmp_path):
    for args, message in ((["hardware.num_devices=2", "trainer.auto_resume=true"], "trainer.auto_resume"),
                          (["-m", "hardware.num_devices=2", "optimizer.lr=1e-3,1e-4"], "cannot be swept")):
        r = subprocess.run([sys.executable, str(ROOT / "train.py"), *args], capture_output=True, text=True,
                           cwd=ROOT, env={**os.environ, "DS2EXP_ROOT": str(tmp_path)}, timeout=120)
        assert r.returncode == 2, r.stderr
        assert message in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "outputs").exists() and not (tmp_path / "multirun").exists()



def _msrun_worker(root_pid: int, rank: int):
    """The pid of data-parallel rank `rank` below `root_pid` (the msrun worker: MS_ROLE=MS_WORKER and
    RANK_ID in its environment, leader of its own session; the log tails carry the same environment)."""
    children = {}
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{entry}/stat", "rb") as fh:
                fields = fh.read().rsplit(b")", 1)[1].split()
            with open(f"/proc/{entry}/environ", "rb") as fh:
                env = dict(i.split(b"=", 1) for i in fh.read().split(b"\0") if b"=" in i)
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append((int(entry), int(fields[3]), env))
    todo = [root_pid]
    while todo:
        for pid, session, env in children.get(todo.pop(), []):
            if (env.get(b"MS_ROLE") == b"MS_WORKER" and env.get(b"RANK_ID") == str(rank).encode()
                    and session == pid):
                return pid
            todo.append(pid)
    return None


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            return fh.read().rsplit(b")", 1)[1].split()[0] not in (b"Z", b"X")
    except OSError:
        return False


@pytest.mark.slow
def test_a_rank_killed_mid_run_stops_the_whole_run_within_seconds(tmp_path, synth_data_dir):
    """SIGKILL to rank 1 after step 5 (what the OOM killer does): rank 0, blocked in its AllReduce, the
    scheduler and msrun are stopped; the launcher records the run failed (run_state.json, the MLflow run
    FAILED), prints the summary and one error line naming rank 1, and exits 1; rank 0's last checkpoint
    stays loadable."""
    from ds2exp.checkpoints.io import load_checkpoint

    run_dir, db = tmp_path / "outputs" / "run", tmp_path / "mlflow.db"
    out, err = tmp_path / "stdout.txt", tmp_path / "stderr.txt"
    cmd = train_cmd(synth_data_dir, run_dir, *MICRO_BATCH4, "hardware.num_devices=2", "trainer.max_steps=400",
                    "trainer.eval_every=1000", "trainer.checkpoint_every=2", "trainer.log_every=1",
                    f"logger.tracking_uri=sqlite:///{db}")
    with open(out, "wb") as o, open(err, "wb") as e:
        proc = subprocess.Popen(cmd, stdout=o, stderr=e, cwd=ROOT, env=train_env(tmp_path))
    try:
        wait_for(lambda: max_logged_step(db) >= 5, 600, proc, "step 5 in the MLflow store")
        rank0, rank1 = _msrun_worker(proc.pid, 0), _msrun_worker(proc.pid, 1)
        assert rank0 and rank1, "the msrun workers were not found"
        os.kill(rank1, signal.SIGKILL)
        killed = time.monotonic()
        returncode = proc.wait(timeout=60)  # a hang fails here
        took = time.monotonic() - killed
    finally:
        if proc.poll() is None:
            proc.kill()
    print(f"SIGKILL of rank 1 to the launcher's exit: {took:.1f} s")
    stdout, stderr = out.read_text(errors="replace"), err.read_text(errors="replace")
    assert returncode == 1, stdout[-3000:] + stderr[-3000:]
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, stderr[-3000:]
    assert f"data-parallel rank 1 (pid {rank1})" in errors[0] and "SIGKILL" in errors[0]
    assert str(run_dir / "msrun_logs" / "worker_1.log") in errors[0]
    assert (stdout + stderr).count("Traceback") == 0, stdout[-3000:] + stderr[-3000:]
    assert "==== ds2exp training: failed" in stdout and f"run directory:   {run_dir}" in stdout
    assert not _alive(rank0)  # stopped, not left blocked in its AllReduce

    assert load_checkpoint(run_dir / "checkpoints" / "last.ckpt").meta["step"] >= 2
    state = json.loads((run_dir / "run_state.json").read_text())
    assert state["status"] == "failed" and "rank 1" in state["error"]
    (run,) = runs_of(mlflow_client(f"sqlite:///{db}"))
    assert run.info.run_id == state["mlflow_run_id"] and run.info.status == "FAILED"
    assert run.data.tags["ds2exp.status"] == "failed" and "rank 1" in run.data.tags["ds2exp.error"]
    assert run.info.run_id in stdout
