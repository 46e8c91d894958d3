"""Time the plain and fast DeepSpeech2 layers (ds2exp.models.layers) side by side, in one run.

    .venv/bin/python -m bench.bench_layers            # default shapes (a few minutes, plain GRU is slow)
    .venv/bin/python -m bench.bench_layers --quick    # smaller T, one repeat
    .venv/bin/python -m bench.bench_layers --only conv --repeats 3

Prints one table: impl, layer, shape, fwd s, fwd+bwd s, GFLOP/s. Times are the median of
`--repeats` calls after one warm-up call (which also pays numba's compile time, reported apart),
PYNATIVE mode. "fwd+bwd" is mindspore.value_and_grad w.r.t. the input and every parameter.
GFLOP/s = 3 x forward FLOPs / fwd+bwd time (backward ~ 2x forward for conv and matmul).
Rows:
  plain        the stock cells: nn.Conv2d; nn.LSTM / nn.GRU with seq_length (what make_*(impl="plain") builds)
  plain-noseq  nn.LSTM without seq_length (MindSpore's fused CPU LSTM kernel; cannot honour lengths)
  fast         make_*(impl="fast")
  fast:S       FastConv2d with conv strategy S (gemm: MindSpore's forward; direct_gemm: the direct forward)
  ms matmul / numpy 2 blk   the RNN input projection's GEMM in MindSpore vs numpy's BLAS (fwd = fwd+bwd = one product)
  fast-jit     the same under mindspore.jit (first-call compile time in the note column)
The machine is shared: compare rows of one run, not numbers across runs.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import mindspore as ms
import numpy as np
from mindspore import Tensor, nn

from ds2exp import kernels
from ds2exp.models import layers as L

ms.set_context(mode=ms.PYNATIVE_MODE)
ms.set_device("CPU")
if "--async" not in sys.argv:
    # Synchronous op launch. On this 2-core machine MindSpore's default asynchronous launch is
    # what makes the stock layers slow (measured: nn.Conv2d conv2 fwd+bwd 1.0 -> 0.5 s, fused
    # bi-LSTM fwd+bwd 5.0 -> 0.2 s) and it also slows the pyfunc-based fast conv backward.
    ms.runtime.launch_blocking()


def _sync(out):
    if isinstance(out, (tuple, list)):
        for o in out:
            _sync(o)
    elif isinstance(out, Tensor):
        out.asnumpy()


def timed(fn, repeats):
    t0 = time.perf_counter()
    _sync(fn())
    first = time.perf_counter() - t0
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        _sync(fn())
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts), first


def grad_fn(cell, n_inputs):
    params = cell.trainable_params()

    def loss(*args):
        y = cell(*args)
        return (y * y).sum() * 0.5

    return ms.value_and_grad(loss, tuple(range(n_inputs)) if n_inputs > 1 else 0, params), loss


ROWS = []


def row(impl, layer, shape, fwd, fb, flops, note=""):
    gf = 3 * flops / fb / 1e9 if fb else float("nan")
    ROWS.append((impl, layer, shape, fwd, fb, gf, note))
    print(f"  {impl:<11} {layer:<10} {shape:<28} fwd {fwd:8.3f}  fwd+bwd {fb:8.3f}  {gf:7.1f} GFLOP/s  {note}",
          file=sys.stderr, flush=True)


def bench_conv(name, B, C, O, k, s, p, F, T, impls, repeats):
    x = Tensor(np.random.randn(B, C, F, T).astype(np.float32))
    Fo, To = L.conv_output_size(F, T, k, s, p)
    flops = 2 * B * O * Fo * To * C * k[0] * k[1]
    ref = None
    for impl in impls:
        if impl.startswith("fast:"):  # one strategy of FastConv2d, e.g. fast:gemm
            cell = L.FastConv2d(C, O, k, s, p, strategy=impl.split(":", 1)[1])
        else:
            cell = L.make_conv2d(C, O, k, s, p, impl=impl)
        if ref is None:
            ref = cell
        else:
            cell.weight.set_data(ref.weight.value().copy())
        fwd, _ = timed(lambda c=cell: c(x), repeats)
        g, _ = grad_fn(cell, 1)
        fb, _ = timed(lambda g=g: g(x), repeats)
        row(impl, name, f"{B}x{C}x{F}x{T}", fwd, fb, flops)


def bench_projection_gemm(repeats):
    """The RNN input projection's products (ds2_tiny, B=16 x 150 frames, both directions) in MindSpore's
    MatMul, as FastRNN runs them, against numpy's BLAS as it would run inside the recurrence op (one
    BLAS thread, pinned for reproducible bits; two row blocks on the kernel threads)."""
    from mindspore import ops

    from ds2exp.kernels.settings import pin_blas_threads, run_tasks

    pin_blas_threads()
    matmul_t = ops.MatMul(transpose_b=True)
    for M, K, N, what in ((2400, 328, 1536, "layer-1 forward"), (2400, 192, 1536, "layer-2 forward"),
                          (2400, 1536, 328, "layer-1 input gradient")):
        x = np.random.randn(M, K).astype(np.float32)
        w = np.random.randn(N, K).astype(np.float32)
        xt, wt = Tensor(x), Tensor(w)
        out = np.empty((M, N), np.float32)

        def blocks():
            run_tasks([(0, M // 2), (M // 2, M)], lambda r: np.matmul(x[r[0]:r[1]], w.T, out=out[r[0]:r[1]]))
            return out

        flops = 2 * M * K * N / 3  # row() reports 3 x flops / time
        for impl, fn in (("ms matmul", lambda: matmul_t(xt, wt)), ("numpy 2 blk", blocks)):
            t, _ = timed(fn, repeats)
            row(impl, "proj", f"{M}x{K} @ {K}x{N}", t, t, flops, what)


def bench_rnn(mode, B, T, In, H, bidir, impls, repeats, jit=False):
    D = 2 if bidir else 1
    G = (4 if mode == "lstm" else 3) * H
    x = Tensor(np.random.randn(B, T, In).astype(np.float32))
    lens = np.full(B, T, np.int32)
    lens[1::2] = T - T // 8           # ragged
    lens = Tensor(lens)
    flops = 2 * B * T * D * G * (In + H)
    shape = f"B{B} T{T} {In}->{H}{' bi' if bidir else ''}"
    for impl in impls:
        if impl == "plain-noseq":
            if mode != "lstm":
                continue
            cell = nn.LSTM(In, H, 1, batch_first=True, bidirectional=bidir)

            class NoSeq(nn.Cell):
                def __init__(self, rnn):
                    super().__init__()
                    self.rnn = rnn

                def construct(self, a):
                    return self.rnn(a)[0]

            c2 = NoSeq(cell)
            fwd, _ = timed(lambda c=c2: c(x), repeats)
            g, _ = grad_fn(c2, 1)
            fb, _ = timed(lambda g=g: g(x), repeats)
            row(impl, mode, shape, fwd, fb, flops, "no lengths")
            continue
        cell = L.make_rnn(mode, In, H, bidir, impl=impl)
        fwd, first = timed(lambda c=cell: c(x, lens), repeats)
        g, _ = grad_fn(cell, 1)
        fb, first_fb = timed(lambda g=g: g(x, lens), repeats)
        note = f"1st call {max(first, first_fb):.2f}s" if impl == "fast" else ""
        row(impl, mode, shape, fwd, fb, flops, note)
        if jit and impl == "fast":
            jf = ms.jit(cell.construct)
            jg = ms.jit(g)
            fwd_j, c1 = timed(lambda f=jf: f(x, lens), repeats)
            fb_j, c2_ = timed(lambda f=jg: f(x, lens), repeats)
            row("fast-jit", mode, shape, fwd_j, fb_j, flops, f"compile {c1:.1f}+{c2_:.1f}s")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", choices=["conv", "rnn", "gemm"], default=None)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="T=100 for the RNNs, skip plain GRU and H=1024")
    ap.add_argument("--no-plain-gru", action="store_true", help="skip nn.GRU (its Python loop takes minutes)")
    ap.add_argument("--jit", action="store_true", help="also time the fast RNN under mindspore.jit")
    ap.add_argument("--async", dest="async_", action="store_true",
                    help="keep MindSpore's default asynchronous op launch (default: launch_blocking)")
    args = ap.parse_args(argv)
    np.random.seed(0)
    print(f"mindspore {ms.__version__}, numpy {np.__version__}, numba kernels: {kernels.settings.use_numba}, "
          f"kernel threads {kernels.settings.threads}, cpus {os.cpu_count()}, "
          f"launch: {'async' if args.async_ else 'blocking'}", file=sys.stderr)
    rep = 1 if args.quick else args.repeats
    if args.only in (None, "conv"):
        # DS2 conv1 on 2 s of 10 ms frames; conv2 on its output (T/2)
        bench_conv("conv1", 8, 1, 32, (41, 11), (2, 2), (20, 20, 5, 5), 161, 200, ["plain", "fast"], rep)
        bench_conv("conv2", 8, 32, 32, (21, 11), (2, 1), (10, 10, 5, 5), 81, 100, ["plain", "fast"], rep)
        # conv2's forward, MindSpore's Conv2D (gemm) against the direct kernel (direct_gemm), at the
        # channel counts of ds2_tiny (8), 16 and ds2_reference (32): where FastConv2d's auto choice
        # switches (layers.DIRECT_FORWARD_MAX_CHANNEL_PAIRS)
        for B, ch, T in ((16, 8, 150), (8, 16, 150), (4, 32, 200)):
            bench_conv("conv2", B, ch, ch, (21, 11), (2, 1), (10, 10, 5, 5), 81, T,
                       ["fast:gemm", "fast:direct_gemm"], max(rep, 3))
    if args.only in (None, "gemm"):
        bench_projection_gemm(max(rep, 5))
    if args.only in (None, "rnn"):
        T = 100 if args.quick else 200
        for mode in ("lstm", "gru"):
            impls = ["plain", "plain-noseq", "fast"]
            if mode == "gru" and (args.quick or args.no_plain_gru):
                impls = ["fast"]
            bench_rnn(mode, 8, T, 1312, 256, True, impls, rep, jit=args.jit)
        if not args.quick:
            for mode in ("lstm", "gru"):
                impls = ["plain-noseq", "fast"] if mode == "lstm" else ["fast"]
                bench_rnn(mode, 2, T, 1312, 1024, True, impls, rep)
    print()
    hdr = f"| {'impl':<11} | {'layer':<6} | {'shape':<26} | {'fwd s':>7} | {'fwd+bwd s':>9} | {'GFLOP/s':>7} | note"
    print(hdr)
    print("|" + "|".join("-" * (len(c) + 0) for c in hdr.split("|")[1:]))
    for impl, layer, shape, fwd, fb, gf, note in ROWS:
        print(f"| {impl:<11} | {layer:<6} | {shape:<26} | {fwd:7.3f} | {fb:9.3f} | {gf:7.1f} | {note}")


if __name__ == "__main__":
    main()
