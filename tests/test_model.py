"""Model variants exposed in config build, run, and name their parameters like the reference."""
from pathlib import Path

import mindspore as ms
import numpy as np
import pytest

from ds2exp.cli import check_overrides
from ds2exp.models.deepspeech2 import DeepSpeech2, build_model, count_parameters, parameter_groups


@pytest.mark.parametrize("rnn_type, merge, activation, bn, bidirectional", [
    ("lstm", "sum", "hardtanh", True, True),
    ("gru", "concat", "tanh", False, True),
    ("lstm", "sum", "relu", True, False),
])
def test_variants_forward(rnn_type, merge, activation, bn, bidirectional):
    m = DeepSpeech2(conv_channels=2, rnn_type=rnn_type, rnn_layers=2, rnn_hidden=8, merge=merge,
                    activation=activation, batch_norm=bn, bidirectional=bidirectional)
    x = ms.Tensor(np.random.default_rng(0).standard_normal((2, 161, 40)).astype(np.float32))
    logits, lengths = m(x, ms.Tensor(np.array([40, 25], np.int32)))
    assert logits.shape == (2, 20, 29)
    assert lengths.asnumpy().tolist() == [20, 13]
    names = [n for n, _ in m.parameters_and_names()]
    assert "RNN.lstms.1.weight_hh_l0" in names and "fc.module.weight" in names
    assert ("conv.bn1.gamma" in names) == bn
    assert ("RNN.lstms.0.weight_ih_l0_reverse" in names) == bidirectional
    in_size = dict(m.parameters_and_names())["RNN.lstms.1.weight_ih_l0"].shape[1]
    assert in_size == (16 if (merge == "concat" and bidirectional) else 8)


def test_config_presets_build():
    cfg = check_overrides(["model=ds2_small"])
    m = build_model(cfg.model)
    assert count_parameters(m) > 5_000_000
    groups = parameter_groups(m)
    assert set(groups) == {"conv1", "conv2", "rnn0", "rnn1", "rnn2", "fc"}


def test_rnn_block_name_lowercase_spelling():
    m = DeepSpeech2(conv_channels=2, rnn_layers=1, rnn_hidden=4, rnn_block_name="rnn")
    assert any(n.startswith("rnn.lstms.0.") for n, _ in m.parameters_and_names())


def test_every_model_preset_and_the_quickstart_command_compose():
    from ds2exp.config import config_dir
    from ds2exp.quickstart import DEFAULT_OVERRIDES

    names = sorted(p.stem for p in (Path(config_dir()) / "model").glob("*.yaml"))
    assert {"ds2_tiny", "ds2_tiny_gru", "ds2_small", "ds2_reference"} <= set(names)
    for name in names:
        assert check_overrides([f"model={name}"]).model.name == name
    cfg = check_overrides(DEFAULT_OVERRIDES)
    assert (cfg.model.name, str(cfg.model.rnn_type.value), cfg.model.rnn_hidden) == ("ds2_tiny_gru", "gru", 256)
    assert cfg.dataset.batch_size == 8 and cfg.trainer.max_minutes == 10
    assert str(cfg.optimizer.schedule.value) == "warmup_cosine" and cfg.optimizer.lr == 1.5e-3
    assert count_parameters(build_model(cfg.model)) == 1_715_448  # as the training run logged


# the plain (stock MindSpore) model takes 6-10 s a case; its other activations run with the slow tests
@pytest.mark.parametrize("impl, activation", [
    *[("fast", a) for a in ("hardtanh", "tanh", "relu")], ("plain", "hardtanh"),
    pytest.param("plain", "tanh", marks=pytest.mark.slow), pytest.param("plain", "relu", marks=pytest.mark.slow)])
def test_logits_do_not_depend_on_batch_padding(impl, activation):
    """An utterance's logits (eval mode) are the same alone and padded next to a longer one:
    conv1's output is masked past each length, and the RNNs read only valid frames."""
    m = DeepSpeech2(conv_channels=3, rnn_type="gru", rnn_layers=2, rnn_hidden=8, activation=activation,
                    conv_impl=impl, rnn_impl=impl)
    m.set_train(False)
    rng = np.random.default_rng(4)
    short = rng.standard_normal((161, 30)).astype(np.float32) * 3
    alone, _ = m(ms.Tensor(short[None]), ms.Tensor(np.array([30], np.int32)))
    batch = np.zeros((2, 161, 64), np.float32)
    batch[0, :, :30] = short
    batch[1] = rng.standard_normal((161, 64)).astype(np.float32) * 3
    padded, lengths = m(ms.Tensor(batch), ms.Tensor(np.array([30, 64], np.int32)))
    n = int(lengths.asnumpy()[0])
    assert n == 15
    np.testing.assert_allclose(padded.asnumpy()[0, :n], alone.asnumpy()[0, :n], rtol=1e-4, atol=1e-5)


def test_hardtanh_is_clamp_0_20_with_its_gradient():
    from ds2exp.models.deepspeech2 import Activation

    x = np.array([-5.0, -1e-3, 1e-3, 0.7, 7.3, 19.99, 20.01, 50.0], np.float32).reshape(1, 1, 1, 8)
    act = Activation("hardtanh")
    y = act(ms.Tensor(x)).asnumpy()
    np.testing.assert_allclose(y, np.clip(x, 0, 20), rtol=1e-6, atol=1e-6)
    g = ms.grad(lambda a: act(a).sum())(ms.Tensor(x)).asnumpy()
    np.testing.assert_allclose(g.ravel(), [0, 0, 1, 1, 1, 1, 0, 0], atol=1e-6)
    mask = ms.Tensor(np.array([1, 1, 1, 0, 1, 1, 0, 1], np.float32).reshape(1, 1, 1, 8))
    ym = act(ms.Tensor(x), mask).asnumpy()
    np.testing.assert_allclose(ym, np.clip(x, 0, 20) * mask.asnumpy(), rtol=1e-6, atol=1e-6)
