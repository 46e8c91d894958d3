"""Divergence before NaN: tell a finite loss or gradient-norm explosion from ordinary noise.

A finite step is *exploded* when
  - its loss is over `factor` x the median loss of the last `window` good steps, or
  - its global gradient norm (before clipping) is over `factor` x their median gradient norm, or
  - its loss is over the absolute cap `max_loss`,
the relative checks starting once `min_history` good steps are known. Only good steps enter the
window, so a run of exploded steps is measured against the state before the explosion.

The trainer skips exploded steps like non-finite ones and hands them to the same policy
(`trainer.nonfinite`: skip / stop / rollback) with cause `loss_explosion`. Thresholds and the
measurements they come from: docs/diagnosis.md.
"""
from __future__ import annotations

import collections
import math
from typing import Any, Deque, Dict, List, Optional, Tuple


class ExplosionDetector:
    def __init__(self, cfg):
        self.enabled = bool(cfg.enabled)
        self.factor = float(cfg.factor)
        self.min_history = int(cfg.min_history)
        self.max_loss = float(cfg.max_loss)
        self.check_grad_norm = bool(cfg.check_grad_norm)
        self.good: Deque[Tuple[float, float]] = collections.deque(maxlen=int(cfg.window))

    def medians(self) -> Tuple[Optional[float], Optional[float]]:
        if len(self.good) < self.min_history:
            return None, None
        return (_median([l for l, _ in self.good]),
                _median([g for _, g in self.good if math.isfinite(g)]))

    def check(self, loss: float, grad_norm: float) -> Optional[Dict[str, Any]]:
        """The evidence when this finite step is exploded, else None."""
        if not self.enabled or not math.isfinite(loss):
            return None
        med_loss, med_norm = self.medians()
        evidence = {"loss": loss, "grad_norm": grad_norm, "median_loss": med_loss, "median_grad_norm": med_norm,
                    "factor": self.factor, "max_loss": self.max_loss, "window_steps": len(self.good)}
        if med_loss is not None and med_loss > 0 and loss > self.factor * med_loss:
            return {**evidence, "signal": "loss", "ratio": loss / med_loss,
                    "why": f"loss {loss:.4g} is {loss / med_loss:.3g}x the median {med_loss:.4g} of the last "
                           f"{len(self.good)} good steps (trainer.divergence.factor {self.factor:g})"}
        if (self.check_grad_norm and med_norm is not None and med_norm > 0 and math.isfinite(grad_norm)
                and grad_norm > self.factor * med_norm):
            return {**evidence, "signal": "grad_norm", "ratio": grad_norm / med_norm,
                    "why": f"grad norm {grad_norm:.4g} is {grad_norm / med_norm:.3g}x the median {med_norm:.4g} "
                           f"of the last {len(self.good)} good steps (trainer.divergence.factor {self.factor:g})"}
        if loss > self.max_loss:
            return {**evidence, "signal": "max_loss",
                    "why": f"loss {loss:.4g} over trainer.divergence.max_loss {self.max_loss:g}"}
        return None

    def accept(self, loss: float, grad_norm: float) -> None:
        """Record a good (applied) step."""
        self.good.append((float(loss), float(grad_norm)))

    def state(self) -> List[List[float]]:
        return [[l, g] for l, g in self.good]

    def load(self, state: Optional[List[List[float]]]) -> None:
        self.good.clear()
        for l, g in state or []:
            self.good.append((float(l), float(g)))


def _median(values: List[float]) -> Optional[float]:
    if not values:
        return None
    v = sorted(values)
    n = len(v)
    return v[n // 2] if n % 2 else 0.5 * (v[n // 2 - 1] + v[n // 2])
