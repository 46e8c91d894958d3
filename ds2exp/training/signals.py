"""Ctrl-C and SIGTERM during training: finish the step, checkpoint it, end the run as interrupted.

What MindSpore 2.8 does with signals (measured on CPU with strace and sigaction queries): its first
op installs a SIGINT handler (libmindspore_runtime_pipeline.so), and from then on its runtime
threads install SIGINT handlers around the graphs they run (libmindspore_ms_backend.so,
libmindspore_common.so; every optimizer step does), racing with each other and with any handler
set from Python. Each of those handlers answers SIGINT with `kill(getpid(), SIGTERM)`, and the
default SIGTERM action ends the process: exit -15, Python's KeyboardInterrupt never runs.
MindSpore never touches SIGTERM. So ds2exp owns SIGTERM:

- SIGTERM gets a C-level handler (a numba `cfunc`, SA_SIGINFO) that reads the sender's pid: a
  SIGTERM the process sent itself is MindSpore passing on a SIGINT and is handed to Python as
  SIGINT, any other as SIGTERM (without numba every SIGTERM is reported as SIGTERM);
- SIGINT gets a Python handler, set again after MindSpore's first op (`warm_up_runtime`) and after
  every step (`check`), which catches a SIGINT that arrives while no MindSpore graph runs.

What a signal does, by phase:

- set-up (data preparation, model build, MLflow run): stop at once (`TrainingInterrupted` is raised
  where the program is); every file ds2exp writes is written atomically;
- training: the current step (and a validation that is running) completes, `last.ckpt` of that
  step is written, then `TrainingInterrupted` ends the run (ds2exp.training.run marks it);
- a second SIGINT/SIGTERM at any time: `os._exit(130)` / `os._exit(143)` as soon as the MindSpore
  op that is running returns; the last complete checkpoint is intact, since checkpoints are
  written to a temporary file and renamed.

Data parallel: every rank is told through the stop flag the ranks already exchange with the
gradients (the one `trainer.max_minutes` uses), so all ranks stop after the same step.
"""
from __future__ import annotations

import ctypes
import logging
import os
import platform
import signal
import threading
from pathlib import Path
from typing import Dict, Optional

log = logging.getLogger(__name__)

SIGNALS = (signal.SIGINT, signal.SIGTERM)


def exit_status(signum: int) -> int:
    """The shell's convention: 128 + the signal number (SIGINT 130, SIGTERM 143)."""
    return 128 + int(signum)


def signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


class TrainingInterrupted(KeyboardInterrupt):
    """A signal ended training. `step`: the last completed step (None: before training started);
    `checkpoint`: the checkpoint of that step, if one was written."""

    def __init__(self, signum: int, step: Optional[int] = None, checkpoint: Optional[Path] = None):
        where = f"after step {step}" if step is not None else "before training started"
        super().__init__(f"{signal_name(signum)} {where}")
        self.signum = int(signum)
        self.step = step
        self.checkpoint = checkpoint

    @property
    def exit_status(self) -> int:
        return exit_status(self.signum)


def warm_up_runtime() -> None:
    """Run one tiny MindSpore op, so that MindSpore's runtime (and its SIGINT handler) is set up
    before ours is set again."""
    import mindspore as ms
    import numpy as np

    (ms.Tensor(np.ones(2, np.float32)) + 1).asnumpy()


def _say(text: str) -> None:
    try:  # os.write: safe inside a signal handler, unlike print
        os.write(2, f"\n[ds2exp] {text}\n".encode())
    except OSError:
        pass


# ------------------------------------------------------------------ SIGTERM at the C level
class _SigAction(ctypes.Structure):  # glibc's struct sigaction on 64-bit Linux
    _fields_ = [("handler", ctypes.c_void_p), ("mask", ctypes.c_ulong * 16), ("flags", ctypes.c_int),
                ("restorer", ctypes.c_void_p)]


_SA_SIGINFO, _SA_ONSTACK, _SA_RESTART = 0x4, 0x08000000, 0x10000000
_keep_alive: list = []  # the compiled handler and the function pointer it calls must outlive it


def _install_sigterm_forwarder() -> bool:
    """Replace the C-level SIGTERM handler Python installed (call right after `signal.signal(SIGTERM,
    ...)`) by one that hands a self-sent SIGTERM to Python as SIGINT. False when not possible here."""
    if not (platform.system() == "Linux" and ctypes.sizeof(ctypes.c_void_p) == 8
            and platform.machine() in ("x86_64", "aarch64")):
        return False
    try:
        import numpy as np
        from numba import carray, cfunc, types

        libc = ctypes.CDLL(None, use_errno=True)
        current = _SigAction()
        if libc.sigaction(signal.SIGTERM, None, ctypes.byref(current)) != 0 or not current.handler:
            return False
        python_handler = ctypes.CFUNCTYPE(None, ctypes.c_int)(current.handler)  # CPython's signal_handler
        own_pid = os.getpid()
        sigint, sigterm = int(signal.SIGINT), int(signal.SIGTERM)

        @cfunc(types.void(types.int32, types.voidptr, types.voidptr))
        def forward(signum, info, context):  # async-signal-safe: reads siginfo, calls CPython's handler
            words = carray(info, (8,), dtype=np.int32)  # si_signo, si_errno, si_code, pad, si_pid, ...
            if words[4] == own_pid:
                python_handler(sigint)
            else:
                python_handler(sigterm)

        action = _SigAction()
        action.handler = forward.address
        action.flags = _SA_SIGINFO | _SA_RESTART | _SA_ONSTACK
        if libc.sigaction(signal.SIGTERM, ctypes.byref(action), None) != 0:
            return False
        _keep_alive[:] = [forward, python_handler]
        return True
    except Exception as exc:  # noqa: BLE001 - numba missing or failing: plain SIGTERM handling
        log.info("SIGTERM pid check not installed (%s: %s); a Ctrl-C MindSpore passes on is reported as "
                 "SIGTERM", type(exc).__name__, exc)
        return False


