"""One DeepSpeech2 training step, three ways, side by side in one run: ds2exp vs naive MindSpore vs PyTorch.

    .venv/bin/python -m bench.bench_step             # ds2_tiny and ds2_reference (about 10 minutes)
    .venv/bin/python -m bench.bench_step --quick     # ds2_tiny only, fewer steps (about 2 minutes)

Rows (each in its own subprocess, so peak memory and thread settings are isolated):

  ds2exp   a real ``ds2exp.training.trainer.Trainer`` built from the composed Hydra config
           (``setup_mindspore``: blocking launch; fast kernels; Adam; grad_clip 400) and its
           ``train_step``: value_and_grad, numpy gradient checks and per-group norms, clipping,
           optimizer. The step is split into fwd+bwd / numpy gradient handling / Adam by timing
           wrappers around ``trainer.grad_fn`` and ``trainer.optimizer``.
  naive    what the MindSpore model zoo recipe builds: nn.Conv2d + nn.LSTM (impl="plain"), default
           asynchronous launch, every utterance padded to 1250 frames, batch 1,
           value_and_grad + nn.Adam. Audio s/s counts the real (unpadded) audio of the utterance.
  pytorch  the same architecture in PyTorch (conv + BN + activation, packed bidirectional nn.LSTM
           with directions summed, Linear without bias, nn.CTCLoss(blank=28), Adam,
           clip_grad_norm_), torch.set_num_threads(2), the same batch as the ds2exp row.

Seconds per step = median of the timed steps after warm-up. GFLOP/s = 3 x analytic forward FLOPs
(convolutions, LSTM input and recurrent matrix products, FC; element-wise work not counted) of
the shape actually computed (the naive row's 1250 padded frames included) / s per step, against
the GEMM peak: MindSpore ops.matmul of 2048x2048 float32, best of a few, measured in this run.
Data wait: the ds2exp Trainer fed by the real ``BatchLoader`` on synth_tiny (if built under
data/), share of wall time spent waiting for the next batch. Memory: ru_maxrss of each subprocess.
The machine may be shared: compare rows of one run only.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

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
# architecture, FLOPs, batches (no MindSpore / PyTorch needed)
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


def conv_shapes(frames: int, bins: int = NUM_BINS):
    """(F1, T1, F2, T2) after conv1 (41x11, stride 2x2, pad 20/5) and conv2 (21x11, stride 2x1, pad 10/5)."""
    f1 = (bins + 40 - 41) // 2 + 1
    t1 = (frames + 10 - 11) // 2 + 1
    f2 = (f1 + 20 - 21) // 2 + 1
    t2 = (t1 + 10 - 11) // 1 + 1
    return f1, t1, f2, t2


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
    h = int(arch["rnn_hidden"])
    d = 2 if arch["bidirectional"] else 1
    g = (4 if str(arch["rnn_type"]) == "lstm" else 3) * h
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
    h = int(arch["rnn_hidden"])
    d = 2 if arch["bidirectional"] else 1
    g = (4 if str(arch["rnn_type"]) == "lstm" else 3) * h
    size = c * f2
    for _ in range(int(arch["rnn_layers"])):
        n += d * (g * size + g * h + 2 * g)
        size = h if (d == 1 or arch["merge"] == "sum") else d * h
    return n + size * classes


def label_length(frames: int) -> int:
    """Synthetic transcript length: about 12.5 characters per second of audio (synth_tiny: ~13)."""
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
    """Wall hours to train on `hours` of audio once at `audio_per_s` audio seconds per second."""
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


def _max_rss_mib() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


def _median(ts: List[float]) -> float:
    return float(statistics.median(ts))


# --------------------------------------------------------------------------------------------
# child rows (each runs in its own interpreter)
# --------------------------------------------------------------------------------------------
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
    ts = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        ops.matmul(a, b).asnumpy()
        ts.append(time.perf_counter() - t0)
    best = min(ts)
    # memory read bandwidth (what bounds the recurrence's small-batch matrix products): float32 dot of 256 MB
    v = rng.standard_normal(64 << 20).astype(np.float32)
    bw = min(_timeit(lambda: v.dot(v)) for _ in range(5))
    return {"gflops": 2.0 * n ** 3 / best / 1e9, "n": n, "best_s": best, "median_s": _median(ts),
            "read_gbs": v.nbytes / bw / 1e9}


def _ds2exp_trainer(model_name: str, batch_size: int, blocking: bool = True):
    """A real Trainer (and its config) as train.py builds it, minus MLflow."""
    import tempfile

    from ds2exp.cli import compose_config
    from ds2exp.models.deepspeech2 import build_model
    from ds2exp.tracking.mlflow_tracker import NullTracker
    from ds2exp.training.optim import build_optimizer
    from ds2exp.training.run import setup_mindspore
    from ds2exp.training.trainer import Trainer

    overrides = [f"model={model_name}", "logger=none", "trainer.progress=false", f"dataset.batch_size={batch_size}",
                 f"hardware.blocking_launch={str(blocking).lower()}"]
    if os.environ.get("DS2EXP_BENCH_DATA"):  # as bench/run_all.py's feature section
        overrides.append(f"paths.data_dir={Path(os.environ['DS2EXP_BENCH_DATA']).resolve()}")
    cfg = compose_config(overrides)
    setup_mindspore(cfg.hardware, int(cfg.trainer.seed))
    model = build_model(cfg.model)
    optimizer = build_optimizer(model.trainable_params(), cfg.optimizer)
    run_dir = tempfile.mkdtemp(prefix="ds2exp-bench-")
    trainer = Trainer(cfg, model, optimizer, None, None, NullTracker(), Path(run_dir), steps_per_epoch=1)
    model.set_train(True)
    return cfg, model, trainer


class _Timed:
    """Wraps a callable; records the wall time of each call (MindSpore results synced)."""

    def __init__(self, fn, sync=None):
        self.fn = fn
        self.sync = sync
        self.times: List[float] = []

    def __call__(self, *a, **k):
        t0 = time.perf_counter()
        out = self.fn(*a, **k)
        if self.sync is not None:
            self.sync(out)
        self.times.append(time.perf_counter() - t0)
        return out


def _grad_variants(trainer, grads, repeats: int) -> Dict[str, float]:
    """Seconds for the gradient handling between backward and optimizer, three ways, same grads.

    trainer: Trainer.train_step's code (float64 copies, / scale, g*g, clip multiply, new Tensors).
    numpy32: float32 views, one dot per tensor, new Tensors only when the clip factor < 1.
    ms:      per-tensor squared sums in MindSpore, one host transfer of the sums.
    """
    import math

    import mindspore as ms
    import numpy as np
    from mindspore import ops

    groups = trainer.param_groups
    clip = float(trainer.cfg.optimizer.grad_clip)
    scale = 1.0

    def trainer_way():
        grads_np = [g.asnumpy().astype(np.float64) / scale for g in grads]
        group_sq = {g: 0.0 for g in trainer.group_names}
        for g, name in zip(grads_np, groups):
            group_sq[name] += float(np.sum(g * g))
        norm = math.sqrt(sum(group_sq.values()))
        factor = min(1.0, clip / (norm + 1e-6))
        return tuple(ms.Tensor((g * factor).astype(np.float32)) for g in grads_np)

    def numpy32_way():
        group_sq = {g: 0.0 for g in trainer.group_names}
        for g, name in zip(grads, groups):
            a = g.asnumpy().reshape(-1)
            group_sq[name] += float(np.dot(a, a))
        norm = math.sqrt(sum(group_sq.values()))
        factor = min(1.0, clip / (norm + 1e-6))
        return grads if factor >= 1.0 else tuple(g * factor for g in grads)

    def ms_way():
        sq = ops.stack([ops.reduce_sum(g * g) for g in grads]).asnumpy().astype(np.float64)
        group_sq = {g: 0.0 for g in trainer.group_names}
        for v, name in zip(sq, groups):
            group_sq[name] += float(v)
        norm = math.sqrt(sum(group_sq.values()))
        factor = min(1.0, clip / (norm + 1e-6))
        return grads if factor >= 1.0 else tuple(g * factor for g in grads)

    out = {}
    for name, fn in (("trainer", trainer_way), ("numpy32", numpy32_way), ("ms", ms_way)):
        fn()
        ts = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
        out[name] = _median(ts)
    return out


class _Accum:
    """Wraps a module-level function; sums its wall time (pyfunc kernels: numpy/numba work)."""

    def __init__(self, fn):
        self.fn = fn
        self.total = 0.0

    def __call__(self, *a, **k):
        t0 = time.perf_counter()
        try:
            return self.fn(*a, **k)
        finally:
            self.total += time.perf_counter() - t0


def _install_kernel_timers():
    """Time the host-side (numpy/numba) kernels inside ds2exp's fast layers. Must run before the
    model is built: the RNN pyfunc ops capture the kernels when the first FastRNN is made."""
    from ds2exp.models import layers as L

    fwd, bwd = L._NP_KERNELS["lstm"]
    timers = {"rnn_fwd": _Accum(fwd), "rnn_bwd": _Accum(bwd), "im2col": _Accum(L._freq_im2col),
              "col2im": _Accum(L._freq_col2im)}
    L._NP_KERNELS["lstm"] = (timers["rnn_fwd"], timers["rnn_bwd"])
    L._freq_im2col = timers["im2col"]
    L._freq_col2im = timers["col2im"]
    return timers


def _lean_train_step(trainer, batch):
    """What Trainer.train_step does (same checks, norms, clipping, optimizer), with the gradient
    handling in float32 on the arrays MindSpore hands out (no float64 copies, no new Tensors
    unless the clip factor or loss scale changes them). Not used by ds2exp: a bench what-if."""
    import math

    import mindspore as ms
    import numpy as np

    scale = trainer.state.loss_scale
    (scaled_loss, (losses, absmax)), grads = trainer.grad_fn(
        ms.Tensor(batch.features), ms.Tensor(batch.feature_lengths), ms.Tensor(batch.labels),
        ms.Tensor(batch.label_lengths), ms.Tensor(scale, ms.float32))
    group_sq = {g: 0.0 for g in trainer.group_names}
    for g, name in zip(grads, trainer.param_groups):
        a = g.asnumpy().reshape(-1)
        group_sq[name] += float(np.dot(a, a)) / (scale * scale)
    total = sum(group_sq.values())
    grad_norm = math.sqrt(total) if math.isfinite(total) else float("inf")
    loss = float(scaled_loss.asnumpy()) / scale
    float(absmax.asnumpy()), losses.asnumpy()
    if math.isfinite(loss) and math.isfinite(grad_norm):
        clip = float(trainer.cfg.optimizer.grad_clip)
        factor = min(1.0, clip / (grad_norm + 1e-6)) if clip > 0 else 1.0
        if factor < 1.0 or scale != 1.0:
            grads = tuple(g * (factor / scale) for g in grads)
        trainer.optimizer(grads)
    return loss


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
    t0 = time.perf_counter()
    for _ in range(args.warmup):
        trainer.train_step(batch)
    warm = time.perf_counter() - t0
    grad_t.times.clear()
    opt_t.times.clear()
    for t in timers.values():
        t.total = 0.0
    ts, losses = [], []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        res = trainer.train_step(batch)
        ts.append(time.perf_counter() - t0)
        losses.append(res.loss)
    n = len(ts)
    fb = np.array(grad_t.times)
    adam = np.array(opt_t.times)
    rest = np.array(ts) - fb - adam
    kern = {k: t.total / n for k, t in timers.items()}
    out: Dict[str, Any] = {"s": _median(ts), "times": ts, "warmup_s": warm, "loss": losses[-1],
                           "finite": bool(np.isfinite(losses).all()),
                           "profile": {"fwd_bwd": _median(list(fb)), "numpy_grads": _median(list(rest)),
                                       "adam": _median(list(adam)), "rnn_fwd": kern["rnn_fwd"],
                                       "rnn_bwd": kern["rnn_bwd"], "conv_data": kern["im2col"] + kern["col2im"]}}
    if args.grad_variants:
        (_, _), grads = grad_t.fn(ms.Tensor(x), ms.Tensor(xl), ms.Tensor(y), ms.Tensor(yl),
                                  ms.Tensor(1.0, ms.float32))
        out["grad_variants"] = _grad_variants(trainer, grads, repeats=3)
        del grads
    if args.lean_steps:
        lean = []
        for _ in range(args.lean_steps):
            t0 = time.perf_counter()
            _lean_train_step(trainer, batch)
            lean.append(time.perf_counter() - t0)
        out["lean_s"] = _median(lean)
        out["lean_times"] = lean
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

    data = build_data(cfg)  # synth corpus already built: only manifests are read
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
        print("BENCH_PARTIAL " + json.dumps(kw), flush=True)

    t0 = time.perf_counter()
    partial(step_started=time.time(), times=[], warmup_s=None, loss=None)
    loss = None
    for _ in range(args.warmup):
        loss = step()
    warm = time.perf_counter() - t0
    ts: List[float] = []
    deadline = time.perf_counter() + args.budget_s
    for i in range(args.steps):
        if i and time.perf_counter() + _median(ts) > deadline:
            break
        partial(step_started=time.time(), times=ts, warmup_s=warm, loss=loss)
        t0 = time.perf_counter()
        loss = step()
        ts.append(time.perf_counter() - t0)
    return {"s": _median(ts), "times": ts, "warmup_s": warm, "loss": loss}


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
            layers = [nn.Conv2d(1, c, (41, 11), (2, 2), (20, 5), bias=False)]
            if arch["batch_norm"]:
                layers.append(nn.BatchNorm2d(c))
            layers += [act(), nn.Conv2d(c, c, (21, 11), (2, 1), (10, 5), bias=False)]
            if arch["batch_norm"]:
                layers.append(nn.BatchNorm2d(c))
            layers.append(act())
            self.conv = nn.Sequential(*layers)
            size = c * f2
            self.rnns = nn.ModuleList()
            for _ in range(int(arch["rnn_layers"])):
                self.rnns.append(nn.LSTM(size, h, bidirectional=bidir))
                size = h if (merge_sum or not bidir) else 2 * h
            self.fc = nn.Linear(size, NUM_CLASSES, bias=False)

        def forward(self, x, lengths):
            x = self.conv(x.unsqueeze(1))  # (B, C, F', T')
            b, ch, f, t = x.shape
            x = x.view(b, ch * f, t).permute(2, 0, 1).contiguous()  # (T', B, C*F')
            out_len = torch.div(lengths - 1, 2, rounding_mode="floor") + 1
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

    def step():
        opt.zero_grad(set_to_none=True)
        logits, ol = model(x, xl)
        loss = ctc(logits.log_softmax(-1), y, ol, yl).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 400.0)
        opt.step()
        return float(loss.detach())

    t0 = time.perf_counter()
    for _ in range(args.warmup):
        step()
    warm = time.perf_counter() - t0
    ts = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        loss = step()
        ts.append(time.perf_counter() - t0)
    n = args.gemm_n
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = min(_timeit(lambda: a @ b) for _ in range(3))
    return {"s": _median(ts), "times": ts, "warmup_s": warm, "loss": loss, "torch": torch.__version__,
            "params": sum(p.numel() for p in model.parameters()), "gemm_gflops": 2.0 * n ** 3 / best / 1e9}


def _timeit(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


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
    ap.add_argument("--budget-s", type=float, default=1e9)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--gemm-n", type=int, default=2048)
    ap.add_argument("--data-steps", type=int, default=0)
    ap.add_argument("--grad-variants", action="store_true")
    ap.add_argument("--lean-steps", type=int, default=0)
    args = ap.parse_args(argv)
    out = CHILDREN[args.child](args)
    out["self_max_rss_mib"] = _max_rss_mib()
    print("BENCH_JSON " + json.dumps(out), flush=True)
    return 0


# --------------------------------------------------------------------------------------------
# parent: plan, run the rows, print the table
# --------------------------------------------------------------------------------------------
def run_child(child: str, timeout: float = 1200, **kw) -> Dict[str, Any]:
    """Run one row in a fresh interpreter; its peak RSS comes from wait4. A row that outlives
    `timeout` is killed; its result then says how long its unfinished step had run ("lower_bound_s")."""
    import tempfile

    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", child]
    for k, v in kw.items():
        if isinstance(v, bool):
            if v:
                cmd.append("--" + k.replace("_", "-"))
        elif v is not None:
            cmd += ["--" + k.replace("_", "-"), str(v)]
    t0 = time.perf_counter()
    with tempfile.TemporaryFile("w+") as fo, tempfile.TemporaryFile("w+") as fe:
        p = subprocess.Popen(cmd, stdout=fo, stderr=fe, text=True, cwd=str(ROOT))
        timed_out = False
        deadline = time.time() + timeout
        while True:
            pid, status, ru = os.wait4(p.pid, os.WNOHANG)
            if pid:
                break
            if time.time() > deadline:
                p.kill()
                _, status, ru = os.wait4(p.pid, 0)
                timed_out = True
                break
            time.sleep(0.1)
        p.returncode = os.waitstatus_to_exitcode(status)
        killed_at = time.time()
        fo.seek(0)
        fe.seek(0)
        stdout, stderr = fo.read(), fe.read()
    wall = time.perf_counter() - t0
    final, partial = None, None
    for line in stdout.splitlines():
        if line.startswith("BENCH_JSON "):
            final = json.loads(line[len("BENCH_JSON "):])
        elif line.startswith("BENCH_PARTIAL "):
            partial = json.loads(line[len("BENCH_PARTIAL "):])
    if final is None and timed_out and partial is not None:
        final = dict(partial)
        if partial.get("times"):
            final["s"] = _median(partial["times"])
        else:
            final["s"] = None
            final["lower_bound_s"] = killed_at - partial["step_started"]
        final["timed_out"] = timeout
    if final is None:
        why = f"timed out after {timeout:.0f} s" if timed_out else \
            f"rc={p.returncode}: {(stderr.strip().splitlines() or ['no output'])[-1][:160]}"
        return {"error": why, "wall_s": wall}
    final["wall_s"] = wall
    final["max_rss_mib"] = ru.ru_maxrss / 1024.0  # KiB on Linux
    return final


def plan(quick: bool, naive_timeout: float = 420.0) -> List[Dict[str, Any]]:
    """The rows: model, path, shapes, child kwargs, timeout. Sized so that the table takes ~10 minutes
    on 2 cores; the naive ds2_reference step (Python loop over 1250 frames x 10 LSTM directions,
    then its backward) is timed once, without warm-up, and killed after `naive_timeout` s."""
    rows = []
    models = ["ds2_tiny"] if quick else ["ds2_tiny", "ds2_reference"]
    for m in models:
        b, t = SHAPES[m]
        tiny = m == "ds2_tiny"
        rows.append(dict(model=m, path="ds2exp", batch=b, frames=t, padded=t, timeout=900,
                         kw=dict(child="ds2exp", model=m, batch=b, frames=t, warmup=2 if tiny else 1,
                                 steps=(3 if quick else 5) if tiny else 3, data_steps=(12 if tiny else 0),
                                 grad_variants=not tiny, lean_steps=(3 if tiny else 2))))
        rows.append(dict(model=m, path="naive", batch=1, frames=t, padded=NAIVE_FRAMES,
                         timeout=300 if tiny else naive_timeout,
                         kw=dict(child="naive", model=m, batch=1, frames=t, pad_to=NAIVE_FRAMES,
                                 warmup=1 if tiny else 0, steps=2 if tiny else 1, budget_s=60 if tiny else 0)))
        rows.append(dict(model=m, path="pytorch", batch=b, frames=t, padded=t, timeout=900,
                         kw=dict(child="torch", model=m, batch=b, frames=t, warmup=2 if tiny else 1,
                                 steps=(3 if quick else 5) if tiny else 3, threads=2)))
    return rows


PATH_LABEL = {"ds2exp": "ds2exp Trainer (fast, blocking)", "naive": "naive zoo (plain, async, pad 1250)",
              "pytorch": "PyTorch 2 threads"}


def _fmt(v: Optional[float], spec: str, width: int, prefix: str = "") -> str:
    return f"{'-' if v is None else prefix + format(v, spec):>{width}s}"


def run(quick: bool = False, out=print, naive_timeout: float = 420.0) -> Dict[str, Any]:
    t_start = time.perf_counter()
    peak = run_child("peak", timeout=300, steps=5)
    rows = plan(quick, naive_timeout)
    for r in rows:
        r["res"] = run_child(timeout=r["timeout"], **r["kw"])
    peak_g = peak.get("gflops")
    results = {"peak": peak, "rows": rows}
    by = {(r["model"], r["path"]): r for r in rows}

    # derived figures; a killed naive step gives bounds: s/step > x, audio s/s < y, speed-ups > z
    for r in rows:
        res = r["res"]
        if "error" in res:
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

    out("Training step: forward + CTC + backward + Adam; median s/step after warm-up; each row its own process.")
    if peak_g:
        out(f"GEMM peak (MindSpore ops.matmul {peak['n']}x{peak['n']} float32, best of 5, blocking launch): "
            f"{peak_g:.1f} GFLOP/s; memory read {peak['read_gbs']:.1f} GB/s")
    else:
        out(f"GEMM peak: failed ({peak.get('error')})")
    out(f"  {'model':14s} {'path':34s} {'batch':>9s} {'steps':>5s} {'s/step':>9s} {'audio s/s':>9s} "
        f"{'GFLOP/s':>8s} {'% peak':>7s} {'vs naive':>9s} {'vs torch':>8s} {'RSS MiB':>8s}")
    for r in rows:
        res = r["res"]
        shape = f"{r['batch']}x{r['frames']}" + ("" if r["padded"] == r["frames"] else f"/{r['padded']}")
        if "error" in res:
            out(f"  {r['model']:14s} {PATH_LABEL[r['path']]:34s} {shape:>9s}  failed: {res['error']}")
            continue
        up, lo = ("<", ">") if r["bound"] else ("", "")
        pct = 100 * r["gflops"] / peak_g if peak_g else None
        out(f"  {r['model']:14s} {PATH_LABEL[r['path']]:34s} {shape:>9s} {len(res['times']) or 1:5d} "
            f"{_fmt(r['step'], '.3f', 9, lo)} {_fmt(r['audio_per_s'], '.3f', 9, up)} "
            f"{_fmt(r['gflops'], '.1f', 8, up)} {_fmt(pct, '.1f', 6, up)}% "
            f"{_fmt(r['vs_naive'], '.1f', 8, '>' if r['vs_naive_bound'] else up)}x "
            f"{_fmt(r['vs_torch'], '.2f', 7, lo)}x {res['max_rss_mib']:8.0f}")
    out("  batch = utterances x frames (10 ms each), /1250 = padded frames computed; audio s/s counts real audio;")
    out("  GFLOP/s = 3 x analytic forward FLOPs of the computed shape / s; RSS = peak resident memory of the row.")
    for r in rows:
        res = r["res"]
        if "error" in res:
            continue
        if r["path"] == "naive":
            if r["bound"]:
                out(f"  {r['model']} naive: ONE step, no warm-up, killed after {res['lower_bound_s']:.0f} s unfinished "
                    f"(row timeout {res['timed_out']:.0f} s): s/step is a lower bound")
            elif r["kw"]["warmup"] == 0:
                out(f"  {r['model']} naive: {len(res['times'])} step(s) timed, no warm-up (too slow for more); "
                    f"steps {', '.join(f'{t:.1f}' for t in res['times'])} s")
            else:
                out(f"  {r['model']} naive: warm-up step {res['warmup_s']:.1f} s, then "
                    f"{', '.join(f'{t:.1f}' for t in res['times'])} s")
        if r["path"] == "pytorch":
            out(f"  {r['model']} PyTorch {res['torch']}: {res['params']:,} parameters; torch's own 2048^2 GEMM "
                f"{res['gemm_gflops']:.1f} GFLOP/s")

    # where the ds2exp step goes
    out("\nds2exp step, where the time goes (median s/step; Trainer.train_step split by timers around "
        "trainer.grad_fn and trainer.optimizer, and around the numpy/numba kernels of the fast layers):")
    for r in rows:
        res = r["res"]
        if r["path"] != "ds2exp" or "error" in res:
            continue
        p = res["profile"]
        tot = res["s"]
        host = p["rnn_fwd"] + p["rnn_bwd"] + p["conv_data"]
        other = max(0.0, p["fwd_bwd"] - host)

        def pc(v):
            return f"{v:6.3f} ({100 * v / tot:4.1f}%)"

        out(f"  {r['model']} (loss {res['loss']:.1f}, finite={res['finite']}), step {tot:.3f} s:")
        out(f"    value_and_grad {pc(p['fwd_bwd'])} = LSTM recurrence fwd {pc(p['rnn_fwd'])} + bwd "
            f"{pc(p['rnn_bwd'])} + conv im2col/col2im {pc(p['conv_data'])} + MindSpore ops {pc(other)}")
        out(f"    numpy gradient handling {pc(p['numpy_grads'])};  Adam {pc(p['adam'])}")
        arch = model_arch(r["model"])
        _, _, _, t2 = conv_shapes(r["frames"])
        h = int(arch["rnn_hidden"])
        d = 2 if arch["bidirectional"] else 1
        w_bytes = int(arch["rnn_layers"]) * t2 * d * 4 * h * h * 4  # W_hh streamed once per time step
        rec = forward_flops(arch, r["batch"], r["frames"])["rnn_recurrent"]
        if p["rnn_fwd"] > 0 and p["rnn_bwd"] > 0:
            out(f"    recurrence: {r['batch']} rows per W_hh pass -> {rec / w_bytes:.1f} FLOP/byte; forward streams "
                f"{w_bytes / 1e9:.2f} GB of W_hh per step at {w_bytes / p['rnn_fwd'] / 1e9:.1f} GB/s "
                f"({rec / p['rnn_fwd'] / 1e9:.1f} GFLOP/s); memory read bandwidth measured "
                f"{peak.get('read_gbs', float('nan')):.1f} GB/s")
        gv = res.get("grad_variants")
        if gv:
            out(f"    gradient handling alone, same gradients: Trainer.train_step's float64 numpy {gv['trainer']:.3f} s;"
                f" float32 numpy dot {gv['numpy32']:.3f} s; squared sums in MindSpore {gv['ms']:.3f} s")
        if res.get("lean_s"):
            torch_s = by.get((r["model"], "pytorch"), {}).get("res", {}).get("s")
            vs = f", {res['lean_s'] / torch_s:.2f}x PyTorch" if torch_s else ""
            out(f"    what-if (bench only, trainer.py unchanged): the same step with float32 gradient handling "
                f"{res['lean_s']:.3f} s/step{vs}")

    # data wait
    tiny = by.get(("ds2_tiny", "ds2exp"), {}).get("res", {})
    d = tiny.get("data") if "error" not in tiny else None
    out("\nData wait (ds2exp Trainer, ds2_tiny, real BatchLoader on synth_tiny, shuffled epoch):")
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
    for m in (["ds2_tiny"] if quick else ["ds2_tiny", "ds2_reference"]):
        a = by.get((m, "ds2exp"), {})
        bound = a.get("vs_naive_bound", False)
        checks.append(check(f"{m}: ds2exp audio s/s / naive audio s/s", a.get("vs_naive"), TARGET_SPEEDUP, True,
                            ".1f", lower_bound=bound))
        checks.append(check(f"{m}: ds2exp s/step / PyTorch s/step", a.get("vs_torch"), TARGET_TORCH_RATIO, False,
                            ".2f"))
    if not quick:
        a = by.get(("ds2_reference", "ds2exp"), {})
        share = a["gflops"] / peak_g if a.get("gflops") and peak_g else None
        checks.append(check("ds2_reference: ds2exp GFLOP/s / GEMM peak", share, TARGET_PEAK_SHARE, True, ".2f"))
    for c in checks:
        out(c)
    results["checks"] = checks
    out(f"\n(step bench wall time {time.perf_counter() - t_start:.0f} s)")
    return results


def main(argv: Optional[List[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "--child" in argv:
        return child_main(argv)
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="ds2_tiny only, fewer steps")
    ap.add_argument("--naive-timeout", type=float, default=420.0,
                    help="seconds after which the naive ds2_reference row is killed (its step is then a lower bound)")
    args = ap.parse_args(argv)
    run(quick=args.quick, out=lambda s: print(s, flush=True), naive_timeout=args.naive_timeout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
