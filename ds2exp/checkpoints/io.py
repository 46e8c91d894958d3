"""Checkpoints: model + optimizer state + training position + resolved config, written atomically.

Format: MindSpore's own `.ckpt` (protobuf, no pickle), so MindSpore tools read it and the
model zoo's checkpoints load through the same path. Model parameters keep their names;
optimizer state is stored under `optimizer.`; the training position, RNG state, loss scale
and resolved config travel as one JSON string under `ds2exp_meta`.

A checkpoint is written to a temporary file in the same folder, fsynced and renamed, so the
previous file stays intact if the process dies or the disk fills.

Integrity: before the rename, a SHA-256 of everything MindSpore wrote is appended as one more
protobuf record (field 15 of the top-level message, which MindSpore's reader skips), and the
metadata says `"checksum": "sha256"`. `verify_checkpoint()` reads the records without MindSpore and
checks the hash, so a file cut anywhere, even exactly at a record boundary, is detected. Files
without the trailer (model zoo checkpoints, older ds2exp ones) are checked for structure only.
A run directory resolves to its newest intact checkpoint by step, whichever kind (`last`,
`last.prev`, `best-*`); the ones passed over are named in a warning.
"""
from __future__ import annotations

import hashlib
import json
import logging
import mmap
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import mindspore as ms
import numpy as np
from omegaconf import OmegaConf

from ds2exp.atomic import atomic_path
from ds2exp.checkpoints.names import RunDir

META_KEY = "ds2exp_meta"
OPT_PREFIX = "optimizer."
CHECKSUM_FIELD = 15  # top-level protobuf field of the SHA-256 trailer; MindSpore's Checkpoint uses 1
_CHECKSUM_PREFIX = b"ds2exp-sha256:"
_MS_CRC_TRAILER = 17  # MindSpore's optional b"crc_num" + 10 bytes at the very end

log = logging.getLogger(__name__)


class CheckpointError(Exception):
    pass


@dataclass
class LoadedCheckpoint:
    path: Path
    model_state: Dict[str, np.ndarray]
    optimizer_state: Dict[str, np.ndarray]
    meta: Dict[str, Any]


class _CutShort(ValueError):
    pass


def _varint(buf, pos: int, end: int) -> Tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= end or shift > 63:
            raise _CutShort(f"ends inside a record header at byte {end}")
        b = buf[pos]
        pos += 1
        value |= (b & 0x7F) << shift
        if not b & 0x80:
            return value, pos
        shift += 7


def _fields(buf, pos: int, end: int):
    """(field number, start, end) of each length-delimited field between pos and end."""
    while pos < end:
        key, pos = _varint(buf, pos, end)
        wire = key & 7
        if wire == 0:  # a number (e.g. one of a tensor's dims)
            _, pos = _varint(buf, pos, end)
            continue
        if wire != 2:
            raise ValueError(f"unexpected protobuf wire type {wire} at byte {pos}")
        size, pos = _varint(buf, pos, end)
        if pos + size > end:
            raise _CutShort(f"ends at byte {end} inside a record that needs {pos + size}")
        yield key >> 3, pos, pos + size
        pos += size


def _tensor_dims(buf, pos: int, end: int) -> Tuple[int, ...]:
    """TensorProto field 1 (repeated int64 dims), packed or not."""
    dims: List[int] = []
    while pos < end:
        key, pos = _varint(buf, pos, end)
        if key & 7 == 0:
            value, pos = _varint(buf, pos, end)
            if key >> 3 == 1:
                dims.append(value)
            continue
        size, pos = _varint(buf, pos, end)
        if key >> 3 == 1:  # packed
            p = pos
            while p < pos + size:
                value, p = _varint(buf, p, pos + size)
                dims.append(value)
        pos += size
    return tuple(dims)


def _checksum_record(digest: str) -> bytes:
    payload = _CHECKSUM_PREFIX + digest.encode()
    return bytes([(CHECKSUM_FIELD << 3) | 2, len(payload)]) + payload


def _meta_text(raw: bytes, is_str: bool) -> str:
    """ds2exp writes its metadata as UTF-8 bytes; older files hold a MindSpore str (numpy unicode:
    UTF-32, little-endian)."""
    return raw.decode("utf-32-le").rstrip("\x00") if is_str else raw.decode("utf-8")


