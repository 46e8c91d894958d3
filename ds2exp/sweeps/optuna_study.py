"""The Optuna study of a search: where it is stored (`hydra.sweeper.storage`, by default `optuna.db` beside
the MLflow store), the command it belongs to (its identity), and trials left RUNNING by a process that is
gone (failed by pid on this host, else by a stale heartbeat). The search loop: ds2exp/sweeps/optuna_search.py.
"""
from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import warnings
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from omegaconf import DictConfig, OmegaConf

log = logging.getLogger("ds2exp.optuna")

# Keys that say where and how a trial runs, not what it trains: not part of the study's identity.
_NOT_IDENTITY = ("paths.", "logger.", "hydra.", "hardware.", "trainer.progress")


class SearchConfigError(ValueError):
    """A search that cannot run as given: train.py exits with status 2 and this one line (ds2exp/cli.py)."""


class StudyMismatch(SearchConfigError):
    """The study of that name was made by another command."""


# ------------------------------------------------------------------ where the study is
def default_storage(config: DictConfig) -> str:
    """`optuna.db` beside the SQLite MLflow store, else in the project folder (`paths.root_dir`)."""
    uri = str(OmegaConf.select(config, "logger.tracking_uri", default="") or "")
    backend = OmegaConf.select(config, "logger.backend", default="none")
    if str(getattr(backend, "value", backend)) == "mlflow" and uri.startswith("sqlite:///"):
        folder = Path(uri[len("sqlite:///"):]).parent
    else:
        folder = Path(str(OmegaConf.select(config, "paths.root_dir")))
    return f"sqlite:///{folder.resolve() / 'optuna.db'}"


def shown(url: str) -> str:
    """The store's URL with its password hidden."""
    try:
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 - only for printing
        return url


def study_location(config: DictConfig) -> Tuple[str, str]:
    """(study name, storage URL) the sweeper of `config` uses."""
    sweeper = config.hydra.sweeper
    return str(sweeper.study_name), str(sweeper.storage or default_storage(config))


# ------------------------------------------------------------------ the search space
def distribution(override):
    from hydra.core.override_parser.types import ChoiceSweep, IntervalSweep, RangeSweep
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    value = override.value()
    log_scale = "log" in value.tags
    if isinstance(value, IntervalSweep):
        if "int" in value.tags:
            return IntDistribution(int(value.start), int(value.end), log=log_scale)
        return FloatDistribution(float(value.start), float(value.end), log=log_scale)
    if isinstance(value, (ChoiceSweep, RangeSweep)):
        values = list(override.sweep_iterator())
        if isinstance(value, RangeSweep) and len(values) > 1 and all(type(v) is int for v in values) \
                and value.step > 0 and not log_scale:
            return IntDistribution(values[0], values[-1], step=int(value.step))
        if not all(v is None or isinstance(v, (bool, int, float)) for v in values):
            values = list(override.sweep_string_iterator())  # strings as the command line would give them
        return CategoricalDistribution(values)
    raise SearchConfigError(f"{override.input_line}: the Optuna sweeper searches choice(), range() and interval() "
                     f"(tag(log, ...) for a log scale), not {type(value).__name__}")


def identity(space: Mapping[str, Any], fixed: Sequence[str], monitor: str, direction: str) -> str:
    """What makes trials comparable: the search space, what the fixed overrides change, the objective."""
    from optuna.distributions import distribution_to_json

    kept = sorted(o for o in fixed if not o.lstrip("+~").startswith(_NOT_IDENTITY))
    return json.dumps({"space": {k: json.loads(distribution_to_json(d)) for k, d in sorted(space.items())},
                       "overrides": kept, "objective": f"{direction} {monitor}"}, sort_keys=True)


