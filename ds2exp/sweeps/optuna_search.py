"""The Optuna search of `python train.py -m +sweep=optuna_lr` (the sweeper: hydra_plugins/ds2exp_optuna_sweeper).

- The study lives in an RDB store: `hydra.sweeper.storage`, by default `optuna.db` (SQLite) in the
  folder of the MLflow store when `logger.tracking_uri` is a SQLite one, else in the project folder.
  A PostgreSQL URL shares one study between machines. The study is opened with `load_if_exists`, so
  the same command joins it, or resumes it after an interruption.
- `hydra.sweeper.n_trials` counts every trial of the study, whichever process or run made it: a
  process starts trials while the study has fewer, so a resumed study ends at n_trials, not n_trials
  more. Several processes that ask in the same instant may each start one more (as Optuna's own
  `MaxTrialsCallback` does).
- A study remembers the command that made it (the search space, the overrides that change what a
  trial trains, the objective). A command that differs is refused, instead of mixing trials of other
  budgets into one ranking: give it its own `hydra.sweeper.study_name`. Paths, the MLflow logger and
  hardware settings are not part of it, so machines with other folders or thread counts can join.
- A trial left RUNNING by a process that is gone is marked FAILED when a process next starts a trial:
  at once when it ran on this host and its pid is gone, else when its heartbeat (written every
  `heartbeat_interval` s while it trains) is older than `grace_period`. A live trial on another
  machine keeps its heartbeat and is left alone.
- Each trial is one job of Hydra's launcher (job folder = trial number), its overrides the sampled
  values. Its outcome comes from the job: the value the job returns (the best value of
  `trainer.monitor`, ds2exp/training/run.py) -> COMPLETE; pruned at a validation -> PRUNED; diverged
  (`summary.json`) or crashed (`error.txt`) -> FAILED with user attributes `failure` and `cause`.
- Pruning: the Trainer reports `trainer.monitor` at each validation through ds2exp/tracking/trial_hook.py,
  which needs the trial to train in this process (Hydra's basic launcher, the default).
- A seeded sampler is seeded with `seed + trial number` for each trial: trials drawn by two machines
  differ, and a resumed study draws what the uninterrupted one would have.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import socket
import threading
import time
import warnings
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from omegaconf import DictConfig, OmegaConf

log = logging.getLogger("ds2exp.optuna")

RESULTS_FILE = "optimization_results.yaml"
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
def _distribution(override):
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


def search_space(params: Optional[Mapping[str, Any]], arguments: Sequence[str]):
    """({key: distribution}, fixed overrides) from `hydra.sweeper.params` and the command line. A key on
    the command line replaces the preset's: with a sweep it is searched over that, with one value fixed."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    command = {o.key_or_group: o for o in parser.parse_overrides(list(arguments))}
    space: Dict[str, Any] = {}
    fixed: List[str] = []
    for key, value in (params or {}).items():
        if value is None:
            continue
        o = command.pop(str(key), None) or parser.parse_override(f"{key}={value}")
        if o.is_sweep_override():
            space[str(key)] = _distribution(o)
        else:
            fixed.append(o.input_line)
    for key, o in command.items():
        if o.is_sweep_override():
            space[key] = _distribution(o)
        else:
            fixed.append(o.input_line)
    return space, fixed


def _override(key: str, value: Any) -> str:
    if isinstance(value, bool):
        return f"{key}={'true' if value else 'false'}"
    return f"{key}={value!r}" if isinstance(value, float) else f"{key}={value}"


def _suggest(trial, key: str, d) -> Any:
    from optuna.distributions import CategoricalDistribution, IntDistribution

    if isinstance(d, CategoricalDistribution):
        return trial.suggest_categorical(key, d.choices)
    if isinstance(d, IntDistribution):
        return trial.suggest_int(key, d.low, d.high, step=d.step, log=d.log)
    return trial.suggest_float(key, d.low, d.high, step=d.step, log=d.log)


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


class _Heartbeat:
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


class _TrialLink:
    """ds2exp/tracking/trial_hook.py's link for one trial: reports to the study, says when it is pruned."""

    def __init__(self, trial, tags: Dict[str, str]):
        self.trial, self._tags, self.pruned_at = trial, tags, None

    def tags(self) -> Dict[str, str]:
        return self._tags

    def report(self, step: int, value: float) -> bool:
        if not math.isfinite(value):
            return False
        self.trial.report(value, step)
        if self.trial.should_prune():
            self.pruned_at = step
            return True
        return False


# ------------------------------------------------------------------ one trial's outcome
def _read_json(path: Path) -> Dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _last_line(path: Path) -> str:
    try:
        lines = [ln.strip() for ln in path.read_text().splitlines() if ln.strip()]
    except OSError:
        return ""
    return lines[-1] if lines else ""


