"""The C++ recurrences (ds2exp/kernels/native/recurrence.cc) as MindSpore aot ops: the same results as
the numba kernels, bit for bit the same on any thread count, and the numba/numpy fallback where no
compiler builds them."""
import logging
import os

import mindspore as ms
import numpy as np
import pytest
from mindspore import Tensor

from ds2exp import kernels as K
from ds2exp.kernels import native as KN
from ds2exp.models import layers as L

ms.set_context(mode=ms.PYNATIVE_MODE)
ms.set_device("CPU")

pytestmark = pytest.mark.skipif(KN.library() is None, reason="no C++ compiler builds the native kernels here")

# 9 rows (a block of 8 and one leftover), 40 hidden units (two vector blocks of 16 and a tail of 8,
# so up to 3 threads own units), ragged lengths including 1 and the full 11 frames
B, T, IN, H = 9, 11, 6, 40
LENGTHS = np.array([11, 4, 6, 11, 1, 7, 8, 11, 3], np.int32)


def layer_outputs(rnn_type, bidirectional, native, threads=None, seed=0):
    """y and every gradient of sum(y * dy) for one FastRNN built with the given kernels and threads."""
    old_native = KN.set_native_enabled(native)
    old_threads = K.set_threads(threads) if threads else None
    try:
        ms.set_seed(seed)
        cell = L.make_rnn(rnn_type, IN, H, bidirectional, impl="fast")
        rng = np.random.default_rng(seed)
        x = Tensor(rng.standard_normal((B, T, IN)).astype(np.float32))
        dy = Tensor(rng.standard_normal((B, T, (2 if bidirectional else 1) * H)).astype(np.float32))
        lengths = Tensor(LENGTHS)
        params = cell.trainable_params()
        _, (dx, dps) = ms.value_and_grad(lambda v: (cell(v, lengths) * dy).sum(), 0, params)(x)
        y = cell(x, lengths).asnumpy()
        return cell, [y, dx.asnumpy()] + [g.asnumpy() for g in dps]
    finally:
        KN.set_native_enabled(old_native)
        if threads:
            K.set_threads(old_threads)


@pytest.mark.parametrize("rnn_type", ["lstm", "gru"])
@pytest.mark.parametrize("bidirectional", [True, False], ids=["bi", "uni"])
def test_native_matches_numba(rnn_type, bidirectional):
    cell, native = layer_outputs(rnn_type, bidirectional, native=True)
    assert cell.fused and cell.layer_op.func_type == "aot"
    cell, reference = layer_outputs(rnn_type, bidirectional, native=False)
    assert not cell.fused and cell.scan.func_type == "pyfunc"
    for a, b in zip(native, reference):
        assert a.shape == b.shape
        np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-5 * max(1.0, float(np.abs(b).max())))
    y = native[0]
    assert np.abs(y).max() > 0.01
    short = int(np.argmin(LENGTHS))  # frames past a row's length are zero in the output
    assert np.all(y[short, LENGTHS[short]:] == 0) and np.abs(y[short, :LENGTHS[short]]).max() > 0


@pytest.mark.parametrize("rnn_type", ["lstm", "gru"])
def test_native_results_do_not_depend_on_threads(rnn_type):
    _, one = layer_outputs(rnn_type, True, native=True, threads=1)
    for threads in (2, 3, 8):
        _, many = layer_outputs(rnn_type, True, native=True, threads=threads)
        for a, b in zip(one, many):
            assert np.array_equal(a, b), threads


def test_no_compiler_falls_back_and_says_so(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="ds2exp.kernels.native"):
        assert KN.build(None, tmp_path) is None
        assert KN.build("/bin/false", tmp_path) is None
    assert "no C++ compiler" in caplog.text and "numba/numpy" in caplog.text
    assert "building recurrence.cc failed" in caplog.text
    assert list(tmp_path.iterdir()) == []  # no half-written library left behind


def test_build_once_per_source_and_machine(tmp_path):
    first = KN.build(KN._compiler(), tmp_path)
    assert first is not None and os.path.dirname(first) == str(tmp_path)
    mtime = os.stat(first).st_mtime_ns
    assert KN.build(KN._compiler(), tmp_path) == first
    assert os.stat(first).st_mtime_ns == mtime
    assert [p.name for p in tmp_path.iterdir()] == [os.path.basename(first)]


def test_kernels_time_themselves():
    before = KN.kernel_seconds()
    layer_outputs("lstm", True, native=True)
    after = KN.kernel_seconds()
    assert after["rnn_fwd"] > before["rnn_fwd"] and after["rnn_bwd"] > before["rnn_bwd"]


def test_a_mistyped_split_setting_is_named_and_ignored(monkeypatch, caplog):
    monkeypatch.setenv("DS2EXP_RNN_SPLIT", "unit")
    with caplog.at_level(logging.WARNING, logger="ds2exp.kernels.native"):
        assert KN._split_setting() == "directions"
    assert "DS2EXP_RNN_SPLIT='unit'" in caplog.text
    monkeypatch.setenv("DS2EXP_RNN_SPLIT", "units")
    assert KN._split_setting() == "units"
