"""Data-parallel training on MindSpore's own launcher, `msrun`.

`python train.py hardware.num_devices=2 ...` re-runs the same command under
`msrun --worker_num=2 --local_worker_num=2 --join=True`, with one fixed run directory for all
ranks. msrun starts a scheduler process and one worker per device, each running train.py:

* the scheduler (MS_ROLE=MS_SCHED) only joins the cluster (`init()`) and waits;
* each worker (MS_ROLE=MS_WORKER) trains on its shard of every epoch's batches
  (`BucketBatchSampler(rank, world)`), and after every backward the gradients, the loss and a
  few flags are averaged across ranks in one AllReduce (`GradientAverager`). Every rank therefore
  applies the same update and takes the same skip/stop decision on a non-finite step;
* rank 0 alone validates, writes checkpoints and logs to MLflow.

Commands started by msrun directly (several nodes: `msrun --worker_num=16 --local_worker_num=8
--master_addr=... --node_rank=... train.py hardware=gpu hardware.num_devices=16`) skip the relaunch,
because MS_ROLE is already set.

Measured with MindSpore 2.8.0 on CPU: init() picks the `mccl` backend; AllReduce supports SUM only
(float32/float16), so flags are summed as floats; `ops.Barrier` has no CPU kernel.
"""
from __future__ import annotations

import logging
import os
import shutil
import socket
import sys
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
from ds2exp.config import enum_value

log = logging.getLogger(__name__)

# Summed over ranks with the gradients: how many ranks are out of time / had an infeasible
# transcript / non-finite features, and the step's utterances and seconds of audio on all ranks.
FLAG_NAMES = ("stop_requested", "infeasible_batch", "bad_features", "utterances", "audio_seconds")


def role() -> Optional[str]:
    """MS_ROLE as msrun sets it: MS_SCHED for the scheduler, MS_WORKER for a training rank."""
    return os.environ.get("MS_ROLE") or None


def in_msrun_worker() -> bool:
    return role() == "MS_WORKER"



def run_scheduler(device_target: str = "CPU") -> None:
    """The msrun scheduler: join the cluster and serve it until the workers finish (init() returns
    only when the job ends; msrun then collects this process)."""
    import mindspore as ms
    from mindspore.communication import init

    ms.set_device(device_target)
    init()


def init_data_parallel(num_devices: int) -> Tuple[int, int]:
    """Join the collective group (call after setup_mindspore); returns (rank, world size)."""
    from mindspore.communication import get_group_size, get_rank, init

    init()
    rank, world = int(get_rank()), int(get_group_size())
    if world != num_devices:
        raise RuntimeError(f"hardware.num_devices={num_devices} but msrun started {world} workers; "
                           "make them agree (msrun --worker_num)")
    return rank, world


@dataclass
class Reduced:
    grads: tuple
    loss: float
    flags: dict  # FLAG_NAMES -> number of ranks that raised the flag


class GradientAverager:
    """Mean of the gradients and the loss over all ranks, plus summed flags, in one AllReduce of a
    flat float32 buffer (one collective per step instead of one per parameter)."""

    def __init__(self, world: int):
        from mindspore import ops

        self.world = world
        self._allreduce = ops.AllReduce()  # SUM: the only reduction MindSpore 2.8 has on CPU

    def reduce(self, grads: Sequence, loss: float, flags: Sequence[float]) -> Reduced:
        import mindspore as ms
        from mindspore import ops

        extras = ms.Tensor(np.asarray([loss, *flags], np.float32))
        total = self._allreduce(ops.cat([g.reshape(-1) for g in grads] + [extras]))
        out = tuple(part / self.world for part in _split(total, [g.shape for g in grads]))
        tail = total[-(len(flags) + 1):].asnumpy().astype(np.float64)
        return Reduced(out, float(tail[0] / self.world), dict(zip(FLAG_NAMES, tail[1:].tolist())))

    def average_in_place(self, params: Sequence) -> None:
        """Make `params` (e.g. BatchNorm moving statistics, which each rank updates from its own
        batch) equal on all ranks: their mean."""
        from mindspore import ops

        if not params:
            return
        total = self._allreduce(ops.cat([p.value().reshape(-1) for p in params]))
        for p, part in zip(params, _split(total, [p.shape for p in params])):
            ops.assign(p, part / self.world)

    def broadcast_from_rank0(self, params: Sequence) -> None:
        """Start every rank from rank 0's parameters (same seed gives the same init, this makes sure)."""
        from mindspore import ops

        if not params:
            return
        from mindspore.communication import get_rank

        flat = ops.cat([p.value().reshape(-1) for p in params])
        if get_rank() != 0:
            flat = ops.zeros_like(flat)
        total = self._allreduce(flat)  # rank 0's values + zeros: a broadcast built from SUM
        for p, part in zip(params, _split(total, [p.shape for p in params])):
            ops.assign(p, part.astype(p.dtype))


def _split(flat, shapes) -> List:
    """The tensors of `shapes` laid end to end at the start of the 1-D tensor `flat`."""
    out, offset = [], 0
    for shape in shapes:
        n = int(np.prod(shape))
        out.append(flat[offset:offset + n].reshape(shape))
        offset += n
    return out


# ------------------------------------------------------------------------------------ launching
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _explicit_run_dir(argv: Sequence[str]) -> Optional[str]:
    for a in argv:
        if a.startswith("hydra.run.dir="):
            return a.split("=", 1)[1]
    return None


