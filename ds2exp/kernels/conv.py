"""2-D convolution pieces over (B, C, F, T) inputs, no bias, padding (top, bottom, left, right).

* The GEMM backward's data movement (models/layers.py does the two GEMMs in MindSpore):
  ``freq_im2col`` (im2col over frequency rows only - kF/sF times the input, not kF*kT times),
  ``time_shifts`` (the kT time shifts of the output gradient side by side), ``freq_col2im``.
* Direct kernels: ``direct_conv_forward`` (any number of channels: DS2 conv1 and conv2) and
  ``direct_conv_weight_grad`` (one input channel without an input gradient: DS2 conv1 over the features).
* numpy references: ``conv_forward_np``, ``conv_backward_np`` (also the fallback without numba).
"""
import math

import numpy as np
from numpy.lib.stride_tricks import as_strided

from ds2exp.kernels import compiled
from ds2exp.kernels.settings import kernel, run_tasks, settings


def pair(v):
    if isinstance(v, int):
        return (v, v)
    v = tuple(int(a) for a in v)
    if len(v) != 2:
        raise ValueError(f"expected an int or a pair, got {v!r}")
    return v


def pad4(p):
    if isinstance(p, int):
        return (p, p, p, p)
    p = tuple(int(a) for a in p)
    if len(p) == 2:
        return (p[0], p[0], p[1], p[1])
    if len(p) != 4:
        raise ValueError(f"padding must be an int, a pair or (top, bottom, left, right), got {p!r}")
    return p


def conv_output_size(F, T, kernel_size, stride, padding):
    """(F_out, T_out) of a conv with pad_mode="pad" and padding (top, bottom, left, right)."""
    kF, kT = pair(kernel_size)
    sF, sT = pair(stride)
    pt, pb, pl, pr = pad4(padding)
    return (F + pt + pb - kF) // sF + 1, (T + pl + pr - kT) // sT + 1


@kernel("im2col")
def freq_im2col(x, kF, sF, Fo, pt, pb, pl, Tu):
    """x (B, C, F, T) -> Xf (B, Tu, Fo, kF*C): Xf[b, t, f, kf*C + c] = xpad[b, c, sF*f + kf, t]."""
    B, C, F, T = x.shape
    Fp = F + pt + pb
    xp = np.zeros((B, Tu, Fp, C), np.float32)
    tv = max(0, min(T, Tu - pl))
    if tv > 0:
        xp[:, pl:pl + tv, pt:pt + F, :] = x[:, :, :, :tv].transpose(0, 3, 2, 1)
    sb, st, sf, sc = xp.strides
    v = as_strided(xp, (B, Tu, Fo, kF, C), (sb, st, sf * sF, sf, sc), writeable=False)
    return np.ascontiguousarray(v).reshape(B, Tu, Fo, kF * C)


@kernel("col2im")
def freq_col2im(dXf, C, kF, sF, F, T, pt, pb, pl):
    """Adjoint of freq_im2col: dXf (B, Tu, Fo, kF*C) -> dx (B, C, F, T)."""
    B, Tu, Fo, _ = dXf.shape
    if settings.use_numba:
        dx = np.empty((B, C, F, T), np.float32)
        compiled.freq_col2im(np.ascontiguousarray(dXf, dtype=np.float32), C, kF, sF, pt, pl, dx)
        return dx
    Fp = F + pt + pb
    d5 = dXf.reshape(B, Tu, Fo, kF, C)
    dxp = np.zeros((B, Tu, Fp, C), np.float32)
    span = (Fo - 1) * sF + 1
    for kf in range(kF):
        dxp[:, :, kf:kf + span:sF, :] += d5[:, :, :, kf, :]
    dx = np.zeros((B, C, F, T), np.float32)
    tv = max(0, min(T, Tu - pl))
    if tv > 0:
        dx[:, :, :, :tv] = dxp[:, pl:pl + tv, pt:pt + F, :].transpose(0, 3, 2, 1)
    return dx


@kernel("time_shifts")
def time_shifts(dy, sT, kT):
    """dy (B, O, Fo, To) -> dZ (B*Tu*Fo, kT*O): dZ[b, u, f, kt, o] = dy[b, o, f, t] where
    u = t*sT + kt, else 0 (Tu = (To-1)*sT + kT)."""
    B, O, Fo, To = dy.shape
    Tu = (To - 1) * sT + kT
    if settings.use_numba:
        dZ = np.empty((B, Tu, Fo, kT, O), np.float32)
        compiled.time_shifts(np.ascontiguousarray(np.asarray(dy, np.float32).transpose(0, 3, 2, 1)), sT, dZ)
        return dZ.reshape(B * Tu * Fo, kT * O)
    dZ = np.zeros((B, Tu, Fo, kT, O), np.float32)
    dY = dy.transpose(0, 3, 2, 1)
    tspan = (To - 1) * sT + 1
    for kt in range(kT):
        dZ[:, kt:kt + tspan:sT, :, kt, :] = dY
    return dZ.reshape(B * Tu * Fo, kT * O)


