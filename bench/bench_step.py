"""One DeepSpeech2 training step, three ways, side by side in one run: ds2exp vs naive MindSpore vs PyTorch.

    .venv/bin/python -m bench.bench_step             # ds2_tiny and ds2_reference (10-15 minutes)
    .venv/bin/python -m bench.bench_step --quick     # ds2_tiny only (about 5 minutes)

Rows (each in its own subprocess, so peak memory and thread settings are isolated):

  ds2exp   a real ``ds2exp.training.trainer.Trainer`` built from the composed Hydra config
           (``setup_mindspore``: blocking launch; fast kernels; Adam; grad_clip 400) and its
           ``train_step``: value_and_grad, numpy gradient checks and per-group norms, clipping,
           optimizer. The step is split into value_and_grad / numpy gradient handling / Adam by
           timing wrappers around ``trainer.grad_fn`` and ``trainer.optimizer``, and value_and_grad
           further by timers around the numpy/numba kernels of the fast layers.
  naive    what the MindSpore model zoo recipe builds: nn.Conv2d + nn.LSTM (impl="plain"), default
           asynchronous launch, every utterance padded to 1250 frames, batch 1,
           value_and_grad + nn.Adam. Audio s/s counts the real (unpadded) audio of the utterance.
           ds2_reference: one step without warm-up, killed after --naive-timeout seconds (its
           s/step is then a lower bound, and what depends on it a bound).
  pytorch  the same architecture in PyTorch (conv + BN + activation, packed bidirectional nn.LSTM
           with directions summed, Linear without bias, nn.CTCLoss(blank=28), Adam,
           clip_grad_norm_), torch.set_num_threads(2), the same batch as the ds2exp row.

The ds2exp and PyTorch processes of a model are alive together and take turns, one step at a
time in A B B A order, so that both see the same machine load (the machine may be shared).
Seconds per step = median of the timed steps after warm-up. GFLOP/s = 3 x analytic forward FLOPs
(convolutions, LSTM input and recurrent matrix products, FC; element-wise work not counted) of the
shape actually computed (the naive row's 1250 padded frames included) / s per step, against the
GEMM peak: MindSpore ops.matmul of 2048x2048 float32, best of 5, in this run. Data wait: the
ds2exp Trainer fed by the real ``BatchLoader`` on synth_tiny (if built under data/): share of wall
time spent waiting for the next batch. Memory: ru_maxrss of each row's process (wait4).
"""
from __future__ import annotations

import argparse
import json
import os
import queue
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import ds2exp  # noqa: E402,F401  (protobuf implementation before mindspore)

NUM_BINS = 161
NUM_CLASSES = 29
BLANK = 28
FRAMES_PER_SECOND = 100  # 10 ms feature stride
NAIVE_FRAMES = 1250  # the model zoo pads every utterance to 1250 frames
TRAIN_CLEAN_100_HOURS = 100.6

ARCH_KEYS = ("conv_channels", "activation", "batch_norm", "rnn_type", "rnn_layers", "rnn_hidden", "bidirectional",
             "merge")
ARCH_DEFAULTS = {"batch_norm": True, "rnn_type": "lstm", "bidirectional": True, "merge": "sum"}

# model -> (batch, frames) of the ds2exp / PyTorch rows
SHAPES = {"ds2_tiny": (16, 300), "ds2_reference": (4, 400)}

TARGET_SPEEDUP = 20.0  # ds2exp audio s/s >= 20 x naive
TARGET_TORCH_RATIO = 1.2  # ds2exp s/step <= 1.2 x PyTorch
TARGET_PEAK_SHARE = 0.40  # ds2exp GFLOP/s >= 40 % of the GEMM peak on ds2_reference


# --------------------------------------------------------------------------------------------
# architecture, FLOPs, batches, verdicts (no MindSpore / PyTorch needed)
# --------------------------------------------------------------------------------------------
def model_arch(name: str) -> Dict[str, Any]:
    """Architecture keys of conf/model/<name>.yaml (missing keys take the schema defaults)."""
    from omegaconf import OmegaConf

    raw = OmegaConf.to_container(OmegaConf.load(ROOT / "conf" / "model" / f"{name}.yaml"))
    arch = {k: raw.get(k, ARCH_DEFAULTS.get(k)) for k in ARCH_KEYS}
    missing = [k for k, v in arch.items() if v is None]
    if missing:
        raise ValueError(f"conf/model/{name}.yaml lacks {missing}")
    return arch


