"""Crash recovery for training runs: run state, a per-run lock, and finding a run to resume.

Each training process writes `<run dir>/run_state.json` (status, config fingerprint, pid, MLflow run
id, resume count) and holds an exclusive `flock` on `<run dir>/.ds2exp.lock` while it lives. The
kernel drops the lock when the process dies however it dies (SIGKILL included), so:

- status "running" and the lock free = the process was killed or the machine went down: resumable;
- status "running" and the lock held = a live process trains there: never touched;
- "interrupted" (Ctrl-C) is resumable too; "finished" and "failed" (non-finite stop, exception) are
  final: `resume=<dir>` still continues them explicitly, `trainer.auto_resume` does not (a failed run
  would only fail the same way again).

`trainer.auto_resume=true` looks under `outputs/` and `multirun/` (of the project root and of the
working directory) for the newest resumable run of the same configuration and continues it: from its
latest readable checkpoint, or from step 0 in the same directory and MLflow run when it was killed
before its first checkpoint. "Same" means an equal `config_fingerprint`: a hash of the resolved config
without the fields that say where things live or how the command was started (`paths`, `resume`,
`trainer.auto_resume`, `trainer.progress`); values derived from paths (`dataset.root`, the SQLite
`logger.tracking_uri`) do count.
"""
from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import logging
import os
import socket
import time
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Tuple

from omegaconf import DictConfig, OmegaConf
from ds2exp.checkpoints.names import CHECKPOINTS, RunDir

log = logging.getLogger(__name__)

STATE_NAME = "run_state.json"
LOCK_NAME = ".ds2exp.lock"
# "running" with the lock free: killed (SIGKILL, power loss); "interrupted": Ctrl-C.
RESUMABLE = ("running", "interrupted")
# Top-level keys, then dotted keys, that do not change what a run computes.
FINGERPRINT_IGNORE = ("paths", "resume", "hydra", "trainer.auto_resume", "trainer.progress")


class RunDirBusy(RuntimeError):
    pass


def _plain(cfg: Any) -> Dict[str, Any]:
    if isinstance(cfg, DictConfig):
        return OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)  # type: ignore[return-value]
    return json.loads(json.dumps(cfg, default=str))


def config_fingerprint(cfg: Any) -> str:
    """Hash of the resolved config minus location/launch fields (see FINGERPRINT_IGNORE)."""
    d = _plain(cfg)
    for key in FINGERPRINT_IGNORE:
        parts = key.split(".")
        node = d
        for part in parts[:-1]:
            node = node.get(part) if isinstance(node, dict) else None
            if node is None:
                break
        if isinstance(node, dict):
            node.pop(parts[-1], None)
    text = json.dumps(d, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:20]


# ---------------------------------------------------------------------- state file
def read_run_state(run_dir: str | Path) -> Dict[str, Any]:
    try:
        return json.loads((Path(run_dir) / STATE_NAME).read_text())
    except (OSError, ValueError):
        return {}


def write_run_state(run_dir: str | Path, **fields: Any) -> Dict[str, Any]:
    """Merge `fields` into run_state.json (atomically); returns the new state."""
    from ds2exp.atomic import atomic_write_text

    state = read_run_state(run_dir)
    state.update(fields)
    state["updated"] = time.strftime("%Y-%m-%dT%H:%M:%S")
    try:
        atomic_write_text(Path(run_dir) / STATE_NAME, json.dumps(state, indent=1, default=str))
    except OSError as exc:
        log.warning("could not write %s: %s", Path(run_dir) / STATE_NAME, exc)
    return state


# ---------------------------------------------------------------------- lock
class RunLock:
    """An exclusive, non-blocking flock on `<run dir>/.ds2exp.lock`, held until release or exit."""

    def __init__(self, run_dir: str | Path):
        self.path = Path(run_dir) / LOCK_NAME
        self.fd: Optional[int] = None

    def acquire(self) -> "RunLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(str(self.path), os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = ""
            try:
                holder = os.pread(fd, 200, 0).decode(errors="replace").strip()
            except OSError:
                pass
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise RunDirBusy(f"run directory {self.path.parent} is in use by another training process"
                                 + (f" ({holder})" if holder else "")) from exc
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is not None:
            try:
                fcntl.flock(self.fd, fcntl.LOCK_UN)
            finally:
                os.close(self.fd)
                self.fd = None


