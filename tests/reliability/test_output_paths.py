"""An output folder that cannot be created: one line, exit status 3, nothing created."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import ROOT
from tests.helpers.processes import train_env


def _bare_run(cwd: Path, *args: str, env=None, timeout=120):
    """train.py from `cwd`, with DS2EXP_ROOT=cwd: Hydra's relative outputs/ and the store land in cwd."""
    return subprocess.run([sys.executable, str(ROOT / "train.py"), *args], capture_output=True, text=True, cwd=cwd,
                          env=env or train_env(cwd), timeout=timeout)


@pytest.mark.parametrize("override, key, what", [
    ("hydra.run.dir={blocker}/run", "hydra.run.dir", "run directory"),
    ("paths.root_dir={blocker}/root", "logger.tracking_uri", "MLflow store folder"),
])
def test_unusable_run_directory_is_one_line_and_creates_nothing(tmp_path, override, key, what):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    r = _bare_run(tmp_path, override.format(blocker=blocker))
    assert r.returncode == 3
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith(f"output error: cannot create the {what} {blocker}/")
    assert f"{blocker} is a file, not a directory" in lines[0] and f"set {key} to a writable folder" in lines[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file"]


def test_sweep_directory_under_a_file_is_refused(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    r = _bare_run(tmp_path, "-m", f"hydra.sweep.dir={blocker}/sweep", "optimizer.lr=1e-4,1e-3")
    assert r.returncode == 3 and "cannot create the run directory" in r.stderr and "hydra.sweep.dir" in r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file"]
