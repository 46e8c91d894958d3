"""Fast CPU implementations of the two slow DeepSpeech2 layers (2-D convolution and the RNN).

Each layer comes in two implementations behind one interface, selected by ``impl``:

``"plain"``
    the stock MindSpore cells: ``nn.Conv2d(pad_mode="pad", has_bias=False)``; ``nn.LSTM`` /
    ``nn.GRU`` (one layer, batch_first) called with ``seq_length``. The reference.
``"fast"``
    *conv*: forward with MindSpore's own convolution kernel (it is competitive), backward by a
    custom bprop built from large matrix multiplies: numpy pyfunc ops do the data movement
    (im2col over frequency rows only - kF/sF times the input, not kF*kT times; the kT time
    shifts of dy; col2im) and MindSpore's matmul (about 2x OpenBLAS's here) does the two GEMMs.
    With a single input channel and no input gradient needed (DS2 conv1 over the features,
    ``input_grad=False``), forward and weight gradient are direct numba kernels instead; with one
    input channel and an input gradient, MindSpore's own backward is as fast, so it is kept.
    *RNN*: the input projection of all time steps and both directions is ONE MindSpore matmul;
    the recurrence - forward and a hand-written backward, both directions, ragged lengths - runs
    in a ``mindspore.ops.Custom(func_type="pyfunc")`` op with a custom bprop, so autodiff works
    through the whole model in PYNATIVE mode, under ``mindspore.value_and_grad`` and under
    ``mindspore.jit``. With numba and at most 32 rows, each direction's whole time loop is one
    compiled call (the two directions on two threads, the product with W_hh register-blocked);
    otherwise a numpy loop with BLAS per step. The input bias is added inside the recurrence op.

Parameters carry the same names and shapes in both implementations (``weight`` for the conv;
``weight_ih_l0``, ``weight_hh_l0``, ``bias_ih_l0``, ``bias_hh_l0`` and the ``_reverse`` ones for the
RNN, gate order of ``nn.LSTM`` (i, f, g, o) and ``nn.GRU`` (r, z, n)), also when nested in a
model, so checkpoints load into either.

Notes (measured on the 2-core CPU, bench/bench_layers.py):

* Call ``mindspore.runtime.launch_blocking()`` once at start-up. MindSpore's default asynchronous
  op launch is what makes the stock layers slow on this machine (nn.Conv2d conv2 fwd+bwd 1.0 ->
  0.5 s, the fused nn.LSTM fwd+bwd 5.0 -> 0.2 s) and it costs the pyfunc-based fast conv
  backward about 2x (the pyfunc runs on a runtime thread that fights the main thread for the GIL).
* The pyfunc ops run on CPU only; float32 only.
* numba compiles its kernels on first use (a few seconds, then cached in __pycache__).
  ``DS2EXP_NO_NUMBA=1`` or ``set_numba_enabled(False)`` selects the numpy fallback.
"""
from __future__ import annotations

import math
import os

import mindspore as ms
import numpy as np
from mindspore import Parameter, nn, ops
from mindspore.common.initializer import HeUniform, Uniform, initializer
from numpy.lib.stride_tricks import as_strided

__all__ = [
    "HAVE_NUMBA",
    "FastConv2d",
    "FastRNN",
    "PlainGRU",
    "PlainLSTM",
    "PlainRNN",
    "conv_output_size",
    "make_conv2d",
    "make_rnn",
    "set_numba_enabled",
]

IMPLS = ("plain", "fast")

# --------------------------------------------------------------------------------------------
# numba (optional): compiled recurrences and conv-backward data movement
# --------------------------------------------------------------------------------------------
try:  # pragma: no cover - exercised implicitly
    import numba as _numba
    HAVE_NUMBA = True
except ImportError:  # also raised by a numba built for another numpy
    _numba = None
    HAVE_NUMBA = False

_USE_NUMBA = HAVE_NUMBA and os.environ.get("DS2EXP_NO_NUMBA", "") in ("", "0")
# fastmath without the no-NaN/no-Inf assumptions: reassociation lets LLVM vectorise the dot
# products, while an Inf or NaN (a diverging run) still propagates as IEEE says - with nnan/ninf
# the clamped tanh below may turn an Inf into a NaN, and a diverging run dies sooner than it should.
_FAST_MATH = {"nsz", "arcp", "contract", "afn", "reassoc"}
# numba's kernels beat OpenBLAS at these small row counts (measured: B=8, H=256: 130 us vs 300 us
# a step; B=2, H=1024: 1.4 ms vs 4 ms); above this batch size BLAS is as fast.
_NUMBA_MAX_ROWS = 32


def set_numba_enabled(flag: bool) -> bool:
    """Turn the numba kernels on/off (numpy fallback); returns the previous setting."""
    global _USE_NUMBA
    old = _USE_NUMBA
    _USE_NUMBA = bool(flag) and HAVE_NUMBA
    return old


