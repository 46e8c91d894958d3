"""Fast vs plain DeepSpeech2 layers (ds2exp.models.layers over ds2exp.kernels): same outputs, same gradients.

Small shapes; the whole file runs in well under a minute on 2 cores.
"""
import subprocess
import sys
import warnings

import mindspore as ms
import numpy as np
import pytest
from mindspore import Tensor, nn

from ds2exp import kernels as K
from ds2exp.kernels import compiled
from ds2exp.kernels import conv as KC
from ds2exp.kernels import native as KN
from ds2exp.kernels import rnn as KR
from ds2exp.models import layers as L

ms.set_context(mode=ms.PYNATIVE_MODE)
ms.set_device("CPU")

TOL = 1e-4


def assert_close(actual, expected, name=""):
    """|a - e| <= 1e-4 * max(1, max|e|): 1e-4 absolute for O(1) values, relative for large sums."""
    actual = np.asarray(actual)
    expected = np.asarray(expected)
    assert actual.shape == expected.shape, (name, actual.shape, expected.shape)
    scale = max(1.0, float(np.abs(expected).max(initial=0.0)))
    err = float(np.abs(actual - expected).max(initial=0.0))
    assert err <= TOL * scale, f"{name}: max abs error {err:.3g} > {TOL} x {scale:.3g}"


def copy_params(src, dst):
    """Copy parameters by name (what loading a reference checkpoint into either impl does)."""
    sp = {p.name: p for p in src.get_parameters()}
    dp = list(dst.get_parameters())
    assert sorted(sp) == sorted(p.name for p in dp)
    for p in dp:
        assert tuple(p.shape) == tuple(sp[p.name].shape), p.name
        p.set_data(Tensor(sp[p.name].asnumpy().copy()))


def outputs_and_grads(cell, inputs, dy):
    """y, d(sum(y*dy))/d inputs[0], and {param name: grad}."""
    params = cell.trainable_params()
    dyt = Tensor(dy)

    def loss(*args):
        return (cell(*args) * dyt).sum()

    _, (gx, gp) = ms.value_and_grad(loss, 0, params)(*inputs)
    y = cell(*inputs).asnumpy()
    return y, gx.asnumpy(), {p.name: g.asnumpy() for p, g in zip(params, gp)}


def assert_same(plain, fast, inputs, seed=0):
    y0 = plain(*inputs).asnumpy()
    dy = np.random.default_rng(seed).standard_normal(y0.shape).astype(np.float32)
    yp, gxp, gpp = outputs_and_grads(plain, inputs, dy)
    yf, gxf, gpf = outputs_and_grads(fast, inputs, dy)
    assert_close(yf, yp, "output")
    assert_close(gxf, gxp, "d input")
    assert sorted(gpf) == sorted(gpp)
    for name in gpp:
        assert_close(gpf[name], gpp[name], "d " + name)
    return yp, gxp, gpp


@pytest.fixture(params=[True, False], ids=["numba", "numpy"])
def numba_mode(request):
    if request.param and not K.HAVE_NUMBA:
        pytest.skip("numba not installed")
    old = K.set_numba_enabled(request.param)
    yield request.param
    K.set_numba_enabled(old)


@pytest.fixture(params=["native", "numba", "numpy"])
def rnn_kernels(request):
    """The RNN layers' three recurrence kernels: C++ (aot ops), numba and numpy (pyfunc ops)."""
    if request.param == "native" and KN.library() is None:
        pytest.skip("no C++ compiler builds the native kernels here")
    if request.param == "numba" and not K.HAVE_NUMBA:
        pytest.skip("numba not installed")
    old_native = KN.set_native_enabled(request.param == "native")
    old_numba = K.set_numba_enabled(request.param != "numpy")
    yield request.param
    KN.set_native_enabled(old_native)
    K.set_numba_enabled(old_numba)