def conv_shapes(frames: int, bins: int = NUM_BINS) -> Tuple[int, int, int, int]:
    """(F1, T1, F2, T2) after conv1 (41x11, stride 2x2, pad 20/5) and conv2 (21x11, stride 2x1, pad 10/5)."""
    f1 = (bins + 40 - 41) // 2 + 1
    t1 = (frames + 10 - 11) // 2 + 1
    f2 = (f1 + 20 - 21) // 2 + 1
    t2 = (t1 + 10 - 11) // 1 + 1
    return f1, t1, f2, t2


def _rnn_dims(arch: Dict[str, Any]) -> Tuple[int, int, int]:
    h = int(arch["rnn_hidden"])
    d = 2 if arch["bidirectional"] else 1
    g = (4 if str(arch["rnn_type"]) == "lstm" else 3) * h
    return h, d, g


def forward_flops(arch: Dict[str, Any], batch: int, frames: int, bins: int = NUM_BINS,
                  classes: int = NUM_CLASSES) -> Dict[str, float]:
    """Multiply-add FLOPs (2 per MAC) of one forward pass, by component.

    conv: 2 * B * O * F_out * T_out * C_in * kF * kT. RNN, per layer and direction:
    input projection 2 * B * T' * G * In and recurrence 2 * B * T' * G * H (G = 4H for LSTM, 3H
    for GRU). FC: 2 * B * T' * H_out * classes. BN, activations, gate non-linearities, the
    direction sum, log-softmax and CTC are element-wise and left out.
    """
    c = int(arch["conv_channels"])
    f1, t1, f2, t2 = conv_shapes(frames, bins)
    out: Dict[str, float] = {}
    out["conv1"] = 2.0 * batch * c * f1 * t1 * 1 * 41 * 11
    out["conv2"] = 2.0 * batch * c * f2 * t2 * c * 21 * 11
    h, d, g = _rnn_dims(arch)
    size = c * f2
    ih = hh = 0.0
    for _ in range(int(arch["rnn_layers"])):
        ih += 2.0 * batch * t2 * d * g * size
        hh += 2.0 * batch * t2 * d * g * h
        size = h if (d == 1 or arch["merge"] == "sum") else d * h
    out["rnn_input"] = ih
    out["rnn_recurrent"] = hh
    out["fc"] = 2.0 * batch * t2 * size * classes
    out["total"] = sum(out.values())
    return out


def train_flops(arch: Dict[str, Any], batch: int, frames: int) -> float:
    """Forward + backward = 3 x the forward FLOPs."""
    return 3.0 * forward_flops(arch, batch, frames)["total"]


def parameter_count(arch: Dict[str, Any], bins: int = NUM_BINS, classes: int = NUM_CLASSES) -> int:
    """Trainable parameters (convs without bias, BN gamma/beta, RNN with both biases, FC without bias)."""
    c = int(arch["conv_channels"])
    _, _, f2, _ = conv_shapes(100, bins)
    n = c * 41 * 11 + c * c * 21 * 11 + (4 * c if arch["batch_norm"] else 0)
    h, d, g = _rnn_dims(arch)
    size = c * f2
    for _ in range(int(arch["rnn_layers"])):
        n += d * (g * size + g * h + 2 * g)
        size = h if (d == 1 or arch["merge"] == "sum") else d * h
    return n + size * classes