if HAVE_NUMBA:
    @_numba.njit(fastmath=_FAST_MATH, cache=True, nogil=True)
    def _nb_rows_wT(h, w, out):  # pragma: no cover - compiled
        """out[b, j] = sum_k h[b, k] * w[j, k]: the recurrent product of one direction and step.

        Blocked 4 rows of w x 4 rows of h: each pass over k loads 8 vectors for 16 FMAs, where a
        plain dot product per (b, j) loads 2 for 1, so the core is no longer bound by its loads
        (measured: B=4, 4096x1024: 0.93 ms -> 0.29 ms; B=8, 768x256: 39 us -> 18 us). Leftover rows
        (B or G not a multiple of 4) take the plain dot product.
        """
        G, H = w.shape
        B = h.shape[0]
        Gb = G - G % 4
        Bb = B - B % 4
        for j in range(0, Gb, 4):
            for b in range(0, Bb, 4):
                s00 = s01 = s02 = s03 = s10 = s11 = s12 = s13 = np.float32(0.0)
                s20 = s21 = s22 = s23 = s30 = s31 = s32 = s33 = np.float32(0.0)
                for k in range(H):
                    w0 = w[j, k]
                    w1 = w[j + 1, k]
                    w2 = w[j + 2, k]
                    w3 = w[j + 3, k]
                    h0 = h[b, k]
                    h1 = h[b + 1, k]
                    h2 = h[b + 2, k]
                    h3 = h[b + 3, k]
                    s00 += w0 * h0
                    s01 += w0 * h1
                    s02 += w0 * h2
                    s03 += w0 * h3
                    s10 += w1 * h0
                    s11 += w1 * h1
                    s12 += w1 * h2
                    s13 += w1 * h3
                    s20 += w2 * h0
                    s21 += w2 * h1
                    s22 += w2 * h2
                    s23 += w2 * h3
                    s30 += w3 * h0
                    s31 += w3 * h1
                    s32 += w3 * h2
                    s33 += w3 * h3
                out[b, j], out[b + 1, j], out[b + 2, j], out[b + 3, j] = s00, s01, s02, s03
                out[b, j + 1], out[b + 1, j + 1], out[b + 2, j + 1], out[b + 3, j + 1] = s10, s11, s12, s13
                out[b, j + 2], out[b + 1, j + 2], out[b + 2, j + 2], out[b + 3, j + 2] = s20, s21, s22, s23
                out[b, j + 3], out[b + 1, j + 3], out[b + 2, j + 3], out[b + 3, j + 3] = s30, s31, s32, s33
            for b in range(Bb, B):
                for jj in range(j, j + 4):
                    s = np.float32(0.0)
                    for k in range(H):
                        s += w[jj, k] * h[b, k]
                    out[b, jj] = s
        for j in range(Gb, G):
            for b in range(B):
                s = np.float32(0.0)
                for k in range(H):
                    s += w[j, k] * h[b, k]
                out[b, j] = s

    @_numba.njit(fastmath=_FAST_MATH, cache=True, nogil=True)
    def _nb_rows_w(g, w, out):  # pragma: no cover - compiled
        """out[b, k] = sum_j g[b, j] * w[j, k]: the backward's product through W_hh, same blocking
        over 4 rows of g x 4 rows of w without a transposed copy of w (measured: B=4, 4096x1024:
        0.80 ms -> 0.31 ms, where a transposed copy alone costs 30 ms per direction)."""
        G, H = w.shape
        B = g.shape[0]
        Gb = G - G % 4
        Bb = B - B % 4
        out[:] = 0.0
        for b in range(0, Bb, 4):
            for j in range(0, Gb, 4):
                a00, a01, a02, a03 = g[b, j], g[b, j + 1], g[b, j + 2], g[b, j + 3]
                a10, a11, a12, a13 = g[b + 1, j], g[b + 1, j + 1], g[b + 1, j + 2], g[b + 1, j + 3]
                a20, a21, a22, a23 = g[b + 2, j], g[b + 2, j + 1], g[b + 2, j + 2], g[b + 2, j + 3]
                a30, a31, a32, a33 = g[b + 3, j], g[b + 3, j + 1], g[b + 3, j + 2], g[b + 3, j + 3]
                for k in range(H):
                    w0 = w[j, k]
                    w1 = w[j + 1, k]
                    w2 = w[j + 2, k]
                    w3 = w[j + 3, k]
                    out[b, k] += a00 * w0 + a01 * w1 + a02 * w2 + a03 * w3
                    out[b + 1, k] += a10 * w0 + a11 * w1 + a12 * w2 + a13 * w3
                    out[b + 2, k] += a20 * w0 + a21 * w1 + a22 * w2 + a23 * w3
                    out[b + 3, k] += a30 * w0 + a31 * w1 + a32 * w2 + a33 * w3
            for j in range(Gb, G):
                for bb in range(b, b + 4):
                    s = g[bb, j]
                    for k in range(H):
                        out[bb, k] += s * w[j, k]
        for b in range(Bb, B):
            for j in range(G):
                s = g[b, j]
                for k in range(H):
                    out[b, k] += s * w[j, k]

    # ---- whole recurrences, one direction per call --------------------------------------------
    # The numpy loops below pay ~15 small ufunc calls (and the GIL) per time step; at DS2's small
    # batches that Python overhead is as large as the arithmetic. These kernels run the whole time
    # loop compiled, without the GIL, so the two directions of a layer also run on two cores.
    # numba's tanh is a scalar libm call that does not vectorise (an earlier whole-loop kernel was
    # slower than numpy for that reason), so they use Eigen's float32 rational approximation of
    # tanh (clamped rational fit; largest absolute error 3.5e-7 over [-20, 20], measured), which the
    # compiler vectorises.

    @_numba.njit(fastmath=_FAST_MATH, cache=True, nogil=True, inline="always")
    def _nb_tanh(x):  # pragma: no cover - compiled
        x = min(max(x, np.float32(-7.90531110763549805)), np.float32(7.90531110763549805))
        x2 = x * x
        p = x2 * np.float32(-2.76076847742355e-16) + np.float32(2.00018790482477e-13)
        p = p * x2 + np.float32(-8.60467152213735e-11)
        p = p * x2 + np.float32(5.12229709037114e-08)
        p = p * x2 + np.float32(1.48572235717979e-05)
        p = p * x2 + np.float32(6.37261928875436e-04)
        p = p * x2 + np.float32(4.89352455891786e-03)
        p = p * x
        q = x2 * np.float32(1.19825839466702e-06) + np.float32(1.18534705686654e-04)
        q = q * x2 + np.float32(2.26843463243900e-03)
        q = q * x2 + np.float32(4.89352518554385e-03)
        return p / q

    @_numba.njit(fastmath=_FAST_MATH, cache=True, nogil=True, inline="always")
    def _nb_sigmoid(x):  # pragma: no cover - compiled
        return np.float32(0.5) * _nb_tanh(np.float32(0.5) * x) + np.float32(0.5)

    @_numba.njit(fastmath=_FAST_MATH, cache=True, nogil=True)
    def _nb_lstm_fwd(X, w, A, C, Hs, Tm):  # pragma: no cover - compiled
        """One direction: X (T, B, 4H) incl. both biases; fills A (i, f, g, o), C and Hs."""
        G, H = w.shape
        B = X.shape[1]
        h = np.zeros((B, H), np.float32)
        c = np.zeros((B, H), np.float32)
        g = np.empty((B, G), np.float32)
        for t in range(Tm):
            _nb_rows_wT(h, w, g)
            for b in range(B):
                for k in range(H):
                    i = _nb_sigmoid(g[b, k] + X[t, b, k])
                    f = _nb_sigmoid(g[b, H + k] + X[t, b, H + k])
                    gg = _nb_tanh(g[b, 2 * H + k] + X[t, b, 2 * H + k])
                    o = _nb_sigmoid(g[b, 3 * H + k] + X[t, b, 3 * H + k])
                    A[t, b, k] = i
                    A[t, b, H + k] = f
                    A[t, b, 2 * H + k] = gg
                    A[t, b, 3 * H + k] = o
                    cc = c[b, k] * f + i * gg
                    c[b, k] = cc
                    C[t, b, k] = cc
                    hh = _nb_tanh(cc) * o
                    h[b, k] = hh
                    Hs[t, b, k] = hh

    @_numba.njit(fastmath=_FAST_MATH, cache=True, nogil=True)
    def _nb_lstm_bwd(dY, w, A, C, dG, Tm):  # pragma: no cover - compiled
        G, H = w.shape
        B = dY.shape[1]
        dh = np.zeros((B, H), np.float32)
        dc = np.zeros((B, H), np.float32)
        d = np.zeros((B, G), np.float32)
        for t in range(Tm - 1, -1, -1):
            for b in range(B):
                for k in range(H):
                    i = A[t, b, k]
                    f = A[t, b, H + k]
                    gg = A[t, b, 2 * H + k]
                    o = A[t, b, 3 * H + k]
                    dhk = dh[b, k] + dY[t, b, k]
                    tc = _nb_tanh(C[t, b, k])
                    d[b, 3 * H + k] = dhk * tc * o * (np.float32(1.0) - o)
                    dck = dc[b, k] + dhk * o * (np.float32(1.0) - tc * tc)
                    d[b, k] = dck * gg * i * (np.float32(1.0) - i)
                    d[b, 2 * H + k] = dck * i * (np.float32(1.0) - gg * gg)
                    if t > 0:
                        d[b, H + k] = dck * C[t - 1, b, k] * f * (np.float32(1.0) - f)
                    else:
                        d[b, H + k] = 0.0
                    dc[b, k] = dck * f
            dG[t] = d
            _nb_rows_w(d, w, dh)

    @_numba.njit(fastmath=_FAST_MATH, cache=True, nogil=True)
    def _nb_gru_fwd(X, w, bias, A, S, Hs, Tm):  # pragma: no cover - compiled
        """One direction: X (T, B, 3H) incl. bias_ih; fills A (r, z, n), S = W_hn h + b_hn, Hs."""
        G, H = w.shape
        B = X.shape[1]
        h = np.zeros((B, H), np.float32)
        gh = np.empty((B, G), np.float32)
        for t in range(Tm):
            _nb_rows_wT(h, w, gh)
            for b in range(B):
                for k in range(H):
                    r = _nb_sigmoid(X[t, b, k] + gh[b, k] + bias[k])
                    z = _nb_sigmoid(X[t, b, H + k] + gh[b, H + k] + bias[H + k])
                    s = gh[b, 2 * H + k] + bias[2 * H + k]
                    n = _nb_tanh(X[t, b, 2 * H + k] + r * s)
                    A[t, b, k] = r
                    A[t, b, H + k] = z
                    A[t, b, 2 * H + k] = n
                    S[t, b, k] = s
                    hh = (h[b, k] - n) * z + n
                    h[b, k] = hh
                    Hs[t, b, k] = hh

    @_numba.njit(fastmath=_FAST_MATH, cache=True, nogil=True)
    def _nb_gru_bwd(dY, w, A, S, Hs, dX, dGh, Tm):  # pragma: no cover - compiled
        G, H = w.shape
        B = dY.shape[1]
        dh = np.zeros((B, H), np.float32)
        dg = np.zeros((B, G), np.float32)
        back = np.empty((B, H), np.float32)
        for t in range(Tm - 1, -1, -1):
            for b in range(B):
                for k in range(H):
                    r = A[t, b, k]
                    z = A[t, b, H + k]
                    n = A[t, b, 2 * H + k]
                    dhk = dh[b, k] + dY[t, b, k]
                    h_prev = Hs[t - 1, b, k] if t > 0 else np.float32(0.0)
                    dn = dhk * (np.float32(1.0) - z) * (np.float32(1.0) - n * n)
                    dz = (h_prev - n) * dhk * z * (np.float32(1.0) - z)
                    dr = dn * S[t, b, k] * r * (np.float32(1.0) - r)
                    dX[t, b, k] = dr
                    dX[t, b, H + k] = dz
                    dX[t, b, 2 * H + k] = dn
                    dg[b, k] = dr
                    dg[b, H + k] = dz
                    dg[b, 2 * H + k] = dn * r
                    dh[b, k] = dhk * z
            dGh[t] = dg
            _nb_rows_w(dg, w, back)
            dh += back


