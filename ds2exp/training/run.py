"""Wires one training run together from a composed config (called by train.py)."""
from __future__ import annotations

import json
import logging
import os
import platform
import random
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import numpy as np
from omegaconf import DictConfig, OmegaConf

import ds2exp
from ds2exp.config import project_root
from ds2exp.config import enum_value
from ds2exp.checkpoints import RunDir, resumed_run_dir

log = logging.getLogger("ds2exp.train")



def setup_mindspore(hw_cfg, seed: int, threads: Optional[int] = None) -> None:
    """Device, launch mode, threads (`threads` overrides hardware.threads) and seeds. The context stays in
    PYNATIVE mode; hardware.mode=graph compiles the training step only (compiled_step)."""
    import mindspore as ms

    target = enum_value(hw_cfg.device_target)
    if hasattr(ms, "set_device"):
        ms.set_device(target)
        ms.set_context(mode=ms.PYNATIVE_MODE)
    else:
        ms.set_context(mode=ms.PYNATIVE_MODE, device_target=target)
    if target == "CPU" and getattr(hw_cfg, "blocking_launch", True):
        # Measured on 2 cores: MindSpore's default asynchronous op launch makes small CPU ops
        # wait on each other (bi-LSTM fwd+bwd 2.7 s -> 0.09 s with blocking launch).
        try:
            ms.runtime.launch_blocking()
        except AttributeError:
            ms.set_context(pynative_synchronize=True)
    threads = threads or hw_cfg.threads
    if threads:
        try:
            ms.set_context(runtime_num_threads=int(threads))
        except (ValueError, TypeError, RuntimeError) as exc:
            log.warning("hardware.threads=%s not applied: %s", threads, exc)
    ms.set_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=project_root(), capture_output=True, text=True,
                              timeout=10).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def run_dir_from_hydra() -> Path:
    try:
        from hydra.core.hydra_config import HydraConfig

        return Path(HydraConfig.get().runtime.output_dir)
    except (ImportError, ValueError):
        from datetime import datetime

        return Path(project_root()) / "outputs" / datetime.now().strftime("%Y-%m-%d/%H-%M-%S")


def build_data(cfg, run_dir: Optional[Path] = None, need_test: bool = False, rank: int = 0,
               world: int = 1) -> Dict[str, Any]:
    """Loaders for train/val(/test). Data parallel: rank `rank` of `world` gets its shard of every
    epoch's training batches, and only rank 0 (the one that validates) gets the val loader."""
    from ds2exp.data.dataset import BatchLoader, BucketBatchSampler, DatasetError, load_split, resolve_manifests
    from ds2exp.data.features import FeatureCache, FeatureSettings
    from ds2exp.training.trainer import compiled_step

    d = cfg.dataset
    settings = FeatureSettings.from_config(d.feature)
    cache = FeatureCache(cfg.paths.cache_dir, settings, enabled=d.feature.cache,
                         max_gb=d.feature.cache_max_gb)
    manifests = resolve_manifests(cfg, progress=cfg.trainer.progress)
    out: Dict[str, Any] = {"settings": settings, "cache": cache, "manifests": manifests}
    for split in ("train", "val", "test"):
        if not manifests.get(split) or (split == "test" and not need_test) or (split != "train" and rank > 0):
            out[split] = None
            continue
        data = load_split(split, manifests[split], cfg, settings, report_dir=run_dir)
        if not data.examples:
            raise DatasetError(f"the {split} split is empty after filtering (manifests: "
                               f"{', '.join(map(str, manifests[split]))}; dropped: {data.drop_counts()})")
        train = split == "train"
        sampler = BucketBatchSampler(data.examples, d.batch_size, d.num_buckets, cfg.trainer.seed,
                                     sortagrad=train and d.sortagrad, rank=rank if train else 0,
                                     world=world if train else 1)
        out[split] = BatchLoader(data, sampler, cache, d.num_workers,
                                 spec_augment_cfg=d.spec_augment if train else None, seed=cfg.trainer.seed,
                                 fixed_label_length=train and compiled_step(cfg.hardware),
                                 crop_frames=d.crop_frames if train else None, label_pad=d.label_pad if train else None)
    return out