class StopOnSignal:
    """SIGINT/SIGTERM handlers for one training process (install in the main thread)."""

    def __init__(self) -> None:
        self.signum: Optional[int] = None
        self.deferred = False  # False: raise at once (set-up); True: stop after the current step
        self.forwarding = False  # SIGTERM's C-level handler tells MindSpore's forwarded SIGINT apart
        self._previous: Dict[int, object] = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def install(self) -> "StopOnSignal":
        if threading.current_thread() is not threading.main_thread():
            return self  # signal handlers can only be set from the main thread
        for sig in SIGNALS:
            previous = signal.signal(sig, self._handle)
            self._previous.setdefault(sig, previous)
        self.forwarding = _install_sigterm_forwarder()
        return self

    def reassert(self) -> None:
        """Set the SIGINT handler again (MindSpore's threads replace it); SIGTERM keeps its own."""
        if self._previous:
            signal.signal(signal.SIGINT, self._handle)

    def uninstall(self) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous if previous is not None else signal.SIG_DFL)
        self._previous = {}

    def _handle(self, signum: int, frame) -> None:
        name = signal_name(signum)
        if self.signum is not None:
            _say(f"second {name}: exiting now; the last complete checkpoint is kept")
            os._exit(exit_status(signum))
        self.signum = signum
        if not self.deferred:
            raise TrainingInterrupted(signum)
        _say(f"{name}: finishing the current step and saving a checkpoint "
             f"({'Ctrl-C' if signum == signal.SIGINT else 'the signal'} again exits at once)")

    def check(self, trainer) -> None:
        """Called by the trainer after each completed step: stop here when a signal came."""
        self.reassert()
        if self.signum is None:
            return
        if getattr(trainer, "reducer", None) is not None:
            # Data parallel: raise the stop flag the ranks exchange with the next step's gradients;
            # every rank then ends after that step, and the run ends as interrupted.
            trainer.deadline = 0.0
            return
        path = trainer.save_last()
        raise TrainingInterrupted(self.signum, trainer.state.step, path)


# ------------------------------------------------------------------ data parallel: the launcher
def _descendants(pid: int) -> list:
    """Processes below `pid` (from /proc)."""
    children: Dict[int, list] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as fh:
                ppid = int(fh.read().rsplit(b")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def _ms_role(pid: int) -> Optional[str]:
    try:
        with open(f"/proc/{pid}/environ", "rb") as fh:
            for item in fh.read().split(b"\0"):
                if item.startswith(b"MS_ROLE="):
                    return item[len(b"MS_ROLE="):].decode()
    except OSError:
        pass
    return None


def run_forwarding_signals(cmd, env, watch=None) -> tuple:
    """Run msrun (`cmd`) in a session of its own and pass SIGINT/SIGTERM sent to this process on to
    its training workers, which stop after their current step; msrun would SIGKILL them on Ctrl-C.
    `watch(proc, interrupted)` (ds2exp.training.rank_watch.RankWatch), when given, is called every
    `watch.interval` seconds while msrun runs, and afterwards as long as it returns True: it may end
    msrun and still be stopping the processes msrun started.
    Returns (msrun's exit status, the first signal forwarded or None)."""
    import subprocess
    import time

    proc = subprocess.Popen(cmd, env=env, start_new_session=True)
    received: list = []

    def forward(signum, frame):
        received.append(signum)
        workers = [p for p in _descendants(proc.pid) if _ms_role(p) == "MS_WORKER"]
        for pid in workers:
            try:
                os.kill(pid, signum)
            except ProcessLookupError:
                pass
        if not workers:  # none running (set-up or shutdown): end msrun and everything under it
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:  # msrun's group is gone already (a watch stopped it)
                pass
        _say(f"{signal_name(signum)}: passed on to {len(workers)} data-parallel worker(s)")

    previous = {sig: signal.signal(sig, forward) for sig in SIGNALS}
    try:
        if watch is None:
            returncode = proc.wait()
        else:
            while watch(proc, bool(received)) or proc.poll() is None:
                time.sleep(watch.interval)
            returncode = proc.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return returncode, (received[0] if received else None)