def _fused(B) -> bool:
    """Whether the compiled whole-loop kernels run this batch (numba on, a small batch)."""
    return _USE_NUMBA and B <= _NUMBA_MAX_ROWS


def _h_wT(h, wT):
    """(D,B,H) x (D,H,G) -> (D,B,G) by BLAS; wT is W_hh transposed, C-contiguous. The numpy loops
    only run where the compiled kernels do not (numba off, or more than _NUMBA_MAX_ROWS rows)."""
    return np.matmul(h, wT)


def _g_w(g, w):
    """(D,B,G) x (D,G,H) -> (D,B,H) by BLAS."""
    return np.matmul(g, w)


# --------------------------------------------------------------------------------------------
# RNN recurrence in numpy: both directions in one loop over "aligned" time
# --------------------------------------------------------------------------------------------
# Direction 1 (reverse) is handled by reversing every row within its own length before the loop
# (t -> L-1-t for t < L, padding frames stay in place), so both directions run forward over a
# valid prefix of length L. Outputs at t >= L are zeroed and so receive no gradient; the states
# that run on past L in a shorter row never reach a valid output, so they get zero gradient too.


def _align_index(lengths, T):
    t = np.arange(T)[None, :]
    L = lengths.astype(np.int64)[:, None]
    return np.where(t < L, L - 1 - t, t)


def _to_aligned(xp, lengths, D):
    """(B, T, D*G) -> (D, T, B, G); direction 1 reversed within each row's length."""
    B, T, DG = xp.shape
    G = DG // D
    x4 = xp.reshape(B, T, D, G)
    out = np.empty((D, T, B, G), np.float32)
    out[0] = x4[:, :, 0].transpose(1, 0, 2)
    if D == 2:
        idx = _align_index(lengths, T)
        out[1] = x4[np.arange(B)[:, None], idx, 1].transpose(1, 0, 2)
    return out


def _from_aligned(a, lengths):
    """(D, T, B, G) -> (B, T, D*G); inverse of _to_aligned."""
    D, T, B, G = a.shape
    out = np.empty((B, T, D, G), np.float32)
    out[:, :, 0] = a[0].transpose(1, 0, 2)
    if D == 2:
        idx = _align_index(lengths, T)
        out[:, :, 1] = a[1].transpose(1, 0, 2)[np.arange(B)[:, None], idx]
    return out.reshape(B, T, D * G)


def _valid_mask(lengths, T):
    """(1, T, B, 1) float mask of valid (aligned) frames."""
    m = (np.arange(T)[:, None] < lengths[None, :]).astype(np.float32)
    return m[None, :, :, None]


def _clip_lengths(lengths, T):
    return np.clip(np.asarray(lengths).astype(np.int64).reshape(-1), 0, T)


# Both directions share one loop (half the Python per-step overhead) while their two W_hh fit in
# cache together; above this size each direction runs its own loop so that its W_hh stays in L3
# (measured, B=2 H=1024: 0.87 ms a step for two sequential directions vs 1.34 ms interleaved).
_JOINT_DIRECTIONS_MAX_BYTES = 16 << 20


def _one_per_direction(D):
    """Direction indices for the compiled kernels: each direction its own task (own core)."""
    return list(range(D))


def _direction_groups(w):
    D = w.shape[0]
    if D == 1 or w.nbytes <= _JOINT_DIRECTIONS_MAX_BYTES:
        return [slice(0, D)]
    return [slice(d, d + 1) for d in range(D)]


# Directions that run their own loops run in two threads at once: the per-step products are numba
# kernels that release the GIL and are memory-bound on W_hh, so a second core adds bandwidth
# (measured, B=4 H=1024 T=200, two cores: about 1.5x on the recurrence). Each direction's
# arithmetic is unchanged, so results are bitwise those of one thread. DS2EXP_RNN_THREADS=1 turns
# this off; OMP_NUM_THREADS=1 (msrun's default for each data-parallel rank) does too.
def _direction_threads() -> int:
    for var in ("DS2EXP_RNN_THREADS", "OMP_NUM_THREADS"):
        value = os.environ.get(var, "")
        if value.isdigit() and int(value) > 0:
            return min(2, int(value))
    return min(2, os.cpu_count() or 1)


_DIRECTION_THREADS = _direction_threads()
_POOL = None


def _run_concurrently(groups, fn) -> None:
    """fn(group) for every group (RNN directions, conv batch halves), concurrently when there are
    several and threads are allowed."""
    global _POOL
    if len(groups) == 1 or _DIRECTION_THREADS < 2:
        for sl in groups:
            fn(sl)
        return
    if _POOL is None:
        from concurrent.futures import ThreadPoolExecutor

        _POOL = ThreadPoolExecutor(max_workers=_DIRECTION_THREADS, thread_name_prefix="ds2exp-rnn")
    for future in [_POOL.submit(fn, sl) for sl in groups]:
        future.result()  # re-raises a failure of that direction here


