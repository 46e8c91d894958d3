"""ds2exp.checkpoints.names.RunDir: the run directory's file names, and which files hold a training state."""
from __future__ import annotations

from ds2exp.checkpoints.names import RunDir


def test_run_dir_of_a_run_its_folder_or_a_checkpoint(tmp_path):
    run = tmp_path / "outputs" / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "last.ckpt").write_bytes(b"x")
    for ref in (run, run / "checkpoints", run / "checkpoints" / "last.ckpt"):
        assert RunDir.of(ref).path == run
    rd = RunDir(run)
    assert rd.last == run / "checkpoints" / "last.ckpt" and rd.last_prev.name == "last.prev.ckpt"
    assert rd.checkpoint_folder == run / "checkpoints" and rd.has_training_state()
    loose = tmp_path / "loose"
    loose.mkdir()
    assert RunDir(loose).checkpoint_folder == loose and not RunDir(loose).has_training_state()


def test_training_checkpoints_are_last_best_then_last_prev(tmp_path):
    rd = RunDir(tmp_path)
    rd.checkpoints.mkdir()
    names = ["last.prev.ckpt", "best-step0000200-cer58.12.ckpt", "averaged-best3.ckpt", "last.ckpt",
             ".last.ckpt.x1.tmp.ckpt", "best-step0000100-cer60.00.ckpt"]
    for n in names:
        (rd.checkpoints / n).write_bytes(b"x")
    assert [p.name for p in rd.training_checkpoints()] == [
        "last.ckpt", "best-step0000100-cer60.00.ckpt", "best-step0000200-cer58.12.ckpt", "last.prev.ckpt"]
    assert [p.name for p in rd.best()] == ["best-step0000100-cer60.00.ckpt", "best-step0000200-cer58.12.ckpt"]