# ------------------------------------------------------------------------------------------ conv
CONVS = {
    # name: (C_in, C_out, kernel, stride, padding (top, bottom, left, right), F, T, B)
    "ds2_conv1": (1, 32, (41, 11), (2, 2), (20, 20, 5, 5), 161, 14, 2),
    "ds2_conv2": (32, 32, (21, 11), (2, 1), (10, 10, 5, 5), 81, 7, 2),
    "ds2_tiny_conv2": (8, 8, (21, 11), (2, 1), (10, 10, 5, 5), 81, 9, 2),
    "odd": (3, 5, (5, 4), (3, 2), (2, 1, 0, 3), 17, 13, 3),
}


@pytest.mark.parametrize("name", sorted(CONVS))
@pytest.mark.parametrize("strategy", ["auto", "gemm", "direct_gemm", "native"])
def test_conv_fast_matches_plain(name, strategy, numba_mode):
    C, O, k, s, p, F, T, B = CONVS[name]
    plain = L.make_conv2d(C, O, k, s, p, impl="plain")
    fast = L.FastConv2d(C, O, k, s, p, strategy=strategy) if strategy != "auto" else \
        L.make_conv2d(C, O, k, s, p, impl="fast")
    copy_params(plain, fast)
    x = Tensor(np.random.default_rng(1).standard_normal((B, C, F, T)).astype(np.float32))
    yp, _, _ = assert_same(plain, fast, (x,))
    assert yp.shape == (B, O) + L.conv_output_size(F, T, k, s, p)


def test_conv_auto_strategy():
    assert L.make_conv2d(32, 32, (21, 11), (2, 1), (10, 10, 5, 5)).strategy == "gemm"
    assert L.make_conv2d(8, 8, (21, 11), (2, 1), (10, 10, 5, 5)).strategy == "direct_gemm"
    assert L.make_conv2d(16, 16, (21, 11), (2, 1), (10, 10, 5, 5)).strategy == "direct_gemm"
    assert L.make_conv2d(1, 32, (41, 11), (2, 2), (20, 20, 5, 5)).strategy == "native"
    assert L.make_conv2d(1, 32, (41, 11), (2, 2), (20, 20, 5, 5), input_grad=False).strategy == "direct"
    with pytest.raises(ValueError, match="one input channel with input_grad=False"):
        L.FastConv2d(2, 4, (3, 3), (1, 1), (1, 1, 1, 1), strategy="direct", input_grad=False)
    with pytest.raises(ValueError, match="input_grad=False"):
        L.FastConv2d(1, 4, (3, 3), (1, 1), (1, 1, 1, 1), strategy="direct")
    with pytest.raises(ValueError, match="conv strategy must be one of"):
        L.FastConv2d(1, 4, (3, 3), (1, 1), (1, 1, 1, 1), strategy="wide")


@pytest.mark.parametrize("name", ["ds2_conv1", "odd_one_channel", "stride_3"])
def test_conv_direct_matches_plain_without_input_gradient(name, numba_mode):
    """The direct one-channel kernels (DS2 conv1) give the plain conv's output and weight gradient;
    the input gradient is zeros by contract (input_grad=False)."""
    O, k, s, p, F, T, B = {"ds2_conv1": (8, (41, 11), (2, 2), (20, 20, 5, 5), 161, 23, 3),
                           "odd_one_channel": (5, (5, 4), (3, 2), (2, 1, 0, 3), 17, 13, 3),
                           "stride_3": (4, (3, 7), (1, 3), (0, 2, 6, 1), 9, 20, 1)}[name]
    plain = L.make_conv2d(1, O, k, s, p, impl="plain")
    fast = L.make_conv2d(1, O, k, s, p, impl="fast", input_grad=False)
    assert fast.strategy == "direct"
    copy_params(plain, fast)
    x = Tensor(np.random.default_rng(2).standard_normal((B, 1, F, T)).astype(np.float32))
    dy = np.random.default_rng(3).standard_normal((B, O) + L.conv_output_size(F, T, k, s, p)).astype(np.float32)
    yp, _, gp = outputs_and_grads(plain, (x,), dy)
    yf, gx, gf = outputs_and_grads(fast, (x,), dy)
    assert_close(yf, yp, "output")
    assert_close(gf["weight"], gp["weight"], "d weight")
    assert np.all(gx == 0.0)



