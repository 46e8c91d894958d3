"""The recurrent layer's MindSpore Custom ops (FastRNN in models/layers.py builds on them).

``native_layer_op``: the input projection and the recurrence of a whole layer in one aot op over the
C++ kernels (ds2exp.kernels.native); ``numpy_scan_op``: the recurrence alone in a pyfunc op over the
numba/numpy kernels (ds2exp.kernels.rnn), the projection then one MindSpore matmul. Both have a custom
bprop, so autodiff works through them in PYNATIVE mode, under ``mindspore.value_and_grad`` and under
``mindspore.jit``.
"""
from __future__ import annotations

import functools

import numpy as np
from mindspore import ops

from ds2exp.kernels.rnn import KERNELS


def _make_scan_ops(mode, D):
    """Custom pyfunc forward op (with custom bprop) for a `mode` recurrence with D directions.

    Forward op inputs: xp (B, T, D*G) without bias, lengths (B,) int32, then (w_hh, b_hh, b_ih) per
    direction.
    Outputs: y (B, T, D*H) and three saved tensors (D, T, B, G|H|H) used by the backward.
    """
    fwd_np, bwd_np = KERNELS[mode]

    def _out_shapes(xs, ws):
        B, T = xs[0], xs[1]
        G, H = ws[0], ws[1]
        return (B, T, D * H), (D, T, B, G), (D, T, B, H), (D, T, B, H)

    def _bias_ih_grad(dxp):
        # the input bias adds to every valid frame's projection: its gradient is dxp summed
        return dxp.reshape(-1, D, dxp.shape[-1] // D).sum(axis=0)

    if D == 1:
        def fwd(xp, lengths, w0, b0, bi0):
            return fwd_np(xp, lengths, w0[None], b0[None], bi0[None])

        def fwd_shape(xs, ls, w0, b0, bi0):
            return _out_shapes(xs, w0)

        def fwd_dtype(xt, lt, w0, b0, bi0):
            return xt, xt, xt, xt

        def bwd(lengths, w0, a, s, hs, dy):
            dxp, dw, db = bwd_np(lengths, w0[None], a, s, hs, dy)
            return dxp, dw[0], db[0], _bias_ih_grad(dxp)[0]

        def bwd_shape(ls, w0, a, s, hs, dy):
            return (dy[0], dy[1], w0[0]), tuple(w0), (w0[0],), (w0[0],)

        def bwd_dtype(lt, w0, a, s, hs, dy):
            return w0, w0, w0, w0

        bwd_op = ops.Custom(bwd, out_shape=bwd_shape, out_dtype=bwd_dtype, func_type="pyfunc")

        def bprop(xp, lengths, w0, b0, bi0, out, dout):
            dxp, dw0, db0, dbi0 = bwd_op(lengths, w0, out[1], out[2], out[3], dout[0])
            return dxp, ops.zeros_like(lengths), dw0, db0, dbi0
    else:
        def fwd(xp, lengths, w0, b0, bi0, w1, b1, bi1):
            return fwd_np(xp, lengths, np.stack((w0, w1)), np.stack((b0, b1)), np.stack((bi0, bi1)))

        def fwd_shape(xs, ls, w0, b0, bi0, w1, b1, bi1):
            return _out_shapes(xs, w0)

        def fwd_dtype(xt, lt, w0, b0, bi0, w1, b1, bi1):
            return xt, xt, xt, xt

        def bwd(lengths, w0, w1, a, s, hs, dy):
            dxp, dw, db = bwd_np(lengths, np.stack((w0, w1)), a, s, hs, dy)
            dbi = _bias_ih_grad(dxp)
            return dxp, dw[0], db[0], dbi[0], dw[1], db[1], dbi[1]

        def bwd_shape(ls, w0, w1, a, s, hs, dy):
            G = (w0[0],)
            return (dy[0], dy[1], 2 * w0[0]), tuple(w0), G, G, tuple(w1), G, G

        def bwd_dtype(lt, w0, w1, a, s, hs, dy):
            return (w0,) * 7

        bwd_op = ops.Custom(bwd, out_shape=bwd_shape, out_dtype=bwd_dtype, func_type="pyfunc")

        def bprop(xp, lengths, w0, b0, bi0, w1, b1, bi1, out, dout):
            dxp, dw0, db0, dbi0, dw1, db1, dbi1 = bwd_op(lengths, w0, w1, out[1], out[2], out[3], dout[0])
            return dxp, ops.zeros_like(lengths), dw0, db0, dbi0, dw1, db1, dbi1

    fwd_op = ops.Custom(fwd, out_shape=fwd_shape, out_dtype=fwd_dtype, func_type="pyfunc", bprop=bprop)
    # keep the Python callables alive: the pyfunc registry is keyed by id()
    fwd_op._ds2_keep = (fwd, bwd, bprop, bwd_op)
    return fwd_op


@functools.lru_cache(maxsize=None)
def numpy_scan_op(mode, D):
    """One pyfunc recurrence op per (mode, directions), shared by every FastRNN of that kind."""
    return _make_scan_ops(mode, D)


def _make_native_layer_op(mode, D, library):
    """Custom aot op (with custom bprop) for a whole `mode` layer with D directions, projection included:
    the C++ kernels of `library` (ds2exp/kernels/native/recurrence.cc, where its tensors are listed).

    Forward inputs: x (B, T, In), lengths (B,) int32, then (w_ih, w_hh, b_hh, b_ih) per direction.
    Outputs: y (B, T, D*H) and the saved tensors (D, T, B, G|H|H) of the backward, which takes
    x, lengths, (w_ih, w_hh) per direction, the saved tensors and dy, and returns dx and
    (d w_ih, d w_hh, d b_hh, d b_ih) per direction."""

    def fwd_shape(xs, ls, *ps):
        B, T = xs[0], xs[1]
        G, H = ps[1][0], ps[1][1]
        return (B, T, D * H), (D, T, B, G), (D, T, B, H), (D, T, B, H)

    def fwd_dtype(xt, lt, *ps):
        return xt, xt, xt, xt

    def bwd_shape(xs, ls, *ps):
        grads = []
        for d in range(D):
            w_ih, w_hh = ps[2 * d], ps[2 * d + 1]
            grads += [tuple(w_ih), tuple(w_hh), (w_hh[0],), (w_hh[0],)]
        return (tuple(xs),) + tuple(grads)

    def bwd_dtype(xt, lt, *ps):
        return (xt,) * (1 + 4 * D)

    bwd_op = ops.Custom(f"{library}:{mode}_backward", out_shape=bwd_shape, out_dtype=bwd_dtype, func_type="aot")

    if D == 1:
        def bprop(x, lengths, wi0, wh0, bh0, bi0, out, dout):
            g = bwd_op(x, lengths, wi0, wh0, out[1], out[2], out[3], dout[0])
            return (g[0], ops.zeros_like(lengths)) + tuple(g[1:])
    else:
        def bprop(x, lengths, wi0, wh0, bh0, bi0, wi1, wh1, bh1, bi1, out, dout):
            g = bwd_op(x, lengths, wi0, wh0, wi1, wh1, out[1], out[2], out[3], dout[0])
            return (g[0], ops.zeros_like(lengths)) + tuple(g[1:])

    fwd_op = ops.Custom(f"{library}:{mode}_forward", out_shape=fwd_shape, out_dtype=fwd_dtype, func_type="aot",
                        bprop=bprop)
    fwd_op._ds2_keep = (bprop, bwd_op)
    return fwd_op


@functools.lru_cache(maxsize=None)
def native_layer_op(mode, D, library):
    """One C++ layer op per (mode, directions, library), shared by every FastRNN of that kind."""
    return _make_native_layer_op(mode, D, library)
