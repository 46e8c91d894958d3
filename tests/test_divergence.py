"""Divergence before NaN: a finite loss/grad-norm explosion is detected, skipped and handled by the
same skip/stop/rollback policy and diagnosis as non-finite steps (real MindSpore training)."""
import json
import math

import numpy as np
import pytest
from omegaconf import OmegaConf

from ds2exp.tracking import make_tracker
from ds2exp.training.divergence import ExplosionDetector
from ds2exp.training.progress import estimated_total
from ds2exp.training.state import TrainingStopped
from bench.small_runs import MICRO_BATCH4
from tests.helpers.processes import train
from tests.helpers.tracking import mlflow_runs
from tests.helpers.trainers import make_trainer


def detector(**kw):
    cfg = {"enabled": True, "factor": 20.0, "window": 5, "min_history": 1, "patience": 3, "max_loss": 1e5,
           "check_grad_norm": True, **kw}
    return ExplosionDetector(OmegaConf.create(cfg))


def test_detector_flags_a_loss_far_above_the_median_of_good_steps_only():
    d = detector()
    assert d.check(300.0, 50.0) is None  # nothing to compare with yet, and under max_loss
    for loss in (300.0, 250.0, 280.0, 5000.0, 260.0):  # one odd batch in the window barely moves the median
        d.accept(loss, 50.0)
    assert d.medians() == (280.0, 50.0)
    assert d.check(280.0 * 19, 50.0) is None
    e = d.check(280.0 * 21, 50.0)
    assert e["signal"] == "loss" and e["ratio"] == pytest.approx(21) and "median 280" in e["why"]
    # exploded steps never enter the window: the reference stays the pre-explosion state
    assert d.medians() == (280.0, 50.0)


def test_detector_grad_norm_max_loss_min_history_and_off():
    d = detector(min_history=3)
    d.accept(100.0, 10.0)
    d.accept(90.0, 12.0)
    assert d.check(100.0, 1e4) is None  # fewer than min_history good steps: no relative check
    d.accept(95.0, 11.0)
    assert d.check(100.0, 1e4)["signal"] == "grad_norm"
    # the absolute cap needs no history (the relative checks are reported first when both fire)
    assert detector(min_history=10).check(2e5, 11.0)["signal"] == "max_loss"
    assert d.check(2e5, 11.0)["signal"] == "loss"
    assert detector(check_grad_norm=False, min_history=1).check(100.0, 1e9) is None
    off = detector(enabled=False)
    off.accept(1.0, 1.0)
    assert off.check(1e9, 1e9) is None
    assert d.check(float("inf"), 1.0) is None  # non-finite steps are the non-finite path's business


def test_progress_total_counts_toward_the_time_limit():
    # 10 steps in 10 s with 100 s left: the run ends near step 110, not at the 20,080-step limit
    assert estimated_total(10, 20080, 0, 10.0, 100.0) == 110
    assert estimated_total(10, 50, 0, 10.0, 100.0) == 50  # the step limit comes first
    assert estimated_total(0, 20080, 0, 0.0, 600.0) == 20080  # no rate measured yet
    assert estimated_total(30, 20080, 0, 10.0, -5.0) == 30  # past the deadline: ends here


# ---------------------------------------------------------------- in process, real MindSpore
# (the spoken_manifest fixture: tests/conftest.py)
def weights(trainer):
    return {p.name: p.asnumpy().copy() for p in trainer.model.trainable_params()}


def test_stop_policy_stops_an_exploding_run_with_first_bad_and_diverged_steps(tmp_path, spoken_manifest):
    tr = make_trainer(tmp_path, spoken_manifest, "optimizer.lr=1e3", "trainer.max_steps=12", "trainer.nonfinite=stop")
    with pytest.raises(TrainingStopped) as stop:
        tr.fit()
    d = stop.value.diagnosis
    s = tr.state
    assert d["cause"] == "loss_explosion" and d["explosion"]["signal"] in ("loss", "grad_norm", "max_loss")
    assert s.nonfinite_steps == 0 and s.exploded_steps == 3 == s.anomalous_steps  # patience 3, all finite
    assert d["diverged_at_step"] == d["step"] == s.step == d["first_bad_step"] + 2
    assert math.isfinite(d["loss"]) and "3 in a row, policy stop" in d["summary"]
    # every step's loss is in the history, exploded ones included, so the chart shows the explosion
    assert s.history["step"] == list(range(1, s.step + 1))
    first_bad = d["first_bad_step"]
    assert min(s.history["loss"][first_bad - 1:]) > 20 * s.history["loss"][0]