def _lstm_fwd_loop(X, w, A, C, Hs, Tm):
    D, G, H = w.shape
    B = X.shape[2]
    wT = np.ascontiguousarray(w.transpose(0, 2, 1))
    # sigmoid(x) = 0.5 * tanh(0.5 x) + 0.5: one tanh over all four gates
    scale = np.full(G, 0.5, np.float32)
    scale[2 * H:3 * H] = 1.0
    shift = np.full(G, 0.5, np.float32)
    shift[2 * H:3 * H] = 0.0
    h = np.zeros((D, B, H), np.float32)
    c = np.zeros((D, B, H), np.float32)
    for t in range(Tm):
        g = _h_wT(h, wT)
        g += X[:, t]
        g *= scale
        np.tanh(g, out=g)
        g *= scale
        g += shift
        A[:, t] = g
        i, f, gg, o = g[..., :H], g[..., H:2 * H], g[..., 2 * H:3 * H], g[..., 3 * H:]
        c *= f
        c += i * gg
        C[:, t] = c
        h = np.tanh(c)
        h *= o
        Hs[:, t] = h


def lstm_forward_np(xp, lengths, w, b, b_ih=None):
    """LSTM recurrence.

    xp: (B, T, D*4H) input projections (direction-major on the last axis);
    lengths: (B,); w: (D, 4H, H) weight_hh; b: (D, 4H) bias_hh; b_ih: (D, 4H) bias_ih, or None when
    xp already includes it. Adding it here, while the projections are copied into the aligned
    layout anyway, is free; as a MindSpore broadcast add it was not (measured, (800, 8192): 20 ms
    forward, and its gradient a slow reduction).
    Returns y (B, T, D*H) (zero at padded frames) and the saved activations for the backward:
    A (D, T, B, 4H) gate activations, C (D, T, B, H) cell states, Hs (D, T, B, H) hidden states.
    """
    D, G, H = w.shape
    B, T, _ = xp.shape
    lengths = _clip_lengths(lengths, T)
    X = _to_aligned(xp, lengths, D)
    X += (b if b_ih is None else b + b_ih)[:, None, None, :]
    Tm = int(lengths.max()) if B else 0
    A = np.zeros((D, T, B, G), np.float32)
    C = np.zeros((D, T, B, H), np.float32)
    Hs = np.zeros((D, T, B, H), np.float32)
    w = np.ascontiguousarray(w, dtype=np.float32)
    if _fused(B):
        _run_concurrently(_one_per_direction(D), lambda d: _nb_lstm_fwd(X[d], w[d], A[d], C[d], Hs[d], Tm))
    else:
        _run_concurrently(_direction_groups(w),
                            lambda sl: _lstm_fwd_loop(X[sl], w[sl], A[sl], C[sl], Hs[sl], Tm))
    Y = Hs * _valid_mask(lengths, T)
    return _from_aligned(Y, lengths), A, C, Hs


def _lstm_bwd_loop(dY, w, A, C, dG, Tm):
    D, G, H = w.shape
    B = dY.shape[2]
    dh = np.zeros((D, B, H), np.float32)
    dc = np.zeros((D, B, H), np.float32)
    d = np.empty((D, B, G), np.float32)
    for t in range(Tm - 1, -1, -1):
        a = A[:, t]
        i, f, gg, o = a[..., :H], a[..., H:2 * H], a[..., 2 * H:3 * H], a[..., 3 * H:]
        dh += dY[:, t]
        tc = np.tanh(C[:, t])
        np.multiply(dh, tc, out=d[..., 3 * H:])                   # d o
        d[..., 3 * H:] *= o * (1.0 - o)
        tc *= tc
        np.subtract(1.0, tc, out=tc)
        tc *= o
        tc *= dh
        dc += tc                                                  # d c_t
        np.multiply(dc, gg, out=d[..., :H])                       # d i
        d[..., :H] *= i * (1.0 - i)
        np.multiply(dc, i, out=d[..., 2 * H:3 * H])               # d g
        d[..., 2 * H:3 * H] *= 1.0 - gg * gg
        if t > 0:
            np.multiply(dc, C[:, t - 1], out=d[..., H:2 * H])     # d f
            d[..., H:2 * H] *= f * (1.0 - f)
        else:
            d[..., H:2 * H] = 0.0
        dc *= f
        dG[:, t] = d
        dh = _g_w(d, w)


def _backward_inputs(lengths, w, dy, T, B):
    """Shared preamble of the RNN backward passes: clipped lengths, the output gradient in the
    aligned (D, T, B, H) layout with padded frames zeroed, the last valid step, contiguous W_hh."""
    D = w.shape[0]
    lengths = _clip_lengths(lengths, T)
    dY = _to_aligned(np.asarray(dy, np.float32), lengths, D)
    dY *= _valid_mask(lengths, T)
    Tm = int(lengths.max()) if B else 0
    return lengths, dY, Tm, np.ascontiguousarray(w, dtype=np.float32)


def _recurrent_weight_grads(dGh, Hs):
    """d W_hh and d b from the gradients of the recurrent pre-activations (D, T, B, G) and the
    hidden states (D, T, B, H): each step's W_hh multiplies the previous step's h (0 at t=0)."""
    D, T, B, G = dGh.shape
    H = Hs.shape[-1]
    Hprev = np.zeros_like(Hs)
    Hprev[:, 1:] = Hs[:, :-1]
    dw = np.matmul(dGh.reshape(D, T * B, G).transpose(0, 2, 1), Hprev.reshape(D, T * B, H))
    return dw.astype(np.float32), dGh.sum(axis=(1, 2)).astype(np.float32)


def lstm_backward_np(lengths, w, A, C, Hs, dy):
    """Gradients of lstm_forward_np: returns d_xp (B, T, D*4H), d_w (D, 4H, H), d_b (D, 4H)."""
    D, G, H = w.shape
    _, T, B, _ = A.shape
    lengths, dY, Tm, w = _backward_inputs(lengths, w, dy, T, B)
    dG = np.zeros((D, T, B, G), np.float32)
    if _fused(B):
        _run_concurrently(_one_per_direction(D), lambda d: _nb_lstm_bwd(dY[d], w[d], A[d], C[d], dG[d], Tm))
    else:
        _run_concurrently(_direction_groups(w),
                            lambda sl: _lstm_bwd_loop(dY[sl], w[sl], A[sl], C[sl], dG[sl], Tm))
    dw, db = _recurrent_weight_grads(dG, Hs)
    return _from_aligned(dG, lengths), dw, db


def _gru_fwd_loop(X, w, b, A, S, Hs, Tm):
    D, G, H = w.shape
    B = X.shape[2]
    wT = np.ascontiguousarray(w.transpose(0, 2, 1))
    bb = b[:, None, :]
    h = np.zeros((D, B, H), np.float32)
    a = np.empty((D, B, G), np.float32)
    for t in range(Tm):
        gh = _h_wT(h, wT)
        gh += bb
        x = X[:, t]
        rz = a[..., :2 * H]
        np.add(x[..., :2 * H], gh[..., :2 * H], out=rz)
        rz *= 0.5
        np.tanh(rz, out=rz)
        rz *= 0.5
        rz += 0.5
        r, z = a[..., :H], a[..., H:2 * H]
        n = a[..., 2 * H:]
        np.multiply(r, gh[..., 2 * H:], out=n)
        n += x[..., 2 * H:]
        np.tanh(n, out=n)
        S[:, t] = gh[..., 2 * H:]
        A[:, t] = a
        hn = h - n
        hn *= z
        hn += n
        h = hn
        Hs[:, t] = h


