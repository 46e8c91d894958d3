"""Learning-rate schedules, including the time-budget cosine that `make train` uses."""
import math

import pytest
from omegaconf import OmegaConf

from ds2exp.training.optim import learning_rate


def _cfg(schedule, lr=1e-3, warmup=0, min_ratio=0.0, anneal=1.1):
    return OmegaConf.create({"lr": lr, "schedule": schedule, "warmup_steps": warmup, "min_lr_ratio": min_ratio,
                             "anneal": anneal})


def test_constant_and_exponential():
    assert learning_rate(_cfg("constant"), 500, 3, 1000) == pytest.approx(1e-3)
    assert learning_rate(_cfg("exponential"), 500, 3, 1000) == pytest.approx(1e-3 / 1.1 ** 3)


def test_warmup_is_linear_then_cosine_reaches_the_floor_at_the_last_step():
    cfg = _cfg("warmup_cosine", warmup=10, min_ratio=0.1)
    assert learning_rate(cfg, 0, 0, 110) == pytest.approx(1e-4)
    assert learning_rate(cfg, 9, 0, 110) == pytest.approx(1e-3)
    assert learning_rate(cfg, 60, 0, 110) == pytest.approx(1e-4 + 9e-4 * 0.5)
    assert learning_rate(cfg, 110, 0, 110) == pytest.approx(1e-4)


def test_cosine_follows_the_time_budget_when_it_is_further_along_than_the_steps():
    cfg = _cfg("warmup_cosine", warmup=10, min_ratio=0.0)
    # 20,000 planned steps, 5% of them done, but 75% of max_minutes used: the time decides
    by_steps = learning_rate(cfg, 1010, 0, 20010)
    by_time = learning_rate(cfg, 1010, 0, 20010, time_progress=0.75)
    assert by_steps == pytest.approx(1e-3 * 0.5 * (1 + math.cos(math.pi * 0.05)))
    assert by_time == pytest.approx(1e-3 * 0.5 * (1 + math.cos(math.pi * 0.75)))
    assert learning_rate(cfg, 1010, 0, 20010, time_progress=1.3) == pytest.approx(0.0)  # clamped at the floor
    # steps further along than time: the steps decide
    assert learning_rate(cfg, 15010, 0, 20010, time_progress=0.1) == pytest.approx(
        1e-3 * 0.5 * (1 + math.cos(math.pi * 0.75)))
    # warm-up is by steps whatever the clock says; constant ignores time
    assert learning_rate(cfg, 4, 0, 20010, time_progress=0.9) == pytest.approx(5e-4)
    assert learning_rate(_cfg("constant"), 1010, 0, 20010, time_progress=0.9) == pytest.approx(1e-3)
