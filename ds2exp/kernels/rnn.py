"""RNN recurrences (LSTM, GRU; one or two directions; ragged lengths), forward and backward.

Layout: xp (B, T, D*G) input projections, direction-major on the last axis; W_hh (D, G, H);
G = 4H (LSTM gates i, f, g, o) or 3H (GRU gates r, z, n, as nn.GRU / PyTorch). With numba and at
most ``settings.numba_max_rows`` rows, each direction's whole time loop is one compiled call
(kernels/compiled.py), the directions on separate threads; otherwise a numpy loop with BLAS per
step. Each direction's arithmetic is the same whichever thread runs it.
"""
import numpy as np

from ds2exp.kernels import compiled
from ds2exp.kernels.settings import kernel, run_tasks, settings

GATES = {"lstm": 4, "gru": 3}


def _compiled(B) -> bool:
    """Whether the compiled whole-loop kernels run this batch (numba on, a small batch)."""
    return settings.use_numba and B <= settings.numba_max_rows


def _h_wT(h, wT):
    """(D,B,H) x (D,H,G) -> (D,B,G) by BLAS; wT is W_hh transposed, C-contiguous. The numpy loops
    only run where the compiled kernels do not (numba off, or more than settings.numba_max_rows rows)."""
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


def row_chunks(B, D):
    """Row ranges for the compiled recurrences. One per direction while the threads are no more than
    the directions; with more threads, each direction's rows are cut into chunks of a multiple of 4
    rows (the recurrent product's row block, compiled.rows_wT), so every row meets the same code,
    in the same order, as without the cut: the results are bitwise the same for any split."""
    per_direction = max(1, settings.threads // max(1, D))
    if per_direction == 1 or B <= 4:
        return [(0, B)]
    n = min(per_direction, -(-B // 4))   # chunks per direction, at least 4 rows each
    rows = -(-B // n)                    # ceil(B / n)
    size = 4 * -(-rows // 4)             # rounded up to a multiple of 4
    return [(b, min(B, b + size)) for b in range(0, B, size)]


def _run_compiled(fn, args, Tm):
    """fn(*(a[d] ...), Tm) for every direction d (args have a leading direction axis), cut further
    into row chunks (row_chunks) on the per-step arrays (D, T, B, ...), whose rows are axis 1 of a[d]
    (W_hh and biases have no rows); each chunk runs on contiguous copies, which are written back."""
    D, B = args[0].shape[0], args[0].shape[2]
    chunks = row_chunks(B, D)
    batched = [a.ndim == 4 for a in args]

    def task(item):
        d, (b0, b1) = item
        if len(chunks) == 1:
            fn(*(a[d] for a in args), Tm)
            return
        part = [np.ascontiguousarray(a[d][:, b0:b1]) if cut else a[d] for a, cut in zip(args, batched)]
        fn(*part, Tm)
        for a, p, cut in zip(args, part, batched):
            if cut:
                a[d][:, b0:b1] = p

    run_tasks([(d, c) for d in range(D) for c in chunks], task)


def _run_recurrence(compiled_kernel, numpy_loop, args, Tm):
    """One recurrence pass over every direction: the compiled kernel when it applies to this batch
    (_compiled), else the numpy loop over direction groups. args: (per-step input, W_hh, ...)."""
    B, w = args[0].shape[2], args[1]
    if _compiled(B):
        _run_compiled(compiled_kernel, args, Tm)
    else:
        run_tasks(_direction_groups(w), lambda sl: numpy_loop(*(a[sl] for a in args), Tm))


def _direction_groups(w):
    """Direction slices for the numpy loops: both in one loop while their W_hh fit in cache
    together (settings.joint_directions_max_bytes), else one loop each."""
    D = w.shape[0]
    if D == 1 or w.nbytes <= settings.joint_directions_max_bytes:
        return [slice(0, D)]
    return [slice(d, d + 1) for d in range(D)]


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


@kernel("rnn_fwd")
def lstm_forward(xp, lengths, w, b, b_ih=None):
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
    _run_recurrence(compiled.lstm_fwd, _lstm_fwd_loop, (X, w, A, C, Hs), Tm)
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


def _backward(lengths, w, dy, Hs, compiled_kernel, numpy_loop, saved, dX, dGh):
    """What the RNN backward passes share: clip the lengths, bring the output gradient into the
    aligned (D, T, B, H) layout with padded frames zeroed, run the recurrence backward on
    (dY, W_hh, *saved), then d W_hh and d b from dGh (the recurrent pre-activations' gradient) and Hs.
    Returns d_xp from dX (D, T, B, G) in the (B, T, D*G) layout, d_w, d_b."""
    D, T, B = dX.shape[:3]
    lengths = _clip_lengths(lengths, T)
    dY = _to_aligned(np.asarray(dy, np.float32), lengths, D)
    dY *= _valid_mask(lengths, T)
    Tm = int(lengths.max()) if B else 0
    w = np.ascontiguousarray(w, dtype=np.float32)
    _run_recurrence(compiled_kernel, numpy_loop, (dY, w) + saved, Tm)
    dw, db = _recurrent_weight_grads(dGh, Hs)
    return _from_aligned(dX, lengths), dw, db


# d W_hh's product is cut into this many gate-row blocks per direction whatever the thread count
# (numpy's BLAS runs on one thread, see settings.pin_blas_threads): the same bits for any threads.
WEIGHT_GRAD_BLOCKS = 8


def _recurrent_weight_grads(dGh, Hs):
    """d W_hh and d b from the gradients of the recurrent pre-activations (D, T, B, G) and the
    hidden states (D, T, B, H): each step's W_hh multiplies the previous step's h (0 at t=0)."""
    D, T, B, G = dGh.shape
    H = Hs.shape[-1]
    Hprev = np.zeros_like(Hs)
    Hprev[:, 1:] = Hs[:, :-1]
    g2 = dGh.reshape(D, T * B, G)
    h2 = Hprev.reshape(D, T * B, H)
    dw = np.empty((D, G, H), np.float32)
    n = max(1, min(G, WEIGHT_GRAD_BLOCKS))
    edges = [round(i * G / n) for i in range(n + 1)]

    def block(item):
        d, i = item
        g0, g1 = edges[i], edges[i + 1]
        dw[d, g0:g1] = g2[d, :, g0:g1].T @ h2[d]

    run_tasks([(d, i) for d in range(D) for i in range(n)], block)
    return dw, dGh.sum(axis=(1, 2)).astype(np.float32)


@kernel("rnn_bwd")
def lstm_backward(lengths, w, A, C, Hs, dy):
    """Gradients of lstm_forward: returns d_xp (B, T, D*4H), d_w (D, 4H, H), d_b (D, 4H)."""
    dG = np.zeros(A.shape, np.float32)  # input and recurrent pre-activations share one gradient
    return _backward(lengths, w, dy, Hs, compiled.lstm_bwd, _lstm_bwd_loop, (A, C, dG), dX=dG, dGh=dG)


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


@kernel("rnn_fwd")
def gru_forward(xp, lengths, w, b, b_ih=None):
    """GRU recurrence (r, z, n gates as nn.GRU / PyTorch: n = tanh(x_n + r * (W_hn h + b_hn))).

    xp: (B, T, D*3H); w: (D, 3H, H); b: (D, 3H) bias_hh; b_ih: (D, 3H) bias_ih, or None when xp
    already includes it (see lstm_forward). Returns y (B, T, D*H) and
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
    _run_recurrence(compiled.gru_fwd, _gru_fwd_loop, (X, w, b, A, S, Hs), Tm)
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


@kernel("rnn_bwd")
def gru_backward(lengths, w, A, S, Hs, dy):
    """Gradients of gru_forward: returns d_xp (B, T, D*3H), d_w (D, 3H, H), d_b (D, 3H)."""
    dX = np.zeros(A.shape, np.float32)   # input pre-activations
    dGh = np.zeros(A.shape, np.float32)  # recurrent pre-activations (r scales the candidate's)
    return _backward(lengths, w, dy, Hs, compiled.gru_bwd, _gru_bwd_loop, (A, S, Hs, dX, dGh), dX, dGh)


KERNELS = {"lstm": (lstm_forward, lstm_backward), "gru": (gru_forward, gru_backward)}
