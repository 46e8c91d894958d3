"""The sweeper's settings (`hydra.sweeper.*`), registered as `hydra/sweeper=ds2exp_optuna`."""
from dataclasses import dataclass, field
from typing import Any, Dict, Optional

from hydra.core.config_store import ConfigStore


@dataclass
class Ds2expOptunaSweeperConf:
    _target_: str = "hydra_plugins.ds2exp_optuna_sweeper.sweeper.Ds2expOptunaSweeper"
    # sampler and pruner reach the sweeper as configs: the sampler is made again per trial with its seed
    _recursive_: bool = False
    # trials of the whole study (every process and run that worked on it: COMPLETE, PRUNED, FAILED, RUNNING)
    n_trials: int = 12
    # minimize or maximize; null: from trainer.monitor_mode
    direction: Optional[str] = None
    study_name: str = "ds2exp"
    # an RDB URL (sqlite:///..., postgresql://user@host/db); null: optuna.db beside the MLflow store
    storage: Optional[str] = None
    sampler: Dict[str, Any] = field(default_factory=lambda: {"_target_": "optuna.samplers.TPESampler",
                                                             "seed": None})
    pruner: Dict[str, Any] = field(default_factory=lambda: {"_target_": "optuna.pruners.MedianPruner",
                                                            "n_startup_trials": 5, "n_warmup_steps": 0})
    # seconds between a running trial's heartbeats in the store
    heartbeat_interval: int = 60
    # a RUNNING trial without a heartbeat for this long (s) is FAILED; null: 2 x heartbeat_interval
    grace_period: Optional[int] = None
    # key: a sweep (choice(...), range(...), interval(...), tag(log, interval(...)))
    params: Dict[str, Any] = field(default_factory=dict)


ConfigStore.instance().store(group="hydra/sweeper", name="ds2exp_optuna", node=Ds2expOptunaSweeperConf,
                             provider="ds2exp")
