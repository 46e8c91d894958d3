"""From a reference to a model: the one `load_model`.

A reference is a .ckpt file, a run directory (its best checkpoint by the run's trainer.monitor,
else last.ckpt) or an MLflow run id (its `ds2exp.run_dir` tag). evaluate, transcribe and export
all load their model here.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, NamedTuple, Optional, Tuple

from omegaconf import OmegaConf

from ds2exp.checkpoints.names import LAST, LAST_PREV, RunDir
from ds2exp.checkpoints.io import CheckpointError, LoadedCheckpoint, load_checkpoint, model_config_for


class LoadedModel(NamedTuple):
    model: Any  # in inference mode
    checkpoint: LoadedCheckpoint
    why: Optional[str]  # which checkpoint of a run was taken and why; None for a file named directly


def locate_checkpoint(ref: str, tracking_uri: Optional[str] = None) -> Tuple[Path, Optional[str]]:
    """The checkpoint file a reference names, and the line saying why (None for a file)."""
    from ds2exp.checkpoints.best import choose_best

    p = Path(ref)
    if p.is_file():
        return p, None
    if p.is_dir():
        ckpt_dir = RunDir(p).checkpoint_folder
        best = choose_best(ckpt_dir)
        if best is not None:
            return best.path, best.describe()
        for name in (LAST, LAST_PREV):
            if (ckpt_dir / name).is_file():
                return ckpt_dir / name, f"using {name} (the run has no best checkpoint: no validation ran)"
        raise CheckpointError(f"no checkpoint in run directory {p}")
    if tracking_uri and len(ref) >= 16 and ref.isalnum():
        from mlflow.tracking import MlflowClient

        try:
            run = MlflowClient(tracking_uri).get_run(ref)
        except Exception as exc:
            raise CheckpointError(f"{ref}: not a file, a run directory or an MLflow run id ({exc})") from exc
        run_dir = run.data.tags.get("ds2exp.run_dir")
        if not run_dir:
            raise CheckpointError(f"MLflow run {ref} has no ds2exp.run_dir tag")
        return locate_checkpoint(run_dir)
    raise CheckpointError(f"checkpoint not found: {ref} (expected a .ckpt file, a run directory or an MLflow run id)")


def resolve_checkpoint(ref: str, tracking_uri: Optional[str] = None,
                       announce: Optional[Callable[[str], None]] = None) -> Path:
    """The checkpoint file of `ref` (see locate_checkpoint); `announce` gets the why line, if any."""
    path, why = locate_checkpoint(ref, tracking_uri)
    if why and announce:
        announce(why)
    return path


def build_from_checkpoint(loaded: LoadedCheckpoint, fallback_model_cfg, impl: Optional[str] = None):
    """The checkpoint's model (its stored model config, else `fallback_model_cfg`), in inference mode;
    `impl` overrides conv_impl and rnn_impl."""
    from ds2exp.models.deepspeech2 import build_model, load_state

    model_cfg = model_config_for(loaded, fallback_model_cfg)
    if model_cfg is None:
        raise ValueError(f"{loaded.path} carries no model config (a model zoo checkpoint?); score it with "
                         f"evaluate.py model=... or export it with export.py model=...")
    mcfg = OmegaConf.create(OmegaConf.to_container(model_cfg, enum_to_str=True))
    if impl:
        mcfg.conv_impl = impl
        mcfg.rnn_impl = impl
    model = build_model(mcfg)
    load_state(model, loaded.model_state)
    model.set_train(False)
    return model


def load_model(ref: str, fallback_model_cfg=None, tracking_uri: Optional[str] = None,
               impl: Optional[str] = None) -> LoadedModel:
    """Resolve `ref`, read and check the checkpoint, build its model."""
    path, why = locate_checkpoint(ref, tracking_uri)
    loaded = load_checkpoint(path)
    return LoadedModel(build_from_checkpoint(loaded, fallback_model_cfg, impl), loaded, why)
