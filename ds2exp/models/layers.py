"""The two slow-on-CPU DeepSpeech2 layers (2-D convolution and the RNN) as MindSpore cells.

Each layer comes in two implementations behind one interface, selected by ``impl``:

``"plain"``
    the stock MindSpore cells: ``nn.Conv2d(pad_mode="pad", has_bias=False)``; ``nn.LSTM`` /
    ``nn.GRU`` (one layer, batch_first) called with ``seq_length``. The reference.
``"fast"``
    *conv*: forward by a direct compiled kernel (ds2exp.kernels.conv.direct_conv_forward; MindSpore's
    CPU Conv2D ran DS2's conv2 at about 7 GFLOP/s) up to DIRECT_FORWARD_MAX_CHANNEL_PAIRS input x
    output channels, MindSpore's Conv2D above that; backward by a custom bprop built from large
    matrix multiplies: numpy pyfunc ops (ds2exp.kernels.conv) do the data movement
    (im2col over frequency rows only - kF/sF times the input, not kF*kT times; the kT time
    shifts of dy; col2im) and MindSpore's matmul (about 2x OpenBLAS's here) does the two GEMMs.
    With a single input channel and no input gradient needed (DS2 conv1 over the features,
    ``input_grad=False``), the weight gradient is a direct kernel too; with one input channel and
    an input gradient, MindSpore's own forward and backward are kept.
    *RNN*: where a C++ compiler builds ds2exp.kernels.native, the whole layer - the input projection
    and the recurrence, forward and a hand-written backward, both directions, ragged lengths - is ONE
    ``Custom(func_type="aot")`` op over the C++ kernels (models/rnn_ops.py). Otherwise the input
    projection of all time steps and both directions is one MindSpore matmul and the recurrence runs
    in a ``Custom(func_type="pyfunc")`` op over the numba/numpy kernels (ds2exp.kernels.rnn): with
    numba and at most 32 rows each direction's whole time loop is one compiled call, else a numpy
    loop with BLAS per step. Both have a custom bprop, so autodiff works through the whole model in
    PYNATIVE mode, under ``mindspore.value_and_grad`` and under ``mindspore.jit``.

Parameters carry the same names and shapes in both (``weight``; ``weight_ih_l0``, ``weight_hh_l0``,
``bias_ih_l0``, ``bias_hh_l0`` and ``_reverse``, gate order of ``nn.LSTM`` (i, f, g, o) and ``nn.GRU``
(r, z, n)), also nested in a model, so checkpoints load into either.

Notes (measured on the 2-core CPU, bench/bench_layers.py):

* Call ``mindspore.runtime.launch_blocking()`` once at start-up: MindSpore's asynchronous op launch makes
  the stock layers slow here (nn.Conv2d conv2 fwd+bwd 1.0 -> 0.5 s, the fused nn.LSTM 5.0 -> 0.2 s) and
  the pyfunc-based fast conv backward about 2x slower (its runtime thread fights the main one for the GIL).
* The pyfunc ops run on CPU only, float32 only. numba compiles its kernels on first use (cached in
  __pycache__); ``DS2EXP_NO_NUMBA=1`` or ``ds2exp.kernels.set_numba_enabled(False)``: the numpy fallback.
"""
from __future__ import annotations

import math

import mindspore as ms
from mindspore import Parameter, nn, ops
from mindspore.common.initializer import HeUniform, Uniform, initializer

from ds2exp.kernels.conv import (conv_output_size, direct_conv_forward, direct_conv_weight_grad, direct_geometry,
                                 freq_col2im, freq_im2col, pad4, pair, time_shifts)
from ds2exp.kernels import native
from ds2exp.kernels.rnn import GATES
from ds2exp.models.rnn_ops import native_layer_op, numpy_scan_op

__all__ = [
    "FastConv2d",
    "FastRNN",
    "PlainGRU",
    "PlainLSTM",
    "PlainRNN",
    "conv_output_size",
    "make_conv2d",
    "make_rnn",
]

IMPLS = ("plain", "fast")


# --------------------------------------------------------------------------------------------
# RNN cells
# --------------------------------------------------------------------------------------------
def _check_rnn_type(rnn_type):
    t = str(rnn_type).lower()
    if t not in GATES:
        raise ValueError(f"rnn_type must be 'lstm' or 'gru', got {rnn_type!r}")
    return t


