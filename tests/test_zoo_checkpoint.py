"""MindSpore <= 1.5 zoo checkpoints: flat cuDNN-layout LSTM weights (RNN.weightN) convert on load."""
import logging

import mindspore as ms
import numpy as np
import pytest

from ds2exp.models.deepspeech2 import DeepSpeech2, load_state
from ds2exp.models.zoo_checkpoint import FlatLayoutError, convert_flat_rnn
from ds2exp.checkpoints.io import load_checkpoint
from tests.helpers.models import cudnn_flat

LAYERS, HIDDEN = 2, 8


def small_lstm_model(seed):
    ms.set_seed(seed)
    return DeepSpeech2(conv_channels=2, activation="tanh", rnn_layers=LAYERS, rnn_hidden=HIDDEN,
                       conv_impl="plain", rnn_impl="fast")  # the plain RNN takes ~25 s here


def write_flat_checkpoint(model, path):
    """The model's weights saved as a MindSpore <= 1.5 zoo checkpoint: RNN.weight0.. instead of per-gate."""
    params = {n: p.asnumpy() for n, p in model.parameters_and_names()}
    entries = [{"name": n, "data": ms.Tensor(v)} for n, v in params.items() if not n.startswith("RNN.lstms.")]
    entries += [{"name": f"RNN.weight{i}", "data": ms.Tensor(cudnn_flat(params, i))} for i in range(LAYERS)]
    ms.save_checkpoint(entries, str(path))
    return params


def test_flat_checkpoint_gives_the_per_gate_models_logits(tmp_path, caplog):
    original = small_lstm_model(1)
    rng = np.random.default_rng(0)
    for name, p in original.parameters_and_names():  # known, distinct weights (biases nonzero)
        low = 0.5 if "moving_variance" in name else -0.3
        p.set_data(ms.Tensor(rng.uniform(low, low + 0.6, p.shape).astype(np.float32)))
    params = write_flat_checkpoint(original, tmp_path / "zoo_ms15.ckpt")
    loaded = load_checkpoint(tmp_path / "zoo_ms15.ckpt")
    assert "RNN.weight0" in loaded.model_state and not any("weight_ih" in k for k in loaded.model_state)

    converted = small_lstm_model(2)
    caplog.set_level(logging.INFO, logger="ds2exp.models.zoo_checkpoint")
    load_state(converted, loaded.model_state)
    assert any("converted 2 flat LSTM weights" in r.getMessage() for r in caplog.records)
    got = {n: p.asnumpy() for n, p in converted.parameters_and_names()}
    for name, value in params.items():
        np.testing.assert_array_equal(got[name], value, err_msg=name)

    original.set_train(False)
    converted.set_train(False)
    x = ms.Tensor(rng.standard_normal((2, 161, 60)).astype(np.float32))
    lengths = ms.Tensor(np.array([60, 47], np.int32))
    a = original(x, lengths)[0].asnumpy()
    b = converted(x, lengths)[0].asnumpy()
    diff = float(np.max(np.abs(a - b)))
    print(f"flat-layout checkpoint: converted logits vs per-gate original, max |diff| = {diff:.3g}")
    assert diff <= 1e-6


def test_layout_matches_mindspore_flat_lstm_kernel():
    """MindSpore's own flat-weight LSTM op (ops.LSTM, the kernel nn.LSTM <= 1.5 called) reads a
    one-direction vector as W_ih, W_hh, then the bias: with b_hh = 0 that is the cuDNN layout, so the
    converted per-gate layer must give the op's output."""
    from ds2exp.models.layers import make_rnn

    In, H, T, B = 6, 5, 9, 2
    rng = np.random.default_rng(3)
    per_gate = {"RNN.lstms.0.weight_ih_l0": rng.uniform(-0.5, 0.5, (4 * H, In)),
                "RNN.lstms.0.weight_hh_l0": rng.uniform(-0.5, 0.5, (4 * H, H)),
                "RNN.lstms.0.bias_ih_l0": rng.uniform(-0.5, 0.5, (4 * H,)),
                "RNN.lstms.0.bias_hh_l0": np.zeros(4 * H)}
    per_gate = {k: v.astype(np.float32) for k, v in per_gate.items()}
    flat = np.concatenate([per_gate[k].reshape(-1) for k in per_gate]).reshape(-1, 1, 1)
    x = rng.standard_normal((T, B, In)).astype(np.float32)
    h0 = ms.Tensor(np.zeros((1, B, H), np.float32))
    kernel = ms.ops.LSTM(In, H, 1, True, False, 0.0)(ms.Tensor(x), h0, h0, ms.Tensor(flat))[0].asnumpy()

    layer = make_rnn("lstm", In, H, bidirectional=False, impl="plain")
    shapes = {f"RNN.lstms.0.{n}": tuple(p.shape) for n, p in layer.parameters_and_names()}
    state = convert_flat_rnn({"RNN.weight0": flat}, shapes)
    for n, p in layer.parameters_and_names():
        p.set_data(ms.Tensor(state[f"RNN.lstms.0.{n}"]))
    ours = layer(ms.Tensor(x.transpose(1, 0, 2)), ms.Tensor(np.full(B, T, np.int32))).asnumpy().transpose(1, 0, 2)
    diff = float(np.max(np.abs(ours - kernel)))
    print(f"converted layer vs MindSpore's flat-weight LSTM kernel: max |diff| = {diff:.3g}")
    assert diff <= 1e-5


def test_wrong_size_names_the_sizes():
    model = small_lstm_model(4)
    shapes = {n: tuple(p.shape) for n, p in model.parameters_and_names()}
    with pytest.raises(FlatLayoutError, match=r"RNN.weight1: 10 values, but the model's layer needs \d+"):
        convert_flat_rnn({"RNN.weight1": np.zeros((10, 1, 1), np.float32)}, shapes)
    with pytest.raises(FlatLayoutError, match="no RNN layer 7"):
        convert_flat_rnn({"RNN.weight7": np.zeros((10, 1, 1), np.float32)}, shapes)
