"""Train a DeepSpeech2 model: `python train.py hardware=cpu optimizer.lr=1e-4`.

Sweeps: `python train.py -m optimizer.lr=1e-4,1e-3 dataset.batch_size=8,16` or a preset,
`python train.py -m +sweep=nan_lr_batch`; summarise with `python -m ds2exp.sweep_report <sweep dir>`.
"""
import sys

import ds2exp  # noqa: F401  (first: fixes the protobuf implementation before MindSpore/MLflow load)
import hydra
from omegaconf import DictConfig

from ds2exp.cli import preflight
from ds2exp.config import config_dir


@hydra.main(config_path=config_dir(), config_name="train", version_base=None)
def main(cfg: DictConfig) -> float:
    from ds2exp.tracking.sweep_job import in_multirun, run_sweep_job
    from ds2exp.training.run import run_training

    if in_multirun():  # a crashed or diverged job is recorded as failed; the sweep goes on
        return run_sweep_job(cfg, run_training)
    from ds2exp.training.checkpoint import CheckpointError
    from ds2exp.training.recovery import RunDirBusy

    try:
        return run_training(cfg)
    except (CheckpointError, RunDirBusy) as exc:  # disk full, damaged checkpoint, run dir in use: one line
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    preflight(sys.argv[1:])
    main()
