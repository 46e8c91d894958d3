"""The data-parallel launcher's watch over its msrun workers: a rank that dies stops the whole run.

What msrun 2.8 does, measured on CPU with 2 ranks:

- each worker (`python train.py`) runs in a session of its own (setsid), with MS_ROLE=MS_WORKER and
  RANK_ID = MS_NODE_ID = its rank in its environment; the `tail -f` processes that copy the worker logs
  to the console carry the same variables but lead no session; the scheduler (MS_ROLE=MS_SCHED) stays
  in msrun's process group;
- msrun looks at its workers once a second; when one has exited non-zero (a crash, SIGKILL, the OOM
  killer) it SIGKILLs the others at once, then waits for the scheduler, which noticed the lost node
  33 s after a SIGKILL at step 5 (before all ranks joined, it waits up to msrun's --cluster_time_out,
  600 s by default) and ends with a traceback that msrun prints with one of its own; nothing records
  the run's end. Without msrun's kill, the surviving rank's AllReduce failed after ~30 s;
- a normal end is not simultaneous: rank 1 exits (status 0) while rank 0 still validates and writes
  its checkpoint and summary (3.4 s in a 4-step tiny run; minutes with a full validation). A worker
  that exits with status 0 is therefore never taken for a dead one.

So the launcher (`RankWatch`, called every POLL_S by `signals.run_forwarding_signals`) looks at the
workers itself: a worker that ended with a signal or a non-zero status while another still ran is a
dead rank. The launcher then takes msrun's place at once (SIGKILL to msrun alone, before msrun kills
the others or prints anything; the launcher is a child subreaper, so the workers become its children
and their exit statuses stay readable). It gives the others GRACE_S to end on their own (a rank that
ends with an exit status may be part of an end all ranks reached together, e.g. a divergence), none
after a death by signal, then SIGTERMs the worker groups and msrun's group (scheduler, log tails),
SIGKILLs what is left TERM_S later (a rank blocked in a collective never runs a Python signal
handler), and `report` records the end: run_state.json `failed`, the MLflow run FAILED with
`ds2exp.status`/`ds2exp.error`, summary.json, the printed summary and one `error:` line. When rank 0
had closed the run itself by then (run_state.json with its pid: all ranks diverged together, or rank
0's own crash, which it records), that record stands and sets the exit status. Whatever the workers
did, msrun and its scheduler are stopped LINGER_S after the last worker ended.
"""
from __future__ import annotations

import importlib
import ctypes
import logging
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from ds2exp.config import enum_value

log = logging.getLogger(__name__)

POLL_S = 0.05  # a worker's zombie lasts until msrun's next look (up to 1 s): seen well within that
SCAN_S = 0.25  # workers not found yet are looked for in all of /proc, less often
GRACE_S = 5.0  # for the other ranks to end on their own after one exited with a non-zero status
TERM_S = 3.0  # SIGTERM, then SIGKILL
LINGER_S = 10.0  # msrun or its scheduler still running this long after the last worker: stopped
TAIL_S = 1.0  # tail -f looks at a file once a second when it cannot use inotify
MSRUN_KILL_S = 2.0  # msrun SIGKILLs the other workers within its 1-second look after a non-zero exit
ENDED = ("finished", "diverged", "failed", "interrupted")  # run_state statuses that close a run
_PR_SET_CHILD_SUBREAPER = 36


