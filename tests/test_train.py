"""Real training runs (MindSpore, synthesised audio, an MLflow SQLite store)."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from bench.small_runs import MICRO_BATCH4, SMALL
from tests.helpers.processes import train
from tests.helpers.tracking import mlflow_runs


def test_acceptance_train_20_steps_logs_everything_to_mlflow(tmp_path, shared_data_dir):
    train(tmp_path, shared_data_dir, "hardware=cpu", "optimizer.lr=1e-4", "trainer.max_steps=20",
          "trainer.log_every=5", "trainer.eval_every=10", "trainer.max_eval_utterances=24")
    client, runs = mlflow_runs(tmp_path)
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED"
    for name in ("train/loss", "train/lr", "train/grad_norm", "train/loss_scale", "train/nonfinite_steps",
                 "train/utt_per_s", "train/audio_s_per_s", "val/loss", "val/wer", "val/cer"):
        assert name in run.data.metrics, name
    history = client.get_metric_history(run.info.run_id, "train/loss")
    assert [m.step for m in history] == [5, 10, 15, 20]
    assert all(np.isfinite(m.value) and m.value > 0 for m in history)
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val/wer")] == [10, 20]
    lr = client.get_metric_history(run.info.run_id, "train/lr")
    assert all(abs(m.value - 1e-4) < 1e-12 for m in lr)
    p = run.data.params
    assert p["optimizer.lr"] == "0.0001" and p["hardware.device_target"] == "CPU"
    assert p["mindspore_version"] == "2.8.0" and p["device"] == "CPU" and len(p["git_commit"]) >= 4
    arts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config", "samples", "plots", "checkpoints"} <= arts
    ckpts = client.list_artifacts(run.info.run_id, "checkpoints")
    assert ckpts and ckpts[0].file_size > 100_000
    resolved = Path(client.download_artifacts(run.info.run_id, "config/resolved.yaml", str(tmp_path)))
    assert "lr: 0.0001" in resolved.read_text()
    run_dir = tmp_path / "outputs" / "run"
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    assert run.data.tags["ds2exp.run_dir"] == str(run_dir)


def _params(path: Path):
    from ds2exp.checkpoints.io import load_checkpoint

    c = load_checkpoint(path)
    return c.model_state, c.optimizer_state, c.meta


@pytest.mark.slow
def test_resume_continues_exactly(tmp_path, shared_data_dir):
    a, b = tmp_path / "a", tmp_path / "b"
    common = SMALL + ["trainer.eval_every=4", "trainer.checkpoint_every=2", "trainer.log_every=2"]
    train(a, shared_data_dir, "trainer.max_steps=8", *common)
    train(b, shared_data_dir, "trainer.max_steps=4", *common)
    run_b = b / "outputs" / "run"
    env_resume = ["trainer.max_steps=8", f"resume={run_b}"]
    train(b, shared_data_dir, *env_resume, *common)
    ma, oa, meta_a = _params(a / "outputs" / "run" / "checkpoints" / "last.ckpt")
    mb, ob, meta_b = _params(run_b / "checkpoints" / "last.ckpt")
    assert meta_a["step"] == meta_b["step"] == 8
    assert set(ma) == set(mb)
    for k in ma:  # CPU kernels are deterministic for a fixed seed: bitwise equal
        np.testing.assert_array_equal(ma[k], mb[k], err_msg=k)
    for k in oa:
        np.testing.assert_array_equal(oa[k], ob[k], err_msg=k)
    # the resumed run is the same MLflow run, its metrics continuing from step 4
    client, runs = mlflow_runs(b)
    assert len(runs) == 1
    steps = [m.step for m in client.get_metric_history(runs[0].info.run_id, "train/loss")]
    assert steps == [2, 4, 6, 8]


def test_logger_none_writes_no_store(tmp_path, shared_data_dir):
    train(tmp_path, shared_data_dir, "logger=none", "trainer.max_steps=2", *MICRO_BATCH4)
    assert not (tmp_path / "mlflow.db").exists()
    assert (tmp_path / "outputs" / "run" / "checkpoints" / "last.ckpt").is_file()


@pytest.mark.parametrize("optimizer", [pytest.param("adamw", marks=pytest.mark.slow), "sgd"])  # adamw: Adam's path
def test_other_optimizers_and_schedules_train(tmp_path, shared_data_dir, optimizer):
    train(tmp_path, shared_data_dir, f"optimizer={optimizer}", "trainer.max_steps=3", "logger=none", *MICRO_BATCH4)
    from ds2exp.checkpoints.io import load_checkpoint

    meta = load_checkpoint(tmp_path / "outputs" / "run").meta
    assert meta["step"] == 3 and meta["config"]["optimizer"]["name"] == optimizer


@pytest.mark.slow
def test_fp16_trains_with_dynamic_loss_scale(tmp_path, shared_data_dir):
    r = train(tmp_path, shared_data_dir, "precision=fp16", "trainer.max_steps=3", "trainer.log_every=1", *MICRO_BATCH4)
    assert "using the plain MindSpore kernels" in r.stdout + r.stderr
    client, runs = mlflow_runs(tmp_path)
    scale = client.get_metric_history(runs[0].info.run_id, "train/loss_scale")
    assert [m.value for m in scale] == [1024.0, 1024.0, 1024.0]
    losses = client.get_metric_history(runs[0].info.run_id, "train/loss")
    assert all(np.isfinite(m.value) for m in losses)


def test_bf16_on_cpu_is_a_config_error(tmp_path, shared_data_dir):
    r = train(tmp_path, shared_data_dir, "precision=bf16", check=False)
    assert r.returncode == 2
    assert "no bfloat16 CPU kernels" in r.stderr and len(r.stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_time_limited_cosine_decays_over_max_minutes(tmp_path, shared_data_dir):
    # 20,000 planned steps would barely start the cosine; a 15-second budget carries it to its floor
    train(tmp_path, shared_data_dir, "trainer.max_minutes=0.25", "trainer.max_steps=20000", "trainer.log_every=1",
          "trainer.eval_every=100000", "optimizer.lr=1e-3", "optimizer.schedule=warmup_cosine",
          "optimizer.warmup_steps=2", "optimizer.min_lr_ratio=0.1", *MICRO_BATCH4)
    summary = json.loads((tmp_path / "outputs" / "run" / "summary.json").read_text())
    assert summary["stop_reason"] == "max_minutes"
    client, runs = mlflow_runs(tmp_path)
    history = sorted(client.get_metric_history(runs[0].info.run_id, "train/lr"), key=lambda m: m.step)
    assert [m.step for m in history] == list(range(1, int(summary["step"]) + 1))  # every step logged
    lr, logged_ms = [m.value for m in history], [m.timestamp for m in history]
    assert lr[:2] == pytest.approx([5e-4, 1e-3][:len(lr)])  # the linear warm-up, done at step 2
    floor, budget_ms = 1e-4, 0.25 * 60_000

    def cosine(progress):
        return floor + (1e-3 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    # How many steps fit in the budget depends on the machine; how far the cosine is at each step does not:
    # the lr of step i + 1 was set after step i was logged, at least (logged_ms[i - 1] - logged_ms[0]) into
    # the budget (which began before step 1), so the cosine is at least that far along, not (i - 2) / 19,998
    # of the way as the 20,000 steps alone would have it; and it never goes up or below its floor.
    for i in range(2, len(lr)):
        assert floor - 1e-12 <= lr[i] <= lr[i - 1] + 1e-12, (i, lr[i - 1], lr[i])
        assert lr[i] <= cosine((logged_ms[i - 1] - logged_ms[0]) / budget_ms) + 1e-12, (i, lr[i], logged_ms)
