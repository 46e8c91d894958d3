"""Score checkpoints: `python evaluate.py checkpoint=PATH dataset=synth_tiny decoder=beam`.

Several at once: `python evaluate.py checkpoints='[runA,runB/checkpoints/last.ckpt,<mlflow run id>]'`.
"""
import sys
from pathlib import Path

import ds2exp  # noqa: F401  (first: fixes the protobuf implementation before MindSpore/MLflow load)
import hydra
from omegaconf import DictConfig

from ds2exp.cli import ConfigValueError, preflight
from ds2exp.config import config_dir


def _check(cfg: DictConfig) -> None:
    if not cfg.checkpoint and not cfg.checkpoints:
        raise ConfigValueError("checkpoint", None, "a .ckpt file, a run directory or an MLflow run id")
    if cfg.split not in ("train", "val", "test"):
        raise ConfigValueError("split", cfg.split, "one of train, val, test")


@hydra.main(config_path=config_dir(), config_name="evaluate", version_base=None)
def main(cfg: DictConfig) -> None:
    import logging

    from hydra.core.hydra_config import HydraConfig

    from ds2exp.data.dataset import DatasetError
    from ds2exp.evaluation.compare import format_table, run_evaluation
    from ds2exp.training.checkpoint import CheckpointError
    from ds2exp.training.run import setup_mindspore

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    setup_mindspore(cfg.hardware, 0)
    out = Path(HydraConfig.get().runtime.output_dir)
    try:
        scores = run_evaluation(cfg, out)
    except (CheckpointError, DatasetError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(1)
    print(format_table(scores))
    print(f"per-utterance results: {out}")


if __name__ == "__main__":
    preflight(sys.argv[1:], config_name="evaluate", extra_check=_check)
    main()