@dataclass
class CheckpointInfo:
    """What `verify_checkpoint` found, read without MindSpore."""
    path: Path
    tags: List[str] = field(default_factory=list)
    meta: Optional[Dict[str, Any]] = None
    shapes: Dict[str, Tuple[int, ...]] = field(default_factory=dict)  # of the tensors, by name
    checksum: Optional[bool] = None  # True: verified; None: the file carries none (model zoo, older files)

    @property
    def step(self) -> Optional[int]:
        step = (self.meta or {}).get("step")
        return int(step) if isinstance(step, (int, float)) else None


def verify_checkpoint(path: str | Path, check_hash: bool = True) -> CheckpointInfo:
    """Read a checkpoint's protobuf records and check its SHA-256; CheckpointError (one line) when the
    file is not a MindSpore checkpoint, is cut short, or its content does not match its checksum.
    `check_hash=False`: records only (no full read of the tensors)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}" if not path.exists() else f"{path} is not a file")
    info = CheckpointInfo(path)
    try:
        with open(path, "rb") as fh:
            size = os.fstat(fh.fileno()).st_size
            if size == 0:
                raise CheckpointError(f"{path}: empty file, not a checkpoint")
            with mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as buf:
                end = size - _MS_CRC_TRAILER if buf[max(0, size - 17):size - 10] == b"crc_num" else size
                digest_at = None
                meta_parts: List[bytes] = []
                meta_type = b""
                for num, start, stop in _fields(buf, 0, end):
                    if num == CHECKSUM_FIELD and bytes(buf[start:start + len(_CHECKSUM_PREFIX)]) == _CHECKSUM_PREFIX:
                        if stop != end:
                            raise ValueError("data after the checksum record")
                        digest_at = (start - 2, bytes(buf[start + len(_CHECKSUM_PREFIX):stop]).decode())
                        continue
                    if num != 1:
                        raise ValueError(f"unexpected protobuf field {num}")
                    tag, content = None, None
                    for vnum, vstart, vstop in _fields(buf, start, stop):
                        if vnum == 1:
                            tag = bytes(buf[vstart:vstop]).decode("utf-8")
                        elif vnum == 2 and tag is not None and tag not in info.shapes:
                            info.shapes[tag] = _tensor_dims(buf, vstart, vstop)
                        if vnum == 2 and tag == META_KEY:
                            for tnum, tstart, tstop in _fields(buf, vstart, vstop):
                                if tnum == 2:
                                    meta_type = bytes(buf[tstart:tstop])
                                elif tnum == 3:
                                    content = bytes(buf[tstart:tstop])
                    if tag is None:
                        raise ValueError("a record without a name")
                    if not info.tags or info.tags[-1] != tag:  # large tensors are written in slices
                        info.tags.append(tag)
                    if content is not None:
                        meta_parts.append(content)
                if meta_parts:
                    info.meta = json.loads(_meta_text(b"".join(meta_parts), meta_type == b"str"))
                if digest_at is not None and check_hash:
                    info.checksum = hashlib.sha256(buf[:digest_at[0]]).hexdigest() == digest_at[1]
    except CheckpointError:
        raise
    except _CutShort as exc:
        raise CheckpointError(f"{path}: truncated checkpoint ({exc})") from exc
    except (ValueError, UnicodeDecodeError, OSError) as exc:
        raise CheckpointError(f"{path}: not a readable MindSpore checkpoint ({str(exc).splitlines()[0][:160]})") \
            from exc
    if not info.tags:
        raise CheckpointError(f"{path}: not a MindSpore checkpoint (no parameters)")
    if info.checksum is False:
        raise CheckpointError(f"{path}: damaged checkpoint (SHA-256 does not match its content)")
    if digest_at is None and (info.meta or {}).get("checksum") == "sha256":
        raise CheckpointError(f"{path}: truncated checkpoint (its SHA-256 record is missing)")
    return info


def save_checkpoint(path: str | Path, model, optimizer=None, meta: Optional[Dict[str, Any]] = None) -> Path:
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CheckpointError(f"cannot create checkpoint folder {path.parent}: {exc.strerror}") from exc
    # The metadata goes first: a file cut anywhere after it still says it should end in a checksum.
    # (as UTF-8 bytes in a uint8 tensor: MindSpore takes strings only at the end, in append_dict)
    meta_bytes = json.dumps({**(meta or {}), "checksum": "sha256"}, default=str).encode("utf-8")
    entries: List[Dict[str, Any]] = [{"name": META_KEY, "data": ms.Tensor(np.frombuffer(meta_bytes, np.uint8))}]
    model_names = set()
    for name, p in model.parameters_and_names():
        entries.append({"name": name, "data": ms.Tensor(p.asnumpy())})
        model_names.add(name)
    if optimizer is not None:
        for name, p in optimizer.parameters_and_names():
            if name in model_names:
                continue  # the optimizer holds the model's own parameters too
            entries.append({"name": OPT_PREFIX + name, "data": ms.Tensor(p.asnumpy())})
    staged: List[Path] = []
    try:
        # The temporary name must end in .ckpt: MindSpore appends the suffix otherwise.
        with atomic_path(path, suffix=".tmp.ckpt") as tmp:
            staged.append(tmp)
            ms.save_checkpoint(entries, str(tmp))
            os.chmod(tmp, 0o644)  # MindSpore leaves it read-only for the owner
            with open(tmp, "rb+") as fh:
                digest = hashlib.sha256()
                for chunk in iter(lambda: fh.read(1 << 22), b""):
                    digest.update(chunk)
                fh.write(_checksum_record(digest.hexdigest()))  # the read left the position at the end
    except BaseException as exc:
        # MindSpore stages its write in `<name>.tmp`: remove its leftovers (atomic_path removed ours).
        for tmp in staged:
            for leftover in tmp.parent.glob(tmp.name[: -len(".ckpt")] + "*"):
                leftover.unlink(missing_ok=True)
        if isinstance(exc, (OSError, RuntimeError, ValueError)):  # MindSpore wraps I/O errors
            why = getattr(exc, "strerror", None) or str(exc).strip().splitlines()[0][:200]
            raise CheckpointError(f"could not write checkpoint {path}: {why}") from exc
        raise
    return path


def load_checkpoint(path: str | Path) -> LoadedCheckpoint:
    """Read a ds2exp or model zoo checkpoint; a truncated/corrupt file raises CheckpointError. A run
    directory gives its newest intact checkpoint (see `find_latest_checkpoint`)."""
    path = Path(path)
    if path.is_dir():
        found = find_latest_checkpoint(path)
        if found is None:
            raise CheckpointError(f"no intact checkpoint found in {path}")
        path = found
    verify_checkpoint(path)
    try:
        raw = ms.load_checkpoint(str(path))
    except Exception as exc:  # MindSpore raises ValueError/RuntimeError on damaged files
        raise CheckpointError(f"{path}: unreadable or truncated checkpoint ({str(exc).splitlines()[0][:200]})") from exc
    meta: Dict[str, Any] = {}
    model_state: Dict[str, np.ndarray] = {}
    opt_state: Dict[str, np.ndarray] = {}
    for name, value in raw.items():
        if name == META_KEY:
            text = value if isinstance(value, str) else _meta_text(value.asnumpy().tobytes(), False)
            meta = json.loads(text)
            meta.pop("checksum", None)
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


def checkpoint_folder(run_dir: str | Path) -> Path:
    return RunDir(run_dir).checkpoint_folder


def select_checkpoint(run_dir: str | Path) -> Tuple[Optional[CheckpointInfo], List[Tuple[Path, str]]]:
    """The newest intact checkpoint of a run by step (last, last.prev or best-*; averaged ones are not
    training states), and the files passed over because they failed their check, with why."""
    candidates = RunDir(run_dir).training_checkpoints()  # on equal steps: last, then best-*, then last.prev
    readable: List[CheckpointInfo] = []
    damaged: List[Tuple[Path, str]] = []
    for c in candidates:  # records only: cheap, gives the steps
        try:
            readable.append(verify_checkpoint(c, check_hash=False))
        except CheckpointError as exc:
            damaged.append((c, str(exc)))
    readable.sort(key=lambda i: (-(i.step if i.step is not None else -1), candidates.index(i.path)))
    for info in readable:  # the full check, newest first, until one passes
        try:
            return verify_checkpoint(info.path), damaged
        except CheckpointError as exc:
            damaged.append((info.path, str(exc)))
    return None, damaged


def find_latest_checkpoint(run_dir: str | Path) -> Optional[Path]:
    """The newest intact checkpoint of a run (see `select_checkpoint`); says which when it is not
    last.ckpt because a newer-looking one failed its check."""
    chosen, damaged = select_checkpoint(run_dir)
    for path, why in damaged:
        log.warning("skipping damaged checkpoint %s", why if str(path) in why else f"{path}: {why}")
    if chosen is not None and damaged:
        log.warning("using %s (step %s), the newest intact checkpoint", chosen.path, chosen.step)
    return chosen.path if chosen is not None else None


def model_config_for(loaded: LoadedCheckpoint, fallback):
    """The model config stored in a checkpoint, or `fallback` for one without (a model zoo checkpoint)."""
    cfg = loaded.meta.get("config", {}).get("model")
    return OmegaConf.create(cfg) if cfg else fallback