def is_locked(run_dir: str | Path) -> bool:
    path = Path(run_dir) / LOCK_NAME
    if not path.exists():
        return False
    try:
        fd = os.open(str(path), os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False
    except OSError:
        return True
    finally:
        os.close(fd)


# ---------------------------------------------------------------------- leftovers
def remove_partial_files(run_dir: str | Path) -> List[Path]:
    """Temporary files a killed process left half-written (checkpoints, atomic writes)."""
    removed = []
    for folder in (RunDir(run_dir).checkpoints, Path(run_dir)):
        if not folder.is_dir():
            continue
        for p in folder.iterdir():
            if p.name.startswith(".") and (".tmp" in p.name) and p.is_file():
                p.unlink(missing_ok=True)
                removed.append(p)
    if removed:
        log.info("removed %d partial file(s) left by an interrupted process: %s", len(removed),
                 ", ".join(p.name for p in removed))
    return removed


# ---------------------------------------------------------------------- auto resume
def search_roots(extra: Iterable[str | Path] = ()) -> List[Path]:
    from ds2exp.config import project_root

    roots: List[Path] = []
    for base in (Path(project_root()), Path.cwd()):
        for sub in ("outputs", "multirun"):
            roots.append(base / sub)
    roots.extend(Path(p) for p in extra)
    out: List[Path] = []
    for r in roots:
        r = r.resolve()
        if r.is_dir() and r not in out:
            out.append(r)
    return out


def _state_files(root: Path, max_depth: int = 5) -> Iterable[Path]:
    root_depth = len(root.parts)
    for dirpath, dirnames, filenames in os.walk(root):
        depth = len(Path(dirpath).parts) - root_depth
        dirnames[:] = [d for d in dirnames if d not in (CHECKPOINTS, ".hydra") and depth < max_depth]
        if STATE_NAME in filenames:
            yield Path(dirpath) / STATE_NAME


def resumable_runs(fingerprint: str, roots: Iterable[Path],
                   exclude: Optional[Path] = None) -> List[Tuple[Path, Optional[Path]]]:
    """Interrupted runs with this fingerprint, newest first: (run dir, latest readable checkpoint or
    None when the run was killed before its first checkpoint)."""
    from ds2exp.checkpoints.io import find_latest_checkpoint

    found: List[Tuple[float, Path, Optional[Path]]] = []
    seen = set()
    for root in roots:
        for state_file in _state_files(root):
            run_dir = state_file.parent.resolve()
            if run_dir in seen or (exclude is not None and run_dir == Path(exclude).resolve()):
                continue
            seen.add(run_dir)
            state = read_run_state(run_dir)
            if state.get("status") not in RESUMABLE or state.get("config_fingerprint") != fingerprint:
                continue
            if is_locked(run_dir):
                continue
            ckpt = find_latest_checkpoint(run_dir) if RunDir(run_dir).checkpoints.is_dir() else None
            when = (ckpt or state_file).stat().st_mtime
            found.append((when, run_dir, ckpt))
    found.sort(key=lambda x: x[0], reverse=True)
    return [(d, c) for _, d, c in found]


def claim_resumable_run(cfg: Any, roots: Iterable[Path]) -> Optional[Tuple[Path, Any, RunLock]]:
    """The newest interrupted run of this config, locked for this process: (run dir, its loaded
    checkpoint or None if it died before the first one, lock); None when there is none.

    A checkpoint must carry the same config (its fingerprint is recomputed from the checkpoint)."""
    from ds2exp.checkpoints.io import CheckpointError, load_checkpoint

    fp = config_fingerprint(cfg)
    for run_dir, ckpt in resumable_runs(fp, roots):
        try:
            lock = RunLock(run_dir).acquire()
        except RunDirBusy:
            continue  # another process claimed it a moment ago
        if read_run_state(run_dir).get("status") not in RESUMABLE:  # finished meanwhile
            lock.release()
            continue
        if ckpt is None:
            return run_dir, None, lock
        try:
            loaded = load_checkpoint(ckpt)
        except CheckpointError:
            lock.release()
            continue
        saved = loaded.meta.get("config")
        if not saved or config_fingerprint(saved) != fp:
            log.info("auto_resume: the checkpoint in %s has a different config; not resumed", run_dir)
            lock.release()
            continue
        return run_dir, loaded, lock
    return None


def resume_config(cfg: DictConfig, saved: Optional[Dict[str, Any]], overrides) -> DictConfig:
    """The checkpoint's own config, with only what this command line overrides explicitly
    (e.g. a larger trainer.max_steps) taken from the new one: a resumed run continues the
    experiment it belongs to, not whatever the defaults are today."""
    if not saved:
        return cfg
    merged = OmegaConf.merge(cfg, saved)
    for ov in overrides:
        key = ov.split("=", 1)[0].lstrip("+~")
        if key in ("resume",) or "/" in key or key.startswith("hydra"):
            continue
        value = OmegaConf.select(cfg, key, default=None)
        OmegaConf.update(merged, key, value, merge=False)
    merged.resume = cfg.resume
    return merged


def hydra_overrides() -> List[str]:
    """This command line's overrides as Hydra parsed them (empty outside a Hydra app)."""
    try:
        from hydra.core.hydra_config import HydraConfig

        return list(HydraConfig.get().overrides.task)
    except (ImportError, ValueError):
        return []


def note_continued_elsewhere(new_dir: Path, old_dir: Path) -> None:
    """Hydra made a run directory for this invocation; say where the training actually went."""
    try:
        if new_dir.resolve() != old_dir.resolve() and new_dir.is_dir():
            (new_dir / "continued_in.txt").write_text(f"trainer.auto_resume: this invocation continued {old_dir}\n")
    except OSError:
        pass
