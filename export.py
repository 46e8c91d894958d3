"""Export a checkpoint and verify it: `python export.py checkpoint=PATH format=MINDIR`.

The MindIR takes any batch of any number of frames with their lengths (docs/deployment.md). It is
loaded back and run on real utterances of different lengths against the checkpoint's model; the
command fails if they differ by more than `tolerance` (1e-5).
"""
import sys

import ds2exp  # noqa: F401  (first: fixes the protobuf implementation before MindSpore/MLflow load)
import hydra
from omegaconf import DictConfig

from ds2exp.cli import preflight
from ds2exp.config import config_dir


@hydra.main(config_path=config_dir(), config_name="export", version_base=None)
def main(cfg: DictConfig) -> None:
    from ds2exp.data.dataset import DatasetError
    from ds2exp.export_model import ExportError, export_checkpoint
    from ds2exp.checkpoints.io import CheckpointError
    from ds2exp.runtime import setup_mindspore

    setup_mindspore(cfg.hardware, 0)
    try:
        res = export_checkpoint(cfg)
    except (ExportError, CheckpointError, DatasetError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(1)
    frames = "any number of" if res.frames is None else res.frames
    print(f"exported {res.path} in {res.export_seconds:.1f} s (input: batch x 161 x {frames} frames, "
          f"and lengths)")
    if res.max_abs_diff is None:
        print("not verified: MindSpore loads back only MindIR")
        return
    ok = res.max_abs_diff <= cfg.tolerance
    lengths = ", ".join(str(n) for n in res.lengths)
    print(f"verified on {res.utterances} utterances at {lengths} frames and as one padded batch "
          f"({res.verify_seconds:.1f} s): max |export - checkpoint| = {res.max_abs_diff:.3g} "
          f"({'OK' if ok else 'FAILED'}, tolerance {cfg.tolerance:g})")
    if not ok:
        sys.exit(1)


if __name__ == "__main__":
    preflight(sys.argv[1:], config_name="export")  # values, checkpoint files, output folders
    main()
