"""Checks of the files a command line names, before Hydra creates a run directory.

`check_inputs(cfg)` raises `ConfigValueError` (one line, naming the key) when a checkpoint, manifest
or language model named in the config is missing, of the wrong kind, damaged (see
`ds2exp.checkpoints.io.verify_checkpoint`), lacks what the command needs (`resume=` needs a
training state), or does not fit the model (`pretrained=`). Checkpoints are read without MindSpore
except for `pretrained=`, whose fit to the configured model is checked by building the model.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Optional

import numpy as np
from omegaconf import DictConfig

from ds2exp.config import ConfigValueError
from ds2exp.data.layout import describe_missing, missing_subsets

_RUN_ID = re.compile(r"^[0-9a-f]{32}$")
CHECKPOINT_KINDS = "a .ckpt file or a run directory holding checkpoints"


class InputError(ConfigValueError):
    """A named file exists but cannot be used; the message says why."""

    def __init__(self, key: str, value, why: str):
        ValueError.__init__(self, f"{key}={value!r}: {why}")
        self.key = key


def check_checkpoint(key: str, value: str, allow_run_id: bool = False, need_training_state: bool = False):
    """The CheckpointInfo of what `value` names (the newest intact one of a run directory); None for an
    MLflow run id (resolved by the command). Raises a one-line ConfigValueError otherwise."""
    kinds = CHECKPOINT_KINDS + (" or an MLflow run id" if allow_run_id else "")
    p = Path(str(value)).expanduser()
    if not p.exists():
        if allow_run_id and _RUN_ID.match(str(value)):
            return None
        raise ConfigValueError(key, value, "an existing checkpoint file or run directory"
                               + (" or an MLflow run id" if allow_run_id else ""))
    from ds2exp.checkpoints.io import CheckpointError, checkpoint_folder, select_checkpoint, verify_checkpoint

    if p.is_dir():
        info, damaged = select_checkpoint(p)
        if info is None:
            why = f" ({len(damaged)} damaged: {damaged[0][1]})" if damaged else ""
            raise InputError(key, value, f"no intact checkpoint in {checkpoint_folder(p)}{why}; expected {kinds}")
    elif not p.is_file():
        raise InputError(key, value, f"not a regular file; expected {kinds}")
    else:
        try:
            info = verify_checkpoint(p)
        except CheckpointError as exc:
            alt = _intact_neighbour(p) if p.suffix == ".ckpt" else None
            hint = f"; the newest intact one beside it is {alt.path.name} (step {alt.step})" if alt else ""
            raise InputError(key, value, f"{_strip_path(str(exc), p)}{hint}") from exc
    if need_training_state and (info.meta is None or info.step is None or "config" not in info.meta):
        raise InputError(key, value, f"{info.path} holds no ds2exp training state (step, config); "
                                     f"resume needs a checkpoint written by train.py")
    return info


def _strip_path(message: str, path: Path) -> str:
    return message[len(str(path)) + 2:] if message.startswith(f"{path}: ") else message


def _intact_neighbour(path: Path):
    from ds2exp.checkpoints.io import select_checkpoint

    try:
        info, _ = select_checkpoint(path.parent)
    except OSError:
        return None
    return info if info is not None and info.path != path else None


def check_pretrained_fits(cfg: DictConfig, info) -> None:
    """pretrained=: every model parameter present with the model's shape (names as load_state maps
    them), checked on a freshly built model from the tensor shapes the file lists."""
    from ds2exp.models.deepspeech2 import load_state
    from ds2exp.models.deepspeech2 import build_model_for_precision

    state = {name: np.broadcast_to(np.float32(0), shape) for name, shape in info.shapes.items()
             if not name.startswith("optimizer.") and name != "ds2exp_meta"}
    try:
        load_state(build_model_for_precision(cfg), state)
    except ValueError as exc:
        msg = " ".join(str(exc).split())
        raise InputError("pretrained", cfg.pretrained, f"{msg[:400]} (the model is model={cfg.model.name})") from exc


def _file(key: str, value: Optional[str], what: str) -> None:
    if value is None:
        return
    p = Path(str(value)).expanduser()
    if not p.exists():
        raise ConfigValueError(key, value, f"an existing {what}")
    if not p.is_file():
        raise InputError(key, value, f"is a {'directory' if p.is_dir() else 'special file'}; expected {what}")


def check_device(cfg: DictConfig) -> None:
    """hardware=gpu|ascend: the installed MindSpore build can use that device (asked in a child process).
    Only for a run on this machine: a SLURM sweep is composed on a login node and trains elsewhere."""
    from ds2exp.runtime import device_problem

    h = cfg.get("hardware")
    why = device_problem(h.device_target) if h is not None else None
    if why:
        raise InputError("hardware", h.get("name") or str(h.device_target), why)


def check_inputs(cfg: DictConfig) -> None:
    """Every file the config names; the keys present decide which command it is."""
    d = cfg.get("dataset")
    if d is not None:
        source = getattr(d.source, "value", d.source)
        if source == "manifest":
            for key in ("train_manifest", "val_manifest", "test_manifest"):
                _file(f"dataset.{key}", d.get(key), "manifest file (JSON-lines, deepspeech.pytorch JSON or zoo CSV)")
        elif source == "librispeech":
            root = Path(str(d.root))
            if not root.is_dir():
                raise ConfigValueError("dataset.root", str(d.root), "an existing folder holding LibriSpeech/<subset>/"
                                       " (or LibriSpeech/ itself) or manifests/<subset>.jsonl")
            subsets = [s for key in ("train_subsets", "val_subsets", "test_subsets") for s in (d.get(key) or [])]
            missing = missing_subsets(root, subsets)
            if missing:
                raise InputError("dataset.root", str(d.root), describe_missing(root, missing))
    dec = cfg.get("decoder")
    if dec is not None and dec.get("lm_path") is not None:
        _file("decoder.lm_path", dec.lm_path, "KenLM language model file (ARPA or binary)")
    if cfg.get("resume") is not None:
        check_checkpoint("resume", cfg.resume, need_training_state=True)
    if cfg.get("pretrained") is not None:
        check_pretrained_fits(cfg, check_checkpoint("pretrained", cfg.pretrained))
    evaluating = "decoder" in cfg  # evaluate.yaml; export.yaml has no decoder
    if "checkpoint" in cfg:
        if cfg.checkpoint is None and not cfg.get("checkpoints") and cfg.get("exported") is None:  # transcribe
            raise ConfigValueError("checkpoint", None, f"{CHECKPOINT_KINDS}" + (
                " or an MLflow run id (or checkpoints='[a,b]')" if evaluating else ""))
        refs = [("checkpoint", cfg.checkpoint)] if cfg.checkpoint is not None else []
        refs += [(f"checkpoints[{i}]", ref) for i, ref in enumerate(cfg.get("checkpoints") or [])]
        for key, ref in refs:
            if check_checkpoint(key, ref, allow_run_id=evaluating) is None:
                check_run_id(key, ref, cfg.get("logger"))


def check_run_id(key: str, value: str, logger_cfg) -> None:
    """An MLflow run id: the configured store has that run and its run directory a checkpoint."""
    from ds2exp.config import enum_value

    if logger_cfg is None or enum_value(logger_cfg.backend) != "mlflow":
        raise InputError(key, value, "an MLflow run id is looked up in the MLflow store, which logger=none turns "
                                     "off; give the run directory or .ckpt, or drop logger=none")
    uri = str(logger_cfg.tracking_uri)
    if uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///"):]).is_file():  # asking would create it
        raise InputError(key, value, f"not a file or run directory, and there is no MLflow store at {uri} to look "
                                     f"a run id up in")
    from ds2exp.checkpoints.io import CheckpointError
    from ds2exp.checkpoints.loading import locate_checkpoint

    try:
        locate_checkpoint(str(value), uri)
    except CheckpointError as exc:
        why = " ".join(str(exc).split())
        raise InputError(key, value, f"{why[:300]} (store: {uri})") from exc