def build_model_for_precision(cfg):
    """The model, with its compute in fp16 when precision=fp16 (parameters stay fp32).

    The fast CPU kernels are float32-only (numpy/numba), so fp16 uses the plain MindSpore
    kernels, which have the same parameters; the switch is logged.
    """
    import mindspore as ms

    from ds2exp.models.deepspeech2 import build_model

    dtype = enum_value(cfg.precision.dtype)
    if dtype == "fp32":
        return build_model(cfg.model)
    mcfg = OmegaConf.create(OmegaConf.to_container(cfg.model, enum_to_str=True))
    if "fast" in (mcfg.conv_impl, mcfg.rnn_impl):
        log.warning("precision=%s: using the plain MindSpore kernels (the fast CPU kernels are float32 only)", dtype)
        mcfg.conv_impl = mcfg.rnn_impl = "plain"
    model = build_model(mcfg)
    model.to_float(ms.float16 if dtype == "fp16" else ms.bfloat16)
    return model


@dataclass
class RunOutcome:
    status: str  # finished, diverged (ds2exp.training.summary.STATUSES; interrupted is raised)
    value: float  # the best value of trainer.monitor over the run: what a hyperparameter search optimises

    @property
    def exit_status(self) -> int:
        """train.py's exit status: 0 finished, 1 diverged or failed (130/143: TrainingInterrupted)."""
        return 0 if self.status == "finished" else 1


def train_command(cfg: DictConfig) -> int:
    """One `python train.py` run: train, print how it ended, return the exit status (0 finished,
    1 diverged or failed; 130 SIGINT and 143 SIGTERM after an interrupt). A failure ends with the
    summary and one `error:` line; its traceback goes to train.log and the MLflow run, not the console."""
    from ds2exp.training.signals import TrainingInterrupted

    try:
        return train_run(cfg).exit_status
    except TrainingInterrupted as exc:
        return exc.exit_status
    except Exception as exc:  # noqa: BLE001 - every failure is reported the same way, then exit 1
        log_traceback(exc)
        if not getattr(exc, "summary_printed", False):  # it failed before its run was set up
            run_dir = run_dir_from_hydra()
            _print_summary(_report("failed", {"stop_reason": "error", "error": one_line_error(exc), "step": None},
                                   None, cfg, run_dir, None, write=run_dir.is_dir()), None)
        print(f"error: {one_line_error(exc)}", file=sys.stderr, flush=True)
        return 1


# Errors whose message is the whole story; anything else is named by its type.
_EXPECTED_ERRORS = ("CheckpointError", "RunDirBusy", "DatasetError", "ManifestError", "ConfigValueError")


def one_line_error(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if type(exc).__name__ in _EXPECTED_ERRORS else f"{type(exc).__name__}: {text}"


def log_traceback(exc: BaseException) -> None:
    """The traceback into the log files (Hydra's train.log), not onto the console."""
    record = log.makeRecord(log.name, logging.ERROR, __file__, 0, "run failed: %s", (one_line_error(exc),),
                            (type(exc), exc, exc.__traceback__))
    for handler in logging.getLogger().handlers + log.handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)


def run_training(cfg: DictConfig) -> float:
    """Train; returns the best value of `trainer.monitor` over the run (what a search optimises)."""
    return train_run(cfg).value


def train_run(cfg: DictConfig) -> RunOutcome:
    """Train and print the end-of-run summary. SIGINT/SIGTERM end the run after the current step
    (ds2exp.training.signals) and raise TrainingInterrupted once the run is marked interrupted."""
    from ds2exp.training.signals import StopOnSignal

    interrupt = StopOnSignal().install()  # until MindSpore starts: a signal stops the set-up at once
    try:
        return _train_run(cfg, interrupt)
    finally:
        interrupt.uninstall()