def outcome(ret, link: _TrialLink, job_dir: Optional[Path], monitor: str):
    """(state, value, user attributes) of a trial from its job's return and folder."""
    from hydra.core.utils import JobStatus
    from optuna.trial import TrialState

    summary = _read_json(job_dir / "summary.json") if job_dir is not None else {}
    attrs: Dict[str, Any] = {"job_dir": str(job_dir) if job_dir is not None else None}
    if summary.get("mlflow_run_id"):
        attrs["mlflow_run_id"] = summary["mlflow_run_id"]
    if ret.status == JobStatus.FAILED:  # raised past ds2exp.sweeps.job_runner
        exc = ret._return_value
        return TrialState.FAIL, None, {**attrs, "failure": "crashed", "cause": f"{type(exc).__name__}: {exc}"[:2000]}
    if job_dir is not None and (job_dir / "error.txt").is_file():
        cause = (summary.get("error") if summary.get("status") == "failed" else None) or _last_line(
            job_dir / "error.txt")
        return TrialState.FAIL, None, {**attrs, "failure": "crashed", "cause": cause[:2000]}
    if summary.get("status") == "diverged":
        at = summary.get("diverged_at_step", summary.get("step"))
        return TrialState.FAIL, None, {**attrs, "failure": "diverged", "diverged_at_step": at,
                                       "cause": str(summary.get("cause") or "unknown"),
                                       "diagnosis": str(summary.get("summary") or "")[:2000]}
    if link.pruned_at is not None:
        return TrialState.PRUNED, None, {**attrs, "pruned_at_step": link.pruned_at}
    value = ret.return_value
    if value is None or not math.isfinite(float(value)):
        return TrialState.FAIL, None, {**attrs, "failure": "no value",
                                       "cause": f"no finite {monitor} (no validation ran)"}
    return TrialState.COMPLETE, float(value), attrs


def _job_dir(ret, sweep_dir: Path, number: int) -> Path:
    try:
        return Path(str(ret.hydra_cfg.hydra.runtime.output_dir))
    except AttributeError:
        return sweep_dir / str(number)


def _params_text(params: Mapping[str, Any]) -> str:
    from ds2exp.sweeps.names import short_value

    return " ".join(f"{k}={short_value(str(v))}" for k, v in params.items())


def _trial_line(t) -> str:
    state = t.state.name if t.state.name != "FAIL" else "FAILED"
    text = f"trial {t.number} {state} ({_params_text(t.params)})"
    if t.state.name == "COMPLETE":
        return text + f": {t.user_attrs.get('monitor', 'value')} {t.value:.4g}"
    if t.state.name == "PRUNED":
        return text + f" at step {t.user_attrs.get('pruned_at_step', t.last_step)}"
    if t.state.name == "FAIL":
        return text + f": {t.user_attrs.get('failure', 'failed')}: {t.user_attrs.get('cause', '?')}"
    return text


# ------------------------------------------------------------------ the search
def run_search(config: DictConfig, launcher, arguments: Sequence[str], *, n_trials: int, direction: Optional[str],
               study_name: str, storage: Optional[str], sampler: Any, pruner: Any, heartbeat_interval: int,
               grace_period: Optional[int], params: Any):
    """Run trials until the study has `n_trials`; print and write its result; returns the study."""
    import optuna
    from hydra.utils import instantiate
    from optuna.trial import TrialState

    from ds2exp.config import enum_value
    from ds2exp.tracking import trial_hook

    optuna.logging.set_verbosity(optuna.logging.WARNING)  # this module prints one line per trial
    params = OmegaConf.to_container(params, resolve=True) if isinstance(params, DictConfig) else params
    space, fixed = search_space(params, arguments)
    if not space:
        raise SearchConfigError("the Optuna sweeper has nothing to search: give hydra.sweeper.params or a sweep on the "
                         "command line, e.g. 'optimizer.lr=tag(log, interval(1e-5, 1e-1))'")
    monitor = str(config.trainer.monitor)
    direction = direction or ("maximize" if enum_value(config.trainer.monitor_mode) == "max" else "minimize")
    url = str(storage or default_storage(config))
    sweep_dir = Path(str(config.hydra.sweep.dir))
    sweep_dir.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(config, sweep_dir / "multirun.yaml")
    study, store = open_study(study_name, url, direction, instantiate(pruner) if pruner else None,
                              identity(space, fixed, monitor, direction), heartbeat_interval, grace_period)
    fail_abandoned(study, store)
    done = len(study.get_trials(deepcopy=False))
    print(f"optuna: study {study_name} in {shown(url)}: {done} of {n_trials} trials "
          + ("already; nothing to run (raise hydra.sweeper.n_trials to add trials)" if done >= n_trials
             else "so far, continuing" if done else "so far, a new study"), flush=True)
    seed = sampler.get("seed") if sampler is not None else None
    host, pid = socket.gethostname(), os.getpid()
    while True:
        fail_abandoned(study, store)
        if len(study.get_trials(deepcopy=False)) >= n_trials:
            break
        with _ask_tell():
            trial = study.ask()
        if sampler is not None:  # per trial, so that machines and resumed runs draw their own values
            study.sampler = instantiate(sampler, **({"seed": int(seed) + trial.number} if seed is not None else {}))
        values = {key: _suggest(trial, key, d) for key, d in space.items()}
        for key, value in (("host", host), ("pid", pid), ("monitor", monitor), ("sweep_dir", str(sweep_dir))):
            trial.set_user_attr(key, value)
        overrides = fixed + [_override(k, v) for k, v in values.items()]
        link = _TrialLink(trial, {"ds2exp.optuna.study": study_name, "ds2exp.optuna.trial": str(trial.number),
                                  "ds2exp.optuna.storage": shown(url)})
        print(f"optuna: trial {trial.number} starts ({_params_text(values)})", flush=True)
        trial_hook.install(link)
        beat = _Heartbeat(store, trial._trial_id, heartbeat_interval)
        try:
            ret = launcher.launch([overrides], initial_job_idx=trial.number)[0]
        except BaseException as exc:  # SIGINT/SIGTERM (TrainingInterrupted), or the launcher itself failed
            interrupted = isinstance(exc, KeyboardInterrupt)
            _tell(study, trial, TrialState.FAIL, None, {"failure": "interrupted" if interrupted else "crashed",
                                                        "cause": f"{type(exc).__name__}: {exc}"})
            if not interrupted:
                raise
            print(f"optuna: trial {trial.number} FAILED: interrupted ({exc}); the same command continues study "
                  f"{study_name} in {shown(url)}", flush=True)
            raise SystemExit(getattr(exc, "exit_status", 130)) from None  # as train.py exits after a signal
        finally:
            beat.stop()
            trial_hook.uninstall()
        job_dir = _job_dir(ret, sweep_dir, trial.number)
        state, value, attrs = outcome(ret, link, job_dir, monitor)
        _tell(study, trial, state, value, attrs)
        print("optuna: " + _trial_line(store.get_trial(trial._trial_id)), flush=True)
    return report(study, url, sweep_dir, n_trials, monitor)