@pytest.mark.parametrize("name", sorted(CONVS))
def test_conv_numpy_reference(name):
    """The numpy forward/backward helpers agree with MindSpore's conv."""
    C, O, k, s, p, F, T, B = CONVS[name]
    plain = L.make_conv2d(C, O, k, s, p, impl="plain")
    x = np.random.default_rng(2).standard_normal((B, C, F, T)).astype(np.float32)
    w = plain.weight.asnumpy()
    y = plain(Tensor(x)).asnumpy()
    assert_close(KC.conv_forward_np(x, w, s, p), y, "forward")
    dy = np.random.default_rng(3).standard_normal(y.shape).astype(np.float32)
    _, gx, gp = outputs_and_grads(plain, (Tensor(x),), dy)
    dx, dw = KC.conv_backward_np(x, w, dy, s, p)
    assert_close(dx, gx, "dx")
    assert_close(dw, gp["weight"], "dw")


@pytest.mark.parametrize("impl", ["plain", "fast"])
def test_conv_params(impl):
    cell = L.make_conv2d(32, 32, (21, 11), (2, 1), (10, 10, 5, 5), impl=impl)
    params = list(cell.get_parameters())
    assert [(q.name, tuple(q.shape)) for q in params] == [("weight", (32, 32, 21, 11))]
    with pytest.raises(ValueError):
        L.make_conv2d(1, 1, 3, 1, 1, impl="nope")


@pytest.mark.parametrize("name, input_grad", [("ds2_conv2", True), ("ds2_conv1", False)])
def test_conv_under_jit(name, input_grad):
    C, O, k, s, p, F, T, B = CONVS[name]
    fast = L.make_conv2d(C, O, k, s, p, impl="fast", input_grad=input_grad)
    x = Tensor(np.random.default_rng(4).standard_normal((B, C, F, T)).astype(np.float32))

    def loss(a):
        return (fast(a) ** 2).sum()

    g = ms.value_and_grad(loss, 0, fast.trainable_params())
    v0, (gx0, gw0) = g(x)
    v1, (gx1, gw1) = ms.jit(g)(x)
    assert_close(v1.asnumpy(), v0.asnumpy(), "loss")
    assert_close(gx1.asnumpy(), gx0.asnumpy(), "dx")
    assert_close(gw1[0].asnumpy(), gw0[0].asnumpy(), "dw")


# ------------------------------------------------------------------------------------------- rnn
RNN_NAMES = ["weight_ih_l0", "weight_hh_l0", "bias_ih_l0", "bias_hh_l0"]


def rnn_inputs(B=3, T=7, In=5, lengths=(7, 3, 5), seed=5):
    x = np.random.default_rng(seed).standard_normal((B, T, In)).astype(np.float32)
    return Tensor(x), Tensor(np.asarray(lengths, np.int32))


@pytest.mark.parametrize("rnn_type", ["lstm", "gru"])
@pytest.mark.parametrize("bidirectional", [False, True], ids=["uni", "bi"])
def test_rnn_fast_matches_plain(rnn_type, bidirectional, rnn_kernels):
    In, H = 5, 4
    plain = L.make_rnn(rnn_type, In, H, bidirectional, impl="plain")
    fast = L.make_rnn(rnn_type, In, H, bidirectional, impl="fast")
    copy_params(plain, fast)
    x, lens = rnn_inputs(In=In)
    yp, _, _ = assert_same(plain, fast, (x, lens))
    D = 2 if bidirectional else 1
    assert yp.shape == (3, 7, D * H)


@pytest.mark.parametrize("rnn_type", ["lstm", "gru"])
def test_rnn_fast_matches_plain_at_blocked_shapes(rnn_type, rnn_kernels):
    """6 rows and 5 hidden units: the compiled recurrent product's 4x4 blocks and its leftover rows
    and gate columns (B=3, H=4 above fit no block of rows) give the plain layer's results."""
    In, H = 5, 5
    plain = L.make_rnn(rnn_type, In, H, True, impl="plain")
    fast = L.make_rnn(rnn_type, In, H, True, impl="fast")
    copy_params(plain, fast)
    x, lens = rnn_inputs(B=6, In=In, lengths=(7, 3, 5, 7, 1, 6), seed=8)
    yp, _, _ = assert_same(plain, fast, (x, lens))
    assert yp.shape == (6, 7, 2 * H)