def gru_forward_np(xp, lengths, w, b, b_ih=None):
    """GRU recurrence (r, z, n gates as nn.GRU / PyTorch: n = tanh(x_n + r * (W_hn h + b_hn))).

    xp: (B, T, D*3H); w: (D, 3H, H); b: (D, 3H) bias_hh; b_ih: (D, 3H) bias_ih, or None when xp
    already includes it (see lstm_forward_np). Returns y (B, T, D*H) and
    A (D, T, B, 3H) = (r, z, n), S (D, T, B, H) = W_hn h + b_hn, Hs (D, T, B, H).
    """
    D, G, H = w.shape
    B, T, _ = xp.shape
    lengths = _clip_lengths(lengths, T)
    X = _to_aligned(xp, lengths, D)
    if b_ih is not None:
        X += b_ih[:, None, None, :]
    Tm = int(lengths.max()) if B else 0
    A = np.zeros((D, T, B, G), np.float32)
    S = np.zeros((D, T, B, H), np.float32)
    Hs = np.zeros((D, T, B, H), np.float32)
    w = np.ascontiguousarray(w, dtype=np.float32)
    b = np.asarray(b, np.float32)
    if _fused(B):
        _run_concurrently(_one_per_direction(D), lambda d: _nb_gru_fwd(X[d], w[d], b[d], A[d], S[d], Hs[d], Tm))
    else:
        _run_concurrently(_direction_groups(w),
                            lambda sl: _gru_fwd_loop(X[sl], w[sl], b[sl], A[sl], S[sl], Hs[sl], Tm))
    Y = Hs * _valid_mask(lengths, T)
    return _from_aligned(Y, lengths), A, S, Hs


def _gru_bwd_loop(dY, w, A, S, Hs, dX, dGh, Tm):
    D, G, H = w.shape
    B = dY.shape[2]
    dh = np.zeros((D, B, H), np.float32)
    zeros = np.zeros((D, B, H), np.float32)
    dx = np.empty((D, B, G), np.float32)
    dg = np.empty((D, B, G), np.float32)
    for t in range(Tm - 1, -1, -1):
        a = A[:, t]
        r, z, n = a[..., :H], a[..., H:2 * H], a[..., 2 * H:]
        dh += dY[:, t]
        h_prev = Hs[:, t - 1] if t > 0 else zeros
        dn = dx[..., 2 * H:]
        np.multiply(dh, 1.0 - z, out=dn)
        dn *= 1.0 - n * n                                          # d n_pre
        dz = dx[..., H:2 * H]
        np.subtract(h_prev, n, out=dz)
        dz *= dh
        dz *= z * (1.0 - z)                                        # d z_pre
        dr = dx[..., :H]
        np.multiply(dn, S[:, t], out=dr)
        dr *= r * (1.0 - r)                                        # d r_pre
        dg[..., :2 * H] = dx[..., :2 * H]
        np.multiply(dn, r, out=dg[..., 2 * H:])                    # d (W_hn h + b_hn)
        dX[:, t] = dx
        dGh[:, t] = dg
        dh *= z
        dh += _g_w(dg, w)


def gru_backward_np(lengths, w, A, S, Hs, dy):
    """Gradients of gru_forward_np: returns d_xp (B, T, D*3H), d_w (D, 3H, H), d_b (D, 3H)."""
    D, G, H = w.shape
    _, T, B, _ = A.shape
    lengths, dY, Tm, w = _backward_inputs(lengths, w, dy, T, B)
    dX = np.zeros((D, T, B, G), np.float32)
    dGh = np.zeros((D, T, B, G), np.float32)
    if _fused(B):
        _run_concurrently(_one_per_direction(D),
                            lambda d: _nb_gru_bwd(dY[d], w[d], A[d], S[d], Hs[d], dX[d], dGh[d], Tm))
    else:
        _run_concurrently(_direction_groups(w),
                            lambda sl: _gru_bwd_loop(dY[sl], w[sl], A[sl], S[sl], Hs[sl], dX[sl], dGh[sl], Tm))
    dw, db = _recurrent_weight_grads(dGh, Hs)
    return _from_aligned(dX, lengths), dw, db


_NP_KERNELS = {"lstm": (lstm_forward_np, lstm_backward_np), "gru": (gru_forward_np, gru_backward_np)}
_GATES = {"lstm": 4, "gru": 3}


def _make_scan_ops(mode, D):
    """Custom pyfunc forward op (with custom bprop) for a `mode` recurrence with D directions.

    Forward op inputs: xp (B, T, D*G) without bias, lengths (B,) int32, then (w_hh, b_hh, b_ih) per
    direction.
    Outputs: y (B, T, D*H) and three saved tensors (D, T, B, G|H|H) used by the backward.
    """
    fwd_np, bwd_np = _NP_KERNELS[mode]

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


_SCAN_OPS = {}


def _scan_op(mode, D):
    key = (mode, D)
    if key not in _SCAN_OPS:
        _SCAN_OPS[key] = _make_scan_ops(mode, D)
    return _SCAN_OPS[key]


# --------------------------------------------------------------------------------------------
# RNN cells
# --------------------------------------------------------------------------------------------
def _check_rnn_type(rnn_type):
    t = str(rnn_type).lower()
    if t not in _GATES:
        raise ValueError(f"rnn_type must be 'lstm' or 'gru', got {rnn_type!r}")
    return t


class _PlainRNNMixin:
    """Reference: nn.LSTM / nn.GRU (one layer, batch_first) called with seq_length.

    Subclasses (not wrappers) of the stock cells, so the parameters sit at this level with the
    stock names (``weight_ih_l0`` ...), exactly like the fast implementation's, also when nested.
    """

    def _setup(self, rnn_type, hidden_size, bidirectional):
        self.rnn_type = rnn_type
        self.hidden_size = hidden_size
        self.num_directions = 2 if bidirectional else 1


class PlainLSTM(_PlainRNNMixin, nn.LSTM):
    def __init__(self, input_size, hidden_size, bidirectional):
        nn.LSTM.__init__(self, input_size, hidden_size, num_layers=1, has_bias=True, batch_first=True,
                         bidirectional=bidirectional)
        self._setup("lstm", hidden_size, bidirectional)

    def construct(self, x, lengths):
        return nn.LSTM.construct(self, x, None, lengths)[0]


class PlainGRU(_PlainRNNMixin, nn.GRU):
    def __init__(self, input_size, hidden_size, bidirectional):
        nn.GRU.__init__(self, input_size, hidden_size, num_layers=1, has_bias=True, batch_first=True,
                        bidirectional=bidirectional)
        self._setup("gru", hidden_size, bidirectional)

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
        G = _GATES[self.rnn_type] * hidden_size
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
        self.matmul_t = ops.MatMul(transpose_b=True)
        self.scan = _scan_op(self.rnn_type, self.num_directions)

    def construct(self, x, lengths=None):
        B, T, In = x.shape
        if lengths is None:
            lengths = ops.fill(ms.int32, (B,), T)
        lengths = lengths.astype(ms.int32)
        if self.num_directions == 2:
            w_ih = ops.concat((self.weight_ih_l0, self.weight_ih_l0_reverse), 0)
        else:
            w_ih = self.weight_ih_l0
        # the input bias is added inside the recurrence op (see lstm_forward_np)
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
def _pair(v):
    if isinstance(v, int):
        return (v, v)
    v = tuple(int(a) for a in v)
    if len(v) != 2:
        raise ValueError(f"expected an int or a pair, got {v!r}")
    return v


