"""A training run's directory: the one place that knows its file names.

    <run dir>/
      checkpoints/last.ckpt          the newest training state (written every trainer.checkpoint_every)
      checkpoints/last.prev.ckpt     the one before it, kept until the new one is complete
      checkpoints/best-step0000200-cer58.12.ckpt   the trainer.keep_best best by trainer.monitor
      checkpoints/averaged-*.ckpt    written by `python -m ds2exp.average` (weights only)

`RunDir.of(ref)` accepts a run directory, its `checkpoints/` folder or a checkpoint file inside it.
This module only names and lists files; reading and checking them is ds2exp.checkpoints.io's job,
choosing the best by the monitor ds2exp.checkpoints.best's. It imports nothing of ds2exp, so every layer
can use it.
"""
from __future__ import annotations

from pathlib import Path
from typing import List

CHECKPOINTS = "checkpoints"
LAST = "last.ckpt"
LAST_PREV = "last.prev.ckpt"
BEST_PREFIX = "best-"
AVERAGED_PREFIX = "averaged-"


class RunDir:
    def __init__(self, path: str | Path):
        self.path = Path(path)

    @classmethod
    def of(cls, ref: str | Path) -> "RunDir":
        """The run a directory, its checkpoints/ folder or a checkpoint file in that folder belongs to."""
        p = Path(ref)
        if p.is_dir():
            return cls(p.parent if p.name == CHECKPOINTS else p)
        return cls(p.parent.parent if p.parent.name == CHECKPOINTS else p.parent)

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    @property
    def checkpoints(self) -> Path:
        return self.path / CHECKPOINTS

    @property
    def last(self) -> Path:
        return self.checkpoints / LAST

    @property
    def last_prev(self) -> Path:
        return self.checkpoints / LAST_PREV

    @property
    def checkpoint_folder(self) -> Path:
        """checkpoints/ when there is one, else the folder itself (a folder of loose checkpoints)."""
        return self.checkpoints if self.checkpoints.is_dir() else self.path

    def has_training_state(self) -> bool:
        """True when last.ckpt or last.prev.ckpt exists (a run that can be resumed)."""
        return self.last.is_file() or self.last_prev.is_file()

    def training_checkpoints(self) -> List[Path]:
        """The checkpoints that hold a training state (last, last.prev, best-*; not averaged ones nor
        half-written temporaries), last.ckpt first, last.prev.ckpt last."""
        rank = {LAST: 0, LAST_PREV: 2}
        found = [p for p in self.checkpoint_folder.glob("*.ckpt")
                 if p.is_file() and not p.name.startswith((".", AVERAGED_PREFIX))]
        return sorted(found, key=lambda p: (rank.get(p.name, 1), p.name))

    def best(self) -> List[Path]:
        return sorted(p for p in self.checkpoint_folder.glob(f"{BEST_PREFIX}*.ckpt") if p.is_file())


def resumed_run_dir(resume: str | Path, meta: dict) -> Path:
    """The run directory a resume continues: the one named (so a moved run still works), else the
    checkpoint's own, else the one recorded in the checkpoint's metadata."""
    p = Path(resume)
    if p.is_dir() or p.parent.name == CHECKPOINTS:
        return RunDir.of(p).path
    return Path(meta.get("run_dir") or p.parent)
