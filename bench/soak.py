"""Soak test: train under random SIGKILLs for a while, then check that nothing was lost.

    make soak                      # SOAK_MINUTES=3 by default
    SOAK_MINUTES=10 SOAK_SEED=7 make soak

For SOAK_MINUTES, one tiny training run (`trainer.auto_resume=true`, a checkpoint every 5 steps,
metrics every step into an MLflow SQLite store) is started again and again with the same command
line and killed with SIGKILL. Starts alternate between 2 threads and 1 (OMP_NUM_THREADS; each child
gets an environment built from this process's own at start-up, never one MindSpore has changed).
Kills are spread over training: most at a random step 1-12 steps past the point the start resumed
from, a random fraction into that step (so also mid-checkpoint); one start in 8 is killed during
start-up. Each start resumes the interrupted run.
Then the run is finished at the step its last checkpoint reached plus 10, and uninterrupted runs of
the same number of steps are trained with the same seed on 2 threads and on 1, and the report says:

- where each kill landed (start-up; training at step N; during a checkpoint write);
- cycles survived: SIGKILLs after which training continued in the same run directory and MLflow run;
- steps lost: steps trained twice, i.e. done after a checkpoint and before a kill (counted from the
  MLflow history: a step logged n times was re-done n-1 times);
- the largest absolute difference between the final parameters (model and optimizer state) and
  those of each uninterrupted run; 0 means bitwise equal.

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

# The children's environment, taken before anything here imports MindSpore (which sets
# OMP_NUM_THREADS=1 in the C environment that a child would otherwise inherit).
CLEAN_ENV = dict(os.environ)

import ds2exp  # noqa: E402,F401  (protobuf implementation before mlflow/mindspore)
from bench.small_runs import SMALL  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]

SOAK_RUN = [*SMALL, "trainer.checkpoint_every=5", "trainer.log_every=1", "trainer.eval_every=50"]


def _store_value(db: Path, sql: str, unreadable):
    """The single value `sql` selects from the MLflow store, read-only: None before the store exists,
    `unreadable` when it stays locked (a killed writer's journal is being rolled back)."""
    for _ in range(20):
        if not db.exists():
            return None
        try:
            with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5) as con:
                return con.execute(sql).fetchone()[0]
        except sqlite3.Error:
            time.sleep(0.25)
    return unreadable


def _max_step(db: Path) -> int:
    """Highest train/loss step in the store (0 when none yet, -1 when it cannot be read)."""
    value = _store_value(db, "SELECT max(step) FROM metrics WHERE key='train/loss'", -1)
    return 0 if value is None else int(value)


def _checkpoint_step(run_dir: Path) -> int:
    from ds2exp.checkpoints.io import find_latest_checkpoint, load_checkpoint

    found = find_latest_checkpoint(run_dir) if (run_dir / "checkpoints").is_dir() else None
    return int(load_checkpoint(found).meta["step"]) if found else 0


def _writing_checkpoint(run_dir: Path) -> bool:
    folder = run_dir / "checkpoints"
    return folder.is_dir() and any(p.name.endswith(".tmp") or ".tmp" in p.suffixes for p in folder.iterdir())


def _env(work: Path, threads: int) -> dict:
    env = {**CLEAN_ENV, "DS2EXP_ROOT": str(work), "OMP_NUM_THREADS": str(threads)}
    env.pop("DS2EXP_RNN_THREADS", None)
    return env


def _logged_rows(db: Path) -> int:
    """train/loss rows in the store: a replayed step adds a row too, so this counts steps done."""
    return int(_store_value(db, "SELECT count(*) FROM metrics WHERE key='train/loss'", 0) or 0)


def _kill_point(proc, db: Path, rng: random.Random, resumed_from: int) -> tuple:
    """Wait for this start's kill point; returns (where, steps this start did) once the caller may kill.
    One start in 8 dies during start-up; the others 1-12 steps after they began training, a random
    fraction into the next step."""
    rows0 = _logged_rows(db)
    if rng.random() < 0.125:
        t_end = time.monotonic() + rng.uniform(0.5, 6.0)
        while time.monotonic() < t_end and proc.poll() is None and _logged_rows(db) == rows0:
            time.sleep(0.05)
        done = _logged_rows(db) - rows0
        return ("start-up", None) if done == 0 else ("training", resumed_from + done)
    target = rng.randint(1, 12)
    seen, t_seen, step_s = 0, time.monotonic(), 1.0
    while proc.poll() is None:
        done = _logged_rows(db) - rows0
        if done != seen:
            if seen > 0:
                step_s = (time.monotonic() - t_seen) / (done - seen)
            seen, t_seen = done, time.monotonic()
        if done >= target:
            break
        time.sleep(0.02)
    time.sleep(rng.uniform(0.0, step_s))
    return "training", resumed_from + _logged_rows(db) - rows0


