"""Run train.py as a real process: start/run/wait/kill, checkpoint comparison, override lists merged (the
small-model settings the runs start from are in bench/small_runs.py)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from tests.helpers import ROOT, wait_for
from tests.helpers.tracking import max_logged_step


def merged(*overrides: str):
    """Override lists joined, a later value of a key replacing an earlier one (train.py refuses a key
    given twice), e.g. SMALL with one of its keys changed."""
    out = {}
    for o in overrides:
        out[o.split("=", 1)[0].lstrip("+~")] = o
    return list(out.values())


def train_cmd(data_dir: Path, run_dir: Path, *overrides: str):
    return [sys.executable, str(ROOT / "train.py"), *merged(f"paths.data_dir={data_dir}", f"hydra.run.dir={run_dir}",
                                                            *overrides)]


def train_env(tmp_root: Path, **extra: str):
    return {**os.environ, "DS2EXP_ROOT": str(tmp_root), **extra}


def no_parent_env(tmp_root: Path):
    """train_env without a DS2EXP_PARENT_RUN_ID inherited from the shell: the MLflow runs the process starts
    (a sweep's parent run, an lr_find run) are no other run's children."""
    env = train_env(tmp_root)
    env.pop("DS2EXP_PARENT_RUN_ID", None)
    return env


def start(tmp_root: Path, data_dir: Path, run_dir: Path, *overrides: str, env=None) -> subprocess.Popen:
    tmp_root.mkdir(parents=True, exist_ok=True)
    log_path = tmp_root / f"train-{time.monotonic_ns()}.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(train_cmd(data_dir, run_dir, *overrides), stdout=log, stderr=subprocess.STDOUT,
                                cwd=ROOT, env=env or train_env(tmp_root))
    proc.log_path = log_path  # type: ignore[attr-defined]
    return proc


def run(tmp_root: Path, data_dir: Path, run_dir: Path, *overrides: str, env=None, check=True, timeout=1200):
    r = subprocess.run(train_cmd(data_dir, run_dir, *overrides), capture_output=True, text=True, cwd=ROOT,
                       env=env or train_env(tmp_root), timeout=timeout)
    if check:
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-4000:]
    return r


def train(tmp_root: Path, data_dir: Path, *overrides: str, check: bool = True, timeout: int = 600):
    """run() into <tmp_root>/outputs/run (the MLflow store: <tmp_root>/mlflow.db, see tracking.mlflow_runs)."""
    return run(tmp_root, data_dir, tmp_root / "outputs" / "run", *overrides, check=check, timeout=timeout)


def load_params(run_dir: Path):
    from ds2exp.checkpoints.io import load_checkpoint

    c = load_checkpoint(run_dir / "checkpoints" / "last.ckpt")
    return c.model_state, c.optimizer_state, c.meta


def assert_same_parameters(a_dir: Path, b_dir: Path):
    ma, oa, meta_a = load_params(a_dir)
    mb, ob, meta_b = load_params(b_dir)
    assert meta_a["step"] == meta_b["step"]
    assert set(ma) == set(mb) and set(oa) == set(ob)
    for k in ma:  # fixed seed, CPU kernels: bitwise equal, not merely close
        np.testing.assert_array_equal(ma[k], mb[k], err_msg=k)
    for k in oa:
        np.testing.assert_array_equal(oa[k], ob[k], err_msg=k)


def sigkill_after_checkpoint(proc: subprocess.Popen, run_dir: Path, db: Path, past_step: int) -> int:
    """SIGKILL `proc` once a checkpoint exists and a train/loss beyond `past_step` is in the store."""
    wait_for(lambda: (run_dir / "checkpoints" / "last.ckpt").exists(), 300, proc, "the first checkpoint")
    wait_for(lambda: max_logged_step(db) > past_step, 300, proc, f"a step beyond {past_step}")
    assert proc.poll() is None, "training finished before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait(timeout=60) == -signal.SIGKILL
    return max_logged_step(db)
