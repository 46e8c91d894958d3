"""A full disk while writing a checkpoint: the run stops with one line naming the file, marked failed."""
from __future__ import annotations

import json
import signal
import subprocess

import pytest

from tests.helpers import ROOT
from bench.small_runs import SMALL
from tests.helpers.processes import train_cmd, train_env


@pytest.mark.slow
def test_disk_full_mid_run_fails_with_the_checkpoint_path(tmp_path, synth_data_dir):
    """A file-size limit (as a full disk) in the training process: the checkpoint write fails, the run
    stops with one error line naming the file, and the run is marked failed, not resumable."""
    import resource

    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of death, as ENOSPC would be
        resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))

    # One unlimited step first: on a fresh checkout that run writes numba's compiled-kernel cache
    # (__pycache__/*.nbc, some over the limit below), as any first run does; the limited run then
    # meets the limit at its checkpoint write only.
    warm = train_cmd(synth_data_dir, tmp_path / "outputs" / "warm", *SMALL, "trainer.max_steps=1", "logger=none",
                     "dataset.feature.cache=false")
    w = subprocess.run(warm, capture_output=True, text=True, cwd=ROOT, env=train_env(tmp_path), timeout=1200)
    assert w.returncode == 0, w.stderr[-3000:]
    run_dir = tmp_path / "outputs" / "run"
    cmd = train_cmd(synth_data_dir, run_dir, *SMALL, "trainer.max_steps=4", "trainer.checkpoint_every=2",
                    "logger=none", "dataset.feature.cache=false")
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=train_env(tmp_path), timeout=1200,
                       preexec_fn=limit)
    assert r.returncode == 1, r.stderr[-3000:]
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: could not write checkpoint {run_dir}/checkpoints/last.ckpt"), r.stderr[-3000:]
    assert "Traceback" not in r.stderr
    state = json.loads((run_dir / "run_state.json").read_text())
    assert state["status"] == "failed" and "could not write checkpoint" in state["error"]
    assert not list((run_dir / "checkpoints").glob(".*tmp*"))
