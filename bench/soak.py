"""Soak test: train under random SIGKILLs for a while, then check that nothing was lost.

    make soak                      # SOAK_MINUTES=3 by default
    SOAK_MINUTES=10 SOAK_SEED=7 make soak

For SOAK_MINUTES, one tiny training run (`trainer.auto_resume=true`, a checkpoint every 5 steps,
metrics every step into an MLflow SQLite store) is started again and again with the same command
line and killed with SIGKILL after a random delay (SOAK_KILL_MIN_S..SOAK_KILL_MAX_S, 1..15 s, seeded by
SOAK_SEED), at any point: while importing, while preparing data, mid-step, mid-checkpoint. Each
start resumes the interrupted run.
Then the run is finished at the step its last checkpoint reached plus 10, an uninterrupted run of
the same number of steps is trained with the same seed, and the report says:

- cycles survived: SIGKILLs after which training continued in the same run directory and MLflow run;
- steps lost: steps trained twice, i.e. done after a checkpoint and before a kill (counted from the
  MLflow history: a step logged n times was re-done n-1 times);
- the largest absolute difference between the final parameters (model and optimizer state) and
  those of the uninterrupted run; 0 means bitwise equal.

Exit status 1 when a step is missing from the MLflow history, the run is not FINISHED, there is more
than one MLflow run, or the parameters differ.
"""
from __future__ import annotations

import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import ds2exp  # noqa: F401  (protobuf implementation before mlflow/mindspore)

ROOT = Path(__file__).resolve().parents[1]

SMALL = ["model.conv_channels=4", "model.rnn_hidden=32", "model.rnn_layers=1", "dataset.batch_size=4",
         "dataset.max_utterances=48", "trainer.max_eval_utterances=8", "trainer.progress=false",
         "dataset.num_buckets=2", "trainer.checkpoint_every=5", "trainer.log_every=1", "trainer.eval_every=50"]


def _max_step(db: Path) -> int:
    """Highest train/loss step in the store (0 when none yet)."""
    for _ in range(20):
        if not db.exists():
            return 0
        try:
            with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5) as con:
                row = con.execute("SELECT max(step) FROM metrics WHERE key='train/loss'").fetchone()
            return 0 if row is None or row[0] is None else int(row[0])
        except sqlite3.Error:  # e.g. the killed writer's journal is being rolled back
            time.sleep(0.25)
    return -1


def _checkpoint_step(run_dir: Path) -> int:
    from ds2exp.training.checkpoint import find_latest_checkpoint, load_checkpoint

    found = find_latest_checkpoint(run_dir) if (run_dir / "checkpoints").is_dir() else None
    return int(load_checkpoint(found).meta["step"]) if found else 0