def _tap_columns(x, w, stride, padding):
    """What both numpy references start from: the frequency-only im2col Xf (B, Tu, Fo, kF*C) of x,
    the weight as Wr (kF*C, kT, O) with rows [kf*C + c], and the output time length To."""
    x = np.asarray(x, np.float32)
    w = np.asarray(w, np.float32)
    C, F, T = x.shape[1:]
    O, _, kF, kT = w.shape
    pt, pb, pl, _ = padding
    Fo, To = conv_output_size(F, T, (kF, kT), stride, padding)
    Tu = (To - 1) * stride[1] + kT          # padded time frames the conv reads
    Xf = freq_im2col(x, kF, stride[0], Fo, pt, pb, pl, Tu)
    Wr = np.ascontiguousarray(w.transpose(2, 1, 3, 0)).reshape(kF * C, kT, O)
    return Xf, Wr, To


def conv_backward_np(x, w, dy, stride, padding):
    """Gradients (dx, dw) of the no-bias conv y = conv2d(x, w, stride, pad=(top, bottom, left, right)),
    in numpy: the frequency-only im2col Xf (B, Tu, Fo, kF*C), then one pair of GEMMs per time tap."""
    Xf, Wr, To = _tap_columns(x, w, stride, padding)
    B, Tu, Fo, K = Xf.shape
    _, kT, O = Wr.shape
    sT = stride[1]
    dY2 = np.ascontiguousarray(np.asarray(dy, np.float32).transpose(0, 3, 2, 1)).reshape(B * To * Fo, O)
    tspan = (To - 1) * sT + 1
    dWr = np.empty((K, kT, O), np.float32)
    dXf = np.zeros((B, Tu, Fo, K), np.float32)
    for kt in range(kT):
        Xk = np.ascontiguousarray(Xf[:, kt:kt + tspan:sT]).reshape(B * To * Fo, K)
        dWr[:, kt, :] = Xk.T @ dY2
        dXf[:, kt:kt + tspan:sT] += (dY2 @ Wr[:, kt, :].T).reshape(B, To, Fo, K)
    C, F, T = np.shape(x)[1:]
    kF = K // C
    dw = np.ascontiguousarray(dWr.reshape(kF, C, kT, O).transpose(3, 1, 0, 2))
    pt, pb, pl, _ = padding
    dx = freq_col2im(dXf, C, kF, stride[0], F, T, pt, pb, pl)
    return dx, dw


def conv_forward_np(x, w, stride, padding):
    """numpy reference of the forward (im2col over frequency, one GEMM, shift-add over time taps)."""
    Xf, Wr, To = _tap_columns(x, w, stride, padding)
    B, Tu, Fo, K = Xf.shape
    _, kT, O = Wr.shape
    sT = stride[1]
    Z = (Xf.reshape(B * Tu * Fo, K) @ Wr.reshape(K, kT * O)).reshape(B, Tu, Fo, kT, O)
    Y = np.zeros((B, To, Fo, O), np.float32)
    tspan = (To - 1) * sT + 1
    for kt in range(kT):
        Y += Z[:, kt:kt + tspan:sT, :, kt, :]
    return np.ascontiguousarray(Y.transpose(0, 3, 2, 1))


# ---- direct compiled kernels: the forward (DS2 conv1 and conv2), conv1's weight gradient ---------
# MindSpore's CPU Conv2D runs DS2's convolutions at a small fraction of the machine's speed.
# Measured inside a ds2_tiny training step (B=16, 300 frames, 8 output channels): conv1's forward +
# weight gradient 73-91 ms; conv2's forward (8 -> 8 channels, 21x11 taps) 370-420 ms (MindSpore's
# profiler, machine load 3), the largest single op of the step. Written directly - the input split
# into its sT time phases so that every kernel tap reads a contiguous row, the loop over output
# frames innermost so that it vectorises, batch chunks on the cores - conv1 takes 44 ms, and conv2's
# forward 0.121 s against Conv2D's 0.298 s side by side (bench/bench_layers.py --only conv, load 5;
# at 32 -> 32 channels the two tie, see layers.DIRECT_FORWARD_MAX_CHANNEL_PAIRS). conv1's input
# gradient is not computed: its input is the features, which nothing differentiates
# (input_grad=False; the gradient is returned as zeros).

# The batch is cut into this many chunks (fewer for a smaller batch) whatever the thread count:
# the weight gradient is the sum of one partial sum per chunk, added in chunk order, so its bits do
# not depend on how many threads ran the chunks (OMP_NUM_THREADS, DS2EXP_RNN_THREADS, cores).
BATCH_CHUNKS = 8


