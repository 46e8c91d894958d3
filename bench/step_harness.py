"""The step bench's processes: each row of the table runs in its own interpreter
(``python -m bench.step_harness --child NAME ...``), and the parent talks to it over stdin/stdout.

Children: ``peak`` (GEMM peak and memory read bandwidth), ``ds2exp`` (a real Trainer's train_step,
split by timers: value_and_grad, the Trainer's numpy gradient handling, Adam, and the host kernels
through ``ds2exp.kernels.settings.timing_hook``), ``naive`` (the model zoo recipe's layers and
launch mode), ``torch`` (bench/torch_baseline.py). ``--threads N`` runs a child on N threads: the
parent sets OMP_NUM_THREADS and DS2EXP_RNN_THREADS and pins it to N cores with taskset; the ds2exp
child also sets ``hardware.threads=N``, and takes further config overrides from
``DS2EXP_BENCH_OVERRIDES`` (space-separated, e.g. ``"model.conv_impl=plain model.rnn_layers=1"``:
what a variant of the model costs in time and peak memory).
"""
from __future__ import annotations

import argparse
import json
import os
import queue
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import ds2exp  # noqa: F401  (protobuf implementation before mindspore)
from bench.flops import FRAMES_PER_SECOND, ROOT, model_arch, synthetic_batch
from bench.timing import emit, median, timed_steps, timeit


def child_peak(args) -> Dict[str, Any]:
    import mindspore as ms
    import numpy as np
    from mindspore import ops

    ms.set_device("CPU")
    ms.set_context(mode=ms.PYNATIVE_MODE)
    ms.runtime.launch_blocking()
    n = args.gemm_n
    rng = np.random.default_rng(0)
    a = ms.Tensor(rng.standard_normal((n, n)).astype(np.float32))
    b = ms.Tensor(rng.standard_normal((n, n)).astype(np.float32))
    ops.matmul(a, b).asnumpy()
    ts = [timeit(lambda: ops.matmul(a, b).asnumpy()) for _ in range(args.steps)]
    best = min(ts)
    # memory read bandwidth: float32 dot of a 256 MB vector with itself (8x the 32 MB L3)
    v = rng.standard_normal(64 << 20).astype(np.float32)
    bw = min(timeit(lambda: v.dot(v)) for _ in range(5))
    return {"gflops": 2.0 * n ** 3 / best / 1e9, "n": n, "best_s": best, "median_s": median(ts),
            "read_gbs": v.nbytes / bw / 1e9}


def _ds2exp_trainer(model_name: str, batch_size: int, threads: Optional[int] = None, mode: str = "pynative"):
    """A real Trainer (and its config) as train.py builds it, minus MLflow; mode: hardware.mode."""
    from ds2exp.cli import compose_config
    from ds2exp.models.deepspeech2 import build_model
    from ds2exp.tracking.mlflow_tracker import NullTracker
    from ds2exp.training.optim import build_optimizer
    from ds2exp.runtime import setup_mindspore
    from ds2exp.training.trainer import Trainer

    overrides = [f"model={model_name}", "logger=none", "trainer.progress=false", f"dataset.batch_size={batch_size}",
                 f"hardware.mode={mode}"]
    if threads:
        overrides.append(f"hardware.threads={threads}")
    overrides += [o for o in os.environ.get("DS2EXP_BENCH_OVERRIDES", "").split() if o]
    if os.environ.get("DS2EXP_BENCH_DATA"):  # as bench/run_all.py's feature section
        overrides.append(f"paths.data_dir={Path(os.environ['DS2EXP_BENCH_DATA']).resolve()}")
    cfg = compose_config(overrides)
    setup_mindspore(cfg.hardware, int(cfg.trainer.seed))  # CPU: blocking launch (hardware.blocking_launch)
    model = build_model(cfg.model)
    optimizer = build_optimizer(model.trainable_params(), cfg.optimizer)
    run_dir = tempfile.mkdtemp(prefix="ds2exp-bench-")
    trainer = Trainer(cfg, model, optimizer, None, None, NullTracker(), Path(run_dir), steps_per_epoch=1)
    model.set_train(True)
    return cfg, model, trainer


class _Timed:
    """Wraps a callable; records wall and process-CPU time of each call, after `sync`."""

    def __init__(self, fn, sync=None):
        self.fn = fn
        self.sync = sync
        self.times: List[float] = []
        self.cpu: List[float] = []

    def __call__(self, *a, **k):
        t0, c0 = time.perf_counter(), time.process_time()
        out = self.fn(*a, **k)
        if self.sync is not None:
            self.sync(out)
        self.times.append(time.perf_counter() - t0)
        self.cpu.append(time.process_time() - c0)
        return out




