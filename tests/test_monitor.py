"""Best means best: checkpoints ranked by trainer.monitor, named by its value, chosen with a reason;
curves.png of short runs (real MindSpore checkpoints, real matplotlib)."""
import warnings

import numpy as np
import pytest

from ds2exp.evaluation.compare import resolve_checkpoint
from ds2exp.training.eval_pass import EvalResult
from ds2exp.tracking.plots import plot_curves
from ds2exp.checkpoints.best import best_filename, choose_best
from ds2exp.checkpoints.io import save_checkpoint
from tests.helpers import ROOT
from tests.helpers.trainers import make_trainer


def result(wer, cer, loss=50.0):
    return EvalResult(loss=loss, wer=wer, cer=cer, num_utterances=8)


def test_cer_monitor_keeps_and_picks_the_lower_cer_over_a_wer_tie(tmp_path, spoken_manifest):
    tr = make_trainer(tmp_path, spoken_manifest, "trainer.keep_best=2")
    for step, wer, cer in ((100, 100.0, 97.0), (200, 100.0, 58.12), (300, 101.0, 60.0), (400, 100.0, 99.0)):
        tr.state.step = step
        tr.save_best(result(wer, cer))
    ckpts = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in ckpts.glob("best-*.ckpt")) == ["best-step0000200-cer58.12.ckpt",
                                                                 "best-step0000300-cer60.00.ckpt"]
    assert [b["step"] for b in tr.state.best] == [200, 300]
    assert tr.state.best[0]["val_wer"] == 100.0 and tr.state.best[0]["monitor"] == "val/cer"
    choice = choose_best(tmp_path / "run")
    assert choice.step == 200 and choice.value == pytest.approx(58.12)
    assert choice.describe() == "using best-step0000200-cer58.12.ckpt (lowest val/cer 58.12% of 2 best checkpoints)"
    lines = []
    assert resolve_checkpoint(str(tmp_path / "run"), announce=lines.append) == choice.path
    assert lines == [choice.describe()]


def test_wer_monitor_and_loss_monitor_names(tmp_path, spoken_manifest):
    tr = make_trainer(tmp_path / "w", spoken_manifest, "trainer.monitor=val/wer", "trainer.keep_best=1")
    for step, wer, cer in ((100, 100.0, 97.0), (200, 100.0, 58.0)):
        tr.state.step = step
        tr.save_best(result(wer, cer))
    # a tie in the monitored value goes to the later step
    kept = [p.name for p in (tmp_path / "w" / "run" / "checkpoints").glob("best-*")]
    assert kept == ["best-step0000200-wer100.00.ckpt"]
    assert best_filename(7, "val/loss", 123.456) == "best-step0000007-loss123.46.ckpt"


def test_old_run_dirs_are_ranked_by_the_wer_in_their_names(tmp_path, spoken_manifest):
    tr = make_trainer(tmp_path, spoken_manifest)
    ckpts = tmp_path / "old" / "checkpoints"
    for name in ("best-step0000100-wer97.10.ckpt", "best-step0000200-wer98.50.ckpt"):
        save_checkpoint(ckpts / name, tr.model, None, {"step": int(name[9:16])})  # no monitor in the meta
    save_checkpoint(ckpts / "last.ckpt", tr.model, None, {"step": 200})
    choice = choose_best(tmp_path / "old")
    assert choice.path.name == "best-step0000100-wer97.10.ckpt"
    assert choice.reason == "lowest val/wer 97.10% of 2 best checkpoints"
    lines = []
    only_last = tmp_path / "nobest" / "checkpoints"
    save_checkpoint(only_last / "last.ckpt", tr.model, None, {"step": 3})
    assert resolve_checkpoint(str(tmp_path / "nobest"), announce=lines.append).name == "last.ckpt"
    assert "no best checkpoint" in lines[0]
    assert choose_best(tmp_path / "nobest") is None


def test_transcribe_says_which_checkpoint_it_took(tmp_path, spoken_manifest):
    import subprocess
    import sys

    tr = make_trainer(tmp_path, spoken_manifest)
    tr.state.step = 5
    tr.save_best(result(100.0, 80.0))
    audio = spoken_manifest.parent / "u0.flac"
    # its own process: transcribe sets the MindSpore device, which a process can do only once
    r = subprocess.run([sys.executable, "-m", "ds2exp.transcribe", f"checkpoint={tmp_path / 'run'}",
                        f"audio=[{audio}]"], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    err = r.stderr
    assert "using best-step0000005-cer80.00.ckpt (lowest val/cer 80.00% of 1 best checkpoint)" in err


def _blue_pixels(png):
    import matplotlib.image as mpimg

    img = mpimg.imread(str(png))[..., :3]
    blue = np.array([0x1F, 0x77, 0xB4]) / 255.0  # matplotlib's first colour (tab:blue)
    return int((np.abs(img - blue).sum(axis=-1) < 0.05).sum())


def test_curves_of_a_one_step_run_show_the_point_without_warnings(tmp_path):
    history = {"step": [1], "loss": [312.5], "grad_norm": [40.0], "val_step": [], "val_wer": [], "val_cer": [],
               "val_loss": []}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # matplotlib's "No artists with labels" legend warning included
        png = plot_curves(history, tmp_path / "curves.png")
    assert _blue_pixels(png) > 20  # a marker, not an empty panel (a lone point has no line)
    history = {"step": [1, 2, 3], "loss": [300.0, 1.6e6, float("nan")], "val_step": [], "val_wer": [],
               "val_cer": [], "val_loss": []}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert plot_curves(history, tmp_path / "diverged.png", first_bad_step=2, diverged_at_step=3).is_file()
    assert plot_curves({"step": []}, tmp_path / "none.png") is None