class _PlainRNNMixin:
    """Reference: nn.LSTM / nn.GRU (one layer, batch_first) called with seq_length.

    Subclasses (not wrappers) of the stock cells, so the parameters sit at this level with the
    stock names (``weight_ih_l0`` ...), exactly like the fast implementation's, also when nested.
    """

    rnn_type = ""

    def __init__(self, input_size, hidden_size, bidirectional):
        super().__init__(input_size, hidden_size, num_layers=1, has_bias=True, batch_first=True,
                         bidirectional=bidirectional)
        self.hidden_size = hidden_size
        self.num_directions = 2 if bidirectional else 1


# construct names its stock class: GRAPH mode cannot compile super().construct
class PlainLSTM(_PlainRNNMixin, nn.LSTM):
    rnn_type = "lstm"

    def construct(self, x, lengths):
        return nn.LSTM.construct(self, x, None, lengths)[0]


class PlainGRU(_PlainRNNMixin, nn.GRU):
    rnn_type = "gru"

    def construct(self, x, lengths):
        return nn.GRU.construct(self, x, None, lengths)[0]


def PlainRNN(rnn_type, input_size, hidden_size, bidirectional):
    """The reference RNN layer (``PlainLSTM`` or ``PlainGRU``)."""
    cls = PlainLSTM if _check_rnn_type(rnn_type) == "lstm" else PlainGRU
    return cls(input_size, hidden_size, bidirectional)


class FastRNN(nn.Cell):
    """One-layer (bi)LSTM/GRU: one input-projection matmul + numpy/numba recurrence (Custom op)."""

    def __init__(self, rnn_type, input_size, hidden_size, bidirectional):
        super().__init__()
        self.rnn_type = _check_rnn_type(rnn_type)
        self.input_size = input_size
        self.hidden_size = hidden_size
        self.num_directions = 2 if bidirectional else 1
        G = GATES[self.rnn_type] * hidden_size
        stdv = 1.0 / math.sqrt(hidden_size)

        def p(shape, name):
            return Parameter(initializer(Uniform(stdv), shape, ms.float32), name=name)

        self.weight_ih_l0 = p((G, input_size), "weight_ih_l0")
        self.weight_hh_l0 = p((G, hidden_size), "weight_hh_l0")
        self.bias_ih_l0 = p((G,), "bias_ih_l0")
        self.bias_hh_l0 = p((G,), "bias_hh_l0")
        if bidirectional:
            self.weight_ih_l0_reverse = p((G, input_size), "weight_ih_l0_reverse")
            self.weight_hh_l0_reverse = p((G, hidden_size), "weight_hh_l0_reverse")
            self.bias_ih_l0_reverse = p((G,), "bias_ih_l0_reverse")
            self.bias_hh_l0_reverse = p((G,), "bias_hh_l0_reverse")
        library = native.library()
        # with the C++ kernels one op does the projection and the recurrence (rnn_ops.native_layer_op)
        self.fused = library is not None
        if self.fused:
            self.layer_op = native_layer_op(self.rnn_type, self.num_directions, library)
        else:
            self.matmul_t = ops.MatMul(transpose_b=True)
            self.scan = numpy_scan_op(self.rnn_type, self.num_directions)

    def construct(self, x, lengths=None):
        B, T, In = x.shape
        if lengths is None:
            lengths = ops.fill(ms.int32, (B,), T)
        lengths = lengths.astype(ms.int32)
        if self.fused:
            if self.num_directions == 2:
                return self.layer_op(x, lengths, self.weight_ih_l0, self.weight_hh_l0, self.bias_hh_l0, self.bias_ih_l0,
                                     self.weight_ih_l0_reverse, self.weight_hh_l0_reverse, self.bias_hh_l0_reverse,
                                     self.bias_ih_l0_reverse)[0]
            return self.layer_op(x, lengths, self.weight_ih_l0, self.weight_hh_l0, self.bias_hh_l0, self.bias_ih_l0)[0]
        if self.num_directions == 2:
            w_ih = ops.concat((self.weight_ih_l0, self.weight_ih_l0_reverse), 0)
        else:
            w_ih = self.weight_ih_l0
        # the input bias is added inside the recurrence op (see kernels.rnn.lstm_forward)
        xp = self.matmul_t(x.reshape(B * T, In), w_ih).reshape(B, T, -1)
        if self.num_directions == 2:
            out = self.scan(xp, lengths, self.weight_hh_l0, self.bias_hh_l0, self.bias_ih_l0,
                            self.weight_hh_l0_reverse, self.bias_hh_l0_reverse, self.bias_ih_l0_reverse)
        else:
            out = self.scan(xp, lengths, self.weight_hh_l0, self.bias_hh_l0, self.bias_ih_l0)
        return out[0]