def _stat(pid: int) -> Optional[List[str]]:
    """/proc/<pid>/stat after the command name (state, ppid, pgrp, session, ...); None: no such process."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            return fh.read().rsplit(b")", 1)[1].decode().split()
    except (OSError, IndexError, UnicodeDecodeError):
        return None


def _environ(pid: int) -> Dict[str, str]:
    try:
        with open(f"/proc/{pid}/environ", "rb") as fh:
            items = fh.read().split(b"\0")
    except OSError:
        return {}
    return dict(i.decode(errors="replace").split("=", 1) for i in items if b"=" in i)


@dataclass
class Worker:
    pid: int
    rank: int
    start: str  # /proc starttime: tells this process from a later one given the same pid
    ended: Optional[float] = None  # time.monotonic() when it was first seen gone
    status: Optional[int] = None  # its wait status, read from its zombie; None when not seen
    others_running: bool = False  # another worker had not ended when this one was seen gone

    @property
    def signum(self) -> Optional[int]:
        return self.status & 0x7F if self.status is not None and self.status & 0x7F else None

    @property
    def abnormal(self) -> bool:
        return self.status != 0  # a status not seen counts, see RankWatch._first_dead

    def how(self) -> str:
        if self.signum is not None:
            from ds2exp.training.signals import signal_name

            hint = " (kill -9 or the out-of-memory killer)" if self.signum == signal.SIGKILL else ""
            return f"was killed by {signal_name(self.signum)}{hint}"
        if self.status is not None:
            return f"exited with status {(self.status >> 8) & 0xFF}"
        return "exited"


class RankWatch:
    """Called as `watch(msrun_proc, interrupted)` every POLL_S while msrun runs, and after msrun ended
    as long as it returns True (it is still stopping what msrun started)."""

    interval = POLL_S

    def __init__(self, world: int, run_dir: Optional[Path] = None, grace_s: float = GRACE_S, term_s: float = TERM_S,
                 linger_s: float = LINGER_S):
        self.world, self.run_dir = world, run_dir
        self.grace_s, self.term_s, self.linger_s = grace_s, term_s, linger_s
        self.workers: Dict[int, Worker] = {}
        self.next_scan = 0.0
        self.suspect: Optional[Worker] = None  # the first rank that ended abnormally while others ran
        self.deadline = 0.0
        self.rank0_record: Optional[Dict[str, Any]] = None  # run_state.json, when rank 0 closed the run itself
        self.stopped = False  # this watch stopped msrun's processes
        self.stragglers: List[Worker] = []  # the workers still running when it did
        self._subreaper = False

    # ------------------------------------------------------------------ watching
    def __call__(self, proc, interrupted: bool) -> bool:
        if self.stopped:
            return False
        if not self._subreaper:  # orphans of a killed msrun become this process's children
            self._subreaper = True
            try:
                ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
            except (OSError, AttributeError):
                pass
        now = time.monotonic()
        self._discover(proc.pid, now)
        self._update(now)
        if self.suspect is None and not interrupted:  # after Ctrl-C the ranks end as they stop
            self.suspect = self._first_dead()
            if self.suspect is not None:
                _signal(proc.pid, signal.SIGKILL)  # msrun would only SIGKILL the others and print tracebacks
                _preload()
                self.deadline = self.suspect.ended + (0.0 if self.suspect.signum else self.grace_s)
        if self.suspect is not None:
            if any(w.ended is None for w in self.workers.values()) and now < self.deadline:
                return True
            self._stop()
            return False
        ended = [w.ended for w in self.workers.values() if w.ended is not None]
        if (self.workers and len(ended) == len(self.workers) and proc.poll() is None
                and now - max(ended) > self.linger_s):
            self._stop()  # every worker is gone but msrun waits on a scheduler that waits for them
        return False

    def _discover(self, msrun_pid: int, now: float) -> None:
        if len(self.workers) >= self.world or now < self.next_scan:
            return
        self.next_scan = now + SCAN_S
        from ds2exp.training.signals import _descendants

        for pid in _descendants(msrun_pid):
            # read again at every scan: between fork and exec a worker still shows msrun's environment
            st = _stat(pid)
            if st is None or pid in self.workers:
                continue
            env = _environ(pid)
            if env.get("MS_ROLE") != "MS_WORKER" or int(st[3]) != pid:  # not a session leader: a log tail
                continue
            rank = env.get("RANK_ID") or env.get("MS_NODE_ID")
            self.workers[pid] = Worker(pid, int(rank) if rank and rank.isdigit() else len(self.workers), st[19])

    def _update(self, now: float) -> None:
        running_before = {w.pid for w in self.workers.values() if w.ended is None}
        for w in self.workers.values():
            if w.ended is not None:
                continue
            st = _stat(w.pid)
            if st is not None and st[19] == w.start and st[0] not in ("Z", "X"):
                continue
            w.ended = now
            if st is not None and st[19] == w.start and len(st) > 49:
                w.status = int(st[49])  # a zombie's exit_code: its wait status
            w.others_running = bool(running_before - {w.pid})
            if w.status is not None:
                try:
                    os.waitpid(w.pid, os.WNOHANG)  # a zombie this process inherited: its status is read
                except ChildProcessError:
                    pass  # msrun's child: msrun reaps it

    def _first_dead(self) -> Optional[Worker]:
        """The first worker that ended with a signal or a non-zero status while another still ran. One
        whose status went unseen (msrun reaped it between two looks) counts once msrun has SIGKILLed
        another after it, which msrun does only after a non-zero exit."""
        found = []
        for w in self.workers.values():
            if w.ended is None or not w.others_running:
                continue
            if w.status is None and not any(o is not w and o.signum == signal.SIGKILL
                                            and 0 <= o.ended - w.ended <= MSRUN_KILL_S
                                            for o in self.workers.values() if o.ended is not None):
                continue
            if w.abnormal:
                found.append(w)
        return min(found, key=lambda w: (w.ended, w.status is not None)) if found else None

    # ------------------------------------------------------------------ stopping
    def _stop(self) -> None:
        """SIGTERM the workers' groups and msrun's (scheduler, log tails), SIGKILL what is left."""
        from ds2exp.training.signals import _descendants

        self.stopped = True
        self.stragglers = [w for w in self.workers.values() if w.ended is None]
        _preload()
        if self.run_dir is not None:  # before any signal of ours: what rank 0 recorded by itself
            from ds2exp.training.recovery import read_run_state

            state = read_run_state(self.run_dir)
            if state.get("status") in ENDED and state.get("pid") == self.rank0_pid():
                self.rank0_record = state
        if not self.stragglers:
            time.sleep(TAIL_S)  # msrun's `tail -f`s copy the end of the worker logs (a summary) to the console
        tree = set(_descendants(os.getpid()))
        groups = {g for g in map(_pgid_or_none, tree) if g is not None} | set(self.workers)
        groups.discard(os.getpgrp())
        for sig, wait in ((signal.SIGTERM, self.term_s), (signal.SIGKILL, 5.0)):
            for g in groups:
                _signal(g, sig, group=True)
            if sig == signal.SIGKILL:
                for p in tree:
                    _signal(p, sig)
            deadline = time.monotonic() + wait
            while any(_running(p) for p in tree) and time.monotonic() < deadline:
                time.sleep(POLL_S)
            if not any(_running(p) for p in tree):
                break
        for p in tree | set(self.workers):
            try:
                os.waitpid(p, os.WNOHANG)  # the zombies this process inherited as subreaper
            except ChildProcessError:
                pass

    # ------------------------------------------------------------------ the end
    def rank0_pid(self) -> Optional[int]:
        return next((w.pid for w in self.workers.values() if w.rank == 0), None)

    def culprit(self) -> Optional[Worker]:
        if self.suspect is not None:
            return self.suspect
        ended = sorted((w for w in self.workers.values() if w.ended is not None and w.abnormal),
                       key=lambda w: (w.ended, w.status is not None))
        return ended[0] if ended else None


_preloading: List[threading.Thread] = []


def _preload() -> None:
    """Import what `report` needs (MindSpore for the checkpoint reader, then MLflow: seconds each) while
    the processes are being stopped."""
    def load() -> None:
        for name in ("ds2exp.checkpoints.io", "mlflow.tracking"):
            try:
                importlib.import_module(name)
            except Exception as exc:  # noqa: BLE001 - `report` imports it again and says what fails
                log.debug("preloading %s failed: %s", name, exc)

    if not _preloading:
        _preloading.append(threading.Thread(target=load, name="ds2exp-preload", daemon=True))
        _preloading[0].start()


def _pgid_or_none(pid: int) -> Optional[int]:
    try:
        return os.getpgid(pid)
    except OSError:
        return None


def _signal(target: int, sig: int, group: bool = False) -> None:
    try:
        (os.killpg if group else os.kill)(target, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _running(pid: int) -> bool:
    st = _stat(pid)
    return st is not None and st[0] not in ("Z", "X")


# ---------------------------------------------------------------------------------- reporting
def report(watch: RankWatch, run_dir: Path, cfg) -> Optional[int]:
    """After msrun: when the watch stopped the run, record and print how it ended and return the exit
    status; None when msrun ended by itself (its own status stands)."""
    if not watch.stopped:
        return None
    culprit = watch.culprit()
    record = watch.rank0_record
    if record is not None:  # rank 0 closed the run itself (all ranks diverged, its own crash): that stands
        status = {"finished": 0, "interrupted": {"SIGINT": 130, "SIGTERM": 143}.get(record.get("signal"), 1)}.get(
            record["status"], 1)
        # not when the ranks ended together (a divergence), rank 0 perhaps still exiting after its record
        died = any(w.rank != 0 for w in watch.stragglers) or any(w.signum for w in watch.workers.values())
        if culprit is not None and status != 0 and died:
            print(f"error: {_message(culprit, run_dir, _last_step(run_dir, record, None))[1]}", file=sys.stderr,
                  flush=True)
        return status
    if culprit is None:
        return 0  # every worker ended with status 0; only msrun's scheduler had to be stopped
    from ds2exp.training import recovery
    from ds2exp.training.ending import print_summary

    state = recovery.read_run_state(run_dir)
    if state.get("pid") != watch.rank0_pid():  # rank 0 died before it marked the run: nothing in it is this run's
        state = {}
    uri = str(cfg.logger.tracking_uri) if enum_value(cfg.logger.backend) != "none" else None
    run_id = state.get("mlflow_run_id") if uri else None
    client = _mlflow_client(uri) if run_id else None
    step = _last_step(run_dir, state, (client, run_id) if client is not None else None)
    short, message = _message(culprit, run_dir, step)
    recovery.write_run_state(run_dir, status="failed", error=message[:2000],
                             **({"step": step} if step is not None else {}))
    exp_id = _end_mlflow_run(client, run_id, message) if client is not None else None
    print_summary(failed_summary(run_dir, cfg, step, short, run_id, exp_id), None)
    print(f"error: {message}", file=sys.stderr, flush=True)
    return 1


def _message(w: Worker, run_dir: Path, step: Optional[int]) -> Tuple[str, str]:
    """(what happened to the rank, the whole error line without `error: `)."""
    worker_log = run_dir / "msrun_logs" / f"worker_{w.rank}.log"
    own = _own_error(worker_log)
    short = f"data-parallel rank {w.rank} (pid {w.pid}) {w.how()}" + (f': "{own}"' if own else "")
    text = f"data-parallel rank {w.rank} (pid {w.pid}) {w.how()} "
    text += f"at step ~{step}" if step is not None else "before any step was recorded"
    if w.others_running:
        text += " while the other ranks trained" if step is not None else " while the other ranks started"
    if own:
        text += f': "{own}"'
    return short, f"{text}; stopped the run. Worker log: {worker_log}"


def _own_error(worker_log: Path) -> Optional[str]:
    """The rank's own last word in its log: its `error:` line, else the last traceback's exception."""
    try:
        with open(worker_log, "rb") as fh:
            fh.seek(max(0, os.fstat(fh.fileno()).st_size - 65536))
            lines = fh.read().decode(errors="replace").splitlines()
    except OSError:
        return None
    for line in reversed(lines):
        if line.startswith("error: "):
            return line[len("error: "):].strip()[:300]
    tb = [i for i, line in enumerate(lines) if line.startswith("Traceback (most recent call last)")]
    if tb:
        for line in lines[tb[-1] + 1:]:
            if line and not line[0].isspace():
                return line.strip()[:300]
    return None


def _last_step(run_dir: Path, state: Dict[str, Any], mlflow_run) -> Optional[int]:
    """The last step known to have run: rank 0's last checkpoint, its run_state, its MLflow train/loss
    (`mlflow_run`: (client, run id) or None)."""
    from ds2exp.checkpoints.names import RunDir
    from ds2exp.checkpoints.io import CheckpointError, verify_checkpoint

    steps = [state.get("step")]
    try:
        steps.append(verify_checkpoint(RunDir(run_dir).last, check_hash=False).step)
    except CheckpointError:
        pass
    if mlflow_run:
        client, run_id = mlflow_run
        try:
            steps += [m.step for m in client.get_metric_history(run_id, "train/loss")]
        except Exception as exc:  # noqa: BLE001 - the store may be down: the checkpoint's step will do
            log.info("could not read train/loss of MLflow run %s: %s", run_id, exc)
    steps = [s for s in steps if isinstance(s, int)]
    return max(steps) if steps else None


def _mlflow_client(uri: str):
    if uri.startswith(("http://", "https://")):  # a server that is down must not hold the launcher for minutes
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def _end_mlflow_run(client, run_id: str, message: str) -> Optional[str]:
    """End rank 0's MLflow run FAILED with the tags a crashed one-process run gets; its experiment id."""
    try:
        client.set_tag(run_id, "ds2exp.status", "failed")
        client.set_tag(run_id, "ds2exp.error", message[:2000])
        client.set_terminated(run_id, "FAILED")
        return str(client.get_run(run_id).info.experiment_id)
    except Exception as exc:  # noqa: BLE001 - the run directory records the failure all the same
        print(f"[ds2exp] could not mark MLflow run {run_id} FAILED: {str(exc).splitlines()[0][:200]}", flush=True)
        return None