def label_length(frames: int) -> int:
    """Synthetic transcript length: 12.5 characters per second of audio (synth_tiny: about 13)."""
    return max(1, frames // 8)


def synthetic_batch(batch: int, frames: int, pad_to: Optional[int] = None, seed: int = 0):
    """features (B, 161, pad_to or frames) float32 (zero beyond `frames`), lengths, labels, label lengths.

    The same seed gives the same numbers in every row (MindSpore or PyTorch)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    total = pad_to or frames
    x = np.zeros((batch, NUM_BINS, total), np.float32)
    x[:, :, :frames] = rng.standard_normal((batch, NUM_BINS, frames)).astype(np.float32)
    lengths = np.full((batch,), frames, np.int32)
    n = label_length(frames)
    y = rng.integers(0, BLANK, (batch, n)).astype(np.int32)  # letters only, never the blank
    y_len = np.full((batch,), n, np.int32)
    return x, lengths, y, y_len


def epoch_hours(audio_per_s: Optional[float], hours: float = TRAIN_CLEAN_100_HOURS) -> Optional[float]:
    """Wall hours to train once on `hours` of audio at `audio_per_s` audio seconds per second."""
    if not audio_per_s or audio_per_s <= 0:
        return None
    return hours / audio_per_s


def check(name: str, value: Optional[float], target: float, higher_is_better: bool, fmt: str,
          lower_bound: bool = False) -> str:
    """One target line. lower_bound: `value` is only known to be at least this (a killed naive step)."""
    if value is None:
        return f"  {name}: n/a (a row failed) ... MISS"
    ok = value >= target if higher_is_better else value <= target
    sign = ">=" if higher_is_better else "<="
    shown = (">" if lower_bound else "") + format(value, fmt)
    verdict = "PASS" if ok else ("MISS (lower bound only)" if lower_bound else "MISS")
    return f"  {name}: {shown} (target {sign} {format(target, fmt)}) ... {verdict}"


def _median(ts: List[float]) -> float:
    return float(statistics.median(ts))


def _timeit(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


# --------------------------------------------------------------------------------------------
# child rows (each runs in its own interpreter)
# --------------------------------------------------------------------------------------------
def _emit(tag: str, payload: Any = None) -> None:
    print(tag if payload is None else f"{tag} {json.dumps(payload)}", flush=True)


def _timed_steps(args, step: Callable[[], Any]) -> Tuple[List[float], float]:
    """Warm-up, then the timed steps: --steps of them, or with --interactive one per STEP line on
    stdin (the parent alternates two such processes) until END."""
    t0 = time.perf_counter()
    for _ in range(args.warmup):
        step()
    warm = time.perf_counter() - t0
    ts: List[float] = []
    if args.interactive:
        _emit("BENCH_READY")
        for line in sys.stdin:
            if line.strip() == "END":
                break
            t0 = time.perf_counter()
            step()
            ts.append(time.perf_counter() - t0)
            _emit("BENCH_STEP", ts[-1])
    else:
        for _ in range(args.steps):
            t0 = time.perf_counter()
            step()
            ts.append(time.perf_counter() - t0)
    return ts, warm


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
    ts = [_timeit(lambda: ops.matmul(a, b).asnumpy()) for _ in range(args.steps)]
    best = min(ts)
    # memory read bandwidth: float32 dot of a 256 MB vector with itself (8x the 32 MB L3)
    v = rng.standard_normal(64 << 20).astype(np.float32)
    bw = min(_timeit(lambda: v.dot(v)) for _ in range(5))
    return {"gflops": 2.0 * n ** 3 / best / 1e9, "n": n, "best_s": best, "median_s": _median(ts),
            "read_gbs": v.nbytes / bw / 1e9}


def _ds2exp_trainer(model_name: str, batch_size: int):
    """A real Trainer (and its config) as train.py builds it, minus MLflow."""
    from ds2exp.cli import compose_config
    from ds2exp.models.deepspeech2 import build_model
    from ds2exp.tracking.mlflow_tracker import NullTracker
    from ds2exp.training.optim import build_optimizer
    from ds2exp.training.run import setup_mindspore
    from ds2exp.training.trainer import Trainer

    overrides = [f"model={model_name}", "logger=none", "trainer.progress=false", f"dataset.batch_size={batch_size}"]
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


class _Accum:
    """Wraps a module-level function; sums its wall and process-CPU time (the pyfunc kernels)."""

    def __init__(self, fn):
        self.fn = fn
        self.total = 0.0
        self.cpu = 0.0

    def __call__(self, *a, **k):
        t0, c0 = time.perf_counter(), time.process_time()
        try:
            return self.fn(*a, **k)
        finally:
            self.total += time.perf_counter() - t0
            self.cpu += time.process_time() - c0


def _install_kernel_timers() -> Dict[str, _Accum]:
    """Time the host-side (numpy/numba) kernels inside ds2exp's fast layers. Must run before the
    model is built: the RNN pyfunc ops capture the kernels when the first FastRNN is made."""
    from ds2exp.models import layers as L

    fwd, bwd = L._NP_KERNELS["lstm"]
    timers = {"rnn_fwd": _Accum(fwd), "rnn_bwd": _Accum(bwd), "im2col": _Accum(L._freq_im2col),
              "col2im": _Accum(L._freq_col2im), "conv1_fwd": _Accum(L.direct_conv_forward),
              "conv1_dw": _Accum(L.direct_conv_weight_grad)}
    L._NP_KERNELS["lstm"] = (timers["rnn_fwd"], timers["rnn_bwd"])
    L._freq_im2col = timers["im2col"]
    L._freq_col2im = timers["col2im"]
    L.direct_conv_forward = timers["conv1_fwd"]
    L.direct_conv_weight_grad = timers["conv1_dw"]
    return timers


def child_ds2exp(args) -> Dict[str, Any]:
    import mindspore as ms
    import numpy as np

    from ds2exp.data.dataset import Batch

    timers = _install_kernel_timers()
    cfg, model, trainer = _ds2exp_trainer(args.model, args.batch)
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

    def step():
        if len(losses) == args.warmup:  # first timed step: the kernel timers start from zero
            for t in timers.values():
                t.total = t.cpu = 0.0
        c0 = time.process_time()
        losses.append(trainer.train_step(batch).loss)
        cpu.append(time.process_time() - c0)

    # warm-up steps are recorded too: drop them from every list afterwards
    ts, warm = _timed_steps(args, step)
    n = len(ts)
    w = args.warmup
    fb, adam = np.array(grad_t.times[w:w + n]), np.array(opt_t.times[w:w + n])
    rest = np.array(ts) - fb - adam
    out: Dict[str, Any] = {"s": _median(ts), "times": ts, "warmup_s": warm, "loss": losses[-1],
                           "finite": bool(np.isfinite(losses[w:]).all()), "cores": float(np.sum(cpu[w:]) / np.sum(ts))}
    timed_wall = float(np.sum(fb))
    out["profile"] = {"fwd_bwd": _median(list(fb)), "numpy_grads": _median(list(rest)), "adam": _median(list(adam)),
                      "fwd_bwd_cores": float(np.sum(grad_t.cpu[w:w + n]) / max(timed_wall, 1e-9))}
    for k, t in timers.items():
        out["profile"][k] = t.total / n
        out["profile"][k + "_cores"] = t.cpu / t.total if t.total else 0.0
    if args.gemm_probe:  # the GEMM the peak is measured with, under this row's load
        a = ms.Tensor(np.random.default_rng(0).standard_normal((2048, 2048)).astype(np.float32))
        best = min(_timeit(lambda: ms.ops.matmul(a, a).asnumpy()) for _ in range(5))
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
    from ds2exp.training.run import build_data

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

    from ds2exp.evaluation.runner import ctc_losses
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
        _emit("BENCH_PARTIAL", kw)

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
    return {"s": _median(ts), "times": ts, "warmup_s": warm if args.warmup else None, "loss": loss}


def _torch_model(arch):
    import torch
    from torch import nn

    c = int(arch["conv_channels"])
    _, _, f2, _ = conv_shapes(100)
    act = {"hardtanh": lambda: nn.Hardtanh(0, 20), "tanh": nn.Tanh, "relu": nn.ReLU}[str(arch["activation"])]
    h = int(arch["rnn_hidden"])
    bidir = bool(arch["bidirectional"])
    if str(arch["rnn_type"]) != "lstm":
        raise ValueError("the PyTorch baseline is written for LSTM models")
    merge_sum = bidir and arch["merge"] == "sum"

    class DS2(nn.Module):
        def __init__(self):
            super().__init__()
            # two conv stages, each masked past the output length afterwards (as ds2exp's ConvBlock)
            first = [nn.Conv2d(1, c, (41, 11), (2, 2), (20, 5), bias=False)]
            second = [nn.Conv2d(c, c, (21, 11), (2, 1), (10, 5), bias=False)]
            if arch["batch_norm"]:
                first.append(nn.BatchNorm2d(c))
                second.append(nn.BatchNorm2d(c))
            self.conv1 = nn.Sequential(*first, act())
            self.conv2 = nn.Sequential(*second, act())
            size = c * f2
            self.rnns = nn.ModuleList()
            for _ in range(int(arch["rnn_layers"])):
                self.rnns.append(nn.LSTM(size, h, bidirectional=bidir))
                size = h if (merge_sum or not bidir) else 2 * h
            self.fc = nn.Linear(size, NUM_CLASSES, bias=False)

        def forward(self, x, lengths):
            out_len = torch.div(lengths - 1, 2, rounding_mode="floor") + 1
            x = self.conv1(x.unsqueeze(1))
            mask = (torch.arange(x.shape[-1])[None, :] < out_len[:, None]).to(x.dtype)[:, None, None, :]
            x = self.conv2(x * mask) * mask  # (B, C, F', T')
            b, ch, f, t = x.shape
            x = x.view(b, ch * f, t).permute(2, 0, 1).contiguous()  # (T', B, C*F')
            for rnn in self.rnns:
                packed = nn.utils.rnn.pack_padded_sequence(x, out_len, enforce_sorted=False)
                x, _ = rnn(packed)
                x, _ = nn.utils.rnn.pad_packed_sequence(x, total_length=t)
                if merge_sum:
                    x = x[..., :h] + x[..., h:]
            return self.fc(x), out_len  # (T', B, classes)

    return DS2()


def child_torch(args) -> Dict[str, Any]:
    import torch

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    arch = model_arch(args.model)
    model = _torch_model(arch)
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=3e-4)
    ctc = torch.nn.CTCLoss(blank=BLANK, reduction="none")
    x, xl, y, yl = (torch.from_numpy(a) for a in synthetic_batch(args.batch, args.frames))
    xl, yl, y = xl.long(), yl.long(), y.long()
    losses: List[float] = []

    def step():
        opt.zero_grad(set_to_none=True)
        logits, ol = model(x, xl)
        loss = ctc(logits.log_softmax(-1), y, ol, yl).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 400.0)
        opt.step()
        losses.append(float(loss.detach()))

    ts, warm = _timed_steps(args, step)
    n = args.gemm_n
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = min(_timeit(lambda: a @ b) for _ in range(3))
    return {"s": _median(ts), "times": ts, "warmup_s": warm, "loss": losses[-1], "torch": torch.__version__,
            "params": sum(p.numel() for p in model.parameters()), "gemm_gflops": 2.0 * n ** 3 / best / 1e9}


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
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--gemm-n", type=int, default=2048)
    ap.add_argument("--data-steps", type=int, default=0)
    ap.add_argument("--gemm-probe", action="store_true")
    args = ap.parse_args(argv)
    _emit("BENCH_JSON", CHILDREN[args.child](args))
    return 0


# --------------------------------------------------------------------------------------------
# parent: run the rows, print the table
# --------------------------------------------------------------------------------------------
class _Child:
    """One row's process: stdout lines arrive on a queue (a reader thread), stderr goes to a file,
    peak RSS comes from wait4 when it ends."""

    def __init__(self, child: str, **kw):
        cmd = [sys.executable, str(Path(__file__).resolve()), "--child", child]
        for k, v in kw.items():
            if isinstance(v, bool):
                if v:
                    cmd.append("--" + k.replace("_", "-"))
            elif v is not None:
                cmd += ["--" + k.replace("_", "-"), str(v)]
        self.t0 = time.perf_counter()
        self.err = tempfile.TemporaryFile("w+")
        self.p = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.err, text=True,
                                  cwd=str(ROOT), bufsize=1)
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


PATH_LABEL = {"ds2exp": "ds2exp Trainer (fast, blocking)", "naive": "naive zoo (plain, async, pad 1250)",
              "pytorch": "PyTorch 2.13, 2 threads"}


def plan(quick: bool, naive_timeout: float = 360.0) -> List[Dict[str, Any]]:
    """The rows, per model: ds2exp and pytorch (run as a duel), then naive.

    Sized to keep `make bench` under 20 minutes on 2 shared cores: the naive rows dominate (a
    Python loop over 1250 frames x every LSTM direction, then its backward). ds2_tiny naive: one
    warm-up and one timed step; ds2_reference naive: one step without warm-up (measured: its first
    and second steps take the same time), killed after `naive_timeout` s."""
    rows = []
    for m in (["ds2_tiny"] if quick else ["ds2_tiny", "ds2_reference"]):
        b, t = SHAPES[m]
        tiny = m == "ds2_tiny"
        steps = 5 if tiny else 3
        rows.append(dict(model=m, path="ds2exp", batch=b, frames=t, padded=t, steps=steps,
                         kw=dict(child="ds2exp", model=m, batch=b, frames=t, warmup=2 if tiny else 1,
                                 data_steps=8 if tiny else 0,
                                 gemm_probe=True)))
        rows.append(dict(model=m, path="pytorch", batch=b, frames=t, padded=t, steps=steps,
                         kw=dict(child="torch", model=m, batch=b, frames=t, warmup=2 if tiny else 1, threads=2)))
        rows.append(dict(model=m, path="naive", batch=1, frames=t, padded=NAIVE_FRAMES, steps=1,
                         timeout=(240 if quick else 300) if tiny else naive_timeout,
                         kw=dict(child="naive", model=m, batch=1, frames=t, pad_to=NAIVE_FRAMES,
                                 warmup=1 if tiny else 0, steps=1)))
    return rows


def _fmt(v: Optional[float], spec: str, width: int, prefix: str = "") -> str:
    return f"{'-' if v is None else prefix + format(v, spec):>{width}s}"


def run(quick: bool = False, out: Callable[[str], None] = print, naive_timeout: float = 360.0) -> Dict[str, Any]:
    t_start = time.perf_counter()
    peak = run_child("peak", timeout=300, steps=5)
    rows = plan(quick, naive_timeout)
    by = {(r["model"], r["path"]): r for r in rows}
    for m in dict.fromkeys(r["model"] for r in rows):
        a, b, nv = by[(m, "ds2exp")], by[(m, "pytorch")], by[(m, "naive")]
        out(f"  ... {m}: ds2exp and PyTorch, {a['steps']} alternating steps each")
        a["res"], b["res"] = run_duel(a["kw"], b["kw"], a["steps"])
        out(f"  ... {m}: naive (up to {nv['timeout']:.0f} s)")
        nv["res"] = run_child(timeout=nv["timeout"], **nv["kw"])
    peak_end = run_child("peak", timeout=300, steps=5)
    probes = {"start": peak.get("gflops"), "end": peak_end.get("gflops")}
    for r in rows:
        if r["path"] == "ds2exp" and r["res"].get("gemm_gflops"):
            probes[f"after {r['model']} steps"] = r["res"]["gemm_gflops"]
    valid = [v for v in probes.values() if v]
    peak_g = max(valid) if valid else None
    peak["read_gbs"] = max(peak.get("read_gbs") or 0.0, peak_end.get("read_gbs") or 0.0) or float("nan")
    results = {"peak": peak, "peak_probes": probes, "rows": rows}

    # derived figures; a killed naive step gives bounds: s/step > x, audio s/s < y, speed-ups > z
    for r in rows:
        res = r["res"]
        if "error" in res or not (res.get("s") or res.get("lower_bound_s")):
            res.setdefault("error", "no step timed")
            continue
        step = res["s"] if res.get("s") is not None else res["lower_bound_s"]
        r["step"] = step
        r["bound"] = res.get("s") is None
        r["audio_per_s"] = r["batch"] * r["frames"] / FRAMES_PER_SECOND / step
        r["gflops"] = train_flops(model_arch(r["model"]), r["batch"], r["padded"]) / step / 1e9
    for r in rows:
        nv, pt = by.get((r["model"], "naive"), {}), by.get((r["model"], "pytorch"), {})
        r["vs_naive"] = r["audio_per_s"] / nv["audio_per_s"] if r.get("step") and nv.get("step") else None
        r["vs_naive_bound"] = bool(nv.get("bound")) and not r.get("bound")
        r["vs_torch"] = r["step"] / pt["step"] if r.get("step") and pt.get("step") else None

    out("\nTraining step: forward + CTC + backward + Adam (+ the Trainer's gradient checks and clipping); median "
        "s/step after warm-up;\neach row its own process; ds2exp and PyTorch steps alternate (A B B A) so both see "
        "the same load.")
    if peak_g:
        out("GEMM peak (MindSpore ops.matmul 2048x2048 float32, blocking launch; best of 5 at each of: "
            + ", ".join(f"{k} {v:.0f}" for k, v in probes.items() if v)
            + f"): {peak_g:.1f} GFLOP/s; memory read bandwidth {peak['read_gbs']:.1f} GB/s")
    else:
        out(f"GEMM peak: failed ({peak.get('error')})")
    out(f"  {'model':14s} {'path':34s} {'batch':>10s} {'steps':>5s} {'s/step':>9s} {'audio s/s':>9s} "
        f"{'GFLOP/s':>8s} {'% peak':>7s} {'vs naive':>9s} {'vs torch':>8s} {'RSS MiB':>8s} {'load':>5s}")
    for r in rows:
        res = r["res"]
        shape = f"{r['batch']}x{r['frames']}" + ("" if r["padded"] == r["frames"] else f"/{r['padded']}")
        if "error" in res:
            out(f"  {r['model']:14s} {PATH_LABEL[r['path']]:34s} {shape:>10s}  failed: {res['error']}")
            continue
        up, lo = ("<", ">") if r["bound"] else ("", "")
        pct = 100 * r["gflops"] / peak_g if peak_g else None
        out(f"  {r['model']:14s} {PATH_LABEL[r['path']]:34s} {shape:>10s} {len(res['times']) or 1:5d} "
            f"{_fmt(r['step'], '.3f', 9, lo)} {_fmt(r['audio_per_s'], '.3f', 9, up)} "
            f"{_fmt(r['gflops'], '.1f', 8, up)} {_fmt(pct, '.1f', 6, up)}% "
            f"{_fmt(r['vs_naive'], '.1f', 8, '>' if r['vs_naive_bound'] else up)}x "
            f"{_fmt(r['vs_torch'], '.2f', 7, lo)}x {res['max_rss_mib']:8.0f} {res['load']:5.1f}")
    out("  batch = utterances x frames (10 ms each), /1250 = padded frames computed; audio s/s counts real audio;")
    out("  GFLOP/s = 3 x analytic forward FLOPs of the computed shape / s; RSS = peak resident memory of the row's")
    out("  process; load = 1-minute load average when the row ended (2 cores).")
    for r in rows:
        res = r["res"]
        if "error" in res:
            continue
        if r["path"] == "naive":
            if r["bound"]:
                out(f"  {r['model']} naive: ONE step{', no warm-up,' if res.get('first') else ''} killed after "
                    f"{res['lower_bound_s']:.0f} s unfinished (row timeout {res['timed_out']:.0f} s): s/step is a "
                    f"lower bound")
            elif not res.get("warmup_s"):
                out(f"  {r['model']} naive: 1 step timed, no warm-up (too slow for more): "
                    f"{', '.join(f'{t:.1f}' for t in res['times'])} s")
            else:
                out(f"  {r['model']} naive: warm-up step {res['warmup_s']:.1f} s, then "
                    f"{', '.join(f'{t:.1f}' for t in res['times'])} s")
        else:
            out(f"  {r['model']} {r['path']}: steps {', '.join(f'{t:.2f}' for t in res['times'])} s"
                + (f"; {res['params']:,} parameters; torch's own 2048^2 GEMM {res['gemm_gflops']:.1f} GFLOP/s"
                   if r["path"] == "pytorch" else ""))

    _print_profile(rows, by, peak, out)

    # data wait
    tiny = by.get(("ds2_tiny", "ds2exp"), {}).get("res", {})
    d = tiny.get("data") if "error" not in tiny else None
    out("\nData wait (ds2exp Trainer, ds2_tiny, real BatchLoader on synth_tiny, shuffled epoch, feature cache):")
    if not d or d.get("error") or d.get("share") is None:
        out(f"  n/a ({(d or {}).get('error', 'not measured')})")
    else:
        out(f"  {100 * d['share']:.1f}% of wall time waiting for data over {d['steps']} steps "
            f"({d['step_s']:.3f} s/step, {d['audio_per_s']:.1f} audio s/s, {d['workers']} loader threads); "
            f"first batch (pipeline start) {d['first_wait_s']:.2f} s, left out")

    # epoch projection
    out(f"\nOne epoch of LibriSpeech train-clean-100 ({TRAIN_CLEAN_100_HOURS} h of audio), ds2_reference:")
    for path in ("ds2exp", "naive", "pytorch"):
        r = by.get(("ds2_reference", path))
        rate = r.get("audio_per_s") if r else None
        h = epoch_hours(rate)
        more = ">" if r and r.get("bound") else ""
        out(f"  {PATH_LABEL[path]:34s} " + (f"{more}{h:.1f} h ({more}{h / 24:.1f} days) at {'<' if more else ''}"
                                            f"{rate:.3f} audio s/s" if h else "n/a (not measured)"))

    # targets
    out("\nTargets:")
    checks = []
    for m in dict.fromkeys(r["model"] for r in rows):
        a = by.get((m, "ds2exp"), {})
        checks.append(check(f"{m}: ds2exp audio s/s / naive audio s/s", a.get("vs_naive"), TARGET_SPEEDUP, True,
                            ".1f", lower_bound=a.get("vs_naive_bound", False)))
        line = check(f"{m}: ds2exp s/step / PyTorch s/step", a.get("vs_torch"), TARGET_TORCH_RATIO, False, ".2f")
        pt = by.get((m, "pytorch"), {})
        if a.get("step") and pt.get("step"):
            best = min(a["res"]["times"]) / min(pt["res"]["times"])
            line += f"  [fastest step / fastest step: {best:.2f}; PyTorch is the more load-sensitive of the two]"
        checks.append(line)
    if not quick:
        a = by.get(("ds2_reference", "ds2exp"), {})
        share = a["gflops"] / peak_g if a.get("gflops") and peak_g else None
        checks.append(check("ds2_reference: ds2exp GFLOP/s / GEMM peak", share, TARGET_PEAK_SHARE, True, ".2f"))
    for c in checks:
        out(c)
    results["checks"] = checks
    out(f"\n(step bench wall time {time.perf_counter() - t_start:.0f} s)")
    return results


def _print_profile(rows, by, peak, out) -> None:
    out("\nds2exp step, where the time goes (median s/step; Trainer.train_step split by timers around "
        "trainer.grad_fn and trainer.optimizer,\nand around the numpy/numba kernels of the fast layers; "
        "'cores' = process CPU time / wall time):")
    for r in rows:
        res = r["res"]
        if r["path"] != "ds2exp" or "error" in res:
            continue
        p = res["profile"]
        tot = res["s"]
        conv1 = p.get("conv1_fwd", 0.0) + p.get("conv1_dw", 0.0)
        host = p["rnn_fwd"] + p["rnn_bwd"] + p["im2col"] + p["col2im"] + conv1
        other = max(0.0, p["fwd_bwd"] - host)

        def pc(v, cores=None):
            return f"{v:.3f} s ({100 * v / tot:.0f}%" + (f", {cores:.1f} cores)" if cores is not None else ")")

        out(f"  {r['model']}: step {tot:.3f} s, {res['cores']:.1f} cores busy on average; loss {res['loss']:.1f}, "
            f"finite={res['finite']}")
        out(f"    value_and_grad {pc(p['fwd_bwd'], p['fwd_bwd_cores'])} = LSTM recurrence fwd "
            f"{pc(p['rnn_fwd'], p['rnn_fwd_cores'])} + bwd {pc(p['rnn_bwd'], p['rnn_bwd_cores'])}")
        out(f"      + conv1 direct forward + weight gradient {pc(conv1)} + conv2 backward im2col/col2im "
            f"{pc(p['im2col'] + p['col2im'])}")
        out(f"      + MindSpore ops (input projections, conv2, BN, CTC, ...) {pc(other)}")
        out(f"    Trainer's numpy gradient handling {pc(p['numpy_grads'])};  Adam {pc(p['adam'])}")
        arch = model_arch(r["model"])
        _, _, _, t2 = conv_shapes(r["frames"])
        h, d, g = _rnn_dims(arch)
        layer_bytes = g * h * 4
        rec = forward_flops(arch, r["batch"], r["frames"])["rnn_recurrent"]
        if p["rnn_fwd"] > 0:
            out(f"    recurrence: {r['batch']} rows per pass over W_hh ({layer_bytes / 2 ** 20:.1f} MiB per direction "
                f"and layer, L3 32 MiB) = {r['batch'] / 2:.0f} FLOP/byte; forward {rec / p['rnn_fwd'] / 1e9:.1f} "
                f"GFLOP/s, W_hh read at {int(arch['rnn_layers']) * t2 * d * layer_bytes / p['rnn_fwd'] / 1e9:.1f} GB/s"
                f" (DRAM read {peak.get('read_gbs', float('nan')):.1f} GB/s)")


def main(argv: Optional[List[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "--child" in argv:
        return child_main(argv)
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="ds2_tiny only")
    ap.add_argument("--naive-timeout", type=float, default=360.0,
                    help="seconds after which the naive ds2_reference row is killed (its s/step is then a lower bound)")
    args = ap.parse_args(argv)
    run(quick=args.quick, out=lambda s: print(s, flush=True), naive_timeout=args.naive_timeout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