def batch_chunks(B):
    """[(b0, b1), ...]: B rows in min(B, BATCH_CHUNKS) contiguous chunks of (nearly) equal size."""
    n = max(1, min(B, BATCH_CHUNKS))
    edges = [round(i * B / n) for i in range(n + 1)]
    return [(edges[i], edges[i + 1]) for i in range(n)]


def _conv_phases_np(x, pt, pl, sT, Fp, Tq):
    """x (B, C, F, T) -> (B, C, sT, Fp, Tq): out[b, c, p, fp, q] = xpad[b, c, fp, sT*q + p] (zero padding)."""
    B, C, F, T = x.shape
    out = np.zeros((B, C, sT, Fp, Tq), np.float32)
    for p in range(sT):
        # padded column u = sT*q + p holds input column u - pl
        q0 = max(0, -((p - pl) // sT))                      # first q with sT*q + p - pl >= 0
        t0 = sT * q0 + p - pl
        n = min(Tq - q0, max(0, (T - 1 - t0) // sT + 1)) if t0 < T else 0
        if n > 0:
            out[:, :, p, pt:pt + F, q0:q0 + n] = x[:, :, :, t0:t0 + sT * (n - 1) + 1:sT]
    return out


def direct_geometry(shape, kernel_size, stride, padding):
    """Output (Fo, To) and the phase buffer's (Fp, Tq) for an input of shape (B, C, F, T)."""
    F, T = shape[2], shape[3]
    Fo, To = conv_output_size(F, T, kernel_size, stride, padding)
    return Fo, To, F + padding[0] + padding[1], To + (kernel_size[1] - 1) // stride[1] + 1


def conv_rows_per_partial(C, kF, kT, sT):
    """How many (c, kf) rows of taps compiled.conv_fwd sums before adding them to the output's total.

    The error of the two float32 running sums is smallest when both are about as long (the square
    root of the C*kF rows over the passes one row takes; a pass adds up to four time taps) and stays
    near that up to twice as many rows per group, while each group costs one more pass over the row
    buffer: twice that root (DS2 conv1: 6 of 41 rows, conv2: 12 of 168). Measured against a float64
    conv at DS2's shapes (B=8, nonnegative inputs): largest error 2.9e-6 (conv1) and 8.7e-6 (conv2)
    where one running sum over all taps is 1.4e-5 and 7.0e-5 off, for 1.5-2% more CPU time."""
    taps = [(kT - p + sT - 1) // sT for p in range(sT)]   # time taps of each phase p
    passes = sum(n // 4 + n % 4 for n in taps)            # four taps per pass, then one at a time
    return max(1, round(2.0 * math.sqrt(C * kF / max(1, passes))))


@kernel("conv_fwd")
def direct_conv_forward(x, w, stride, padding):
    """conv2d of x (B, C, F, T) with w (O, C, kF, kT): the direct kernel (numpy reference without numba)."""
    x = np.asarray(x, np.float32)
    w = np.asarray(w, np.float32)
    if not settings.use_numba:
        return conv_forward_np(x, w, stride, padding)
    B, O = x.shape[0], w.shape[0]
    Fo, To, Fp, Tq = direct_geometry(x.shape, w.shape[2:], stride, padding)
    xph = _conv_phases_np(x, padding[0], padding[2], stride[1], Fp, Tq)
    w = np.ascontiguousarray(w)
    out = np.empty((B, O, Fo, To), np.float32)
    rows = conv_rows_per_partial(x.shape[1], w.shape[2], w.shape[3], stride[1])
    run_tasks(batch_chunks(B), lambda r: compiled.conv_fwd(xph, w, stride[0], stride[1], out, r[0], r[1], rows))
    return out


@kernel("conv1_dw")
def direct_conv_weight_grad(x, dy, kernel_size, stride, padding):
    """d w (O, 1, kF, kT) of direct_conv_forward for the output gradient dy (B, O, Fo, To)."""
    x = np.asarray(x, np.float32)
    dy = np.ascontiguousarray(dy, dtype=np.float32)
    O = dy.shape[1]
    kF, kT = kernel_size
    if not settings.use_numba:
        return conv_backward_np(x, np.zeros((O, 1, kF, kT), np.float32), dy, stride, padding)[1]
    _, _, Fp, Tq = direct_geometry(x.shape, kernel_size, stride, padding)
    xph = _conv_phases_np(x, padding[0], padding[2], stride[1], Fp, Tq)[:, 0]
    chunks = batch_chunks(x.shape[0])
    parts = np.empty((len(chunks), O, kF, kT), np.float32)
    run_tasks(list(enumerate(chunks)),
              lambda ic: compiled.conv1_dw(xph, dy, stride[0], stride[1], parts[ic[0]], ic[1][0], ic[1][1]))
    dw = parts[0].copy()
    for part in parts[1:]:  # fixed order: the same bits for any number of threads
        dw += part
    return dw[:, None]