def failed_summary(run_dir: Path, cfg, step: Optional[int], error: str, run_id: Optional[str],
                   exp_id: Optional[str]) -> Dict[str, Any]:
    """summary.json of the failed run, written by ds2exp.training.ending.write_summary as every run's is,
    from what rank 0 left: its last checkpoint (with the best ones it lists) and its MLflow run."""
    from types import SimpleNamespace

    from ds2exp.checkpoints.io import CheckpointError, verify_checkpoint
    from ds2exp.checkpoints.names import RunDir
    from ds2exp.training.ending import write_summary

    best = None
    try:
        meta = verify_checkpoint(RunDir(run_dir).last, check_hash=False).meta or {}
        kept = [b for b in meta.get("best", []) if Path(str(b.get("path"))).is_file()]
        if kept:
            b = kept[0]
            best = {"path": b.get("path"), "step": b.get("step"), "monitor": b.get("monitor", "val/wer"),
                    "value": b.get("value", b.get("wer")), "val_cer": b.get("val_cer"),
                    "val_wer": b.get("val_wer", b.get("wer")), "val_loss": b.get("val_loss")}
    except CheckpointError:
        pass
    base = {"stop_reason": "error", "error": error, "step": step, "best_checkpoint": best}
    rank0_run = SimpleNamespace(run_id=run_id, experiment_id=exp_id)  # what the summary reads of a tracker
    return write_summary("failed", base, None, cfg, run_dir, rank0_run)