def _train_run(cfg: DictConfig, interrupt) -> RunOutcome:
    from ds2exp.training import distributed, recovery
    from ds2exp.training.signals import warm_up_runtime

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    resumed, lock, restart_in = None, None, None
    rank, world = 0, 1
    if int(cfg.hardware.num_devices) > 1 or distributed.in_msrun_worker():
        # A data-parallel worker started by msrun: join the group first (rank 0 owns the run dir).
        n = int(cfg.hardware.num_devices)
        setup_mindspore(cfg.hardware, cfg.trainer.seed, threads=distributed.threads_per_rank(cfg.hardware, n))
        warm_up_runtime()  # MindSpore's runtime installs its SIGINT handler with its first op ...
        interrupt.reassert()  # ... ours goes back on top
        rank, world = distributed.init_data_parallel(n)
    if not cfg.resume and cfg.trainer.get("auto_resume"):
        claim = recovery.claim_resumable_run(cfg, recovery.search_roots())
        if claim is None:
            log.info("auto_resume: no interrupted run of this configuration; starting a new one")
        else:
            found, resumed, lock = claim
            _note_continued_elsewhere(run_dir_from_hydra(), found)
            if resumed is None:  # killed before its first checkpoint: start over in it, same MLflow run
                log.warning("auto_resume: restarting the interrupted run %s from step 0 (it had no checkpoint)",
                            found)
                restart_in = found
            else:
                log.warning("auto_resume: continuing the interrupted run %s from step %s", found,
                            resumed.meta.get("step"))
                cfg.resume = str(found)
    try:
        if restart_in is not None:
            run_dir = restart_in
        elif cfg.resume:
            if resumed is None:
                from ds2exp.training.checkpoint import load_checkpoint

                resumed = load_checkpoint(cfg.resume)
            run_dir = resumed_run_dir(cfg.resume, resumed.meta)
            cfg = resume_config(cfg, resumed.meta.get("config"), _hydra_overrides())
            log.info("resuming from %s (step %s)", resumed.path, resumed.meta.get("step"))
        else:
            run_dir = run_dir_from_hydra()
        run_dir.mkdir(parents=True, exist_ok=True)
        if lock is None and rank == 0:  # data parallel: rank 0 owns the run directory
            lock = recovery.RunLock(run_dir).acquire()  # RunDirBusy when another process trains there
        return _train(cfg, run_dir, resumed, continues=resumed is not None or restart_in is not None,
                      rank=rank, world=world, interrupt=interrupt)
    finally:
        if lock is not None:
            lock.release()


def _note_continued_elsewhere(new_dir: Path, old_dir: Path) -> None:
    """Hydra made a run directory for this invocation; say where the training actually went."""
    try:
        if new_dir.resolve() != old_dir.resolve() and new_dir.is_dir():
            (new_dir / "continued_in.txt").write_text(f"trainer.auto_resume: this invocation continued {old_dir}\n")
    except OSError:
        pass


@dataclass
class Run:
    """What one training process works with. build_run fills it in part by part, so a failure
    during set-up still finds the MLflow run (and trainer) made so far."""
    cfg: DictConfig
    run_dir: Path
    interrupt: Any  # ds2exp.training.signals.StopOnSignal
    resumes: int = 0  # times this run has been continued before this process
    model: Any = None
    optimizer: Any = None
    data: Optional[Dict[str, Any]] = None
    tracker: Any = None
    trainer: Any = None
    audit: Any = None  # ds2exp.data.audit.AuditReport of the training split


def _train(cfg: DictConfig, run_dir: Path, resumed, continues: bool, rank: int = 0, world: int = 1,
           interrupt=None) -> RunOutcome:
    """`continues`: this process carries on the run in `run_dir` (its MLflow run and tracking spool),
    from `resumed` (a checkpoint), or from step 0 when that is None. `rank`/`world`: data parallel
    (see ds2exp.training.distributed); ranks other than 0 write nothing to the run directory."""
    from ds2exp.training import recovery
    from ds2exp.training.signals import StopOnSignal, TrainingInterrupted

    interrupt = interrupt or StopOnSignal()
    if rank > 0:
        return _train_secondary(cfg, run_dir, resumed, rank, world, interrupt)
    run = Run(cfg, run_dir, interrupt, resumes=_mark_running(cfg, run_dir, continues))
    try:
        build_run(run, resumed, continues, world)
        outcome, summary = fit(run)
        report = finish_run(run, outcome, summary)
    except TrainingInterrupted as exc:
        _print_summary(_end_interrupted(exc, run.trainer, run.tracker, cfg, run_dir), run.tracker)
        raise
    except BaseException as exc:
        _end_failed(run, exc)
        raise
    recovery.write_run_state(run_dir, status=outcome, mlflow_run_id=run.tracker.run_id, step=run.trainer.state.step)
    _print_summary(report, run.tracker)
    best = run.trainer.state.best  # best first by trainer.monitor in trainer.monitor_mode
    return RunOutcome(outcome, float(best[0]["value"]) if best else float("nan"))