def _pad4(p):
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
    kF, kT = _pair(kernel_size)
    sF, sT = _pair(stride)
    pt, pb, pl, pr = _pad4(padding)
    return (F + pt + pb - kF) // sF + 1, (T + pl + pr - kT) // sT + 1


def _freq_im2col(x, kF, sF, Fo, pt, pb, pl, Tu):
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


def _freq_col2im(dXf, C, kF, sF, F, T, pt, pb, pl):
    """Adjoint of _freq_im2col: dXf (B, Tu, Fo, kF*C) -> dx (B, C, F, T)."""
    B, Tu, Fo, _ = dXf.shape
    if _USE_NUMBA:
        dx = np.empty((B, C, F, T), np.float32)
        _nb_freq_col2im(np.ascontiguousarray(dXf, dtype=np.float32), C, kF, sF, pt, pl, dx)
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


if HAVE_NUMBA:
    @_numba.njit(fastmath=_FAST_MATH, cache=True, nogil=True)
    def _nb_freq_col2im(dXf, C, kF, sF, pt, pl, dx):  # pragma: no cover - compiled
        """numba col2im: one pass over dXf in memory order, each (b, t) row summed in a small
        (padded F, C) buffer that stays in L1, then written to its time column of dx. The numpy
        version makes kF strided passes over the whole 30 MB gradient (DS2 conv2: 25 ms vs ~4)."""
        B, Tu, Fo, K = dXf.shape
        _, _, F, T = dx.shape
        Fp = (Fo - 1) * sF + kF
        row = np.empty((max(Fp, pt + F), C), np.float32)
        dx[:] = 0.0
        for b in range(B):
            for t in range(Tu):
                tt = t - pl
                if tt < 0 or tt >= T:
                    continue
                row[:] = 0.0
                for f in range(Fo):
                    base = f * sF
                    for kf in range(kF):
                        for c in range(C):
                            row[base + kf, c] += dXf[b, t, f, kf * C + c]
                for c in range(C):
                    for fi in range(F):
                        dx[b, c, fi, tt] = row[pt + fi, c]


if HAVE_NUMBA:
    @_numba.njit(fastmath=_FAST_MATH, cache=True, nogil=True)
    def _nb_time_shifts(dyT, sT, dZ):  # pragma: no cover - compiled
        """dZ[b, u, f, kt, o] = dyT[b, t, f, o] where u = t*sT + kt, else 0: the kT time shifts of
        the output gradient side by side, written once in dZ's memory order. dyT is dy in
        (B, To, Fo, O) order, so each (b, u, f, kt) copies O contiguous values (measured, DS2 conv2
        at B=16: 7.2 ms -> 4.3 ms against gathering them across dy's channel stride)."""
        B, To, Fo, O = dyT.shape
        _, Tu, _, kT, _ = dZ.shape
        for b in range(B):
            for u in range(Tu):
                for kt in range(kT):
                    t = u - kt
                    if t >= 0 and t % sT == 0 and t // sT < To:
                        ts = t // sT
                        for f in range(Fo):
                            for o in range(O):
                                dZ[b, u, f, kt, o] = dyT[b, ts, f, o]
                    else:
                        for f in range(Fo):
                            for o in range(O):
                                dZ[b, u, f, kt, o] = 0.0


def conv_backward_np(x, w, dy, stride, padding, strategy="auto"):
    """Gradients (dx, dw) of the no-bias conv y = conv2d(x, w, stride, pad=(top, bottom, left, right)).

    Both strategies build the frequency-only im2col Xf (B, Tu, Fo, kF*C) (kF/sF times the input,
    not kF*kT times as a full im2col would be):
      "wide": dZ (B*Tu*Fo, kT*O) = the kT time shifts of dy side by side, then dW = Xf^T dZ and
              dXf = dZ W^T as two large GEMMs. Best when kF*C is large (DS2 conv2).
      "tap":  one pair of GEMMs per time tap (N = O), no kT-times blow-up of dy. Best when kF*C
              is small (DS2 conv1, 1 input channel).
    """
    x = np.asarray(x, np.float32)
    w = np.asarray(w, np.float32)
    dy = np.asarray(dy, np.float32)
    B, C, F, T = x.shape
    O, _, kF, kT = w.shape
    sF, sT = stride
    pt, pb, pl, _ = padding
    Fo, To = conv_output_size(F, T, (kF, kT), stride, padding)
    Tu = (To - 1) * sT + kT          # padded time frames the conv reads
    K = kF * C
    if strategy == "auto":
        strategy = "wide" if K >= 128 else "tap"
    Xf = _freq_im2col(x, kF, sF, Fo, pt, pb, pl, Tu)                 # (B, Tu, Fo, K)
    dY = np.ascontiguousarray(dy.transpose(0, 3, 2, 1))               # (B, To, Fo, O)
    Wr = np.ascontiguousarray(w.transpose(2, 1, 3, 0)).reshape(K, kT, O)   # [kf*C + c, kt, o]
    tspan = (To - 1) * sT + 1
    if strategy == "wide":
        dZ = np.zeros((B, Tu, Fo, kT, O), np.float32)
        for kt in range(kT):
            dZ[:, kt:kt + tspan:sT, :, kt, :] = dY
        dZ = dZ.reshape(B * Tu * Fo, kT * O)
        dWr = Xf.reshape(B * Tu * Fo, K).T @ dZ                        # (K, kT*O)
        dXf = (dZ @ Wr.reshape(K, kT * O).T).reshape(B, Tu, Fo, K)
        del dZ
    elif strategy == "tap":
        dY2 = dY.reshape(B * To * Fo, O)
        dWr = np.empty((K, kT, O), np.float32)
        dXf = np.zeros((B, Tu, Fo, K), np.float32)
        for kt in range(kT):
            Xk = np.ascontiguousarray(Xf[:, kt:kt + tspan:sT]).reshape(B * To * Fo, K)
            dWr[:, kt, :] = Xk.T @ dY2
            dXf[:, kt:kt + tspan:sT] += (dY2 @ Wr[:, kt, :].T).reshape(B, To, Fo, K)
    else:
        raise ValueError(f"unknown strategy {strategy!r}")
    dw = np.ascontiguousarray(dWr.reshape(kF, C, kT, O).transpose(3, 1, 0, 2))
    dx = _freq_col2im(dXf, C, kF, sF, F, T, pt, pb, pl)
    return dx, dw


def conv_forward_np(x, w, stride, padding):
    """numpy reference of the forward (im2col over frequency, one GEMM, shift-add over time taps)."""
    x = np.asarray(x, np.float32)
    w = np.asarray(w, np.float32)
    B, C, F, T = x.shape
    O, _, kF, kT = w.shape
    sF, sT = stride
    pt, pb, pl, _ = padding
    Fo, To = conv_output_size(F, T, (kF, kT), stride, padding)
    Tu = (To - 1) * sT + kT
    K = kF * C
    Xf = _freq_im2col(x, kF, sF, Fo, pt, pb, pl, Tu).reshape(B * Tu * Fo, K)
    Z = (Xf @ np.ascontiguousarray(w.transpose(2, 1, 3, 0)).reshape(K, kT * O)).reshape(B, Tu, Fo, kT, O)
    Y = np.zeros((B, To, Fo, O), np.float32)
    tspan = (To - 1) * sT + 1
    for kt in range(kT):
        Y += Z[:, kt:kt + tspan:sT, :, kt, :]
    return np.ascontiguousarray(Y.transpose(0, 3, 2, 1))