class KernelTimes:
    """Sums the wall and process-CPU time of ds2exp's host kernels by name (the timing hook)."""

    def __init__(self):
        self.wall: Dict[str, float] = {}
        self.cpu: Dict[str, float] = {}

    def __call__(self, name: str, wall: float, cpu: float) -> None:
        self.wall[name] = self.wall.get(name, 0.0) + wall
        self.cpu[name] = self.cpu.get(name, 0.0) + cpu

    def reset(self) -> None:
        self.wall.clear()
        self.cpu.clear()


def child_ds2exp(args) -> Dict[str, Any]:
    import mindspore as ms
    import numpy as np

    from ds2exp.data.dataset import Batch

    from ds2exp import kernels
    from ds2exp.kernels import native as native_kernels

    times = KernelTimes()
    cfg, model, trainer = _ds2exp_trainer(args.model, args.batch, args.threads, args.mode)
    kernels.settings.timing_hook = times
    x, xl, y, yl = synthetic_batch(args.batch, args.frames)
    batch = Batch(x, xl, y, yl, [f"u{i}" for i in range(args.batch)], [args.frames / FRAMES_PER_SECOND] * args.batch,
                  [""] * args.batch)
    sync = lambda _out: ms.runtime.synchronize()  # noqa: E731
    grad_t = _Timed(trainer.grad_fn, sync=sync)
    opt_t = _Timed(trainer.optimizer, sync=sync)
    trainer.grad_fn = grad_t
    trainer.optimizer = opt_t
    losses: List[float] = []
    cpu: List[float] = []

    native_start: Dict[str, float] = {}

    def step():
        if len(losses) == args.warmup:  # first timed step: the kernel timers start from zero
            times.reset()
            native_start.update(native_kernels.kernel_seconds())
        c0 = time.process_time()
        losses.append(trainer.train_step(batch).loss)
        cpu.append(time.process_time() - c0)

    # warm-up steps are recorded too: drop them from every list afterwards
    ts, warm = timed_steps(args, step)
    n = len(ts)
    w = args.warmup
    fb, adam = np.array(grad_t.times[w:w + n]), np.array(opt_t.times[w:w + n])
    rest = np.array(ts) - fb - adam
    out: Dict[str, Any] = {"s": median(ts), "times": ts, "warmup_s": warm, "loss": losses[-1],
                           "finite": bool(np.isfinite(losses[w:]).all()), "cores": float(np.sum(cpu[w:]) / np.sum(ts))}
    timed_wall = float(np.sum(fb))
    out["profile"] = {"fwd_bwd": median(list(fb)), "numpy_grads": median(list(rest)), "adam": median(list(adam)),
                      "fwd_bwd_cores": float(np.sum(grad_t.cpu[w:w + n]) / max(timed_wall, 1e-9))}
    for k, wall in times.wall.items():
        out["profile"][k] = wall / n
        out["profile"][k + "_cores"] = times.cpu[k] / wall if wall else 0.0
    # the C++ recurrences time themselves (wall only: their threads are not this process's Python)
    for k, total in native_kernels.kernel_seconds().items():
        out["profile"][k] = (total - native_start.get(k, 0.0)) / n
        out["profile"][k + "_cores"] = float("nan")
    out["native_rnn"] = native_kernels.library() is not None
    out["threads"] = {"requested": args.threads, "kernels": kernels.settings.threads,
                      "affinity": len(os.sched_getaffinity(0))}
    if args.gemm_probe:  # the GEMM the peak is measured with, under this row's load
        a = ms.Tensor(np.random.default_rng(0).standard_normal((2048, 2048)).astype(np.float32))
        best = min(timeit(lambda: ms.ops.matmul(a, a).asnumpy()) for _ in range(5))
        out["gemm_gflops"] = 2.0 * 2048 ** 3 / best / 1e9
    if args.data_steps:
        out["data"] = _data_wait(cfg, trainer, args.data_steps)
    return out