def _mark_running(cfg: DictConfig, run_dir: Path, continues: bool) -> int:
    """run_state.json says `running`; returns how many times the run was resumed before."""
    from ds2exp.training import recovery

    resumes = 0
    if continues:
        recovery.remove_partial_files(run_dir)
        resumes = int(recovery.read_run_state(run_dir).get("resumes", 0)) + 1
    recovery.write_run_state(run_dir, status="running", config_fingerprint=recovery.config_fingerprint(cfg),
                             pid=os.getpid(), resumes=resumes, started=time.strftime("%Y-%m-%dT%H:%M:%S"))
    return resumes


def build_run(run: Run, resumed, continues: bool, world: int = 1) -> Run:
    """MindSpore, data, model, optimizer, the MLflow run and the Trainer (restored from `resumed`);
    a new run logs its params and config."""
    from ds2exp.models.deepspeech2 import count_parameters
    from ds2exp.training import recovery
    from ds2exp.training.checkpoint import prime_optimizer
    from ds2exp.training.signals import warm_up_runtime
    from ds2exp.training.trainer import Trainer
    from ds2exp.tracking import make_tracker

    cfg, run_dir = run.cfg, run.run_dir
    if world == 1:
        setup_mindspore(cfg.hardware, cfg.trainer.seed)
        warm_up_runtime()  # MindSpore's runtime installs its SIGINT handler with its first op ...
        run.interrupt.reassert()  # ... ours goes back on top (measured: MindSpore does not install it again)
    run.data = build_data(cfg, run_dir, rank=0, world=world)
    run.model, run.optimizer = _model_and_optimizer(cfg)
    run_id = _continued_mlflow_run(cfg, run_dir, resumed) if continues else None
    run.tracker = tracker = make_tracker(cfg.logger, run_name=cfg.logger.run_name or run_dir.name, run_id=run_id,
                                         tags={"ds2exp.run_dir": str(run_dir)}, spool_dir=run_dir,
                                         adopt_spool=continues)
    run.audit = _audit_training_data(cfg, tracker)
    train_loader = run.data["train"]
    steps_per_epoch = len(train_loader.sampler)
    parallel = _join_data_parallel(run.model, world) if world > 1 else {}
    run.trainer = trainer = Trainer(cfg, run.model, run.optimizer, train_loader, run.data["val"], tracker, run_dir,
                                    steps_per_epoch, **parallel)
    if world > 1:
        tracker.set_tags({"ds2exp.data_parallel_ranks": world,
                          "ds2exp.global_batch_size": world * int(cfg.dataset.batch_size)})
    if resumed:
        prime_optimizer(run.optimizer)  # then restore: bitwise the uninterrupted run, denormals included
        trainer.restore(resumed)
        # Steps after this checkpoint that the interrupted process had already logged are logged
        # again by the replay (same values on CPU); MLflow keeps both, the later one is "latest".
        tracker.set_tags({"ds2exp.resume_count": run.resumes, "ds2exp.resumed_from_step": trainer.state.step})
    else:
        if continues:
            tracker.set_tags({"ds2exp.resume_count": run.resumes, "ds2exp.resumed_from_step": 0})
        _log_new_run(run)
    recovery.write_run_state(run_dir, mlflow_run_id=tracker.run_id)
    dropped = train_loader.split.drop_counts()
    if dropped:
        log.info("train split: dropped %s", dropped)
        tracker.log_dict({"train": train_loader.split.dropped}, "data/dropped_train.json")
    log.info("run directory: %s", run_dir)
    log.info("model: %s parameters; train: %d utterances (%.2f h), %d steps/epoch",
             f"{count_parameters(run.model):,}", len(train_loader.split.examples),
             train_loader.split.total_audio_seconds / 3600, steps_per_epoch)
    return run


def _audit_training_data(cfg: DictConfig, tracker):
    """The corpus audit of the training split (cached per source): its hazards logged, its report to MLflow."""
    from ds2exp.data.audit import audit_split

    report = audit_split(cfg, "train", progress=bool(cfg.trainer.progress))
    for line in report.lines():
        (log.warning if report.fatal else log.info)("data audit: %s", line)
    tracker.log_dict(report.to_json(), "data/audit_train.json")
    return report


