"""SIGKILL mid-run, then resume: explicitly (`resume=<run dir>`) and unattended (`trainer.auto_resume`).
The resumed run is the same run directory and MLflow run, and bitwise equal to an uninterrupted one."""
from __future__ import annotations

import json

import pytest

from bench.small_runs import SMALL
from tests.helpers.processes import assert_same_parameters, load_params, run, sigkill_after_checkpoint, start
from tests.helpers.tracking import history, mlflow_client, runs_of

STEPS = 16
KILL_RUN = SMALL + [f"trainer.max_steps={STEPS}", "trainer.checkpoint_every=4", "trainer.log_every=1",
                    "trainer.eval_every=8"]


@pytest.mark.slow
def test_sigkill_then_resume_continues_the_same_run_bitwise(tmp_path, synth_data_dir):
    """Kill -9 after the first checkpoint, resume: same MLflow run, every step logged, the weights
    bitwise equal to an uninterrupted run with the same seed."""
    ref_root, root = tmp_path / "ref", tmp_path / "killed"
    ref_dir, run_dir = ref_root / "outputs" / "run", root / "outputs" / "run"
    reference = start(ref_root, synth_data_dir, ref_dir, *KILL_RUN, "logger=none")  # in parallel
    victim = start(root, synth_data_dir, run_dir, *KILL_RUN)
    db = root / "mlflow.db"
    killed_at = sigkill_after_checkpoint(victim, run_dir, db, past_step=4)
    run_id = json.loads((run_dir / "tracking_state.json").read_text())["run_id"]
    assert json.loads((run_dir / "run_state.json").read_text())["status"] == "running"  # what SIGKILL leaves

    run(root, synth_data_dir, run_dir, *KILL_RUN, f"resume={run_dir}")
    assert reference.wait(timeout=600) == 0

    client = mlflow_client(f"sqlite:///{db}")
    runs = runs_of(client)
    assert [r.info.run_id for r in runs] == [run_id]  # the same run, reopened
    run_info = client.get_run(run_id)
    assert run_info.info.status == "FINISHED"
    resumed_from = int(run_info.data.tags["ds2exp.resumed_from_step"])
    assert 4 <= resumed_from < killed_at < STEPS
    loss = history(client, run_id, "train/loss")
    assert sorted(loss) == list(range(1, STEPS + 1))  # no gap
    replayed = {s for s, v in loss.items() if len(v) > 1}
    # Steps the killed process logged after its last checkpoint are logged again by the replay;
    # nothing else is duplicated, and the replayed values are the same numbers.
    assert replayed <= set(range(resumed_from + 1, killed_at + 1))
    assert all(len(v) <= 2 and v[0] == v[-1] for v in loss.values())
    assert sorted(history(client, run_id, "val/wer")) == [8, 16]
    state = json.loads((run_dir / "run_state.json").read_text())
    assert state["status"] == "finished" and state["resumes"] == 1
    assert_same_parameters(ref_dir, run_dir)


@pytest.mark.slow
def test_auto_resume_finds_the_killed_run_of_the_same_config(tmp_path, synth_data_dir):
    root = tmp_path
    first, second = root / "outputs" / "first", root / "outputs" / "second"
    overrides = [*KILL_RUN, "trainer.auto_resume=true"]
    victim = start(root, synth_data_dir, first, *overrides)
    sigkill_after_checkpoint(victim, first, root / "mlflow.db", past_step=4)
    run(root, synth_data_dir, second, *overrides)  # a new invocation, a new Hydra run dir
    assert "continued" in (second / "continued_in.txt").read_text() and str(first) in (
        second / "continued_in.txt").read_text()
    assert not (second / "checkpoints").exists()
    _, _, meta = load_params(first)
    assert meta["step"] == STEPS
    client = mlflow_client(f"sqlite:///{root / 'mlflow.db'}")
    runs = runs_of(client)
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    assert sorted(history(client, runs[0].info.run_id, "train/loss")) == list(range(1, STEPS + 1))


def test_claim_resumable_run_rules(tmp_path):
    """Only an interrupted run (status running/interrupted, lock free, readable checkpoint) with the
    same config fingerprint is claimed; a live one (lock held) never is."""
    import mindspore as ms  # noqa: F401

    from ds2exp.cli import check_overrides
    from ds2exp.training import recovery
    from ds2exp.checkpoints.io import save_checkpoint
    from tests.helpers.models import tiny_model

    cfg = check_overrides(["trainer.max_steps=10", f"paths.root_dir={tmp_path}"])
    other = check_overrides(["trainer.max_steps=10", "optimizer.lr=1e-3", f"paths.root_dir={tmp_path}"])
    launch = check_overrides(["trainer.max_steps=10", f"paths.root_dir={tmp_path}", "trainer.progress=false",
                              f"paths.cache_dir={tmp_path / 'elsewhere'}", "trainer.auto_resume=true"])
    assert recovery.config_fingerprint(cfg) == recovery.config_fingerprint(launch)  # paths/launch fields ignored
    assert recovery.config_fingerprint(cfg) != recovery.config_fingerprint(other)

    from omegaconf import OmegaConf

    def make(name, c, status):
        d = tmp_path / "outputs" / name
        meta = {"step": 3, "config": OmegaConf.to_container(c, resolve=True, enum_to_str=True)}
        save_checkpoint(d / "checkpoints" / "last.ckpt", tiny_model(), meta=meta)
        recovery.write_run_state(d, status=status, config_fingerprint=recovery.config_fingerprint(c))
        return d

    make("finished", cfg, "finished")
    make("other-config", other, "running")
    roots = [tmp_path / "outputs"]
    assert recovery.claim_resumable_run(cfg, roots) is None
    live = make("live", cfg, "running")
    held = recovery.RunLock(live).acquire()
    assert recovery.claim_resumable_run(cfg, roots) is None  # a live process owns it
    held.release()
    claim = recovery.claim_resumable_run(cfg, roots)
    assert claim is not None and claim[0] == live.resolve() and claim[1].meta["step"] == 3
    with pytest.raises(recovery.RunDirBusy, match="in use by another training process"):
        recovery.RunLock(live).acquire()  # the claim holds the lock
    claim[2].release()
    recovery.write_run_state(live, status="finished")
    # killed before its first checkpoint: claimed without one (restarted from step 0 in the same run dir)
    early = tmp_path / "outputs" / "early"
    recovery.write_run_state(early, status="running", config_fingerprint=recovery.config_fingerprint(cfg))
    claim = recovery.claim_resumable_run(cfg, roots)
    assert claim is not None and claim[0] == early.resolve() and claim[1] is None
    claim[2].release()
    # a half-written temporary checkpoint left by a kill is removed on resume
    (live / "checkpoints" / ".last.abc.tmp.ckpt").write_bytes(b"partial")
    assert [p.name for p in recovery.remove_partial_files(live)] == [".last.abc.tmp.ckpt"]