@pytest.mark.skipif(not K.HAVE_NUMBA, reason="numba not installed")
@pytest.mark.parametrize("B,G,H", [(1, 3, 2), (4, 8, 5), (6, 13, 7), (9, 20, 33)])
def test_recurrent_product_kernels_match_numpy(B, G, H):
    rng = np.random.default_rng(B * G * H)
    h = rng.standard_normal((B, H)).astype(np.float32)
    w = rng.standard_normal((G, H)).astype(np.float32)
    out = np.full((B, G), np.nan, np.float32)
    compiled.rows_wT(h, w, out)
    np.testing.assert_allclose(out, h.astype(np.float64) @ w.T.astype(np.float64), rtol=1e-5, atol=1e-5)
    g = rng.standard_normal((B, G)).astype(np.float32)
    back = np.full((B, H), np.nan, np.float32)
    compiled.rows_w(g, w, back)
    np.testing.assert_allclose(back, g.astype(np.float64) @ w.astype(np.float64), rtol=1e-5, atol=1e-5)


def test_conv_gemm_backward_in_chunks_of_utterances(monkeypatch):
    """A batch whose im2col matrix is over L.IM2COL_CHUNK_BYTES goes through the GEMM backward one
    utterance at a time (here: any batch) with the plain layer's gradients."""
    monkeypatch.setattr(L, "IM2COL_CHUNK_BYTES", 1)
    C_in, C_out, k, s, p, F, T, _ = CONVS["ds2_tiny_conv2"]
    plain = L.make_conv2d(C_in, C_out, k, s, p, impl="plain")
    fast = L.FastConv2d(C_in, C_out, k, s, p, strategy="gemm")
    copy_params(plain, fast)
    x = Tensor(np.random.default_rng(4).standard_normal((3, C_in, F, T)).astype(np.float32))
    assert_same(plain, fast, (x,))


@pytest.mark.parametrize("rnn_type", ["lstm", "gru"])
def test_rnn_directions_in_separate_loops(rnn_type, monkeypatch):
    """Large W_hh: each direction runs its own time loop (the H=1024 path) - same results."""
    monkeypatch.setattr(K.settings, "joint_directions_max_bytes", 0)
    In, H = 5, 4
    plain = L.make_rnn(rnn_type, In, H, True, impl="plain")
    fast = L.make_rnn(rnn_type, In, H, True, impl="fast")
    copy_params(plain, fast)
    assert_same(plain, fast, rnn_inputs(In=In))


@pytest.mark.parametrize("rnn_type", ["lstm", "gru"])
def test_rnn_threads_are_bitwise_one_thread(rnn_type, monkeypatch, numba_mode):
    """Directions (compiled kernels, or numpy loops for a large W_hh) run on their own threads, and
    with more threads than directions the compiled recurrences also cut the rows into chunks of a
    multiple of 4 (9 rows: 4 + 4 + 1 leftover); every row's arithmetic is unchanged, bit for bit."""
    monkeypatch.setattr(K.settings, "joint_directions_max_bytes", 0)
    rng = np.random.default_rng(3)
    B, T, H = 9, 9, 6
    G = (4 if rnn_type == "lstm" else 3) * H
    xp = rng.standard_normal((B, T, 2 * G)).astype(np.float32)
    w = (rng.standard_normal((2, G, H)) * 0.5).astype(np.float32)
    b = rng.standard_normal((2, G)).astype(np.float32)
    lengths = np.array([9, 4, 6, 9, 1, 7, 8, 9, 3], np.int32)
    dy = rng.standard_normal((B, T, 2 * H)).astype(np.float32)
    fwd, bwd = KR.KERNELS[rnn_type]
    outs = {}
    for threads in (1, 2, 4, 16):
        monkeypatch.setattr(K.settings, "threads", threads)
        y, *saved = fwd(xp, lengths, w, b)
        outs[threads] = (y, *bwd(lengths, w, *saved, dy))
    assert KR.row_chunks(B, 2) == [(0, 4), (4, 8), (8, 9)]  # at 16 threads
    assert len(outs[1]) == 4
    for threads in (2, 4, 16):
        for one, many in zip(outs[1], outs[threads]):
            assert one.shape == many.shape and np.array_equal(one, many), threads
    assert np.abs(outs[1][0]).max() > 0 and np.abs(outs[1][1]).max() > 0


