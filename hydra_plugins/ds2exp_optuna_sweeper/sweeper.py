"""The Hydra Sweeper class; it hands the search to ds2exp.sweeps.optuna_search (imported when a sweep
starts, so that Hydra's scan of its plugins, at every command, does not import Optuna)."""
import sys
from typing import Any, List, Optional

from hydra.core.plugins import Plugins
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig


class Ds2expOptunaSweeper(Sweeper):
    def __init__(self, n_trials: int, direction: Optional[str], study_name: str, storage: Optional[str],
                 sampler: Any, pruner: Any, heartbeat_interval: int, grace_period: Optional[int], params: Any):
        self.settings = dict(n_trials=int(n_trials), direction=direction, study_name=str(study_name), storage=storage,
                             sampler=sampler, pruner=pruner, heartbeat_interval=int(heartbeat_interval),
                             grace_period=grace_period, params=params)
        self.config: Optional[DictConfig] = None
        self.launcher = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.config = config
        self.launcher = Plugins.instance().instantiate_launcher(hydra_context=hydra_context,
                                                                task_function=task_function, config=config)

    def sweep(self, arguments: List[str]) -> Any:
        from ds2exp.sweeps.optuna_search import run_search
        from ds2exp.sweeps.optuna_study import SearchConfigError

        assert self.config is not None and self.launcher is not None
        try:
            return run_search(self.config, self.launcher, arguments, **self.settings)
        except SearchConfigError as exc:  # ds2exp's config errors: one line, exit status 2 (ds2exp/cli.py)
            print(f"config error: {exc}", file=sys.stderr, flush=True)
            sys.exit(2)