class _ConvFn(nn.Cell):
    """conv2d(x, w) with MindSpore's forward kernel and a GEMM backward (custom bprop).

    strategy "ms" (default): the data movement (frequency im2col of x, the kT time shifts of dy,
    col2im of the input gradient) runs in numpy pyfunc ops, the two big GEMMs in MindSpore
    (its matmul is ~2x OpenBLAS's here). "wide"/"tap": everything in one numpy pyfunc
    (conv_backward_np). "native": MindSpore's own conv backward (no custom bprop).
    """

    def __init__(self, out_channels, kernel_size, stride, padding, strategy="ms"):
        super().__init__()
        self.conv = ops.Conv2D(out_channel=out_channels, kernel_size=kernel_size, mode=1, pad_mode="pad",
                               pad=padding, stride=stride)
        stride = tuple(stride)
        padding = tuple(padding)
        self.strategy = strategy
        self.kernel_size = tuple(kernel_size)
        self.matmul_ta = ops.MatMul(transpose_a=True)
        self.matmul_tb = ops.MatMul(transpose_b=True)
        sF, sT = stride
        pt, pb, pl, _ = padding
        kF, kT = self.kernel_size

        def bwd(x, w, dy):
            return conv_backward_np(x, w, dy, stride, padding, strategy)

        def im2col(x, dy):
            B, C = x.shape[:2]
            Fo, To = dy.shape[2], dy.shape[3]
            Tu = (To - 1) * sT + kT
            return _freq_im2col(x, kF, sF, Fo, pt, pb, pl, Tu).reshape(B * Tu * Fo, kF * C)

        def im2col_shape(xs, ds):
            Tu = (ds[3] - 1) * sT + kT
            return (xs[0] * Tu * ds[2], kF * xs[1])

        def shifts(dy):
            B, O, Fo, To = dy.shape
            Tu = (To - 1) * sT + kT
            if _USE_NUMBA:
                dZ = np.empty((B, Tu, Fo, kT, O), np.float32)
                _nb_time_shifts(np.ascontiguousarray(np.asarray(dy, np.float32).transpose(0, 3, 2, 1)), sT, dZ)
                return dZ.reshape(B * Tu * Fo, kT * O)
            dZ = np.zeros((B, Tu, Fo, kT, O), np.float32)
            dY = dy.transpose(0, 3, 2, 1)
            tspan = (To - 1) * sT + 1
            for kt in range(kT):
                dZ[:, kt:kt + tspan:sT, :, kt, :] = dY
            return dZ.reshape(B * Tu * Fo, kT * O)

        def shifts_shape(ds):
            Tu = (ds[3] - 1) * sT + kT
            return (ds[0] * Tu * ds[2], kT * ds[1])

        def col2im(dxf, x, dy):
            B, C, F, T = x.shape
            Fo, To = dy.shape[2], dy.shape[3]
            Tu = (To - 1) * sT + kT
            return _freq_col2im(dxf.reshape(B, Tu, Fo, kF * C), C, kF, sF, F, T, pt, pb, pl)

        # the pyfunc registry is keyed by id(): keep the callables alive
        self._keep = (bwd, im2col, shifts, col2im)
        self.bwd = ops.Custom(bwd, out_shape=lambda xs, ws, ds: (xs, ws),
                              out_dtype=lambda xt, wt, dt: (xt, wt), func_type="pyfunc")
        self.im2col = ops.Custom(im2col, out_shape=im2col_shape, out_dtype=lambda xt, dt: xt, func_type="pyfunc")
        self.shifts = ops.Custom(shifts, out_shape=shifts_shape, out_dtype=lambda dt: dt, func_type="pyfunc")
        self.col2im = ops.Custom(col2im, out_shape=lambda fs, xs, ds: xs, out_dtype=lambda ft, xt, dt: xt,
                                 func_type="pyfunc")

    def construct(self, x, w):
        return self.conv(x, w)

    def bprop(self, x, w, out, dout):
        if self.strategy != "ms":
            dx, dw = self.bwd(x, w, dout)
            return dx, dw
        O, C, kF, kT = w.shape
        xf = self.im2col(x, dout)                                    # (B*Tu*Fo, kF*C)
        dz = self.shifts(dout)                                       # (B*Tu*Fo, kT*O)
        wr = ops.transpose(w, (2, 1, 3, 0)).reshape(kF * C, kT * O)
        dwr = self.matmul_ta(xf, dz)                                 # (kF*C, kT*O)
        dw = ops.transpose(dwr.reshape(kF, C, kT, O), (3, 1, 0, 2))
        dxf = self.matmul_tb(dz, wr)                                 # (B*Tu*Fo, kF*C)
        dx = self.col2im(dxf, x, dout)
        return dx, dw


class _NativeConvFn(nn.Cell):
    """conv2d(x, w) entirely with MindSpore's kernels (forward and backward)."""

    def __init__(self, out_channels, kernel_size, stride, padding):
        super().__init__()
        self.conv = ops.Conv2D(out_channel=out_channels, kernel_size=kernel_size, mode=1, pad_mode="pad",
                               pad=padding, stride=stride)

    def construct(self, x, w):
        return self.conv(x, w)


# --------------------------------------------------------------------------------------------
# conv with one input channel (DS2 conv1): direct compiled kernels
# --------------------------------------------------------------------------------------------
# MindSpore's CPU Conv2D and its filter gradient run DS2 conv1 (1 input channel, 41x11 kernel,
# stride 2x2) at a small fraction of the machine's speed: measured at B=16, 300 frames, 8 output
# channels, forward + weight gradient 73-91 ms inside a training step. Written directly - the
# input split into its sT time phases so that every kernel tap reads a contiguous row, the loop
# over output frames innermost so that it vectorises - the same takes 44 ms (batch halves on two
# cores). The input gradient is not computed: conv1's input is the features, which nothing
# differentiates (input_grad=False; its gradient is returned as zeros).


