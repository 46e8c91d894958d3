"""Resume is bitwise whatever the thread settings: a run started on 2 threads and resumed on 1 (and
the reverse) ends with the parameters of an uninterrupted run, bit for bit. The kernels cut their
work into the same pieces for any thread count (ds2exp/kernels/settings.py), so OMP_NUM_THREADS,
DS2EXP_RNN_THREADS and the core count change only the speed."""
from __future__ import annotations

import pytest

from bench.small_runs import SMALL
from tests.helpers.processes import assert_same_parameters, run, sigkill_after_checkpoint, start, train_env

STEPS = 16
RUN = SMALL + [f"trainer.max_steps={STEPS}", "trainer.checkpoint_every=4", "trainer.log_every=1",
               "trainer.eval_every=100"]


def _threads(root, n: int):
    env = train_env(root, OMP_NUM_THREADS=str(n))
    env.pop("DS2EXP_RNN_THREADS", None)
    return env


@pytest.mark.slow
def test_resume_on_other_thread_settings_is_bitwise(tmp_path, synth_data_dir):
    ref_root = tmp_path / "ref"
    ref_dir = ref_root / "outputs" / "run"
    # the uninterrupted run on 2 threads
    # the limits are hang guards: the machine may be shared
    run(ref_root, synth_data_dir, ref_dir, *RUN, "logger=none", env=_threads(ref_root, 2), timeout=1800)
    for first, then in ((2, 1), (1, 2)):
        root = tmp_path / f"{first}to{then}"
        run_dir = root / "outputs" / "run"
        victim = start(root, synth_data_dir, run_dir, *RUN, env=_threads(root, first))
        sigkill_after_checkpoint(victim, run_dir, root / "mlflow.db", past_step=4)
        run(root, synth_data_dir, run_dir, *RUN, f"resume={run_dir}", env=_threads(root, then), timeout=1800)
        assert_same_parameters(ref_dir, run_dir)