def _data_wait(cfg, trainer, steps: int) -> Dict[str, Any]:
    """Trainer.fit's timing of wait vs step, with the real BatchLoader on synth_tiny."""
    from ds2exp.data.synth import SYNTH_PRESETS

    root = Path(str(cfg.dataset.root))
    if cfg.dataset.name not in SYNTH_PRESETS or not (root / "BUILD_INFO.json").is_file():
        return {"error": f"no built corpus at {root}"}
    from ds2exp.data.loaders import build_data

    data = build_data(cfg)  # the synthetic corpus is already built: this reads its manifests
    loader = data["train"]
    waits, steps_s, audio = [], [], []
    it = loader.iterate(epoch=1)  # a shuffled epoch (epoch 0 is SortaGrad: shortest first)
    t_wait = time.perf_counter()
    for k, b in enumerate(it):
        wait = time.perf_counter() - t_wait
        t0 = time.perf_counter()
        trainer.train_step(b)
        steps_s.append(time.perf_counter() - t0)
        waits.append(wait)
        audio.append(b.audio_seconds)
        if k + 1 >= steps:
            break
        t_wait = time.perf_counter()
    # the first batch waits for the pipeline to start: reported apart, left out of the share
    w, s = sum(waits[1:]), sum(steps_s[1:])
    return {"share": w / (w + s) if (w + s) > 0 else None, "first_wait_s": waits[0], "steps": len(waits) - 1,
            "step_s": s / max(1, len(steps_s) - 1), "audio_per_s": sum(audio[1:]) / (w + s) if (w + s) else None,
            "workers": int(cfg.dataset.num_workers)}


def child_naive(args) -> Dict[str, Any]:
    import mindspore as ms

    from ds2exp.models.ctc import ctc_losses
    from ds2exp.models.deepspeech2 import DeepSpeech2

    ms.set_device("CPU")
    ms.set_context(mode=ms.PYNATIVE_MODE)  # default asynchronous launch
    ms.set_seed(0)
    arch = model_arch(args.model)
    model = DeepSpeech2(conv_impl="plain", rnn_impl="plain", **arch)
    model.set_train(True)
    opt = ms.nn.Adam(model.trainable_params(), learning_rate=3e-4)
    x, xl, y, yl = (ms.Tensor(a) for a in synthetic_batch(args.batch, args.frames, pad_to=args.pad_to))

    def fwd(x, xl, y, yl):
        logits, ol = model(x, xl)
        return ctc_losses(logits, ol, y, yl).mean()

    grad = ms.value_and_grad(fwd, None, opt.parameters)

    def step():
        loss, g = grad(x, xl, y, yl)
        opt(g)
        return float(loss.asnumpy())

    def partial(**kw):  # what the parent reports if it has to kill this row
        emit("BENCH_PARTIAL", kw)

    t0 = time.perf_counter()
    partial(step_started=time.time(), times=[], warmup_s=None, loss=None, first=True)
    loss = None
    for _ in range(args.warmup):
        loss = step()
    warm = time.perf_counter() - t0
    ts: List[float] = []
    for _ in range(args.steps):
        partial(step_started=time.time(), times=ts, warmup_s=warm if args.warmup else None, loss=loss,
                first=not ts and not args.warmup)
        t0 = time.perf_counter()
        loss = step()
        ts.append(time.perf_counter() - t0)
    return {"s": median(ts), "times": ts, "warmup_s": warm if args.warmup else None, "loss": loss}

def child_torch(args) -> Dict[str, Any]:
    from bench.torch_baseline import child_torch as run

    return run(args)


CHILDREN = {"peak": child_peak, "ds2exp": child_ds2exp, "naive": child_naive, "torch": child_torch}


def child_main(argv: List[str]) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--child", required=True, choices=sorted(CHILDREN))
    ap.add_argument("--model", default="ds2_tiny")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--frames", type=int, default=300)
    ap.add_argument("--pad-to", type=int, default=None)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--interactive", action="store_true", help="one timed step per STEP line on stdin")
    ap.add_argument("--threads", type=int, default=0, help="0: the default (every core)")
    ap.add_argument("--gemm-n", type=int, default=2048)
    ap.add_argument("--data-steps", type=int, default=0)
    ap.add_argument("--gemm-probe", action="store_true")
    ap.add_argument("--mode", default="pynative", choices=["pynative", "graph"], help="ds2exp: hardware.mode")
    args = ap.parse_args(argv)
    emit("BENCH_JSON", CHILDREN[args.child](args))
    return 0


