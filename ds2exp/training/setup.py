"""A training process's set-up: MindSpore, data, model and optimizer, the MLflow run, the corpus audit
and the Trainer (restored from a checkpoint when the run continues), gathered in a `Run`."""
from __future__ import annotations

import logging
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Optional

import mindspore as ms
from omegaconf import DictConfig, OmegaConf

import ds2exp
from ds2exp.config import enum_value
from ds2exp.data.audit import audit_split
from ds2exp.data.loaders import build_data
from ds2exp.models.deepspeech2 import count_parameters
from ds2exp.runtime import git_commit, setup_mindspore
from ds2exp.tracking import make_tracker
from ds2exp.tracking.mlflow_tracker import flatten
from ds2exp.tracking.resilient import read_state
from ds2exp.training import recovery
from ds2exp.checkpoints.io import prime_optimizer
from ds2exp.training.optim import model_and_optimizer
from ds2exp.training.trainer import Trainer, compiled_step

log = logging.getLogger("ds2exp.train")


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


def mark_running(cfg: DictConfig, run_dir: Path, continues: bool) -> int:
    """run_state.json says `running`; returns how many times the run was resumed before."""
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
    from ds2exp.training.distributed import join_data_parallel
    from ds2exp.training.signals import warm_up_runtime

    cfg, run_dir = run.cfg, run.run_dir
    if world == 1:
        setup_mindspore(cfg.hardware, cfg.trainer.seed)
        warm_up_runtime()  # MindSpore's runtime installs its SIGINT handler with its first op ...
        run.interrupt.reassert()  # ... ours goes back on top (measured: MindSpore does not install it again)
    run.data = build_data(cfg, run_dir, rank=0, world=world, fixed_label_length=compiled_step(cfg.hardware))
    run.model, run.optimizer = model_and_optimizer(cfg)
    run_id = _continued_mlflow_run(cfg, run_dir, resumed) if continues else None
    run.tracker = tracker = make_tracker(cfg.logger, run_name=cfg.logger.run_name or run_dir.name, run_id=run_id,
                                         tags={"ds2exp.run_dir": str(run_dir)}, spool_dir=run_dir,
                                         adopt_spool=continues)
    run.audit = _audit_training_data(cfg, tracker)
    train_loader = run.data["train"]
    steps_per_epoch = len(train_loader.sampler)
    parallel = join_data_parallel(run.model, world) if world > 1 else {}
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
    report = audit_split(cfg, "train", progress=bool(cfg.trainer.progress))
    for line in report.lines():
        (log.warning if report.fatal else log.info)("data audit: %s", line)
    tracker.log_dict(report.to_json(), "data/audit_train.json")
    return report


def _continued_mlflow_run(cfg: DictConfig, run_dir: Path, resumed) -> Optional[str]:
    """The MLflow run a continued run logs to: its checkpoint's, else the one created after that
    checkpoint (store down at start) or before the first one."""
    run_id = resumed.meta.get("mlflow_run_id") if resumed else None
    state = read_state(run_dir)
    if not run_id and state.get("tracking_uri") == str(cfg.logger.tracking_uri):
        run_id = state.get("run_id")
    return run_id


def _log_new_run(run: Run) -> None:
    """Params (config, versions, model and data size) and the config files of a run starting at step 0."""
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
    overrides = recovery.hydra_overrides()
    run.tracker.log_text("\n".join(overrides) + "\n", "config/overrides.txt")
    (run.run_dir / "resolved_config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    if cfg.trainer.get("auto_resume"):
        run.trainer.save_last()  # step 0: a crash from here on resumes this run, not a new one
