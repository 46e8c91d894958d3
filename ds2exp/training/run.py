"""One training run, top to bottom (called by train.py): choose the run directory (new, resumed or
auto-resumed), build the run (ds2exp.training.setup), fit, and end it (ds2exp.training.ending)."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Dict, Tuple

from omegaconf import DictConfig

from ds2exp.checkpoints.names import RunDir, resumed_run_dir
from ds2exp.config import project_root
from ds2exp.training import distributed, ending, recovery
from ds2exp.training.ending import RunOutcome
from ds2exp.training.signals import StopOnSignal, TrainingInterrupted, warm_up_runtime

log = logging.getLogger("ds2exp.train")


def train_command(cfg: DictConfig) -> int:
    """One `python train.py` run: train, print how it ended, return the exit status (ending.ENDINGS).
    A failure ends with the summary and one `error:` line; its traceback goes to train.log, not the console."""
    try:
        return train_run(cfg).exit_status
    except TrainingInterrupted as exc:
        return exc.exit_status
    except Exception as exc:  # noqa: BLE001 - every failure is reported the same way
        return ending.report_failure(exc, cfg, run_dir_from_hydra())


def train_run(cfg: DictConfig) -> RunOutcome:
    """Train and print the end-of-run summary. SIGINT/SIGTERM end the run after the current step
    (ds2exp.training.signals) and raise TrainingInterrupted once the run is marked interrupted."""
    interrupt = StopOnSignal().install()  # until MindSpore starts: a signal stops the set-up at once
    try:
        return _train_run(cfg, interrupt)
    finally:
        interrupt.uninstall()


def run_dir_from_hydra() -> Path:
    try:
        from hydra.core.hydra_config import HydraConfig

        return Path(HydraConfig.get().runtime.output_dir)
    except (ImportError, ValueError):
        from datetime import datetime

        return Path(project_root()) / "outputs" / datetime.now().strftime("%Y-%m-%d/%H-%M-%S")


def _train_run(cfg: DictConfig, interrupt) -> RunOutcome:
    """The run directory (a new one, the one `resume=` names, or the interrupted run auto_resume finds),
    locked while this process trains in it; data-parallel workers join their group first."""
    from ds2exp.runtime import setup_mindspore

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
            recovery.note_continued_elsewhere(run_dir_from_hydra(), found)
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
                from ds2exp.checkpoints.io import load_checkpoint

                resumed = load_checkpoint(cfg.resume)
            run_dir = resumed_run_dir(cfg.resume, resumed.meta)
            cfg = recovery.resume_config(cfg, resumed.meta.get("config"), recovery.hydra_overrides())
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


def _train(cfg: DictConfig, run_dir: Path, resumed, continues: bool, rank: int = 0, world: int = 1,
           interrupt=None) -> RunOutcome:
    """`continues`: this process carries on the run in `run_dir` (its MLflow run and tracking spool),
    from `resumed` (a checkpoint), or from step 0 when that is None. `rank`/`world`: data parallel
    (see ds2exp.training.distributed); ranks other than 0 write nothing to the run directory."""
    from ds2exp.training.setup import Run, build_run, mark_running

    interrupt = interrupt or StopOnSignal()
    if rank > 0:
        return distributed.train_secondary(cfg, run_dir, resumed, rank, world, interrupt)
    run = Run(cfg, run_dir, interrupt, resumes=mark_running(cfg, run_dir, continues))
    try:
        build_run(run, resumed, continues, world)
        outcome, summary = fit(run)
        report = ending.finish(run, outcome, summary)
    except TrainingInterrupted as exc:
        ending.end_interrupted(run, exc)
        raise
    except BaseException as exc:
        ending.end_failed(run, exc)
        raise
    best = run.trainer.state.best  # best first by trainer.monitor in trainer.monitor_mode
    return RunOutcome(outcome, float(best[0]["value"]) if best else float("nan"), report.get("diverged_at_step"))


def fit(run) -> Tuple[str, Dict[str, Any]]:
    """Train until a limit or the divergence policy stops; returns (outcome, summary), outcome
    finished or diverged. A signal ends the run after the current step: TrainingInterrupted."""
    from ds2exp.training.state import TrainingStopped

    trainer, interrupt = run.trainer, run.interrupt
    interrupt.deferred = True  # from here a signal ends the run after the current step
    trainer.interrupt = interrupt
    try:
        summary, outcome = trainer.fit(), "finished"
    except TrainingStopped as stop:
        summary, outcome = ending.record_divergence(run, stop.diagnosis), "diverged"
    if interrupt.requested and outcome == "finished":
        # data parallel: the ranks stopped together after the signal (fit saved last.ckpt)
        raise TrainingInterrupted(interrupt.signum, trainer.state.step, RunDir(trainer.run_dir).last)
    return outcome, summary
