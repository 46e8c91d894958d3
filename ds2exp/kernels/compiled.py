"""The compiled (numba) kernels: recurrences, the recurrent products, conv data movement, conv1.

Without numba these are plain Python functions that nothing calls (``settings.use_numba`` is
False then). All take float32 C-contiguous arrays and write into the output arrays they are given.
"""
import numpy as np

from ds2exp.kernels.settings import HAVE_NUMBA
from ds2exp.kernels.tanh_fit import CLAMP, P, Q

# fastmath without the no-NaN/no-Inf assumptions: reassociation lets LLVM vectorise the dot
# products, while an Inf or NaN (a diverging run) still propagates as IEEE says - with nnan/ninf
# the clamped tanh below may turn an Inf into a NaN, and a diverging run dies sooner than it should.
FAST_MATH = {"nsz", "arcp", "contract", "afn", "reassoc"}


def _jit(**extra):
    if not HAVE_NUMBA:
        return lambda fn: fn
    import numba

    return numba.njit(fastmath=FAST_MATH, cache=True, nogil=True, **extra)


@_jit()
def rows_wT(h, w, out):
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


@_jit()
def rows_w(g, w, out):
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
# The numpy loops (rnn.py) pay ~15 small ufunc calls (and the GIL) per time step; at DS2's small
# batches that Python overhead is as large as the arithmetic. These kernels run the whole time
# loop compiled, without the GIL, so the two directions of a layer also run on two cores.
# numba's tanh is a scalar libm call that does not vectorise (with it a whole-loop kernel is slower
# than numpy), so they use the clamped rational fit of kernels/tanh_fit.py, which the compiler vectorises.
# numba reads the global tuples as constants.
@_jit(inline="always")
def tanh(x):
    x = min(max(x, np.float32(-CLAMP)), np.float32(CLAMP))
    x2 = x * x
    p = x2 * np.float32(P[0]) + np.float32(P[1])
    p = p * x2 + np.float32(P[2])
    p = p * x2 + np.float32(P[3])
    p = p * x2 + np.float32(P[4])
    p = p * x2 + np.float32(P[5])
    p = p * x2 + np.float32(P[6])
    p = p * x
    q = x2 * np.float32(Q[0]) + np.float32(Q[1])
    q = q * x2 + np.float32(Q[2])
    q = q * x2 + np.float32(Q[3])
    return p / q


@_jit(inline="always")
def sigmoid(x):
    return np.float32(0.5) * tanh(np.float32(0.5) * x) + np.float32(0.5)


@_jit()
def lstm_fwd(X, w, A, C, Hs, Tm):
    """One direction: X (T, B, 4H) incl. both biases; fills A (i, f, g, o), C and Hs."""
    G, H = w.shape
    B = X.shape[1]
    h = np.zeros((B, H), np.float32)
    c = np.zeros((B, H), np.float32)
    g = np.empty((B, G), np.float32)
    for t in range(Tm):
        rows_wT(h, w, g)
        for b in range(B):
            for k in range(H):
                i = sigmoid(g[b, k] + X[t, b, k])
                f = sigmoid(g[b, H + k] + X[t, b, H + k])
                gg = tanh(g[b, 2 * H + k] + X[t, b, 2 * H + k])
                o = sigmoid(g[b, 3 * H + k] + X[t, b, 3 * H + k])
                A[t, b, k] = i
                A[t, b, H + k] = f
                A[t, b, 2 * H + k] = gg
                A[t, b, 3 * H + k] = o
                cc = c[b, k] * f + i * gg
                c[b, k] = cc
                C[t, b, k] = cc
                hh = tanh(cc) * o
                h[b, k] = hh
                Hs[t, b, k] = hh


@_jit()
def lstm_bwd(dY, w, A, C, dG, Tm):
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
                tc = tanh(C[t, b, k])
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
        rows_w(d, w, dh)


@_jit()
def gru_fwd(X, w, bias, A, S, Hs, Tm):
    """One direction: X (T, B, 3H) incl. bias_ih; fills A (r, z, n), S = W_hn h + b_hn, Hs."""
    G, H = w.shape
    B = X.shape[1]
    h = np.zeros((B, H), np.float32)
    gh = np.empty((B, G), np.float32)
    for t in range(Tm):
        rows_wT(h, w, gh)
        for b in range(B):
            for k in range(H):
                r = sigmoid(X[t, b, k] + gh[b, k] + bias[k])
                z = sigmoid(X[t, b, H + k] + gh[b, H + k] + bias[H + k])
                s = gh[b, 2 * H + k] + bias[2 * H + k]
                n = tanh(X[t, b, 2 * H + k] + r * s)
                A[t, b, k] = r
                A[t, b, H + k] = z
                A[t, b, 2 * H + k] = n
                S[t, b, k] = s
                hh = (h[b, k] - n) * z + n
                h[b, k] = hh
                Hs[t, b, k] = hh


