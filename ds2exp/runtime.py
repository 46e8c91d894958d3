"""The MindSpore runtime a command runs on: its set-up (device, launch mode, threads, seeds), and whether
the installed build can use the configured device.

MindSpore's wheel carries GPU and Ascend plugins that load only where their drivers are installed
(CUDA and cuDNN; CANN). Asking for such a device without them fails inside MindSpore after the run
directory exists, and under msrun every rank exits while msrun waits; so the command-line checks ask
first, in a child process (setting the device fixes it for the life of a process).
"""
from __future__ import annotations

import functools
import json
import logging
import random
import re
import subprocess
import sys
from typing import Optional

import numpy as np

from ds2exp.config import enum_value, project_root

log = logging.getLogger(__name__)

# What each device needs besides the MindSpore wheel (https://www.mindspore.cn/install).
DEVICE_NEEDS = {
    "GPU": "a machine with an NVIDIA GPU, its driver, CUDA 11.6 and cuDNN 8 (MindSpore's GPU plugin loads them)",
    "Ascend": "an Ascend machine with the CANN toolkit installed and sourced (set_env.sh)",
}

_PROBE = r"""
import io, json, sys, contextlib
err = io.StringIO()
try:
    import mindspore as ms
    with contextlib.redirect_stderr(err):
        ms.set_device(sys.argv[1])
    print(json.dumps({"ok": True, "version": ms.__version__}))
except Exception as exc:
    print(json.dumps({"ok": False, "version": getattr(sys.modules.get("mindspore"), "__version__", "?"),
                      "error": str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__}))
"""


@functools.lru_cache(maxsize=None)
def _probe(target: str) -> dict:
    try:
        r = subprocess.run([sys.executable, "-c", _PROBE, target], capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.SubprocessError) as exc:
        return {"ok": False, "version": "?", "error": f"could not start the check: {exc}"}
    lines = [x for x in r.stdout.splitlines() if x.startswith("{")]
    if not lines:
        return {"ok": False, "version": "?", "error": (r.stderr.strip().splitlines() or ["no answer"])[-1]}
    out = json.loads(lines[-1])
    missing = sorted(set(re.findall(r"(lib\w+\.so)\s*\(need by", r.stderr)))
    if missing:
        out["missing"] = missing
    return out


def device_problem(device_target) -> Optional[str]:
    """None when this MindSpore can run on `device_target`; otherwise one line saying what to install."""
    target = str(enum_value(device_target))
    if target == "CPU":
        return None
    answer = _probe(target)
    if answer["ok"]:
        return None
    missing = f"; {', '.join(answer['missing'])} not found" if answer.get("missing") else ""
    detail = " ".join(answer.get("error", "").split())
    cut = detail.find(" Please check")
    detail = detail[:cut] if cut > 0 else detail[:160]
    return (f"the installed MindSpore {answer['version']} cannot use {target} here ({detail}{missing}); "
            f"{target} needs {DEVICE_NEEDS.get(target, 'its driver stack')}. Use hardware=cpu on this machine")


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