def launch_command(script: Path, argv: Sequence[str], num_devices: int, run_dir: Path, port: int) -> List[str]:
    """The msrun command line that runs `script argv` on `num_devices` local workers."""
    args = [a for a in argv if not a.startswith("hydra.run.dir=")]
    return [sys.executable, "-m", "mindspore.parallel.cluster.run", f"--worker_num={num_devices}",
            f"--local_worker_num={num_devices}", f"--master_port={port}", f"--log_dir={run_dir / 'msrun_logs'}",
            "--join=True", str(script), *args, f"hydra.run.dir={run_dir}"]


def launch(script: Path, argv: Sequence[str], cfg) -> int:
    """Run `script argv` data-parallel under msrun on this machine; returns msrun's exit status."""
    from ds2exp.config import project_root

    n = int(cfg.hardware.num_devices)
    explicit = _explicit_run_dir(argv)
    run_dir = Path(explicit) if explicit else (
        Path(project_root()) / "outputs" / datetime.now().strftime("%Y-%m-%d/%H-%M-%S"))
    run_dir = run_dir.resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    # msrun starts the workers as plain `python <script>`: this interpreter must come first on PATH.
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    # msrun's cluster set-up logs hundreds of retry warnings while the ranks connect; errors only,
    # unless the user chose a level (GLOG_v).
    env.setdefault("GLOG_v", "3")
    if enum_value(cfg.hardware.device_target) == "CPU" and "OMP_NUM_THREADS" not in os.environ:
        env["OMP_NUM_THREADS"] = str(_cores_per_rank(n))
    # Build the data set (synthetic corpus, manifests) once, here, before N ranks would race to.
    from ds2exp.data.dataset import resolve_manifests

    resolve_manifests(cfg, progress=bool(cfg.trainer.progress))
    cmd = launch_command(Path(script), argv, n, run_dir, free_port())
    print(f"[ds2exp] data-parallel: {n} workers via msrun; run directory {run_dir}; "
          f"worker logs {run_dir / 'msrun_logs'}", flush=True)
    if shutil.which("python", path=env["PATH"]) is None:
        raise RuntimeError("msrun needs `python` on PATH")
    from ds2exp.training import rank_watch
    from ds2exp.training.signals import exit_status, run_forwarding_signals

    # When a rank dies (crash, SIGKILL, OOM killer, failed start-up), msrun SIGKILLs the others and then
    # waits on its scheduler for half a minute or more, and nothing records the run's end: the watch
    # stops them all within seconds and `report` records and prints the end.
    watch = rank_watch.RankWatch(n, run_dir)
    returncode, signum = run_forwarding_signals(cmd, env, watch)  # Ctrl-C: the workers stop after their step
    if watch.suspect is not None or (signum is None and watch.stopped):
        return rank_watch.report(watch, run_dir, cfg)
    if signum is not None:
        from ds2exp.training.summary import print_saved_summary

        print_saved_summary(run_dir)  # msrun stops showing rank 0's output once a worker has exited
        return exit_status(signum)
    if returncode != 0:
        print(f"[ds2exp] data-parallel run failed (msrun exit {returncode}); worker logs: "
              f"{run_dir / 'msrun_logs'}", file=sys.stderr)
    return returncode


def relaunch_under_msrun(script: Path, argv: Sequence[str], cfg) -> Optional[int]:
    """`python <script> argv` with hardware.num_devices > 1, outside msrun: run the same command under
    msrun (one worker per device) and return msrun's exit status; None when the command runs as it is
    (one device, already a worker, or only printing its config). `cfg`: the composed config, None if
    there is none (--help). A data-parallel sweep is refused with ValueError (a config error)."""
    if role() is not None or cfg is None or int(cfg.hardware.num_devices) <= 1:
        return None
    if any(a.split("=", 1)[0] in ("--cfg", "-c", "--info", "-i") for a in argv):
        return None
    if any(a in ("-m", "--multirun") for a in argv):
        raise ValueError("hardware.num_devices > 1 cannot be swept (-m); launch data-parallel runs one at a time")
    return launch(script, argv, cfg)


def threads_per_rank(hw_cfg, world: int) -> Optional[int]:
    """CPU threads for one rank: the configured number, else the cores shared out between the ranks."""
    if hw_cfg.threads:
        return int(hw_cfg.threads)
    if world > 1 and enum_value(hw_cfg.device_target) == "CPU":
        return _cores_per_rank(world)
    return None


def _cores_per_rank(world: int) -> int:
    return max(1, (os.cpu_count() or 1) // world)


def join_data_parallel(model, world: int) -> Dict[str, Any]:
    """The Trainer's data-parallel settings (reducer, rank, is_primary); gives every rank rank 0's weights."""
    from mindspore.communication import get_rank

    reducer = GradientAverager(world)
    # the same seed gives every rank the same initial weights; rank 0's are made the rule anyway
    reducer.broadcast_from_rank0(list(model.get_parameters()))
    rank = int(get_rank())
    return {"reducer": reducer, "rank": rank, "is_primary": rank == 0}


def train_secondary(cfg, run_dir: Path, resumed, rank: int, world: int, interrupt):
    """Ranks 1..N-1: train on their shard, in step with rank 0; no MLflow, no files."""
    from ds2exp.data.loaders import build_data
    from ds2exp.tracking.mlflow_tracker import NullTracker
    from ds2exp.checkpoints.io import prime_optimizer
    from ds2exp.training.ending import RunOutcome
    from ds2exp.training.optim import model_and_optimizer
    from ds2exp.training.state import TrainingStopped
    from ds2exp.training.trainer import Trainer, compiled_step

    data = build_data(cfg, None, rank=rank, world=world, fixed_label_length=compiled_step(cfg.hardware))
    model, optimizer = model_and_optimizer(cfg, announce=False)
    trainer = Trainer(cfg, model, optimizer, data["train"], None, NullTracker(), run_dir, len(data["train"].sampler),
                      **join_data_parallel(model, world))
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
