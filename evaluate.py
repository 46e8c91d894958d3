"""Score checkpoints: `python evaluate.py checkpoint=PATH dataset=synth_tiny decoder=beam`.

Several at once: `python evaluate.py checkpoints='[runA,runB/checkpoints/last.ckpt,<mlflow run id>]'`.
"""
import sys
from pathlib import Path

import ds2exp  # noqa: F401  (first: fixes the protobuf implementation before MindSpore/MLflow load)
import hydra
from omegaconf import DictConfig

from ds2exp.cli import preflight
from ds2exp.config import ConfigValueError, config_dir, enum_value


def _check(cfg: DictConfig) -> None:
    if enum_value(cfg.compat) == "zoo" and enum_value(cfg.decoder.name) != "greedy":
        raise ConfigValueError("decoder", enum_value(cfg.decoder.name), "greedy with compat=zoo (the model zoo's "
                                                                        "eval.py decodes greedily)")


@hydra.main(config_path=config_dir(), config_name="evaluate", version_base=None)
def main(cfg: DictConfig) -> None:
    import logging

    from hydra.core.hydra_config import HydraConfig

    from ds2exp.data.dataset import DatasetError
    from ds2exp.evaluation.compare import format_table, run_evaluation
    from ds2exp.checkpoints.io import CheckpointError
    from ds2exp.runtime import setup_mindspore

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
    preflight(sys.argv[1:], config_name="evaluate", extra_check=_check)  # values, checkpoint files, output folders
    main()
