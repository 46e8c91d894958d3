"""What the training loop carries from step to step (`TrainState`, saved in every checkpoint), what one
step produced (`StepResult`), and how the divergence policy stops a run or rolls it back."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

import numpy as np


class RolledBack(Exception):
    """Internal: the state was restored from a checkpoint; restart the epoch iteration."""


class TrainingStopped(Exception):
    """Raised when the divergence policy gives up (non-finite steps or a loss/grad-norm explosion);
    carries the diagnosis (cause, first_bad_step, diverged_at_step, summary, evidence)."""

    def __init__(self, diagnosis: Dict[str, Any]):
        super().__init__(diagnosis.get("summary", "training stopped"))
        self.diagnosis = diagnosis


@dataclass
class StepResult:
    loss: float
    grad_norm: float
    finite: bool
    group_norms: Dict[str, float]
    logits_absmax: float
    losses: np.ndarray
    first_bad_group: Optional[str] = None
    loss_scale: float = 1.0  # the scale this step ran with
    peer_flags: Optional[Dict[str, float]] = None  # data parallel: ranks that raised each flag
    explosion: Optional[Dict[str, Any]] = None  # finite but exploded: the detector's evidence

    @property
    def good(self) -> bool:
        """The step updated the weights."""
        return self.finite and self.explosion is None


@dataclass
class TrainState:
    step: int = 0  # optimizer steps attempted (good + skipped)
    epoch: int = 0
    batch_in_epoch: int = 0
    nonfinite_steps: int = 0
    exploded_steps: int = 0  # finite steps skipped as a loss/grad-norm explosion
    anomalous_steps: int = 0  # nonfinite_steps + exploded_steps
    first_bad_step: Optional[int] = None  # the run's first anomalous step
    consecutive_bad: int = 0  # anomalous steps in a row
    rollbacks: int = 0
    loss_scale: float = 1.0
    good_since_scale: int = 0
    # [{"monitor", "value", "step", "path", "val_cer", "val_wer", "val_loss", "wer"}], best first
    best: List[Dict[str, Any]] = field(default_factory=list)
    # every step's loss and grad norm (non-finite and exploded steps too), and every validation
    history: Dict[str, List] = field(default_factory=lambda: {"step": [], "loss": [], "grad_norm": [], "val_step": [],
                                                              "val_wer": [], "val_cer": [], "val_loss": []})
    lr_factor: float = 1.0