def _conv_phases_np(x, pt, pl, sT, Fp, Tq):
    """x (B, F, T) -> (B, sT, Fp, Tq): out[b, p, fp, q] = xpad[b, fp, sT*q + p] (zero padding)."""
    B, F, T = x.shape
    out = np.zeros((B, sT, Fp, Tq), np.float32)
    for p in range(sT):
        # padded column u = sT*q + p holds input column u - pl
        q0 = max(0, -((p - pl) // sT))                      # first q with sT*q + p - pl >= 0
        t0 = sT * q0 + p - pl
        n = min(Tq - q0, max(0, (T - 1 - t0) // sT + 1)) if t0 < T else 0
        if n > 0:
            out[:, p, pt:pt + F, q0:q0 + n] = x[:, :, t0:t0 + sT * (n - 1) + 1:sT]
    return out


if HAVE_NUMBA:
    @_numba.njit(fastmath=_FAST_MATH, cache=True, nogil=True)
    def _nb_conv1_fwd(xph, w, sF, sT, out, b0, b1):  # pragma: no cover - compiled
        """out[b, o, f, t] = sum_{kf, kt} w[o, kf, kt] * xph[b, kt % sT, sF*f + kf, t + kt // sT].

        The taps are walked as kt = j*sT + p: computing kt % sT and kt // sT with a stride known
        only at run time kept LLVM from vectorising the loop over t (measured 6x slower)."""
        O, kF, kT = w.shape
        Fo, To = out.shape[2], out.shape[3]
        acc = np.empty((O, To), np.float32)
        for b in range(b0, b1):
            for f in range(Fo):
                acc[:] = 0.0
                for kf in range(kF):
                    r = sF * f + kf
                    for p in range(sT):
                        row = xph[b, p, r]
                        for j in range((kT - p + sT - 1) // sT):
                            kt = j * sT + p
                            for o in range(O):
                                wv = w[o, kf, kt]
                                for t in range(To):
                                    acc[o, t] += wv * row[t + j]
                for o in range(O):
                    for t in range(To):
                        out[b, o, f, t] = acc[o, t]

    @_numba.njit(fastmath=_FAST_MATH, cache=True, nogil=True)
    def _nb_conv1_dw(xph, dy, sF, sT, dw, b0, b1):  # pragma: no cover - compiled
        """dw[o, kf, kt] = sum_{b, f, t} dy[b, o, f, t] * xph[b, kt % sT, sF*f + kf, t + kt // sT]."""
        O, kF, kT = dw.shape
        Fo, To = dy.shape[2], dy.shape[3]
        dw[:] = 0.0
        for b in range(b0, b1):
            for f in range(Fo):
                for kf in range(kF):
                    r = sF * f + kf
                    for p in range(sT):  # kt = j*sT + p, as in _nb_conv1_fwd
                        row = xph[b, p, r]
                        for j in range((kT - p + sT - 1) // sT):
                            kt = j * sT + p
                            for o in range(O):
                                s = np.float32(0.0)
                                for t in range(To):
                                    s += dy[b, o, f, t] * row[t + j]
                                dw[o, kf, kt] += s


def _batch_halves(B):
    half = (B + 1) // 2
    return [(0, half), (half, B)] if B > 1 and _DIRECTION_THREADS > 1 else [(0, B)]


def _direct_geometry(shape, kernel_size, stride, padding):
    """Output (Fo, To) and the phase buffer's (Fp, Tq) for an input of shape (B, 1, F, T)."""
    F, T = shape[2], shape[3]
    Fo, To = conv_output_size(F, T, kernel_size, stride, padding)
    return Fo, To, F + padding[0] + padding[1], To + (kernel_size[1] - 1) // stride[1] + 1


def direct_conv_forward(x, w, stride, padding):
    """conv2d of x (B, 1, F, T) with w (O, 1, kF, kT): the direct kernels (numpy reference without numba)."""
    x = np.asarray(x, np.float32)
    w = np.asarray(w, np.float32)
    if not _USE_NUMBA:
        return conv_forward_np(x, w, stride, padding)
    B, O = x.shape[0], w.shape[0]
    Fo, To, Fp, Tq = _direct_geometry(x.shape, w.shape[2:], stride, padding)
    xph = _conv_phases_np(x[:, 0], padding[0], padding[2], stride[1], Fp, Tq)
    w3 = np.ascontiguousarray(w[:, 0])
    out = np.empty((B, O, Fo, To), np.float32)
    _run_concurrently(_batch_halves(B), lambda r: _nb_conv1_fwd(xph, w3, stride[0], stride[1], out, r[0], r[1]))
    return out


def direct_conv_weight_grad(x, dy, kernel_size, stride, padding):
    """d w (O, 1, kF, kT) of direct_conv_forward for the output gradient dy (B, O, Fo, To)."""
    x = np.asarray(x, np.float32)
    dy = np.ascontiguousarray(dy, dtype=np.float32)
    O = dy.shape[1]
    kF, kT = kernel_size
    if not _USE_NUMBA:
        return conv_backward_np(x, np.zeros((O, 1, kF, kT), np.float32), dy, stride, padding)[1]
    _, _, Fp, Tq = _direct_geometry(x.shape, kernel_size, stride, padding)
    xph = _conv_phases_np(x[:, 0], padding[0], padding[2], stride[1], Fp, Tq)
    groups = _batch_halves(x.shape[0])
    parts = np.empty((len(groups), O, kF, kT), np.float32)
    _run_concurrently(list(enumerate(groups)),
                      lambda ig: _nb_conv1_dw(xph, dy, stride[0], stride[1], parts[ig[0]], ig[1][0], ig[1][1]))
    return parts.sum(axis=0)[:, None]


class _DirectConvFn(nn.Cell):
    """conv2d(x, w) for one input channel with the direct kernels (forward and weight gradient);
    the input gradient is zeros (input_grad=False, see above)."""

    def __init__(self, out_channels, kernel_size, stride, padding):
        super().__init__()
        kF, kT = kernel_size

        # module-level functions looked up at call time (bench/bench_step.py times them)
        def fwd(x, w):
            return direct_conv_forward(x, w, stride, padding)

        def dw(x, dy):
            return direct_conv_weight_grad(x, dy, kernel_size, stride, padding)

        def fwd_shape(xs, ws):
            Fo, To, _, _ = _direct_geometry(xs, kernel_size, stride, padding)
            return (xs[0], out_channels, Fo, To)

        self.dw_op = ops.Custom(dw, out_shape=lambda xs, ds: (out_channels, 1, kF, kT),
                                out_dtype=lambda xt, dt: xt, func_type="pyfunc")

        def bprop(x, w, out, dout):
            return ops.zeros_like(x), self.dw_op(x, dout)

        self.fwd_op = ops.Custom(fwd, out_shape=fwd_shape, out_dtype=lambda xt, wt: xt, func_type="pyfunc",
                                 bprop=bprop)
        self._keep = (fwd, dw, bprop)  # the pyfunc registry is keyed by id(): keep them alive

    def construct(self, x, w):
        return self.fwd_op(x, w)


def _auto_conv_strategy(in_channels, kernel_size, input_grad=True):
    # measured (bench/bench_layers.py): the GEMM backward wins when the im2col rows are long
    # (DS2 conv2: kF*C = 672); with one input channel (conv1: kF*C = 41) the direct kernels win
    # where no input gradient is needed, and MindSpore's own conv otherwise.
    if in_channels * kernel_size[0] >= 128:
        return "ms"
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
        self.kernel_size = _pair(kernel_size)
        self.stride = _pair(stride)
        self.padding = _pad4(padding)
        shape = (out_channels, in_channels) + self.kernel_size
        self.weight = Parameter(initializer(HeUniform(math.sqrt(5)), shape, ms.float32), name="weight")
        if strategy == "auto":
            strategy = _auto_conv_strategy(in_channels, self.kernel_size, input_grad)
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
            self.fn = _ConvFn(out_channels, self.kernel_size, self.stride, self.padding, strategy)

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
        return nn.Conv2d(in_channels, out_channels, _pair(kernel_size), _pair(stride), pad_mode="pad",
                         padding=_pad4(padding), has_bias=False)
    if impl == "fast":
        return FastConv2d(in_channels, out_channels, kernel_size, stride, padding, input_grad=input_grad)
    raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
