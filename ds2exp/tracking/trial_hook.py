"""The link between a hyperparameter search and the training run it started in the same process.

The Optuna sweeper (hydra_plugins/ds2exp_optuna_sweeper) runs each trial through Hydra's basic launcher,
that is in its own process, one trial at a time. Before a trial it `install`s a `TrialLink`; while
the trial trains:

- `run_tags()`: tags for the trial's MLflow run (the study and the trial number), taken by
  `ds2exp.tracking.make_tracker` when the run is created;
- `report(step, value, tracker)`: the Trainer calls it after each validation with the value of
  `trainer.monitor`; the link tells the study and returns True when the study prunes the trial, and
  the Trainer then ends the run as finished with `stop_reason: pruned`.

Nothing is installed outside a search (a plain run, a grid sweep, or a job a launcher runs in another
process): then `report` returns False and `run_tags` is empty.
"""
from __future__ import annotations

from typing import Any, Dict, Optional, Protocol


class TrialLink(Protocol):
    def tags(self) -> Dict[str, str]: ...

    def report(self, step: int, value: float) -> bool:
        """Tell the study the monitored value at `step`; True: stop this trial (pruned)."""


_link: Optional[TrialLink] = None


def install(link: TrialLink) -> None:
    global _link
    _link = link


def uninstall() -> None:
    global _link
    _link = None


def run_tags() -> Dict[str, str]:
    return dict(_link.tags()) if _link is not None else {}


def report(step: int, value: float, tracker: Any = None) -> bool:
    """True when the search prunes the running trial (its MLflow run is tagged with the step)."""
    if _link is None or not _link.report(int(step), float(value)):
        return False
    if tracker is not None:
        tracker.set_tags({"ds2exp.optuna.pruned_at_step": int(step)})
    return True