@_jit()
def gru_bwd(dY, w, A, S, Hs, dX, dGh, Tm):
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
        rows_w(dg, w, back)
        dh += back


@_jit()
def freq_col2im(dXf, C, kF, sF, pt, pl, dx):
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


@_jit()
def time_shifts(dyT, sT, dZ):
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


@_jit()
def conv_fwd(xph, w, sF, sT, out, b0, b1, rows_per_partial):
    """out[b, o, f, t] = sum_{c, kf, kt} w[o, c, kf, kt] * xph[b, c, kt % sT, sF*f + kf, t + kt // sT].

    The taps are walked as kt = j*sT + p: computing kt % sT and kt // sT with a stride known
    only at run time kept LLVM from vectorising the loop over t (measured 6x slower). One output
    row (all O channels, To frames) is accumulated in a small buffer that stays in L1; the loop
    over output frames is innermost, so that it vectorises, and takes four taps per pass, so that
    each load and store of the buffer carries four multiply-adds (measured, DS2 conv2 8 -> 8
    channels at B=16, one thread: 170 -> 100 ms; two taps per pass were slower than one, eight
    slower than four).

    The taps of ``rows_per_partial`` (c, kf) rows are summed in a second buffer, which is then added to
    the row's total (conv.conv_rows_per_partial picks the count): with one float32 running sum over all
    C*kF*kT taps (1848 for DS2's conv2) every pass rounds at the total's magnitude, and a trained
    ds2_tiny_gru's conv1 and conv2 came out 3.3e-5 and 2.1e-5 off a float64 conv (MindSpore's Conv2D:
    2.6e-5 and 4.8e-6); with the partial sums 7.9e-6 and 3.9e-6."""
    O, C, kF, kT = w.shape
    Fo, To = out.shape[2], out.shape[3]
    acc = np.empty((O, To), np.float32)
    part = np.empty((O, To), np.float32)
    for b in range(b0, b1):
        for f in range(Fo):
            acc[:] = 0.0
            part[:] = 0.0
            rows = 0
            for c in range(C):
                for kf in range(kF):
                    r = sF * f + kf
                    for p in range(sT):
                        row = xph[b, c, p, r]
                        nj = (kT - p + sT - 1) // sT
                        for o in range(O):
                            j = 0
                            while j + 3 < nj:
                                w0 = w[o, c, kf, j * sT + p]
                                w1 = w[o, c, kf, (j + 1) * sT + p]
                                w2 = w[o, c, kf, (j + 2) * sT + p]
                                w3 = w[o, c, kf, (j + 3) * sT + p]
                                for t in range(To):
                                    part[o, t] += (w0 * row[t + j] + w1 * row[t + j + 1] + w2 * row[t + j + 2]
                                                   + w3 * row[t + j + 3])
                                j += 4
                            while j < nj:
                                w0 = w[o, c, kf, j * sT + p]
                                for t in range(To):
                                    part[o, t] += w0 * row[t + j]
                                j += 1
                    rows += 1
                    if rows == rows_per_partial:
                        rows = 0
                        for o in range(O):
                            for t in range(To):
                                acc[o, t] += part[o, t]
                                part[o, t] = 0.0
            for o in range(O):
                for t in range(To):
                    out[b, o, f, t] = acc[o, t] + part[o, t]


@_jit()
def conv1_dw(xph, dy, sF, sT, dw, b0, b1):
    """dw[o, kf, kt] = sum_{b, f, t} dy[b, o, f, t] * xph[b, kt % sT, sF*f + kf, t + kt // sT]
    (one input channel: xph is conv_fwd's phase buffer without its channel axis)."""
    O, kF, kT = dw.shape
    Fo, To = dy.shape[2], dy.shape[3]
    dw[:] = 0.0
    for b in range(b0, b1):
        for f in range(Fo):
            for kf in range(kF):
                r = sF * f + kf
                for p in range(sT):  # kt = j*sT + p, as in conv_fwd
                    row = xph[b, p, r]
                    for j in range((kT - p + sT - 1) // sT):
                        kt = j * sT + p
                        for o in range(O):
                            s = np.float32(0.0)
                            for t in range(To):
                                s += dy[b, o, f, t] * row[t + j]
                            dw[o, kf, kt] += s