def make_rnn(rnn_type, input_size, hidden_size, bidirectional, impl="fast") -> nn.Cell:
    """One RNN layer: ``cell(x (B,T,In) float32, lengths (B,) int32) -> (B, T, D*hidden)``.

    Forward direction first, then reverse (which starts at each row's own last valid frame);
    padded frames of the output are 0.
    """
    if impl == "plain":
        return PlainRNN(rnn_type, input_size, hidden_size, bidirectional)
    if impl == "fast":
        return FastRNN(rnn_type, input_size, hidden_size, bidirectional)
    raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")


# --------------------------------------------------------------------------------------------
# Convolution
# --------------------------------------------------------------------------------------------
def _direct_forward_op(out_channels, kernel_size, stride, padding, bprop=None):
    """The direct conv forward (ds2exp.kernels.conv.direct_conv_forward) as a Custom pyfunc op, and the
    callables to keep alive (the pyfunc registry is keyed by id())."""

    def fwd(x, w):
        return direct_conv_forward(x, w, stride, padding)

    def fwd_shape(xs, ws):
        Fo, To, _, _ = direct_geometry(xs, kernel_size, stride, padding)
        return (xs[0], out_channels, Fo, To)

    kw = {} if bprop is None else {"bprop": bprop}
    op = ops.Custom(fwd, out_shape=fwd_shape, out_dtype=lambda xt, wt: xt, func_type="pyfunc", **kw)
    return op, (fwd, fwd_shape)


# Largest im2col matrix of the GEMM backward (_ConvFn.bprop): ds2_tiny's conv2 at batch 16 x 300 frames
# (70 MB) goes through in one piece, ds2_reference's at 8 x 1200 frames (538 MB) in chunks of utterances.
IM2COL_CHUNK_BYTES = 96 << 20


