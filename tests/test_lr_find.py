"""Learning-rate range test (`python -m ds2exp.lr_find`): a real short run, its plot and MLflow run."""
from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path

from tests.helpers import ROOT
from bench.small_runs import MICRO_BATCH4
from tests.helpers.processes import no_parent_env


def _run(tmp_path: Path, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ds2exp.lr_find", *args], capture_output=True, text=True,
                          cwd=ROOT, env=no_parent_env(tmp_path), timeout=timeout)


def test_range_schedule_is_exponential_from_min_to_max():
    from ds2exp.training.optim import range_test_lr

    lrs = [range_test_lr(i, 9, 1e-4, 1e4) for i in range(9)]
    assert math.isclose(lrs[0], 1e-4) and math.isclose(lrs[-1], 1e4)
    ratios = [b / a for a, b in zip(lrs, lrs[1:])]
    assert all(math.isclose(r, 10.0) for r in ratios)  # 8 decades in 8 steps


def test_suggestion_is_a_tenth_of_the_lowest_smoothed_loss():
    from ds2exp.lr_find import analyse

    # a range-test shaped curve: flat, falling from lr 1e-3, lowest at 1e-1, then rising fast
    lrs = [10 ** (-5 + 0.1 * i) for i in range(51)]
    losses = [100.0 / (1 + (lr / 1e-3)) + 5 + (lr / 0.1) ** 3 * 20 for lr in lrs]
    res = analyse(lrs, losses, window=1, explosion=None)
    i_min = min(range(len(losses)), key=losses.__getitem__)
    assert res["min_loss_lr"] == lrs[i_min]
    assert math.isclose(res["suggested_lr"], lrs[i_min] / 10)
    assert lrs[5] < res["steepest_lr"] < res["min_loss_lr"]
    cut = analyse(lrs, losses, window=3, explosion={"lr": lrs[30], "step": 30})
    assert cut["min_loss_lr"] < lrs[30] and cut["explosion_lr_div10"] == lrs[30] / 10


def test_help_starts_with_examples_and_bad_ranges_are_one_line_exit_2(tmp_path):
    r = _run(tmp_path, "--help", timeout=120)
    assert r.returncode == 0
    head = r.stdout.strip().splitlines()
    assert any(line.strip().startswith("Examples:") for line in head[:4]), head[:6]
    r = _run(tmp_path, "lr_find.min_lr=1", "lr_find.max_lr=0.5", timeout=120)
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0
    assert "lr_find.max_lr" in r.stderr
    assert not (tmp_path / "outputs").exists() and not (tmp_path / "mlflow.db").exists()


def test_range_test_stops_at_the_explosion_and_logs_the_plot(tmp_path, shared_data_dir):
    from mlflow.tracking import MlflowClient

    run_dir = tmp_path / "lf"
    r = _run(tmp_path, f"paths.data_dir={shared_data_dir}", f"hydra.run.dir={run_dir}", *MICRO_BATCH4,
             "trainer.max_steps=16", "lr_find.min_lr=1e-4", "lr_find.max_lr=1e6", "lr_find.window=3")
    assert r.returncode == 0, r.stderr[-3000:]
    m = re.search(r"suggested maximum lr: ([0-9.e+-]+)  \(lr of the lowest smoothed loss / 10\)", r.stdout)
    assert m, r.stdout
    suggested = float(m.group(1))
    record = json.loads((run_dir / "lr_find.json").read_text())
    assert (run_dir / "lr_find.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    curve = record["curve"]
    assert record["explosion"] is not None and "stopped at step" in r.stdout
    assert len(curve) == record["steps"] == record["explosion"]["step"] + 1 < 16  # stopped before the end
    lrs = [p["lr"] for p in curve]
    assert math.isclose(lrs[0], 1e-4) and all(math.isclose(b / a, 10 ** (10 / 15)) for a, b in zip(lrs, lrs[1:]))
    assert math.isclose(suggested, record["min_loss_lr"] / 10, rel_tol=1e-2)
    assert record["min_loss_lr"] < record["explosion"]["lr"]

    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    run = client.get_run(record["mlflow_run_id"])
    assert run.info.status == "FINISHED" and run.data.tags["ds2exp.kind"] == "lr_find"
    assert math.isclose(float(run.data.tags["lr_find.suggested_lr"]), suggested, rel_tol=1e-2)
    assert {a.path for a in client.list_artifacts(run.info.run_id, "plots")} == {"plots/lr_find.png"}
    logged = client.get_metric_history(run.info.run_id, "lr_find/lr")
    assert len(logged) == len(curve)
    exp = client.get_experiment(run.info.experiment_id)
    assert exp.tags.get("mlflow.experimentKind") == "custom_model_development"
