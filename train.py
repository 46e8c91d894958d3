"""Train a DeepSpeech2 model: `python train.py hardware=cpu optimizer.lr=1e-4`.

Sweeps: `python train.py -m optimizer.lr=1e-4,1e-3 dataset.batch_size=8,16` or a preset,
`python train.py -m +sweep=nan_lr_batch`; summarise with `python -m ds2exp.sweep_report <sweep dir>`.
"""
import sys
from pathlib import Path

import ds2exp  # noqa: F401  (first: fixes the protobuf implementation before MindSpore/MLflow load)
import hydra
from omegaconf import DictConfig

from ds2exp.cli import preflight
from ds2exp.config import config_dir


@hydra.main(config_path=config_dir(), config_name="train", version_base=None)
def main(cfg: DictConfig) -> float:
    from ds2exp.tracking.sweep_job import in_multirun, run_sweep_job
    from ds2exp.training.run import run_training, train_command

    if in_multirun():  # a crashed or diverged job is recorded as failed; the sweep goes on
        return run_sweep_job(cfg, run_training)
    from ds2exp.training.checkpoint import CheckpointError
    from ds2exp.training.recovery import RunDirBusy

    try:
        status = train_command(cfg)  # prints how the run ended
    except (CheckpointError, RunDirBusy) as exc:  # disk full, damaged checkpoint, run dir in use: one line
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(1)
    if status:  # 1 diverged, 130 SIGINT, 143 SIGTERM
        sys.exit(status)


def _launch_data_parallel(argv, cfg) -> None:
    """hardware.num_devices > 1 outside msrun: run this same command under msrun (one worker per
    device) and exit with its status. `cfg`: the config preflight composed."""
    from ds2exp.cli import EXIT_CONFIG_ERROR
    from ds2exp.training import distributed

    if cfg is None or any(a.split("=", 1)[0] in ("--cfg", "-c", "--info", "-i") for a in argv):
        return
    if int(cfg.hardware.num_devices) <= 1:
        return
    if any(a in ("-m", "--multirun") for a in argv):
        print("config error: hardware.num_devices > 1 cannot be swept (-m); launch data-parallel runs one at a time",
              file=sys.stderr)
        sys.exit(EXIT_CONFIG_ERROR)
    sys.exit(distributed.launch(Path(__file__).resolve(), argv, cfg))


if __name__ == "__main__":
    from ds2exp.training.distributed import role, run_scheduler

    if role() == "MS_SCHED":  # msrun's scheduler process runs this script too: it only serves the cluster
        run_scheduler()
        sys.exit(0)
    checked = preflight(sys.argv[1:])
    if role() is None:
        _launch_data_parallel(sys.argv[1:], checked)
    main()
