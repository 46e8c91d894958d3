"""FaultInjector: the hook the Trainer calls after every backward pass (trainer.inject_nan_grad_*)."""
from __future__ import annotations

import numpy as np
from omegaconf import OmegaConf

import ds2exp  # noqa: F401
from ds2exp.training.faults import FaultInjector


def _grads():
    import mindspore as ms

    return (ms.Tensor(np.ones((2, 3), np.float32)), ms.Tensor(np.ones(4, np.float32)))


def test_listed_steps_get_nan_gradients_once_and_only_on_the_chosen_rank():
    faults = FaultInjector.from_config(OmegaConf.create({"inject_nan_grad_steps": [2], "inject_nan_grad_rank": 1}))
    g = _grads()
    assert faults.after_backward(1, 1, g) is g  # not a listed step
    assert faults.after_backward(2, 0, g) is g  # listed, but another rank
    faults = FaultInjector([2, 3])
    assert all(np.isnan(x.asnumpy()).all() for x in faults.after_backward(2, 0, g))
    assert faults.after_backward(2, 0, g) is g  # each step once (a rollback replays it cleanly)
    assert FaultInjector.from_config(OmegaConf.create({})).after_backward(0, 0, g) is g
