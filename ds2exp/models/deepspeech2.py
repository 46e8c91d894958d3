"""DeepSpeech2: two 2-D convolutions, a stack of (bi)directional RNNs, a linear CTC head.

Parameter names follow the MindSpore model zoo checkpoints (`conv.conv1.weight`,
`conv.bn1.gamma`, `RNN.lstms.0.weight_ih_l0`, `fc.module.weight`, ...) so that their
checkpoints load into `ds2_reference` unchanged. The slow-on-CPU layers come from
`ds2exp.models.layers`, where a fast implementation sits behind the same interface as the
plain MindSpore one (`model.conv_impl`, `model.rnn_impl`).
"""
from __future__ import annotations

import logging
from typing import Dict, List, Tuple

import mindspore as ms
from mindspore import nn, ops
from omegaconf import OmegaConf

from ds2exp.config import enum_value
from ds2exp.data.labels import NUM_CLASSES
from ds2exp.geometry import (CONV1_KERNEL, CONV1_PADDING, CONV1_STRIDE, CONV2_KERNEL, CONV2_PADDING, CONV2_STRIDE,
                             output_frames)
from ds2exp.geometry import conv_output_bins as _conv_output_bins
from ds2exp.models.layers import make_conv2d, make_rnn

log = logging.getLogger(__name__)

NUM_BINS = 161  # 20 ms window at 16 kHz



def conv_output_bins(bins: int = NUM_BINS) -> int:
    return _conv_output_bins(bins)


def output_lengths(lengths: ms.Tensor) -> ms.Tensor:
    return output_frames(lengths)


# deepspeech.pytorch's Hardtanh(0, 20), written as relu6(0.3 x) / 0.3 (equal up to rounding, 1e-6
# at 20): MindSpore's clamp backward is several compare/select passes over the tensor, its ReLU6
# gradient one (measured on CPU, (16, 8, 81, 150): 16 ms forward+backward vs 4 ms).
_HARDTANH_SCALE = 0.3


class Activation(nn.Cell):
    """The conv block's activation, times an optional (B, 1, 1, T) frame mask (the mask is folded
    into the activation's last multiply where there is one)."""

    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind

    def construct(self, x, mask=None):
        if self.kind == "hardtanh":
            scale = 1.0 / _HARDTANH_SCALE
            return ops.relu6(x * _HARDTANH_SCALE) * (scale if mask is None else mask * scale)
        y = ops.tanh(x) if self.kind == "tanh" else ops.relu(x)
        return y if mask is None else y * mask


class ConvBlock(nn.Cell):
    def __init__(self, channels: int, activation: str, batch_norm: bool, impl: str):
        super().__init__()
        # conv1's input is the features: nothing differentiates it (FastConv2d's input_grad)
        self.conv1 = make_conv2d(1, channels, CONV1_KERNEL, CONV1_STRIDE, CONV1_PADDING, impl=impl, input_grad=False)
        self.conv2 = make_conv2d(channels, channels, CONV2_KERNEL, CONV2_STRIDE, CONV2_PADDING, impl=impl)
        self.use_bn = batch_norm
        if batch_norm:
            self.bn1 = nn.BatchNorm2d(channels, momentum=0.9)
            self.bn2 = nn.BatchNorm2d(channels, momentum=0.9)
        self.act = Activation(activation)

    def construct(self, x, out_lengths):
        # Frames past an utterance's length are zeroed after conv1 (deepspeech.pytorch's MaskConv):
        # otherwise conv2 reads conv1's outputs there, and an utterance's logits would depend on
        # how much padding its batch happened to have (different batching, different result;
        # data-parallel shards would not add up to the full batch). conv2's output needs no mask:
        # both RNN implementations read only each utterance's own frames (tests/test_layers.py
        # gives them nonzero padding), and a broadcast multiply is not free on CPU (11 ms
        # forward+backward at (16, 8, 41, 150), measured).
        mask = time_mask(out_lengths, output_frames(x.shape[-1]), x.dtype)
        x = self.conv1(x)
        if self.use_bn:
            x = self.bn1(x)
        x = self.act(x, mask)
        x = self.conv2(x)
        if self.use_bn:
            x = self.bn2(x)
        return self.act(x)


def time_mask(lengths, frames: int, dtype):
    """(B, 1, 1, frames): 1 where t < length."""
    t = ops.arange(frames).reshape(1, -1)
    return (t < lengths.reshape(-1, 1)).astype(dtype).reshape(-1, 1, 1, frames)


class RNNStack(nn.Cell):
    def __init__(self, input_size: int, hidden: int, layers: int, rnn_type: str, bidirectional: bool,
                 merge: str, impl: str):
        super().__init__()
        self.hidden = hidden
        self.merge_sum = bidirectional and merge == "sum"
        cells = []
        size = input_size
        for _ in range(layers):
            cells.append(make_rnn(rnn_type, size, hidden, bidirectional, impl=impl))
            size = hidden if (self.merge_sum or not bidirectional) else 2 * hidden
        self.lstms = nn.CellList(cells)  # reference name, whatever the RNN type
        self.output_size = size

    def construct(self, x, lengths):
        for cell in self.lstms:
            x = cell(x, lengths)
            if self.merge_sum:
                x = x[:, :, : self.hidden] + x[:, :, self.hidden:]
        return x


class FCHead(nn.Cell):
    def __init__(self, input_size: int, classes: int):
        super().__init__()
        self.module = nn.Dense(input_size, classes, has_bias=False)  # -> fc.module.weight

    def construct(self, x):
        return self.module(x)


