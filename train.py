"""Train a DeepSpeech2 model: `python train.py hardware=cpu optimizer.lr=1e-4`.

Sweeps: `python train.py -m optimizer.lr=1e-4,1e-3 dataset.batch_size=8,16` or a preset,
`python train.py -m +sweep=nan_lr_batch`; summarise with `python -m ds2exp.sweeps.report <sweep dir>`.
"""
import sys
from pathlib import Path

import ds2exp  # noqa: F401  (first: fixes the protobuf implementation before MindSpore/MLflow load)
import hydra
from omegaconf import DictConfig

from ds2exp.cli import EXIT_CONFIG_ERROR, preflight, resume_in_place
from ds2exp.config import config_dir


@hydra.main(config_path=config_dir(), config_name="train", version_base=None)
def main(cfg: DictConfig) -> float:
    from ds2exp.sweeps.job_runner import in_multirun, run_sweep_job
    from ds2exp.training.run import train_command, train_run

    if in_multirun():  # a crashed or diverged job is recorded as failed; the sweep goes on
        return run_sweep_job(cfg, train_run)
    status = train_command(cfg)  # prints how the run ended; a failure adds one `error:` line
    if status:  # 1 diverged or failed, 130 SIGINT, 143 SIGTERM
        sys.exit(status)


if __name__ == "__main__":
    from ds2exp.training import distributed

    if distributed.role() == "MS_SCHED":  # msrun's scheduler process runs this script too: it only serves
        distributed.run_scheduler()
        sys.exit(0)
    checked = preflight(sys.argv[1:])
    if checked is not None and checked.get("resume") and not any(
            a.startswith("hydra.run.dir=") or a in ("-m", "--multirun") for a in sys.argv[1:]):
        sys.argv += resume_in_place(checked.resume)  # the resumed session logs into the run it continues
    try:  # hardware.num_devices > 1: the same command again, under msrun
        status = distributed.relaunch_under_msrun(Path(__file__).resolve(), sys.argv[1:], checked)
    except ValueError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        sys.exit(EXIT_CONFIG_ERROR)
    except Exception as exc:  # noqa: BLE001 - e.g. the corpus cannot be prepared before the ranks start
        print(f"error: {' '.join(str(exc).split()) or type(exc).__name__}", file=sys.stderr)
        sys.exit(1)
    if status is not None:
        sys.exit(status)
    main()