# --------------------------------------------------------------------------------------------
# parent: run the rows, print the table
# --------------------------------------------------------------------------------------------
class _Child:
    """One row's process: stdout lines arrive on a queue (a reader thread), stderr goes to a file,
    peak RSS comes from wait4 when it ends."""

    def __init__(self, child: str, **kw):
        cmd = [sys.executable, "-m", "bench.step_harness", "--child", child]
        env = dict(os.environ)
        threads = kw.get("threads")
        if threads:
            env.update(OMP_NUM_THREADS=str(threads), DS2EXP_RNN_THREADS=str(threads))
            cores = sorted(os.sched_getaffinity(0))
            if shutil.which("taskset") and threads <= len(cores):
                cmd = ["taskset", "-c", ",".join(str(c) for c in cores[:threads])] + cmd
        for k, v in kw.items():
            if isinstance(v, bool):
                if v:
                    cmd.append("--" + k.replace("_", "-"))
            elif v is not None:
                cmd += ["--" + k.replace("_", "-"), str(v)]
        self.t0 = time.perf_counter()
        self.err = tempfile.TemporaryFile("w+")
        self.p = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.err, text=True,
                                  cwd=str(ROOT), bufsize=1, env=env)
        self.lines: "queue.Queue[Optional[str]]" = queue.Queue()
        self.partial: Optional[Dict[str, Any]] = None
        self.rusage = None
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.p.stdout:
            self.lines.put(line.rstrip("\n"))
        self.lines.put(None)

    def expect(self, tag: str, timeout: float) -> Optional[str]:
        """The payload of the next line starting with `tag` (None: process ended or timeout)."""
        deadline = time.time() + timeout
        while True:
            try:
                line = self.lines.get(timeout=max(0.01, deadline - time.time()))
            except queue.Empty:
                return None
            if line is None:
                return None
            if line.startswith("BENCH_PARTIAL "):
                self.partial = json.loads(line[len("BENCH_PARTIAL "):])
            if line == tag or line.startswith(tag + " "):
                return line[len(tag) + 1:]

    def send(self, text: str) -> None:
        try:
            self.p.stdin.write(text + "\n")
            self.p.stdin.flush()
        except (BrokenPipeError, OSError):
            pass

    def finish(self, timeout: float) -> Dict[str, Any]:
        payload = self.expect("BENCH_JSON", timeout)
        killed_at = None
        if payload is None and self.p.poll() is None:
            self.p.kill()
            killed_at = time.time()
        _, status, self.rusage = os.wait4(self.p.pid, 0)
        self.p.returncode = os.waitstatus_to_exitcode(status)
        wall = time.perf_counter() - self.t0
        if payload is not None:
            res = json.loads(payload)
        elif killed_at is not None and self.partial is not None:
            res = dict(self.partial)  # the unfinished step ran for at least this long
            res["s"] = None
            res["lower_bound_s"] = killed_at - self.partial["step_started"]
            res["timed_out"] = timeout
        else:
            self.err.seek(0)
            tail = (self.err.read().strip().splitlines() or ["no output"])[-1][:160]
            why = f"timed out after {timeout:.0f} s" if killed_at else f"rc={self.p.returncode}: {tail}"
            res = {"error": why}
        self.err.close()
        res["wall_s"] = wall
        res["max_rss_mib"] = self.rusage.ru_maxrss / 1024.0  # KiB on Linux
        res["load"] = os.getloadavg()[0]
        return res


def run_child(child: str, timeout: float = 1200, **kw) -> Dict[str, Any]:
    """One row alone; killed after `timeout` s (a naive row then reports a lower bound)."""
    return _Child(child, **kw).finish(timeout)


def run_duel(a_kw: Dict[str, Any], b_kw: Dict[str, Any], steps: int, timeout: float = 900) -> List[Dict[str, Any]]:
    """Two rows alive together, taking turns one timed step at a time in A B B A order."""
    procs: List[_Child] = []
    for kw in (a_kw, b_kw):  # the second starts (and warms up) while the first waits
        c = _Child(interactive=True, **kw)
        procs.append(c)
        if c.expect("BENCH_READY", timeout) is None:
            results = []
            for p in procs:
                p.send("END")
                results.append(p.finish(60))
            return results + [{"error": "not run (the other row failed)"}] * (2 - len(results))
    for i in range(steps):
        for c in (procs if i % 2 == 0 else procs[::-1]):
            c.send("STEP")
            if c.expect("BENCH_STEP", timeout) is None:
                break
    results = []
    for c in procs:  # one at a time: what a row does after its timed steps must not overlap the other
        c.send("END")
        results.append(c.finish(timeout))
    return results




if __name__ == "__main__":
    sys.exit(child_main(sys.argv[1:]))