class DeepSpeech2(nn.Cell):
    """construct(features (B, 161, T), lengths (B,)) -> (logits (B, T', 29), output lengths (B,))."""

    def __init__(self, conv_channels: int = 32, activation: str = "hardtanh", batch_norm: bool = True,
                 rnn_type: str = "lstm", rnn_layers: int = 5, rnn_hidden: int = 1024, bidirectional: bool = True,
                 merge: str = "sum", conv_impl: str = "fast", rnn_impl: str = "fast",
                 rnn_block_name: str = "RNN", num_classes: int = NUM_CLASSES, num_bins: int = NUM_BINS):
        super().__init__()
        self.conv = ConvBlock(conv_channels, activation, batch_norm, conv_impl)
        rnn_in = conv_channels * conv_output_bins(num_bins)
        stack = RNNStack(rnn_in, rnn_hidden, rnn_layers, rnn_type, bidirectional, merge, rnn_impl)
        # The reference spells the block `RNN`; a few of its checkpoints say `rnn`.
        self.rnn_block_name = rnn_block_name
        setattr(self, rnn_block_name, stack)
        self.fc = FCHead(stack.output_size, num_classes)

    @property
    def rnn_stack(self) -> RNNStack:
        return getattr(self, self.rnn_block_name)

    def construct(self, x, lengths):
        x = ops.expand_dims(x, 1)  # (B, 1, F, T)
        out_lengths = output_lengths(lengths)
        x = self.conv(x, out_lengths)  # (B, C, F', T')
        b, c, f, t = x.shape
        x = x.reshape(b, c * f, t).transpose(0, 2, 1)  # (B, T', C*F')
        x = self.rnn_stack(x, out_lengths)
        return self.fc(x), out_lengths


def build_model(model_cfg) -> DeepSpeech2:
    m = model_cfg
    return DeepSpeech2(conv_channels=m.conv_channels, activation=enum_value(m.activation), batch_norm=m.batch_norm,
                       rnn_type=enum_value(m.rnn_type), rnn_layers=m.rnn_layers, rnn_hidden=m.rnn_hidden,
                       bidirectional=m.bidirectional, merge=enum_value(m.merge), conv_impl=enum_value(m.conv_impl),
                       rnn_impl=enum_value(m.rnn_impl), rnn_block_name=m.rnn_block_name)


def count_parameters(model: nn.Cell, trainable_only: bool = True) -> int:
    params = model.trainable_params() if trainable_only else model.get_parameters()
    total = 0
    for p in params:
        n = 1
        for s in p.shape:
            n *= s
        total += n
    return total


def parameter_groups(model: nn.Cell) -> Dict[str, List[str]]:
    """Layer groups for diagnostics: each conv (+ its BN), each RNN layer, the FC."""
    groups: Dict[str, List[str]] = {}
    for name, p in model.parameters_and_names():
        if not p.requires_grad:
            continue
        parts = name.split(".")
        if parts[0] == "conv":
            key = "conv" + parts[1][-1]  # conv1/bn1 -> conv1, conv2/bn2 -> conv2
        elif parts[0] in ("RNN", "rnn"):
            key = f"rnn{parts[2]}"
        else:
            key = parts[0]
        groups.setdefault(key, []).append(name)
    return groups


def canonical_name(name: str) -> str:
    """Map `rnn.` spellings onto `RNN.` for comparison with the reference."""
    return "RNN." + name[4:] if name.startswith("rnn.") else name


def load_state(model: DeepSpeech2, state: Dict[str, "ms.Parameter"], strict: bool = True) -> Tuple[list, list]:
    """Copy tensors by name (accepting RNN./rnn.); raise with every mismatch listed when strict."""
    import numpy as np

    own = {canonical_name(n): p for n, p in model.parameters_and_names()}
    given = {canonical_name(n): v for n, v in state.items()}
    # MindSpore <= 1.5 zoo checkpoints: one flat cuDNN-layout vector per LSTM layer (RNN.weightN)
    from ds2exp.models.zoo_checkpoint import convert_flat_rnn

    given = convert_flat_rnn(given, {n: tuple(p.shape) for n, p in own.items()})
    missing = sorted(n for n in own if n not in given)
    mismatched = []
    for n, p in own.items():
        if n in given:
            arr = given[n].asnumpy() if hasattr(given[n], "asnumpy") else np.asarray(given[n])
            if tuple(arr.shape) != tuple(p.shape):
                mismatched.append(f"{n}: checkpoint {tuple(arr.shape)} vs model {tuple(p.shape)}")
    unexpected = sorted(n for n in given if n not in own and n.split(".")[0] in ("conv", "RNN", "fc"))
    if strict and (missing or mismatched or unexpected):
        lines = []
        if mismatched:
            lines.append("shape mismatches: " + "; ".join(mismatched[:20]))
        if missing:
            lines.append("missing in checkpoint: " + ", ".join(missing[:20]))
        if unexpected:
            lines.append("not in model: " + ", ".join(unexpected[:20]))
        raise ValueError("checkpoint does not fit the model: " + " | ".join(lines))
    for n, p in own.items():
        if n in given:
            arr = given[n].asnumpy() if hasattr(given[n], "asnumpy") else np.asarray(given[n])
            if tuple(arr.shape) == tuple(p.shape):
                # in place: after an optimizer step, set_data would detach p from the optimizer
                ops.assign(p, ms.Tensor(arr.astype(np.float32) if arr.dtype != np.float32 else arr))
    return missing, mismatched


def build_model_for_precision(cfg):
    """The model, with its compute in fp16 when precision=fp16 (parameters stay fp32).

    The fast CPU kernels are float32-only (numpy/numba), so fp16 uses the plain MindSpore
    kernels, which have the same parameters; the switch is logged.
    """
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
