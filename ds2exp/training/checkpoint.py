"""Checkpoints: model + optimizer state + training position + resolved config, written atomically.

Format: MindSpore's own `.ckpt` (protobuf, no pickle), so MindSpore tools read it and the
model zoo's checkpoints load through the same path. Model parameters keep their names;
optimizer state is stored under `optimizer.`; the training position, RNG state, loss scale
and resolved config travel as one JSON string under `ds2exp_meta`.

A checkpoint is written to a temporary file in the same folder, fsynced and renamed, so the
previous file stays intact if the process dies or the disk fills.
"""
from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional

import mindspore as ms
import numpy as np

META_KEY = "ds2exp_meta"
OPT_PREFIX = "optimizer."


class CheckpointError(Exception):
    pass


@dataclass
class LoadedCheckpoint:
    path: Path
    model_state: Dict[str, np.ndarray]
    optimizer_state: Dict[str, np.ndarray]
    meta: Dict[str, Any]


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(str(path), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(path: str | Path, model, optimizer=None, meta: Optional[Dict[str, Any]] = None) -> Path:
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CheckpointError(f"cannot create checkpoint folder {path.parent}: {exc.strerror}") from exc
    entries: List[Dict[str, Any]] = []
    model_names = set()
    for name, p in model.parameters_and_names():
        entries.append({"name": name, "data": ms.Tensor(p.asnumpy())})
        model_names.add(name)
    if optimizer is not None:
        for name, p in optimizer.parameters_and_names():
            if name in model_names:
                continue  # the optimizer holds the model's own parameters too
            entries.append({"name": OPT_PREFIX + name, "data": ms.Tensor(p.asnumpy())})
    append = {META_KEY: json.dumps(meta or {}, default=str)}
    # The temporary name must end in .ckpt: MindSpore appends the suffix otherwise.
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=".tmp.ckpt")
    os.close(fd)
    try:
        ms.save_checkpoint(entries, tmp, append_dict=append)
        os.chmod(tmp, 0o644)  # MindSpore leaves it read-only for the owner
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException as exc:
        # MindSpore stages its write in `<name>.tmp`; remove ours and its leftovers.
        for leftover in path.parent.glob(Path(tmp).name[: -len(".ckpt")] + "*"):
            leftover.unlink(missing_ok=True)
        if isinstance(exc, (OSError, RuntimeError, ValueError)):  # MindSpore wraps I/O errors
            why = getattr(exc, "strerror", None) or str(exc).strip().splitlines()[0][:200]
            raise CheckpointError(f"could not write checkpoint {path}: {why}") from exc
        raise
    return path


def load_checkpoint(path: str | Path) -> LoadedCheckpoint:
    """Read a ds2exp or model zoo checkpoint; a truncated/corrupt file raises CheckpointError."""
    path = Path(path)
    if path.is_dir():
        found = find_latest_checkpoint(path)
        if found is None:
            raise CheckpointError(f"no checkpoint found in {path}")
        path = found
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        raw = ms.load_checkpoint(str(path))
    except Exception as exc:  # MindSpore raises ValueError/RuntimeError on damaged files
        raise CheckpointError(f"{path}: unreadable or truncated checkpoint ({str(exc).splitlines()[0][:200]})") from exc
    meta: Dict[str, Any] = {}
    model_state: Dict[str, np.ndarray] = {}
    opt_state: Dict[str, np.ndarray] = {}
    for name, value in raw.items():
        if name == META_KEY:
            text = value if isinstance(value, str) else str(value.asnumpy() if hasattr(value, "asnumpy") else value)
            meta = json.loads(text)
            continue
        arr = value.asnumpy() if hasattr(value, "asnumpy") else np.asarray(value)
        if name.startswith(OPT_PREFIX):
            opt_state[name[len(OPT_PREFIX):]] = arr
        else:
            model_state[name] = arr
    return LoadedCheckpoint(path, model_state, opt_state, meta)


def restore_optimizer(optimizer, state: Dict[str, np.ndarray]) -> None:
    # In place (ops.assign): after the optimizer has run, Parameter.set_data would leave it updating
    # a tensor the Parameter no longer holds (MindSpore 2.8, PyNative).
    for name, p in optimizer.parameters_and_names():
        if name in state and tuple(state[name].shape) == tuple(p.shape):
            ms.ops.assign(p, ms.Tensor(state[name].astype(p.asnumpy().dtype)))


def prime_optimizer(optimizer) -> None:
    """Run the optimizer once on zero gradients before a checkpoint's state is assigned.

    Measured with MindSpore 2.8 on CPU: the first call of an optimizer flushes denormal state to
    zero (later calls keep it), e.g. Adam's beta1_power, which is denormal after ~840 steps at
    beta1=0.9. Without this a resumed run's optimizer state differs from the uninterrupted run's in
    such values. Everything this call changes is overwritten by the restore that follows."""
    optimizer(tuple(ms.Tensor(np.zeros(p.shape, p.asnumpy().dtype)) for p in optimizer.parameters))


def find_latest_checkpoint(run_dir: str | Path) -> Optional[Path]:
    """The newest readable checkpoint of a run: `last.ckpt`, else the previous one kept beside it."""
    d = Path(run_dir)
    d = d / "checkpoints" if (d / "checkpoints").is_dir() else d
    candidates = [d / "last.ckpt", d / "last.prev.ckpt"]
    candidates += sorted(d.glob("best-*.ckpt"), key=lambda p: p.stat().st_mtime, reverse=True)
    for c in candidates:
        if c.is_file():
            try:
                ms.load_checkpoint(str(c))
                return c
            except Exception:
                continue  # truncated or damaged: fall back to the previous one
    return None
