"""evaluate.py on real checkpoints of a tiny model, compared side by side."""
import json
import os
import subprocess
import sys

import pytest

from tests.helpers import ROOT
from bench.small_runs import MICRO_BATCH4
from tests.helpers.processes import train
from tests.helpers.tracking import mlflow_runs


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, shared_data_dir):
    root = tmp_path_factory.mktemp("evalrun")
    train(root, shared_data_dir, "trainer.max_steps=6", "trainer.eval_every=3", "trainer.keep_best=2", *MICRO_BATCH4)
    return root, root / "outputs" / "run"


def evaluate(root, data_dir, *overrides, check=True):
    env = {**os.environ, "DS2EXP_ROOT": str(root)}
    r = subprocess.run([sys.executable, str(ROOT / "evaluate.py"), f"paths.data_dir={data_dir}",
                        f"hydra.run.dir={root}/outputs/eval", "dataset.max_utterances=12", *overrides],
                       capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
    if check:
        assert r.returncode == 0, r.stderr[-3000:]
    return r


def test_compare_two_checkpoints_table_files_and_mlflow(trained_run, shared_data_dir):
    root, run_dir = trained_run
    ckpts = sorted((run_dir / "checkpoints").glob("best-*.ckpt"))
    assert len(ckpts) == 2
    r = evaluate(root, shared_data_dir, f"checkpoints=[{ckpts[0]},{run_dir / 'checkpoints' / 'last.ckpt'}]",
                 "model.conv_channels=4")
    lines = r.stdout.splitlines()
    header = next(i for i, ln in enumerate(lines) if ln.startswith("checkpoint"))
    assert "WER %" in lines[header] and "decode ms/utt" in lines[header]
    rows = lines[header + 2: header + 4]
    assert len(rows) == 2 and "run/best-step" in rows[0] and "run/last" in rows[1]
    assert rows[1].split()[4] == "6"  # training step column of last.ckpt
    out = root / "outputs" / "eval"
    recs = [json.loads(x) for x in next(out.glob("*last.utterances.jsonl")).read_text().splitlines()]
    assert len(recs) == 12 and {"id", "reference", "hypothesis", "word_errors"} <= set(recs[0])
    assert (out / "comparison.png").stat().st_size > 1000
    client, runs = mlflow_runs(root)
    evals = [x for x in runs if x.data.tags.get("ds2exp.kind") == "evaluation"]
    assert len(evals) == 1
    assert {"eval/0/wer", "eval/1/wer", "eval/0/cer"} <= set(evals[0].data.metrics)


def test_evaluate_run_dir_links_training_run_and_beam_decoder(trained_run, shared_data_dir):
    root, run_dir = trained_run
    evaluate(root, shared_data_dir, f"checkpoint={run_dir}", "decoder=beam", "decoder.beam_width=8")
    client, runs = mlflow_runs(root)
    training = [x for x in runs if x.data.tags.get("ds2exp.kind") != "evaluation"][0]
    evals = [x for x in runs if x.data.tags.get("ds2exp.decoder") == "beam"]
    assert evals and evals[0].data.tags["ds2exp.training_run_id"] == training.info.run_id


@pytest.mark.slow
def test_evaluate_by_mlflow_run_id(trained_run, shared_data_dir):
    root, _ = trained_run
    client, runs = mlflow_runs(root)
    training = [x for x in runs if x.data.tags.get("ds2exp.kind") != "evaluation"][0]
    r = evaluate(root, shared_data_dir, f"checkpoint={training.info.run_id}")
    assert "run/best-step" in r.stdout


def test_missing_checkpoint_and_other_architecture_are_clear_errors(trained_run, shared_data_dir, tmp_path):
    root, run_dir = trained_run
    r = evaluate(root, shared_data_dir, check=False)
    assert r.returncode == 2 and "config error: checkpoint" in r.stderr
    r = evaluate(root, shared_data_dir, f"checkpoint={tmp_path / 'nope.ckpt'}", check=False)
    # refused by the preflight, before Hydra makes a run directory
    assert r.returncode == 2 and "config error: checkpoint=" in r.stderr and "nope.ckpt" in r.stderr


def export(root, data_dir, *overrides):
    env = {**os.environ, "DS2EXP_ROOT": str(root)}
    return subprocess.run([sys.executable, str(ROOT / "export.py"), f"paths.data_dir={data_dir}",
                           f"hydra.run.dir={root}/outputs/export", *overrides],
                          capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)


@pytest.mark.slow  # tests/test_export.py exports and verifies MindIR files in the default suite
def test_export_mindir_round_trip_within_tolerance(trained_run, shared_data_dir, tmp_path):
    import re

    root, run_dir = trained_run
    out = tmp_path / "model.mindir"
    r = export(root, shared_data_dir, f"checkpoint={run_dir / 'checkpoints' / 'last.ckpt'}", f"output={out}",
               "verify_utterances=3")
    assert r.returncode == 0, r.stderr[-3000:]
    assert out.stat().st_size > 10_000
    m = re.search(r"verified on 3 utterances at .*: max \|export - checkpoint\| = (\S+) \(OK", r.stdout)
    assert m and float(m.group(1)) <= 1e-5, r.stdout


def test_export_onnx_reports_mindspore_reason(trained_run, shared_data_dir):
    root, run_dir = trained_run
    r = export(root, shared_data_dir, f"checkpoint={run_dir}", "format=ONNX", "verify_utterances=1")
    assert r.returncode == 1
    assert "cannot export this model as ONNX" in r.stderr


def test_average_best_checkpoints(trained_run, tmp_path):
    import numpy as np

    from ds2exp.average import main as average_main
    from ds2exp.checkpoints.io import load_checkpoint

    _, run_dir = trained_run
    out = tmp_path / "avg.ckpt"
    assert average_main([str(run_dir), "--mode", "best", "--k", "2", "--out", str(out)]) == 0
    best = sorted((run_dir / "checkpoints").glob("best-*.ckpt"))
    a, b, avg = (load_checkpoint(p).model_state for p in (best[0], best[1], out))
    name = "RNN.lstms.0.weight_hh_l0"
    np.testing.assert_allclose(avg[name], (a[name] + b[name]) / 2, rtol=1e-6, atol=1e-7)
    assert not np.array_equal(a[name], b[name])


def test_empty_dataset_is_a_clear_error(trained_run, shared_data_dir, tmp_path):
    root, run_dir = trained_run
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    r = evaluate(root, shared_data_dir, f"checkpoint={run_dir}", "dataset=manifest",
                 f"dataset.train_manifest={empty}", f"dataset.test_manifest={empty}", check=False)
    assert r.returncode == 1
    assert f"error: {empty}: the manifest is empty" in r.stderr
