"""The step bench: the FLOP counter (bench/flops.py), the arithmetic around the table and the
scaling model (bench/bench_step.py), and (if torch is installed) the PyTorch baseline model
(bench/torch_baseline.py) on tiny shapes. No training step runs here; < 20 s."""
import numpy as np
import pytest

from bench import bench_step as report
from bench import flops as bs
from bench import host


def test_architectures_come_from_the_model_configs():
    tiny = bs.model_arch("ds2_tiny")
    assert (tiny["conv_channels"], tiny["rnn_layers"], tiny["rnn_hidden"], tiny["activation"]) == (8, 2, 192,
                                                                                                   "hardtanh")
    ref = bs.model_arch("ds2_reference")
    assert (ref["conv_channels"], ref["rnn_layers"], ref["rnn_hidden"], ref["merge"]) == (32, 5, 1024, "sum")
    # the model zoo count quoted in conf/model/ds2_reference.yaml
    assert bs.parameter_count(ref) == 86_608_096


def test_parameter_count_matches_the_mindspore_model():
    from ds2exp.models.deepspeech2 import DeepSpeech2, count_parameters

    arch = dict(bs.model_arch("ds2_tiny"), conv_channels=2, rnn_hidden=8, rnn_layers=2)
    assert bs.parameter_count(arch) == count_parameters(DeepSpeech2(**arch))


def test_conv_shapes_match_the_model():
    from ds2exp.models.deepspeech2 import conv_output_bins

    for frames in (1, 2, 99, 100, 300, 1250):
        f1, t1, f2, t2 = bs.conv_shapes(frames)
        assert (f1, f2) == (81, conv_output_bins())
        assert t1 == t2 == (frames - 1) // 2 + 1  # ds2exp.models.deepspeech2.output_lengths


def test_forward_flops_by_hand():
    arch = {"conv_channels": 2, "rnn_layers": 2, "rnn_hidden": 3, "bidirectional": True, "merge": "sum",
            "rnn_type": "lstm", "batch_norm": True, "activation": "tanh"}
    B, T = 2, 10
    f = bs.forward_flops(arch, B, T)
    t2 = 5  # (10 - 1) // 2 + 1
    assert f["conv1"] == 2 * B * 2 * 81 * t2 * 41 * 11
    assert f["conv2"] == 2 * B * 2 * 41 * t2 * 2 * 21 * 11
    G = 4 * 3
    assert f["rnn_input"] == 2 * B * t2 * 2 * G * (2 * 41) + 2 * B * t2 * 2 * G * 3  # layer 2 reads the summed H
    assert f["rnn_recurrent"] == 2 * (2 * B * t2 * 2 * G * 3)
    assert f["fc"] == 2 * B * t2 * 3 * 29
    assert f["total"] == pytest.approx(sum(v for k, v in f.items() if k != "total"))
    assert bs.train_flops(arch, B, T) == pytest.approx(3 * f["total"])
    # concat merge doubles the next layer's input; GRU has 3 gates
    cat = bs.forward_flops(dict(arch, merge="concat"), B, T)
    assert cat["rnn_input"] == 2 * B * t2 * 2 * G * (2 * 41) + 2 * B * t2 * 2 * G * 6
    gru = bs.forward_flops(dict(arch, rnn_type="gru"), B, T)
    assert gru["rnn_recurrent"] == pytest.approx(f["rnn_recurrent"] * 3 / 4)


def test_reference_flops_scale():
    ref = bs.model_arch("ds2_reference")
    f = bs.forward_flops(ref, 4, 400)
    # the five bi-LSTMs dominate; about 155 GFLOP forward for 4 x 4 s
    assert 150e9 < f["total"] < 160e9
    assert f["rnn_input"] + f["rnn_recurrent"] > 0.85 * f["total"]
    # linear in batch
    assert bs.forward_flops(ref, 8, 400)["total"] == pytest.approx(2 * f["total"])