def test_exploded_steps_leave_the_weights_as_they_were(tmp_path, spoken_manifest):
    tr = make_trainer(tmp_path, spoken_manifest, "optimizer.lr=1e3", "trainer.max_steps=12", "trainer.nonfinite=skip",
                      "trainer.nonfinite_patience=4")
    snapshots = []
    original = tr.train_step

    def recording_step(batch):  # the real step; the weights are read after it
        res = original(batch)
        snapshots.append((res.good, weights(tr)))
        return res

    tr.train_step = recording_step
    with pytest.raises(TrainingStopped) as stop:
        tr.fit()
    d = stop.value.diagnosis
    assert d["cause"] == "loss_explosion" and d["diverged_at_step"] == d["first_bad_step"] + 3  # skip: patience 4
    goods = [g for g, _ in snapshots]
    first_bad = goods.index(False)
    assert first_bad >= 1 and not any(goods[first_bad:])
    last_good = snapshots[first_bad - 1][1]
    for _, w in snapshots[first_bad:]:
        for name, value in last_good.items():
            np.testing.assert_array_equal(value, w[name], err_msg=name)


def test_rollback_handles_an_explosion_then_stops_after_max_rollbacks(tmp_path, spoken_manifest):
    tr = make_trainer(tmp_path, spoken_manifest, "optimizer.lr=1e3", "trainer.max_steps=20",
                      "trainer.nonfinite=rollback", "trainer.nonfinite_patience=3", "trainer.max_rollbacks=1",
                      "trainer.checkpoint_every=1000")
    with pytest.raises(TrainingStopped) as stop:
        tr.fit()
    d = stop.value.diagnosis
    s = tr.state
    assert d["cause"] == "loss_explosion" and s.rollbacks == 1 and s.lr_factor == 0.5
    # rolled back to the step-0 checkpoint, exploded again at lr 500: counts survive the rollback
    assert s.exploded_steps == 6 and s.first_bad_step == d["first_bad_step"] < d["diverged_at_step"]


def test_safe_lr_trains_without_anomaly_and_logs_real_batch_losses(tmp_path, spoken_manifest):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    cfg = OmegaConf.create({"backend": "mlflow", "tracking_uri": uri, "experiment_name": "t", "run_name": "safe",
                            "log_checkpoint": False})
    tracker = make_tracker(cfg, run_name="safe")
    tr = make_trainer(tmp_path, spoken_manifest, "optimizer.lr=1e-3", "trainer.max_steps=6", "trainer.log_every=3",
                      tracker=tracker)
    tr.fit()
    tracker.end("FINISHED")
    s = tr.state
    assert s.anomalous_steps == 0 and s.first_bad_step is None
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    run = client.get_run(tracker.run_id)
    assert "first_bad_step" not in run.data.tags
    logged = {m.step: m.value for m in client.get_metric_history(tracker.run_id, "train/loss")}
    assert logged == {3: pytest.approx(s.history["loss"][2]), 6: pytest.approx(s.history["loss"][5])}
    mx = {m.step: m.value for m in client.get_metric_history(tracker.run_id, "train/loss_max")}
    mean = {m.step: m.value for m in client.get_metric_history(tracker.run_id, "train/loss_mean")}
    window = s.history["loss"][3:6]  # steps 4-6, across an epoch boundary (2 batches per epoch)
    assert mx[6] == pytest.approx(max(window)) and mean[6] == pytest.approx(np.mean(window))


# ---------------------------------------------------------------- train.py, MLflow store
def test_train_py_huge_lr_ends_diverged_with_loss_explosion(tmp_path, shared_data_dir):
    r = train(tmp_path, shared_data_dir, "optimizer.lr=1e3", "trainer.max_steps=40", "trainer.nonfinite=stop",
              *MICRO_BATCH4, check=False)
    assert r.returncode == 1, r.stderr[-3000:]
    client, runs = mlflow_runs(tmp_path)
    run = runs[0]
    tags = run.data.tags
    assert run.info.status == "FAILED" and tags["divergence_cause"] == "loss_explosion"
    first, at = int(tags["first_bad_step"]), int(tags["diverged_at_step"])
    assert 1 <= first < at < 40
    assert "first_nonfinite_group" not in tags and "None" not in tags.values()  # an explosion names no layer group
    note = tags["mlflow.note.content"]  # the run's description: the end-of-run summary, then the diagnosis
    assert f"diverged at step {at}: loss_explosion, first bad step {first}" in note
    assert "**Diagnosis** (diagnosis.txt)" in note and "cause: loss_explosion" in note
    run_dir = tmp_path / "outputs" / "run"
    d = json.loads((run_dir / "diagnosis.json").read_text())
    assert (d["first_bad_step"], d["diverged_at_step"], d["cause"]) == (first, at, "loss_explosion")
    text = (run_dir / "diagnosis.txt").read_text()
    assert f"first anomalous step: {first}" in text and f"diverged at step: {at}" in text
    arts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"diagnosis.json", "diagnosis.txt"} <= arts
    assert (run_dir / "curves.png").stat().st_size > 0
    assert client.get_metric_history(run.info.run_id, "train/exploded_steps")[-1].value == at - first + 1