def test_direct_conv_kernels_are_bitwise_the_same_for_any_thread_count(monkeypatch, numba_mode):
    """The direct conv kernels cut the batch into the same chunks whatever the thread count and add
    the partial weight gradients in chunk order: 1, 2, 3 or 16 threads give the same bits."""
    rng = np.random.default_rng(11)
    k, s, p = (41, 11), (2, 2), (20, 20, 5, 5)
    x = rng.standard_normal((13, 1, 161, 40)).astype(np.float32)
    w = rng.standard_normal((6, 1) + k).astype(np.float32)
    dy = rng.standard_normal((13, 6) + KC.conv_output_size(161, 40, k, s, p)).astype(np.float32)
    x8 = rng.standard_normal((13, 8, 81, 20)).astype(np.float32)   # conv2 of ds2_tiny: 8 -> 8 channels
    w8 = rng.standard_normal((8, 8, 21, 11)).astype(np.float32)
    outs = {}
    for threads in (1, 2, 3, 16):
        monkeypatch.setattr(K.settings, "threads", threads)
        outs[threads] = (KC.direct_conv_forward(x, w, s, p), KC.direct_conv_weight_grad(x, dy, k, s, p),
                         KC.direct_conv_forward(x8, w8, (2, 1), (10, 10, 5, 5)))
    for threads in (2, 3, 16):
        for one, many in zip(outs[1], outs[threads]):
            assert np.array_equal(one, many), threads
    sizes = [b1 - b0 for b0, b1 in KC.batch_chunks(13)]
    assert len(sizes) == KC.BATCH_CHUNKS and sum(sizes) == 13 and set(sizes) == {1, 2}
    assert KC.batch_chunks(1) == [(0, 1)]


def _conv_float64(x, w, stride, padding):
    """conv2d in float64, one tap at a time (the reference for the kernels' rounding)."""
    B, C, F, T = x.shape
    O, _, kF, kT = w.shape
    pt, pb, pl, pr = padding
    sF, sT = stride
    xp = np.zeros((B, C, F + pt + pb, T + pl + pr))
    xp[:, :, pt:pt + F, pl:pl + T] = x
    Fo, To = KC.conv_output_size(F, T, (kF, kT), stride, padding)
    y = np.zeros((B, O, Fo, To))
    for kf in range(kF):
        for kt in range(kT):
            taps = xp[:, :, kf:kf + sF * (Fo - 1) + 1:sF, kt:kt + sT * (To - 1) + 1:sT]
            y += np.einsum("bcft,oc->boft", taps, w[:, :, kf, kt].astype(np.float64))
    return y


@pytest.mark.parametrize("name", ["ds2_conv1", "ds2_tiny_conv2"])
def test_direct_conv_forward_rounds_like_a_gemm(name, numba_mode):
    """DS2's convolutions of nonnegative inputs (conv2 reads hardtanh outputs), whose 451 / 1848 taps all
    add up: the direct forward stays within 5e-7 x max|y| of a float64 conv (measured 2.1e-7, 2.9e-7; the
    numpy GEMM 2.5e-7, 2.9e-7; MindSpore's Conv2D 7.1e-7, 4.6e-7). One float32 running sum over all the
    taps is 1.1e-6 (conv1) and 2.6e-6 (conv2) off."""
    k, s, p, C, F, T = {"ds2_conv1": ((41, 11), (2, 2), (20, 20, 5, 5), 1, 161, 60),
                        "ds2_tiny_conv2": ((21, 11), (2, 1), (10, 10, 5, 5), 8, 81, 40)}[name]
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 2, (2, C, F, T)).astype(np.float32)
    w = rng.uniform(-0.02, 0.06, (8, C) + k).astype(np.float32)
    want = _conv_float64(x, w, s, p)
    err = float(np.abs(KC.direct_conv_forward(x, w, s, p) - want).max()) / float(np.abs(want).max())
    assert err <= 5e-7, err