class _ConvFn(nn.Cell):
    """conv2d(x, w) with a GEMM backward (custom bprop): the data movement (frequency im2col of x,
    the kT time shifts of dy, col2im of the input gradient) runs in numpy/numba pyfunc ops
    (ds2exp.kernels.conv), the two big GEMMs in MindSpore (its matmul is ~2x OpenBLAS's here).
    The forward is the direct kernel (ds2exp.kernels.conv.direct_conv_forward) with
    direct_forward=True, else MindSpore's Conv2D."""

    def __init__(self, out_channels, kernel_size, stride, padding, direct_forward=False):
        super().__init__()
        self.matmul_ta = ops.MatMul(transpose_a=True)
        self.matmul_tb = ops.MatMul(transpose_b=True)
        fwd_keep = ()
        if direct_forward:
            self.fwd_op, fwd_keep = _direct_forward_op(out_channels, kernel_size, stride, padding)
        else:
            self.fwd_op = ops.Conv2D(out_channel=out_channels, kernel_size=kernel_size, mode=1, pad_mode="pad",
                                     pad=padding, stride=stride)
        sF, sT = stride
        self.stride_t = sT
        pt, pb, pl, _ = padding
        kF, kT = kernel_size

        def im2col(x, dy):
            B, C = x.shape[:2]
            Fo, To = dy.shape[2], dy.shape[3]
            Tu = (To - 1) * sT + kT
            return freq_im2col(x, kF, sF, Fo, pt, pb, pl, Tu).reshape(B * Tu * Fo, kF * C)

        def im2col_shape(xs, ds):
            Tu = (ds[3] - 1) * sT + kT
            return (xs[0] * Tu * ds[2], kF * xs[1])

        def shifts(dy):
            return time_shifts(dy, sT, kT)

        def shifts_shape(ds):
            Tu = (ds[3] - 1) * sT + kT
            return (ds[0] * Tu * ds[2], kT * ds[1])

        def col2im(dxf, x, dy):
            B, C, F, T = x.shape
            Fo, To = dy.shape[2], dy.shape[3]
            Tu = (To - 1) * sT + kT
            return freq_col2im(dxf.reshape(B, Tu, Fo, kF * C), C, kF, sF, F, T, pt, pb, pl)

        # the pyfunc registry is keyed by id(): keep the callables alive
        self._keep = fwd_keep + (im2col, shifts, col2im)
        self.im2col = ops.Custom(im2col, out_shape=im2col_shape, out_dtype=lambda xt, dt: xt, func_type="pyfunc")
        self.shifts = ops.Custom(shifts, out_shape=shifts_shape, out_dtype=lambda dt: dt, func_type="pyfunc")
        self.col2im = ops.Custom(col2im, out_shape=lambda fs, xs, ds: xs, out_dtype=lambda ft, xt, dt: xt,
                                 func_type="pyfunc")

    def construct(self, x, w):
        return self.fwd_op(x, w)

    def bprop(self, x, w, out, dout):
        O, C, kF, kT = w.shape
        B, Fo, To = dout.shape[0], dout.shape[2], dout.shape[3]
        wr = ops.transpose(w, (2, 1, 3, 0)).reshape(kF * C, kT * O)
        # the im2col matrix and its gradient are kF/sF times the input: a batch of long utterances
        # goes through in chunks of utterances, so that they stay under IM2COL_CHUNK_BYTES
        rows = ((To - 1) * self.stride_t + kT) * Fo
        per_chunk = max(1, IM2COL_CHUNK_BYTES // max(1, rows * kF * C * 4))
        dwr, dxs = None, []
        for b0 in range(0, B, per_chunk):
            xb, db = x[b0:b0 + per_chunk], dout[b0:b0 + per_chunk]
            xf = self.im2col(xb, db)                                 # (b*Tu*Fo, kF*C)
            dz = self.shifts(db)                                     # (b*Tu*Fo, kT*O)
            part = self.matmul_ta(xf, dz)                            # (kF*C, kT*O)
            dwr = part if dwr is None else dwr + part
            dxs.append(self.col2im(self.matmul_tb(dz, wr), xb, db))  # d x of these utterances
        dw = ops.transpose(dwr.reshape(kF, C, kT, O), (3, 1, 0, 2))
        dx = dxs[0] if len(dxs) == 1 else ops.concat(dxs, 0)
        return dx, dw


class _NativeConvFn(nn.Cell):
    """conv2d(x, w) entirely with MindSpore's kernels (forward and backward)."""

    def __init__(self, out_channels, kernel_size, stride, padding):
        super().__init__()
        self.conv = ops.Conv2D(out_channel=out_channels, kernel_size=kernel_size, mode=1, pad_mode="pad",
                               pad=padding, stride=stride)

    def construct(self, x, w):
        return self.conv(x, w)


class _DirectConvFn(nn.Cell):
    """conv2d(x, w) for one input channel with the direct kernels (forward and weight gradient);
    the input gradient is zeros (input_grad=False: nothing differentiates the features)."""

    def __init__(self, out_channels, kernel_size, stride, padding):
        super().__init__()
        kF, kT = kernel_size

        def dw(x, dy):
            return direct_conv_weight_grad(x, dy, kernel_size, stride, padding)

        self.dw_op = ops.Custom(dw, out_shape=lambda xs, ds: (out_channels, 1, kF, kT),
                                out_dtype=lambda xt, dt: xt, func_type="pyfunc")

        def bprop(x, w, out, dout):
            return ops.zeros_like(x), self.dw_op(x, dout)

        self.fwd_op, fwd_keep = _direct_forward_op(out_channels, kernel_size, stride, padding, bprop=bprop)
        self._keep = fwd_keep + (dw, bprop)  # the pyfunc registry is keyed by id(): keep them alive

    def construct(self, x, w):
        return self.fwd_op(x, w)


# "gemm": MindSpore's conv forward, GEMM backward (_ConvFn); "direct_gemm": the direct forward, GEMM
# backward; "native": MindSpore's conv forward and backward; "direct": the one-channel kernels without
# input gradient (_DirectConvFn)
CONV_STRATEGIES = ("gemm", "direct_gemm", "native", "direct")

# Measured (bench/bench_layers.py --only conv, 2 threads, machine load 5), DS2's conv2 (21x11 taps)
# forward, the direct kernel against MindSpore's Conv2D: 0.121 vs 0.298 s at 8 -> 8 channels (B=16,
# 150 frames), 0.208 vs 0.307 s at 16 -> 16 (B=8), 0.499 vs 0.501 s at 32 -> 32 (B=4, 200 frames):
# the direct forward up to this many input x output channels, MindSpore's kernel above.
DIRECT_FORWARD_MAX_CHANNEL_PAIRS = 256


def _auto_conv_strategy(in_channels, out_channels, kernel_size, input_grad=True):
    # measured (bench/bench_layers.py): the GEMM backward wins when the im2col rows are long
    # (DS2 conv2: kF*C = 672); with one input channel (conv1: kF*C = 41) the direct kernels win
    # where no input gradient is needed, and MindSpore's own conv otherwise.
    if in_channels * kernel_size[0] >= 128:
        return "direct_gemm" if in_channels * out_channels <= DIRECT_FORWARD_MAX_CHANNEL_PAIRS else "gemm"
    return "direct" if in_channels == 1 and not input_grad else "native"


class FastConv2d(nn.Cell):
    """No-bias conv2d (pad_mode="pad") with a fast backward; one parameter ``weight`` (O, C, kF, kT).

    input_grad=False declares that nothing differentiates the input (a network's first layer over
    its features): the "direct" strategy then skips that gradient and returns zeros for it.
    """

    def __init__(self, in_channels, out_channels, kernel_size, stride, padding, strategy="auto", input_grad=True):
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = pair(kernel_size)
        self.stride = pair(stride)
        self.padding = pad4(padding)
        shape = (out_channels, in_channels) + self.kernel_size
        self.weight = Parameter(initializer(HeUniform(math.sqrt(5)), shape, ms.float32), name="weight")
        if strategy == "auto":
            strategy = _auto_conv_strategy(in_channels, out_channels, self.kernel_size, input_grad)
        if strategy not in CONV_STRATEGIES:
            raise ValueError(f"conv strategy must be one of {('auto',) + CONV_STRATEGIES}, got {strategy!r}")
        if strategy == "direct" and (in_channels != 1 or input_grad):
            raise ValueError("conv strategy 'direct' is for one input channel with input_grad=False "
                             f"(got in_channels={in_channels}, input_grad={input_grad})")
        self.strategy = strategy
        self.input_grad = input_grad
        if strategy == "native":
            self.fn = _NativeConvFn(out_channels, self.kernel_size, self.stride, self.padding)
        elif strategy == "direct":
            self.fn = _DirectConvFn(out_channels, self.kernel_size, self.stride, self.padding)
        else:
            self.fn = _ConvFn(out_channels, self.kernel_size, self.stride, self.padding,
                              direct_forward=strategy == "direct_gemm")

    def construct(self, x):
        return self.fn(x, self.weight)

    def extend_repr(self):
        return (f"in_channels={self.in_channels}, out_channels={self.out_channels}, "
                f"kernel_size={self.kernel_size}, stride={self.stride}, padding={self.padding}, "
                f"strategy={self.strategy}, input_grad={self.input_grad}")


def make_conv2d(in_channels, out_channels, kernel_size, stride, padding, impl="fast", input_grad=True) -> nn.Cell:
    """No-bias 2-D conv over (B, C, F, T) input with padding (top, bottom, left, right).
    input_grad=False: nothing differentiates the input (see FastConv2d)."""
    if impl == "plain":
        return nn.Conv2d(in_channels, out_channels, pair(kernel_size), pair(stride), pad_mode="pad",
                         padding=pad4(padding), has_bias=False)
    if impl == "fast":
        return FastConv2d(in_channels, out_channels, kernel_size, stride, padding, input_grad=input_grad)
    raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
