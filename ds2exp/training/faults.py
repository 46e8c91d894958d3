"""Faults injected on purpose, for tests and drills of the divergence policy.

`trainer.inject_nan_grad_steps` lists 0-based steps whose gradients are replaced by NaN (each once);
`trainer.inject_nan_grad_rank` limits that to one data-parallel rank. The Trainer calls
`after_backward` once per step, right after the gradients are computed.
"""
from __future__ import annotations

from typing import Iterable, Optional

from mindspore import ops


class FaultInjector:
    def __init__(self, nan_grad_steps: Iterable[int] = (), nan_grad_rank: Optional[int] = None):
        self.nan_grad_steps = set(int(s) for s in nan_grad_steps)
        self.nan_grad_rank = None if nan_grad_rank is None else int(nan_grad_rank)

    @classmethod
    def from_config(cls, trainer_cfg) -> "FaultInjector":
        return cls(trainer_cfg.get("inject_nan_grad_steps") or (), trainer_cfg.get("inject_nan_grad_rank"))

    def after_backward(self, step: int, rank: int, grads):
        """The gradients of `step` on `rank`: NaN when that step is listed (once), else unchanged."""
        if step not in self.nan_grad_steps:
            return grads
        self.nan_grad_steps.discard(step)
        if self.nan_grad_rank is not None and self.nan_grad_rank != rank:
            return grads
        return tuple(ops.full_like(g, float("nan")) for g in grads)