def test_kernels_import_no_mindspore():
    code = ("import sys, ds2exp.kernels, ds2exp.kernels.rnn, ds2exp.kernels.conv, ds2exp.kernels.compiled; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'mindspore'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_timing_hook_sees_each_kernel_call(monkeypatch):
    monkeypatch.setattr(K.settings, "use_native", False)  # the C++ kernels time themselves (test_native_kernels)
    calls = []
    monkeypatch.setattr(K.settings, "timing_hook", lambda name, wall, cpu: calls.append((name, wall, cpu)))
    cell = L.make_rnn("lstm", 5, 4, True, impl="fast")
    x, lens = rnn_inputs(In=5)
    outputs_and_grads(cell, (x, lens), np.ones((3, 7, 8), np.float32))
    names = [c[0] for c in calls]
    assert "rnn_fwd" in names and "rnn_bwd" in names
    assert all(wall >= 0 and cpu >= 0 for _, wall, cpu in calls)


def test_diverging_values_raise_no_numpy_warning(monkeypatch):
    """An Inf in W_hh (a diverging run) propagates to NaN/Inf without numpy's 'invalid value
    encountered in matmul' on the console; the trainer's non-finite policy reports it."""
    monkeypatch.setattr(K.settings, "use_numba", False)  # the numpy loops use BLAS products
    monkeypatch.setattr(K.settings, "threads", 2)        # and the pool's threads have their own error state
    monkeypatch.setattr(K.settings, "joint_directions_max_bytes", 0)
    rng = np.random.default_rng(0)
    xp = rng.standard_normal((2, 5, 2 * 12)).astype(np.float32)
    w = rng.standard_normal((2, 12, 3)).astype(np.float32)
    w[:, 0, 0] = np.inf
    b = np.zeros((2, 12), np.float32)
    lengths = np.array([5, 4], np.int32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        y, *saved = KR.lstm_forward(xp, lengths, w, b)
        grads = KR.lstm_backward(lengths, w, *saved, np.ones((2, 5, 6), np.float32))
    assert not np.isfinite(y).all() and not np.isfinite(grads[1]).all()


@pytest.mark.parametrize("rnn_type", ["lstm", "gru"])
def test_rnn_matches_stock_cell_full_length(rnn_type):
    """Against nn.LSTM / nn.GRU called WITHOUT seq_length (the fused kernel for LSTM): gate order."""
    In, H = 6, 3
    cls = nn.LSTM if rnn_type == "lstm" else nn.GRU
    stock = cls(In, H, 1, batch_first=True, bidirectional=True)
    fast = L.make_rnn(rnn_type, In, H, True, impl="fast")
    copy_params(stock, fast)
    x, lens = rnn_inputs(B=2, T=5, In=In, lengths=(5, 5))
    assert_close(fast(x, lens).asnumpy(), stock(x)[0].asnumpy(), "output")


@pytest.mark.parametrize("impl", ["plain", "fast"])
@pytest.mark.parametrize("rnn_type", ["lstm", "gru"])
def test_rnn_params(impl, rnn_type):
    In, H = 7, 5
    G = (4 if rnn_type == "lstm" else 3) * H
    shapes = {"weight_ih_l0": (G, In), "weight_hh_l0": (G, H), "bias_ih_l0": (G,), "bias_hh_l0": (G,)}
    uni = L.make_rnn(rnn_type, In, H, False, impl=impl)
    assert {q.name: tuple(q.shape) for q in uni.get_parameters()} == shapes
    bi = L.make_rnn(rnn_type, In, H, True, impl=impl)
    expect = dict(shapes, **{k + "_reverse": v for k, v in shapes.items()})
    assert {q.name: tuple(q.shape) for q in bi.get_parameters()} == expect


def test_rnn_param_names_nested_identical():
    class Model(nn.Cell):
        def __init__(self, impl):
            super().__init__()
            self.conv = L.make_conv2d(1, 2, (3, 3), (1, 1), (1, 1, 1, 1), impl=impl)
            self.rnns = nn.CellList([L.make_rnn("lstm", 4, 3, True, impl=impl),
                                     L.make_rnn("gru", 6, 3, False, impl=impl)])

    names = {impl: sorted(Model(impl).parameters_dict()) for impl in ("plain", "fast")}
    assert names["plain"] == names["fast"]
    assert "rnns.0.weight_hh_l0_reverse" in names["fast"] and "conv.weight" in names["fast"]


@pytest.mark.parametrize("impl", ["plain", "fast"])
@pytest.mark.parametrize("rnn_type", ["lstm", "gru"])
def test_rnn_padding_zero_and_reverse_respects_lengths(impl, rnn_type):
    In, H = 5, 4
    cell = L.make_rnn(rnn_type, In, H, True, impl=impl)
    x, lens = rnn_inputs(In=In)
    y = cell(x, lens).asnumpy()
    for b, n in enumerate(lens.asnumpy()):
        assert np.all(y[b, n:] == 0.0), "padded frames must be 0"
        assert np.abs(y[b, :n]).min() > 0.0
    # append 4 frames of garbage: valid frames (both directions) must not change
    xn = x.asnumpy()
    garbage = 100.0 * np.random.default_rng(9).standard_normal((3, 4, In)).astype(np.float32)
    x2 = np.concatenate([xn, garbage], axis=1)
    for b, n in enumerate(lens.asnumpy()):        # also garbage in the row's own padding
        x2[b, n:] = 50.0
    y2 = cell(Tensor(x2), lens).asnumpy()
    assert_close(y2[:, :7], y, "output with extra padding")
    assert np.all(y2[:, 7:] == 0.0)


def test_rnn_reverse_starts_at_last_valid_frame():
    """The reverse direction's output at a row's last valid frame sees only that frame."""
    In, H = 5, 4
    cell = L.make_rnn("lstm", In, H, True, impl="fast")
    x, lens = rnn_inputs(In=In)
    y = cell(x, lens).asnumpy()
    xn = x.asnumpy()
    for b, n in enumerate(lens.asnumpy()):
        one = cell(Tensor(xn[b:b + 1, n - 1:n]), Tensor(np.array([1], np.int32))).asnumpy()
        assert_close(y[b, n - 1, H:], one[0, 0, H:], "reverse at last frame")


def test_rnn_zero_length_row_and_padding_gradients():
    In, H = 5, 4
    cell = L.make_rnn("gru", In, H, True, impl="fast")
    x, _ = rnn_inputs(In=In)
    lens = Tensor(np.array([7, 0, 2], np.int32))
    out, gx, _ = outputs_and_grads(cell, (x, lens), np.ones((3, 7, 2 * H), np.float32))
    assert np.all(out[1] == 0.0) and np.all(out[2, 2:] == 0.0)
    assert np.all(gx[1] == 0.0) and np.all(gx[2, 2:] == 0.0), "padding must get no gradient"


@pytest.mark.parametrize("rnn_type", ["lstm", "gru"])
def test_rnn_under_jit(rnn_type):
    In, H = 5, 4
    cell = L.make_rnn(rnn_type, In, H, True, impl="fast")
    x, lens = rnn_inputs(In=In)

    def loss(a, n):
        return (cell(a, n) ** 2).sum()

    g = ms.value_and_grad(loss, 0, cell.trainable_params())
    v0, (gx0, gp0) = g(x, lens)
    v1, (gx1, gp1) = ms.jit(g)(x, lens)
    assert_close(v1.asnumpy(), v0.asnumpy(), "loss")
    assert_close(gx1.asnumpy(), gx0.asnumpy(), "dx")
    for a, b in zip(gp1, gp0):
        assert_close(a.asnumpy(), b.asnumpy(), "dparam")


def test_rnn_lengths_default_to_full():
    cell = L.make_rnn("lstm", 5, 4, True, impl="fast")
    x, _ = rnn_inputs(In=5)
    full = Tensor(np.full(3, 7, np.int32))
    assert_close(cell(x).asnumpy(), cell(x, full).asnumpy(), "lengths=None")


def test_make_rnn_rejects_bad_args():
    with pytest.raises(ValueError):
        L.make_rnn("rnn", 3, 2, False)
    with pytest.raises(ValueError):
        L.make_rnn("lstm", 3, 2, False, impl="nope")