# ------------------------------------------------------------------ the study
def open_study(name: str, url: str, direction: str, pruner, ident: str, heartbeat_interval: int,
               grace_period: Optional[int]):
    """(study, its RDBStorage): created, or loaded when it exists and was made by the same command."""
    import optuna

    if url.startswith("sqlite:///"):
        Path(url[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
        # several processes on one SQLite file wait for each other's writes instead of failing
        engine_kwargs: Dict[str, Any] = {"connect_args": {"timeout": 120}}
    else:
        engine_kwargs = {"pool_pre_ping": True}  # a server connection dropped while a trial trained
    from sqlalchemy.exc import SQLAlchemyError

    for attempt in range(3):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                storage = optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs,
                                                     heartbeat_interval=int(heartbeat_interval),
                                                     grace_period=int(grace_period) if grace_period else None)
            study = optuna.create_study(study_name=name, storage=storage, direction=direction, pruner=pruner,
                                        load_if_exists=True)
            break
        except (SQLAlchemyError, RuntimeError):  # processes starting together on a new database: one makes the tables
            if attempt == 2:
                raise
            time.sleep(1 + attempt)
    if study.direction.name.lower() != direction:
        raise StudyMismatch(f"study {name} in {shown(url)} is to {study.direction.name.lower()}, this command to "
                            f"{direction}: give this search its own hydra.sweeper.study_name")
    theirs = study.user_attrs.get("ds2exp.identity")
    if theirs is None:  # new (or made by a process that has not written it yet: the same value)
        study.set_user_attr("ds2exp.identity", ident)
    elif theirs != ident:
        raise StudyMismatch(f"study {name} in {shown(url)} was made by another command ({_difference(theirs, ident)}): "
                            f"continue it with its overrides, or give this search its own "
                            f"hydra.sweeper.study_name=<name>")
    return study, storage


def _space_text(key: str, d: Mapping[str, Any]) -> str:
    """`lr=choice(0.001, 0.01)`, `lr=interval(1e-05, 0.1) log` from a distribution's JSON."""
    at = d["attributes"]
    if "choices" in at:
        return f"{key}=choice({', '.join(str(c) for c in at['choices'])})"
    step = f" step {at['step']}" if at.get("step") not in (None, 1) else ""
    return f"{key}=interval({at['low']}, {at['high']})" + (" log" if at.get("log") else "") + step


def _difference(theirs: str, ours: str) -> str:
    """What the study's command has that this one has not, and the other way round, in a few words."""
    a, b = json.loads(theirs), json.loads(ours)
    parts = []
    for what, x, y in (("overrides", a["overrides"], b["overrides"]),
                       ("search", [_space_text(k, v) for k, v in a["space"].items()],
                        [_space_text(k, v) for k, v in b["space"].items()])):
        only_a, only_b = [v for v in x if v not in y], [v for v in y if v not in x]
        if only_a or only_b:
            parts.append(f"{what}: the study's {' '.join(only_a) or 'none'}, "
                         f"this command's {' '.join(only_b) or 'none'}")
    if a["objective"] != b["objective"]:
        parts.append(f"objective: the study's {a['objective']}, this command's {b['objective']}")
    return "; ".join(parts)


def _alive(pid: int) -> bool:
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, ValueError, OverflowError):
        return True
    return True


def fail_abandoned(study, storage) -> List[int]:
    """Mark FAILED the RUNNING trials whose process is gone (see the module's doc); their numbers."""
    from optuna.exceptions import UpdateFinishedTrialError
    from optuna.trial import TrialState

    running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    if not running:
        return []
    try:  # Optuna's own check of heartbeats, without failing them yet: the cause goes on first
        stale = set(storage._get_stale_trial_ids(storage.get_study_id_from_name(study.study_name)))
    except AttributeError:
        stale = set()
    host, failed = socket.gethostname(), []
    for t in running:
        attrs = t.user_attrs
        if attrs.get("host") == host and attrs.get("pid") and not _alive(attrs["pid"]):
            why = f"interrupted: its process ({host} pid {attrs['pid']}) ended before the trial did"
        elif t._trial_id in stale:  # FrozenTrial has no public id; storages are addressed by it
            why = (f"interrupted: no heartbeat from {attrs.get('host', '?')} pid {attrs.get('pid', '?')} for "
                   f"{storage.grace_period} s")
        else:
            continue
        try:
            storage.set_trial_user_attr(t._trial_id, "failure", "interrupted")
            storage.set_trial_user_attr(t._trial_id, "cause", why)
            storage.set_trial_state_values(t._trial_id, TrialState.FAIL)
        except UpdateFinishedTrialError:  # its process, or another one, finished it meanwhile
            continue
        failed.append(t.number)
        print(f"optuna: trial {t.number} marked FAILED: {why}", flush=True)
    return failed


class Heartbeat:
    """Writes the trial's heartbeat into the study's store every `interval` seconds while it trains."""

    def __init__(self, storage, trial_id: int, interval: float):
        self.storage, self.trial_id, self.interval = storage, trial_id, float(interval)
        self._stop = threading.Event()
        storage.record_heartbeat(trial_id)  # at once: a trial without one is never found stale
        self._thread = threading.Thread(target=self._run, name="optuna-heartbeat", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.storage.record_heartbeat(self.trial_id)
            except Exception as exc:  # noqa: BLE001 - a store that does not answer must not stop training
                log.warning("optuna heartbeat of trial %s not written: %s", self.trial_id, exc)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