def main() -> int:
    minutes = float(os.environ.get("SOAK_MINUTES", "3"))
    seed = int(os.environ.get("SOAK_SEED", "0"))
    kill_after = (float(os.environ.get("SOAK_KILL_MIN_S", "1")), float(os.environ.get("SOAK_KILL_MAX_S", "15")))
    data_dir = Path(os.environ.get("SOAK_DATA_DIR", ROOT / "data"))
    work = Path(os.environ.get("SOAK_DIR") or tempfile.mkdtemp(prefix="ds2exp-soak-"))
    work.mkdir(parents=True, exist_ok=True)
    run_dir, ref_dir = work / "outputs" / "soak", work / "outputs" / "reference"
    db = work / "mlflow.db"
    env = {**os.environ, "DS2EXP_ROOT": str(work)}
    base = [sys.executable, str(ROOT / "train.py"), f"paths.data_dir={data_dir}", *SMALL]
    soak_cmd = base + [f"hydra.run.dir={run_dir}", "trainer.max_steps=1000000", "trainer.auto_resume=true"]
    rng = random.Random(seed)
    print(f"soak: {minutes:g} min, seed {seed}, SIGKILL after {kill_after[0]:g}-{kill_after[1]:g} s; work dir {work}",
          flush=True)

    deadline = time.monotonic() + 60 * minutes
    cycles, in_startup = 0, 0
    log = open(work / "soak.log", "ab")
    while time.monotonic() < deadline:
        delay = rng.uniform(*kill_after)
        ckpt_before, logged_before = _checkpoint_step(run_dir), _max_step(db)
        proc = subprocess.Popen(soak_cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        t0 = time.monotonic()
        while time.monotonic() - t0 < delay and proc.poll() is None:
            time.sleep(0.05)
        if proc.poll() is not None:
            print(f"soak: the training process exited by itself with status {proc.returncode}; see {work}/soak.log")
            return 1
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        cycles += 1
        logged, ckpt = _max_step(db), _checkpoint_step(run_dir)
        starting = logged <= max(ckpt_before, logged_before) and ckpt == ckpt_before
        in_startup += starting
        print(f"  cycle {cycles:3d}: SIGKILL after {delay:5.1f} s{' (while starting up)' if starting else ''}; "
              f"started from step {ckpt_before}, last logged step {logged}, last checkpoint {ckpt}", flush=True)

    # Finish: the step the last checkpoint reached + 10, explicitly (resume ignores auto_resume).
    target = _checkpoint_step(run_dir) + 10
    finish = base + [f"hydra.run.dir={run_dir}", f"trainer.max_steps={target}"]
    if (run_dir / "checkpoints").is_dir():
        finish.append(f"resume={run_dir}")
    r = subprocess.run(finish, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    if r.returncode != 0:
        print(f"soak: the final resume failed ({r.returncode}); see {work}/soak.log")
        return 1
    ref = subprocess.run(base + [f"hydra.run.dir={ref_dir}", f"trainer.max_steps={target}", "logger=none"],
                         cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    if ref.returncode != 0:
        print(f"soak: the uninterrupted reference run failed ({ref.returncode}); see {work}/soak.log")
        return 1

    import numpy as np
    from mlflow.tracking import MlflowClient

    from ds2exp.training.checkpoint import load_checkpoint

    a = load_checkpoint(run_dir / "checkpoints" / "last.ckpt")
    b = load_checkpoint(ref_dir / "checkpoints" / "last.ckpt")
    diff = 0.0
    for mine, theirs in ((a.model_state, b.model_state), (a.optimizer_state, b.optimizer_state)):
        assert set(mine) == set(theirs)
        for k in mine:
            diff = max(diff, float(np.max(np.abs(mine[k].astype(np.float64) - theirs[k].astype(np.float64)))))

    client = MlflowClient(f"sqlite:///{db}")
    exp = client.get_experiment_by_name("ds2exp")
    runs = client.search_runs([exp.experiment_id]) if exp else []
    soak_runs = [x for x in runs if x.data.tags.get("ds2exp.run_dir") == str(run_dir)]
    counts: Counter = Counter()
    for x in soak_runs:
        counts.update(m.step for m in client.get_metric_history(x.info.run_id, "train/loss"))
    missing = sorted(set(range(1, target + 1)) - set(counts))
    redone = sum(n - 1 for n in counts.values())
    finished = [x for x in soak_runs if x.info.status == "FINISHED"]
    state = json.loads((run_dir / "run_state.json").read_text())

    print(f"soak: cycles survived: {cycles} SIGKILL/resume cycles ({in_startup} while starting up, "
          f"{cycles - in_startup} while training); the run was continued {state.get('resumes')} times")
    print(f"soak: final step {a.meta['step']} (checkpoint every 5 steps)")
    print(f"soak: steps lost (re-done after kills): {redone} ({redone / max(1, cycles):.1f} per kill)")
    print(f"soak: MLflow: {len(soak_runs)} run(s), {len(finished)} FINISHED; train/loss steps missing: "
          f"{len(missing)}{' ' + str(missing[:10]) if missing else ''}")
    print(f"soak: final parameters vs an uninterrupted {target}-step run: max |diff| = {diff:.3g}"
          f"{' (bitwise equal)' if diff == 0 else ''}")
    ok = not missing and len(soak_runs) == 1 and len(finished) == 1 and diff == 0.0 and a.meta["step"] == target
    print(f"soak: {'PASS' if ok else 'FAIL'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