def test_synthetic_batch_is_deterministic_and_padded():
    x, xl, y, yl = bs.synthetic_batch(3, 50, pad_to=80, seed=1)
    assert x.shape == (3, 161, 80) and x.dtype == np.float32
    assert not x[:, :, 50:].any() and x[:, :, :50].any()
    assert list(xl) == [50] * 3 and xl.dtype == np.int32
    assert y.shape == (3, bs.label_length(50)) and y.max() < bs.BLANK and list(yl) == [y.shape[1]] * 3
    x2, _, y2, _ = bs.synthetic_batch(3, 50, seed=1)
    np.testing.assert_array_equal(x2, x[:, :, :50])
    np.testing.assert_array_equal(y2, y)
    # CTC is feasible: output frames >= labels
    for frames in (300, 400):
        assert bs.label_length(frames) <= (frames - 1) // 2 + 1


def test_epoch_projection_and_checks():
    assert bs.epoch_hours(1.0) == pytest.approx(100.6)
    assert bs.epoch_hours(100.6 * 2) == pytest.approx(0.5)
    assert bs.epoch_hours(None) is None and bs.epoch_hours(0.0) is None
    assert report.check("x", 25.0, 20.0, True, ".1f").endswith("PASS")
    assert report.check("x", 1.3, 1.2, False, ".2f").endswith("MISS")
    assert report.check("x", None, 1.2, False, ".2f").endswith("MISS")


def test_scaling_model():
    # T2 = T1 (1 - p/2): p recovered; p = 0 and p = 1 are the bounds
    assert report.amdahl(1.0, 0.6) == pytest.approx(0.8)
    assert report.amdahl(1.0, 1.2) == 0.0 and report.amdahl(1.0, 0.4) == 1.0
    assert report.projected_speedup(0.8, 2) == pytest.approx(1 / 0.6)
    assert report.projected_speedup(1.0, 16) == pytest.approx(16.0)
    # a share that uses at most 2 threads caps the speed-up: p = 1, half of it capped -> 1 / (0.5/16 + 0.5/2)
    assert report.projected_speedup(1.0, 16, capped=0.5) == pytest.approx(1 / (0.5 / 16 + 0.25))
    assert report.projected_speedup(0.5, 2, capped=0.5) == pytest.approx(report.projected_speedup(0.5, 2))
    # the recurrence's row chunks let it use 8 threads at batch 16: a higher cap, a higher ceiling
    assert report.projected_speedup(1.0, 16, capped=0.5, cap=8) == pytest.approx(1 / (0.5 / 16 + 0.5 / 8))


def test_machine_line_names_the_cpu_and_cores():
    line = host.where()
    assert "cores" in line and "load" in line and "Python" in line


def test_plan_covers_the_four_paths():
    rows = report.plan(quick=False)
    assert {(r["model"], r["path"]) for r in rows} == {(m, p) for m in ("ds2_tiny", "ds2_reference")
                                                       for p in ("ds2exp", "graph", "naive", "pytorch")}
    assert all(r["kw"].get("mode") == "graph" for r in rows if r["path"] == "graph")
    for r in rows:
        if r["path"] == "naive":
            assert r["batch"] == 1 and r["padded"] == bs.NAIVE_FRAMES
        else:
            assert (r["batch"], r["frames"]) == report.SHAPES[r["model"]]
            assert r["kw"]["threads"] == host.cores()  # ds2exp and PyTorch on the same threads


def test_torch_baseline_model_on_tiny_shapes():
    torch = pytest.importorskip("torch")
    from bench.torch_baseline import torch_model

    arch = dict(bs.model_arch("ds2_tiny"), conv_channels=2, rnn_hidden=8)
    model = torch_model(arch)
    assert sum(p.numel() for p in model.parameters()) == bs.parameter_count(arch)
    x, xl, y, yl = (torch.from_numpy(a) for a in bs.synthetic_batch(2, 40))
    xl = torch.tensor([40, 30])
    logits, ol = model(x, xl)
    assert logits.shape == (20, 2, 29) and ol.tolist() == [20, 15]
    loss = torch.nn.CTCLoss(blank=bs.BLANK, reduction="none")(logits.log_softmax(-1), y.long(), ol,
                                                               yl.long()).mean()
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
