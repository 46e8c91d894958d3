"""Optimizers and learning-rate schedules from the `optimizer` config group."""
from __future__ import annotations

import logging
import math
from typing import Optional

import mindspore as ms
from mindspore import nn, ops
from omegaconf import DictConfig

from ds2exp.config import enum_value

log = logging.getLogger("ds2exp.train")



class _NoSparseAdamDeprecation:
    """nn.Adam always builds a FusedSparseAdam for sparse gradients, and MindSpore 2.8 logs that this
    primitive is deprecated when it is built. ds2exp has no sparse gradients and the user cannot act
    on the line, so it is dropped from MindSpore's logger (nothing else is)."""

    @staticmethod
    def filter(record) -> bool:
        return "'FusedSparseAdam' is deprecated" not in record.getMessage()


def _quiet_sparse_adam_deprecation() -> None:
    from mindspore import log as ms_log

    logger = ms_log._get_logger()
    if not any(isinstance(f, _NoSparseAdamDeprecation) for f in logger.filters):
        logger.addFilter(_NoSparseAdamDeprecation())


def build_optimizer(params, cfg) -> nn.Optimizer:
    """Adam, AdamW (decoupled decay) or SGD with (Nesterov) momentum; the lr is set every step."""
    name = enum_value(cfg.name)
    _quiet_sparse_adam_deprecation()
    lr = float(cfg.lr)
    b1, b2 = float(cfg.betas[0]), float(cfg.betas[1])
    if name == "adam":
        return nn.Adam(params, learning_rate=lr, beta1=b1, beta2=b2, eps=float(cfg.eps),
                       weight_decay=float(cfg.weight_decay))
    if name == "adamw":
        return nn.AdamWeightDecay(params, learning_rate=lr, beta1=b1, beta2=b2, eps=float(cfg.eps),
                                  weight_decay=float(cfg.weight_decay))
    if name == "sgd":
        return nn.SGD(params, learning_rate=lr, momentum=float(cfg.momentum), nesterov=bool(cfg.nesterov),
                      weight_decay=float(cfg.weight_decay))
    raise ValueError(f"optimizer.name={name!r}; allowed: adam, adamw, sgd")


def learning_rate(cfg, step: int, epoch: int, total_steps: int, time_progress: Optional[float] = None) -> float:
    """lr for a step. constant; exponential: lr / anneal**epoch (deepspeech.pytorch's per-epoch
    anneal); warmup_cosine: linear warm-up then cosine decay to lr * min_lr_ratio.

    ``time_progress`` (the share of a ``trainer.max_minutes`` budget used so far): the cosine
    follows whichever budget, steps or time, is further along, so that a time-limited run
    reaches the low end of its schedule when its time runs out, not at a step count it never
    gets to."""
    base = float(cfg.lr)
    schedule = enum_value(cfg.schedule)
    warm = int(cfg.warmup_steps)
    if warm > 0 and step < warm:
        return base * (step + 1) / warm
    if schedule == "constant":
        return base
    if schedule == "exponential":
        return base / (float(cfg.anneal) ** epoch)
    if schedule == "warmup_cosine":
        span = max(1, total_steps - warm)
        progress = (step - warm) / span
        if time_progress is not None:
            progress = max(progress, float(time_progress))
        progress = min(1.0, max(0.0, progress))
        floor = base * float(cfg.min_lr_ratio)
        return floor + (base - floor) * 0.5 * (1 + math.cos(math.pi * progress))
    raise ValueError(f"optimizer.schedule={schedule!r}")


def set_learning_rate(optimizer: nn.Optimizer, lr: float) -> None:
    # In place (ops.assign), not Parameter.set_data: measured with MindSpore 2.8 (PyNative), once the
    # optimizer has run, set_data gives the Parameter a new tensor that the optimizer no longer reads,
    # so every later learning rate was silently ignored (tests/test_reliability.py).
    ops.assign(optimizer.learning_rate, ms.Tensor(lr, ms.float32))


def range_test_lr(step: int, total: int, min_lr: float, max_lr: float) -> float:
    """The lr range test's schedule (ds2exp/lr_find.py): exponential rise from `min_lr` at step 0 to
    `max_lr` at step `total - 1`, the same factor every step, so each decade gets the same number of steps."""
    if total <= 1:
        return float(max_lr)
    return float(min_lr) * (float(max_lr) / float(min_lr)) ** (min(step, total - 1) / (total - 1))


def model_and_optimizer(cfg: DictConfig, announce: bool = True):
    """The model (initialised from `pretrained` when set) and its optimizer."""
    from ds2exp.models.deepspeech2 import build_model_for_precision, load_state
    from ds2exp.checkpoints.io import load_checkpoint

    model = build_model_for_precision(cfg)
    if cfg.pretrained:
        pre = load_checkpoint(cfg.pretrained)
        load_state(model, pre.model_state)
        if announce:
            log.info("initialised from %s", pre.path)
    return model, build_optimizer(model.trainable_params(), cfg.optimizer)