def _model_and_optimizer(cfg: DictConfig, announce: bool = True):
    """The model (initialised from `pretrained` when set) and its optimizer."""
    from ds2exp.models.deepspeech2 import load_state
    from ds2exp.training.checkpoint import load_checkpoint
    from ds2exp.training.optim import build_optimizer

    model = build_model_for_precision(cfg)
    if cfg.pretrained:
        pre = load_checkpoint(cfg.pretrained)
        load_state(model, pre.model_state)
        if announce:
            log.info("initialised from %s", pre.path)
    return model, build_optimizer(model.trainable_params(), cfg.optimizer)


def _continued_mlflow_run(cfg: DictConfig, run_dir: Path, resumed) -> Optional[str]:
    """The MLflow run a continued run logs to: its checkpoint's, else the one created after that
    checkpoint (store down at start) or before the first one."""
    from ds2exp.tracking.resilient import read_state

    run_id = resumed.meta.get("mlflow_run_id") if resumed else None
    state = read_state(run_dir)
    if not run_id and state.get("tracking_uri") == str(cfg.logger.tracking_uri):
        run_id = state.get("run_id")
    return run_id


def _log_new_run(run: Run) -> None:
    """Params (config, versions, model and data size) and the config files of a run starting at step 0."""
    import mindspore as ms

    from ds2exp.models.deepspeech2 import count_parameters
    from ds2exp.tracking.mlflow_tracker import flatten

    cfg, train_loader = run.cfg, run.data["train"]
    resolved = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
    params = flatten(resolved)
    params.update({"git_commit": git_commit(), "mindspore_version": ms.__version__,
                   "ds2exp_version": ds2exp.__version__, "device": enum_value(cfg.hardware.device_target),
                   "platform": platform.platform(), "model_parameters": count_parameters(run.model),
                   "train_utterances": len(train_loader.split.examples),
                   "train_audio_hours": round(train_loader.split.total_audio_seconds / 3600, 4)})
    run.tracker.log_params(params)
    run.tracker.log_text(OmegaConf.to_yaml(cfg, resolve=True), "config/resolved.yaml")
    overrides = _hydra_overrides()
    run.tracker.log_text("\n".join(overrides) + "\n", "config/overrides.txt")
    (run.run_dir / "resolved_config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    if cfg.trainer.get("auto_resume"):
        run.trainer.save_last()  # step 0: a crash from here on resumes this run, not a new one


def fit(run: Run) -> Tuple[str, Dict[str, Any]]:
    """Train until a limit or the divergence policy stops; returns (outcome, summary), outcome
    finished or diverged. A signal ends the run after the current step: TrainingInterrupted."""
    from ds2exp.training.signals import TrainingInterrupted
    from ds2exp.training.trainer import TrainingStopped

    trainer, interrupt = run.trainer, run.interrupt
    interrupt.deferred = True  # from here a signal ends the run after the current step
    trainer.interrupt = interrupt
    try:
        summary, outcome = trainer.fit(), "finished"
    except TrainingStopped as stop:
        summary, outcome = _record_divergence(run, stop.diagnosis), "diverged"
    if interrupt.requested and outcome == "finished":
        # data parallel: the ranks stopped together after the signal (fit saved last.ckpt)
        raise TrainingInterrupted(interrupt.signum, trainer.state.step, RunDir(trainer.run_dir).last)
    return outcome, summary


def _record_divergence(run: Run, d: Dict[str, Any]) -> Dict[str, Any]:
    """Tags, diagnosis.json and diagnosis.txt of a run the divergence policy stopped; returns its summary."""
    from ds2exp.training.diagnosis import format_text

    tracker, run_dir = run.tracker, run.run_dir
    d.setdefault("diverged_at_step", d.get("step"))
    d.setdefault("first_bad_step", d.get("step"))
    if run.audit is not None:  # what the audit knows of the bad batch's utterances
        for u in d.get("batch") or []:
            u["hazards"] = run.audit.hazards_of(u["id"])
    tags = {"diverged_at_step": d["diverged_at_step"], "first_bad_step": d["first_bad_step"],
            "divergence_cause": d.get("cause", "unknown"), "first_nonfinite_group": d.get("first_nonfinite_group")}
    tracker.set_tags({k: v for k, v in tags.items() if v is not None})  # a loss explosion names no group
    (run_dir / "diagnosis.json").write_text(json.dumps(d, indent=1, default=str))
    tracker.log_artifact(run_dir / "diagnosis.json")
    if "cause" in d:
        (run_dir / "diagnosis.txt").write_text(format_text(d))
        tracker.log_artifact(run_dir / "diagnosis.txt")
    log.error("training stopped: %s", d.get("summary"))
    return {"stop_reason": "nonfinite", **d}  # stop_reason: stopped by the divergence policy


def finish_run(run: Run, outcome: str, summary: Dict[str, Any]) -> Dict[str, Any]:
    """summary.json, curves and artifacts; ends the MLflow run (FINISHED, or FAILED when diverged)."""
    report = _finish(run.trainer, run.tracker, run.cfg, run.run_dir, summary, outcome)
    run.tracker.end("FINISHED" if outcome == "finished" else "FAILED")
    return report


def _end_failed(run: Run, exc: BaseException) -> None:
    """A crash: run_state failed, the error tagged, MLflow FAILED, and the summary printed."""
    from ds2exp.training import recovery
    from ds2exp.training import summary as run_summary

    import traceback

    error = one_line_error(exc)[:2000]
    recovery.write_run_state(run.run_dir, status="failed", error=error)
    report = _report("failed", {"stop_reason": "error", "error": error}, run.trainer, run.cfg, run.run_dir,
                     run.tracker)
    if run.tracker is not None:
        run.tracker.set_tags({"ds2exp.status": "failed", "ds2exp.error": error, **run_summary.note_tags(report)})
        run.tracker.log_text("".join(traceback.format_exception(type(exc), exc, exc.__traceback__)),
                             "error/traceback.txt")
        run.tracker.end("FAILED")
    _print_summary(report, run.tracker)
    if isinstance(exc, Exception):
        exc.summary_printed = True  # type: ignore[attr-defined]


def _report(outcome: str, base: Dict[str, Any], trainer, cfg, run_dir: Path, tracker,
            write: bool = True) -> Dict[str, Any]:
    """summary.json for this outcome (written when `write`; a failing disk only costs a warning)."""
    from ds2exp.training import summary as run_summary

    report = run_summary.build(outcome, base, trainer.state if trainer is not None else None, cfg, run_dir,
                               tracker)
    if write:
        try:
            (run_dir / "summary.json").write_text(json.dumps(report, indent=1, default=str))
        except OSError as exc:
            log.warning("could not write %s: %s", run_dir / "summary.json", exc)
    return report


def _print_summary(report: Dict[str, Any], tracker) -> None:
    from ds2exp.training.summary import format_summary

    print("\n" + format_summary(report, getattr(tracker, "pending", 0), getattr(tracker, "spool_path", None)),
          flush=True)


def _end_interrupted(exc, trainer, tracker, cfg, run_dir: Path) -> Dict[str, Any]:
    """Mark a run a signal stopped: run_state interrupted, summary.json, MLflow KILLED."""
    from ds2exp.training import recovery
    from ds2exp.training.signals import signal_name

    base = {"stop_reason": "interrupted", "signal": signal_name(exc.signum)}
    step = trainer.state.step if trainer is not None else None
    log.warning("%s: stopped %s%s", base["signal"], f"at step {step}" if step is not None else "during set-up",
                f"; checkpoint {exc.checkpoint}" if exc.checkpoint else "")
    recovery.write_run_state(run_dir, status="interrupted", step=step, signal=base["signal"],
                             **({"mlflow_run_id": tracker.run_id} if tracker is not None and tracker.run_id else {}))
    if trainer is not None:
        report = _finish(trainer, tracker, cfg, run_dir, base, "interrupted")
    else:
        report = _report("interrupted", {**base, "step": None}, None, cfg, run_dir, tracker)
        if tracker is not None:
            from ds2exp.training.summary import note_tags

            tracker.set_tags(note_tags(report))
    if tracker is not None:
        tracker.end("KILLED")
    return report


def _join_data_parallel(model, world: int) -> Dict[str, Any]:
    """The Trainer's data-parallel settings (reducer, rank, is_primary); gives every rank rank 0's weights."""
    from ds2exp.training.distributed import GradientAverager

    from mindspore.communication import get_rank

    reducer = GradientAverager(world)
    # the same seed gives every rank the same initial weights; rank 0's are made the rule anyway
    reducer.broadcast_from_rank0(list(model.get_parameters()))
    rank = int(get_rank())
    return {"reducer": reducer, "rank": rank, "is_primary": rank == 0}


def _train_secondary(cfg: DictConfig, run_dir: Path, resumed, rank: int, world: int, interrupt) -> RunOutcome:
    """Ranks 1..N-1: train on their shard, in step with rank 0; no MLflow, no files."""
    from ds2exp.training.checkpoint import prime_optimizer
    from ds2exp.training.trainer import Trainer, TrainingStopped
    from ds2exp.tracking.mlflow_tracker import NullTracker

    data = build_data(cfg, None, rank=rank, world=world)
    model, optimizer = _model_and_optimizer(cfg, announce=False)
    trainer = Trainer(cfg, model, optimizer, data["train"], None, NullTracker(), run_dir, len(data["train"].sampler),
                      **_join_data_parallel(model, world))
    if resumed:
        prime_optimizer(optimizer)
        trainer.restore(resumed)
    log.info("data-parallel rank %d/%d: %d batches per epoch", rank, world, len(data["train"].sampler))
    interrupt.deferred = True
    trainer.interrupt = interrupt
    try:
        trainer.fit()
    except TrainingStopped as stop:
        # rank 0 records the divergence and exits 1; exit 0 here, or the launcher's watch would take this
        # rank for a dead one while rank 0 is still writing its diagnosis
        log.error("rank %d: training stopped: %s", rank, stop.diagnosis.get("summary"))
        return RunOutcome("finished", float("nan"))
    if interrupt.requested:  # rank 0 records the interrupted run; exit 0, or msrun would kill rank 0
        log.warning("rank %d: stopped by a signal after step %d", rank, trainer.state.step)
    return RunOutcome("finished", float("nan"))


def resume_config(cfg: DictConfig, saved: Optional[Dict[str, Any]], overrides) -> DictConfig:
    """The checkpoint's own config, with only what this command line overrides explicitly
    (e.g. a larger trainer.max_steps) taken from the new one: a resumed run continues the
    experiment it belongs to, not whatever the defaults are today."""
    if not saved:
        return cfg
    merged = OmegaConf.merge(cfg, saved)
    for ov in overrides:
        key = ov.split("=", 1)[0].lstrip("+~")
        if key in ("resume",) or "/" in key or key.startswith("hydra"):
            continue
        value = OmegaConf.select(cfg, key, default=None)
        OmegaConf.update(merged, key, value, merge=False)
    merged.resume = cfg.resume
    return merged


def _hydra_overrides():
    try:
        from hydra.core.hydra_config import HydraConfig

        return list(HydraConfig.get().overrides.task)
    except (ImportError, ValueError):
        return []


def _finish(trainer, tracker, cfg, run_dir: Path, summary: Dict[str, Any], outcome: str) -> Dict[str, Any]:
    """summary.json, curves, artifacts and the ds2exp.status tag of a run that ended with `outcome`;
    returns the summary."""
    from ds2exp.tracking.plots import plot_curves
    from ds2exp.training.summary import note_tags

    s = trainer.state
    summary = _report(outcome, summary, trainer, cfg, run_dir, tracker)
    tags = {"ds2exp.status": outcome, **note_tags(summary)}  # the summary (and diagnosis) as its description
    if summary.get("first_bad_step") is not None:
        tags["first_bad_step"] = summary["first_bad_step"]
    tracker.set_tags(tags)
    png = plot_curves(s.history, run_dir / "curves.png", s.first_bad_step, summary.get("diverged_at_step"))
    if png is not None:
        tracker.log_artifact(png, "plots")
    failures = trainer.train_loader.failures
    if failures:  # audio that broke after preparation: skipped batch entries, listed by reason
        log.warning("%d training utterances could not be loaded and were skipped", len(failures))
        tracker.log_dict(failures, "data/load_failures_train.json")
        tracker.log_metrics({"data/load_failures": len(failures)}, s.step)
    tracker.log_artifact(run_dir / "summary.json")
    # an interrupted run uploads its best checkpoint when it is resumed and ends
    if outcome != "interrupted" and s.best and cfg.logger.log_checkpoint and Path(s.best[0]["path"]).exists():
        tracker.log_artifact(s.best[0]["path"], "checkpoints")
    return summary
