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
import warnings
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence

from omegaconf import DictConfig, OmegaConf

from ds2exp.sweeps.optuna_study import (SearchConfigError, Heartbeat, default_storage, distribution,
                                        fail_abandoned, identity, open_study, shown)

log = logging.getLogger("ds2exp.optuna")

RESULTS_FILE = "optimization_results.yaml"


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
            space[str(key)] = distribution(o)
        else:
            fixed.append(o.input_line)
    for key, o in command.items():
        if o.is_sweep_override():
            space[key] = distribution(o)
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
        beat = Heartbeat(store, trial._trial_id, heartbeat_interval)
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
    """Optuna warns that heartbeats are meant for Study.optimize: this module writes them itself (Heartbeat)."""
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