def main() -> int:
    minutes = float(os.environ.get("SOAK_MINUTES", "3"))
    seed = int(os.environ.get("SOAK_SEED", "0"))
    data_dir = Path(os.environ.get("SOAK_DATA_DIR", ROOT / "data"))
    work = Path(os.environ.get("SOAK_DIR") or tempfile.mkdtemp(prefix="ds2exp-soak-"))
    work.mkdir(parents=True, exist_ok=True)
    run_dir = work / "outputs" / "soak"
    db = work / "mlflow.db"
    base = [sys.executable, str(ROOT / "train.py"), f"paths.data_dir={data_dir}", *SOAK_RUN]
    soak_cmd = base + [f"hydra.run.dir={run_dir}", "trainer.max_steps=1000000", "trainer.auto_resume=true"]
    rng = random.Random(seed)
    print(f"soak: {minutes:g} min, seed {seed}; starts alternate 2 and 1 threads; work dir {work}", flush=True)

    deadline = time.monotonic() + 60 * minutes
    cycles = 0
    landed: Counter = Counter()
    log = open(work / "soak.log", "ab")
    while time.monotonic() < deadline:
        threads = 2 if cycles % 2 == 0 else 1
        ckpt_before = _checkpoint_step(run_dir)
        proc = subprocess.Popen(soak_cmd, cwd=ROOT, env=_env(work, threads), stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        t0 = time.monotonic()
        where, step = _kill_point(proc, db, rng, max(ckpt_before, 0))
        if proc.poll() is not None:
            print(f"soak: the training process exited by itself with status {proc.returncode}; see {work}/soak.log")
            return 1
        in_checkpoint = _writing_checkpoint(run_dir)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        cycles += 1
        if in_checkpoint:
            where = "checkpoint write"
        landed[where] += 1
        ckpt = _checkpoint_step(run_dir)
        at = f" after step {step}" if step is not None else ""
        print(f"  cycle {cycles:3d} ({threads} thread{'s' if threads > 1 else ''}): SIGKILL after "
              f"{time.monotonic() - t0:5.1f} s, during {where}{at}; resumed from step {ckpt_before}, "
              f"last checkpoint now {ckpt}", flush=True)
    print("soak: kills landed: " + ", ".join(f"{n} during {w}" for w, n in sorted(landed.items())), flush=True)

    # Finish: the step the last checkpoint reached + 10, explicitly (resume ignores auto_resume).
    target = _checkpoint_step(run_dir) + 10
    finish = base + [f"hydra.run.dir={run_dir}", f"trainer.max_steps={target}"]
    if (run_dir / "checkpoints").is_dir():
        finish.append(f"resume={run_dir}")
    r = subprocess.run(finish, cwd=ROOT, env=_env(work, 1), stdout=log, stderr=subprocess.STDOUT)
    if r.returncode != 0:
        print(f"soak: the final resume failed ({r.returncode}); see {work}/soak.log")
        return 1
    ref_dirs = {}
    for threads in (2, 1):
        ref_dirs[threads] = work / "outputs" / f"reference-{threads}t"
        ref = subprocess.run(base + [f"hydra.run.dir={ref_dirs[threads]}", f"trainer.max_steps={target}",
                                     "logger=none"], cwd=ROOT, env=_env(work, threads), stdout=log,
                             stderr=subprocess.STDOUT)
        if ref.returncode != 0:
            print(f"soak: the uninterrupted {threads}-thread reference run failed ({ref.returncode}); "
                  f"see {work}/soak.log")
            return 1

    import numpy as np
    from mlflow.tracking import MlflowClient

    from ds2exp.checkpoints.io import load_checkpoint

    a = load_checkpoint(run_dir / "checkpoints" / "last.ckpt")
    diffs = {}
    for threads, ref_dir in ref_dirs.items():
        b = load_checkpoint(ref_dir / "checkpoints" / "last.ckpt")
        diff = 0.0
        for mine, theirs in ((a.model_state, b.model_state), (a.optimizer_state, b.optimizer_state)):
            assert set(mine) == set(theirs)
            for k in mine:
                diff = max(diff, float(np.max(np.abs(mine[k].astype(np.float64) - theirs[k].astype(np.float64)))))
        diffs[threads] = diff

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

    print(f"soak: cycles survived: {cycles} SIGKILL/resume cycles ("
          + ", ".join(f"{n} during {w}" for w, n in sorted(landed.items()))
          + f"); the run was continued {state.get('resumes')} times")
    print(f"soak: final step {a.meta['step']} (checkpoint every 5 steps)")
    print(f"soak: steps lost (re-done after kills): {redone} ({redone / max(1, cycles):.1f} per kill)")
    print(f"soak: MLflow: {len(soak_runs)} run(s), {len(finished)} FINISHED; train/loss steps missing: "
          f"{len(missing)}{' ' + str(missing[:10]) if missing else ''}")
    for threads, diff in diffs.items():
        print(f"soak: final parameters vs an uninterrupted {target}-step run on {threads} thread"
              f"{'s' if threads > 1 else ''}: max |diff| = {diff:.3g}{' (bitwise equal)' if diff == 0 else ''}")
    ok = (not missing and len(soak_runs) == 1 and len(finished) == 1 and all(d == 0.0 for d in diffs.values())
          and a.meta["step"] == target)
    print(f"soak: {'PASS' if ok else 'FAIL'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
