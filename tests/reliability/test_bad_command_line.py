"""Every bad command line: exit status 2, one line naming the key and what is allowed, nothing created."""
from __future__ import annotations

import subprocess
import sys

from tests.helpers import ROOT
from tests.helpers.processes import train_env

BAD_COMMAND_LINES = [
    (["optimizer.lrr=1"], ["unknown config key 'optimizer.lrr'", "allowed keys under 'optimizer': name, lr,"]),
    (["+trainer.bar=2"], ["unknown config key 'trainer.bar'", "allowed keys under 'trainer':"]),
    (["++foo=1"], ["unknown config key 'foo'", "allowed keys: paths, dataset, model"]),
    (["trainer.max_steps=abc"], ["'trainer.max_steps'", "could not be converted to Integer"]),
    (["trainer.auto_resume=maybe"], ["'trainer.auto_resume'", "is not a valid bool"]),
    (["optimizer.lr=0"], ["optimizer.lr=0.0 is not allowed", "expected a number > 0"]),
    (["optimizer.lr=-0.001"], ["optimizer.lr=-0.001 is not allowed", "expected a number > 0"]),
    (["dataset.batch_size=0"], ["dataset.batch_size=0 is not allowed", "expected an integer >= 1"]),
    (["precision=fp64"], ["precision=fp64 is not an option", "allowed: bf16, fp16, fp32"]),
    (["model=ds2_huge"], ["model=ds2_huge is not an option", "allowed: ds2_reference, ds2_small, ds2_tiny"]),
    (["model.rnn_type=rnn"], ["'model.rnn_type'", "expected one of [lstm, gru]"]),
    (["resume=/no/such/checkpoint"], ["resume='/no/such/checkpoint' is not allowed",
                                      "an existing checkpoint file or run directory"]),
    (["pretrained=/no/such.ckpt"], ["pretrained='/no/such.ckpt' is not allowed", "an existing checkpoint file"]),
    (["-m", "optimizer.lr=1e-3,-1"], ["optimizer.lr=-1.0 is not allowed", "expected a number > 0"]),
    (["optimizer.lr=1e-3", "optimizer.lr=2e-3"], ["'optimizer.lr' is given twice", "give each key once"]),
    (["hardware=cpu", "hardware=gpu"], ["'hardware' is given twice"]),
]


def test_every_bad_command_line_exits_2_with_one_line_and_leaves_nothing(tmp_path):
    """Each bad override: status 2, one stderr line naming the key and what is allowed, and no run
    directory, sweep directory, MLflow store or data folder created (all run in parallel)."""
    procs = []
    for i, (args, expected) in enumerate(BAD_COMMAND_LINES):
        cwd = tmp_path / f"case{i}"
        cwd.mkdir()
        procs.append((args, expected, cwd, subprocess.Popen(
            [sys.executable, str(ROOT / "train.py"), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True, cwd=cwd, env=train_env(cwd))))
    for args, expected, cwd, proc in procs:
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 2, (args, err)
        lines = [ln for ln in err.splitlines() if ln.strip()]
        assert len(lines) == 1 and lines[0].startswith("config error: "), (args, err)
        for text in expected:
            assert text in lines[0], (args, lines[0])
        assert list(cwd.iterdir()) == [], (args, list(cwd.iterdir()))  # no outputs/, multirun/, mlflow.db, data/