@contextlib.contextmanager
def _ask_tell():
    """Optuna warns that heartbeats are meant for Study.optimize: this module writes them itself (_Heartbeat)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used")
        yield


def _tell(study, trial, state, value, attrs: Mapping[str, Any]) -> None:
    from optuna.exceptions import UpdateFinishedTrialError
    from optuna.trial import TrialState

    try:
        for key, v in attrs.items():
            if v is not None:
                trial.set_user_attr(key, v)
        with _ask_tell():
            if state == TrialState.COMPLETE:
                study.tell(trial, value)
            else:
                study.tell(trial, state=state)
    except (UpdateFinishedTrialError, RuntimeError, ValueError) as exc:  # e.g. failed meanwhile as abandoned
        log.warning("trial %s: its result was not recorded: %s", trial.number, exc)


def report(study, url: str, sweep_dir: Path, n_trials: int, monitor: str):
    """Print the study's counts, its best trial and where it is; write optimization_results.yaml."""
    from optuna.trial import TrialState

    trials = study.get_trials(deepcopy=False)
    counts = {s: sum(t.state == s for t in trials) for s in TrialState}
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    best = study.best_trial if complete else None
    lines = [f"optuna study {study.study_name}: {len(trials)} of {n_trials} trials: "
             f"{counts[TrialState.COMPLETE]} complete, {counts[TrialState.PRUNED]} pruned, "
             f"{counts[TrialState.FAIL]} failed" + (f", {counts[TrialState.RUNNING]} running elsewhere"
                                                    if counts[TrialState.RUNNING] else "")]
    lines += ["  " + _trial_line(t) for t in trials if t.state in (TrialState.FAIL, TrialState.PRUNED)]
    if best is not None:
        where = ", ".join(f"{k} {best.user_attrs[k]}" for k in ("job_dir", "mlflow_run_id") if best.user_attrs.get(k))
        lines.append(f"best: trial {best.number}, {monitor} {best.value:.4g}: "
                     + " ".join(_override(k, v) for k, v in best.params.items()) + (f" ({where})" if where else ""))
    else:
        lines.append("best: none yet (no trial completed)")
    lines.append(f"study: {study.study_name} in {shown(url)}; the same command again continues it up to "
                 f"hydra.sweeper.n_trials (counting every trial of the study)")
    print("\n" + "\n".join(lines), flush=True)
    result = {"study_name": study.study_name, "storage": shown(url), "n_trials": len(trials),
              "states": {s.name: counts[s] for s in TrialState if counts[s]}, "monitor": monitor,
              "direction": study.direction.name.lower()}
    if best is not None:
        result.update(best_params=dict(best.params), best_value=float(best.value), best_trial=best.number)
    OmegaConf.save(OmegaConf.create(result), sweep_dir / RESULTS_FILE)
    return study
