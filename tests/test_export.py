"""Export: a MindIR that takes any batch of any number of frames with their lengths, checked against the
checkpoint's model at several lengths (export.py's command line is tested in tests/test_evaluate.py)."""
import json
from dataclasses import asdict

import numpy as np
import pytest

from tests.helpers import write_flac

TEXTS = ["open the door", "a small world of sound and light", "go home", "the cat sat on the mat in the warm sun"]


@pytest.fixture(scope="module")
def speech(tmp_path_factory, say):
    """Four utterances of different lengths in a JSON-lines manifest."""
    tmp = tmp_path_factory.mktemp("export")
    with open(tmp / "m.jsonl", "w") as fh:
        for i, text in enumerate(TEXTS):
            y = say(text, "en-us", 160, 50)
            audio = write_flac(tmp / f"u{i}.flac", y)
            fh.write(json.dumps({"id": f"u{i}", "audio_path": str(audio), "transcript": text.upper(),
                                 "duration": len(y) / 16000, "sample_rate": 16000}) + "\n")
    return tmp


def tiny_checkpoint(path, rnn_type: str):
    """A small model whose recurrent weights drive its gates and candidate states into saturation (|x| up
    to ~6), where MindSpore's own Tanh kernel is off by up to 1e-4; saved with its config as train.py does."""
    import mindspore as ms
    from omegaconf import OmegaConf

    from ds2exp.config import FeatureConfig, ModelConfig
    from ds2exp.models.deepspeech2 import build_model
    from ds2exp.checkpoints.io import save_checkpoint

    mcfg = OmegaConf.to_container(OmegaConf.structured(ModelConfig(conv_channels=4, rnn_hidden=32, rnn_layers=2,
                                                                   rnn_type=rnn_type)), enum_to_str=True)
    ms.set_seed(0)
    model = build_model(OmegaConf.create(mcfg))
    for name, p in model.parameters_and_names():
        if "weight_hh" in name or "weight_ih" in name:
            ms.ops.assign(p, p * 4.0)
    return save_checkpoint(path, model, meta={"step": 0, "config": {
        "model": mcfg, "dataset": {"feature": asdict(FeatureConfig())}}})


def export_config(speech, ckpt, out):
    from ds2exp.cli import compose_config

    m = speech / "m.jsonl"
    return compose_config([f"checkpoint={ckpt}", f"output={out}", "dataset=manifest", f"dataset.train_manifest={m}",
                           f"dataset.test_manifest={m}", f"paths.data_dir={speech / 'data'}", "verify_utterances=4",
                           "progress=false"], "export")


@pytest.mark.parametrize("rnn_type", ["lstm", pytest.param("gru", marks=pytest.mark.slow)])
def test_exported_graph_serves_any_length_and_batch(speech, tmp_path, rnn_type):
    import mindspore as ms

    from ds2exp.export_model import InferenceGraph, _batch, build_from_checkpoint, export_checkpoint
    from ds2exp.checkpoints.io import load_checkpoint
    from ds2exp.mindir import load_graph, read_export_info

    ms.runtime.launch_blocking()
    ckpt = tiny_checkpoint(tmp_path / f"{rnn_type}.ckpt", rnn_type)
    cfg = export_config(speech, ckpt, tmp_path / f"{rnn_type}.mindir")
    res = export_checkpoint(cfg)
    print(f"{rnn_type}: exported in {res.export_seconds:.1f} s, checked at {res.lengths} frames and as one padded "
          f"batch in {res.verify_seconds:.1f} s: max |export - checkpoint| = {res.max_abs_diff:.3g}")
    assert len(set(res.lengths)) >= 3 and res.frames is None
    assert res.max_abs_diff <= 1e-5

    # lengths the check did not use: very short, longer than any utterance; batches mixing them
    rng = np.random.default_rng(1)
    long = np.concatenate([rng.standard_normal((161, 300)), rng.standard_normal((161, 311))], 1).astype(np.float32)
    feats = [rng.standard_normal((161, 17)).astype(np.float32), long,
             rng.standard_normal((161, 120)).astype(np.float32)]
    reference = InferenceGraph(build_from_checkpoint(load_checkpoint(ckpt), None))
    graph = load_graph(res.path)
    singles = []
    for f in feats:
        x, n = _batch([f], None)
        got, out_len = (t.asnumpy() for t in graph(ms.Tensor(x), ms.Tensor(n)))
        want = reference(ms.Tensor(x), ms.Tensor(n))[0].asnumpy()
        assert got.shape == (1, (f.shape[1] + 1) // 2, 29) and int(out_len[0]) == got.shape[1]
        assert np.max(np.abs(got - want)) <= 1e-5, (f.shape, np.max(np.abs(got - want)))
        singles.append(got[0])
    x, n = _batch(feats, None)  # one padded batch: each row's valid frames as when it ran alone
    got, out_len = (t.asnumpy() for t in graph(ms.Tensor(x), ms.Tensor(n)))
    for i, single in enumerate(singles):
        assert int(out_len[i]) == single.shape[0]
        assert np.max(np.abs(got[i, : single.shape[0]] - single)) <= 1e-5

    info = read_export_info(res.path)
    assert info["labels"][-1] == "_" and info["blank_index"] == 28 and info["frames"] is None
    assert info["feature"]["window_size"] == 0.02 and info["model"]["rnn_type"] == rnn_type


def test_fixed_length_export_pads_and_masks(speech, tmp_path):
    """frames=N: a graph fixed at N frames; shorter inputs are zero-padded, the lengths input masks them."""
    import mindspore as ms

    from ds2exp.export_model import export_checkpoint
    from ds2exp.transcribe import ExportedModel

    ms.runtime.launch_blocking()
    ckpt = tiny_checkpoint(tmp_path / "lstm.ckpt", "lstm")
    cfg = export_config(speech, ckpt, tmp_path / "fixed.mindir")
    cfg.frames = 400
    res = export_checkpoint(cfg)
    assert res.frames == 400 and res.max_abs_diff <= 1e-5, res
    model = ExportedModel(str(res.path))
    assert model.max_frames == 400
    f = np.random.default_rng(2).standard_normal((161, 230)).astype(np.float32)
    assert model(f).shape == (115, 29)


def _gru_float64(x, lengths, params, hidden):
    """A bidirectional GRU layer (nn.GRU's gates, the model's layout) in float64."""
    def sigmoid(v):
        return 1.0 / (1.0 + np.exp(-v))

    H = hidden
    out = np.zeros(x.shape[:2] + (2 * H,))
    for d, sfx in enumerate(("", "_reverse")):
        w_ih, w_hh, b_ih, b_hh = (params[n + sfx].astype(np.float64)
                                  for n in ("weight_ih_l0", "weight_hh_l0", "bias_ih_l0", "bias_hh_l0"))
        for b, n in enumerate(lengths):
            steps = range(n) if d == 0 else range(n - 1, -1, -1)
            h = np.zeros(H)
            for t in steps:
                gx, gh = w_ih @ x[b, t].astype(np.float64) + b_ih, w_hh @ h + b_hh
                r, z = sigmoid(gx[:H] + gh[:H]), sigmoid(gx[H:2 * H] + gh[H:2 * H])
                c = np.tanh(gx[2 * H:] + r * gh[2 * H:])
                h = c + z * (h - c)
                out[b, t, d * H:(d + 1) * H] = h
    return out


def test_exported_gru_layer_is_as_accurate_as_the_compiled_recurrence(monkeypatch):
    """The export's GRU layer (GraphRNN) and the training kernels' (compiled recurrence) against a float64
    GRU, on weights that keep the gates in [-4, 4], where MindSpore's Sigmoid kernel is up to 8.4e-7 off:
    with it in the gates the exported layer was 1.4e-6 (max) and 1.1e-7 (mean) off, twice the compiled
    recurrence's 4-6e-7 and 4.7e-8. The graph computes its gates as the recurrence does (graph_rnn.py)."""
    import mindspore as ms

    from ds2exp import kernels
    from ds2exp.kernels import rnn as KR
    from ds2exp.models.graph_rnn import GraphRNN

    if not kernels.HAVE_NUMBA:
        pytest.skip("numba not installed")
    monkeypatch.setattr(kernels.settings, "use_numba", True)  # the numpy loops' BLAS products round differently
    In, H, T = 32, 64, 100
    rng = np.random.default_rng(0)
    params = {}
    for sfx in ("", "_reverse"):
        params["weight_ih_l0" + sfx] = (rng.uniform(-1, 1, (3 * H, In)) * 2 / np.sqrt(In)).astype(np.float32)
        params["weight_hh_l0" + sfx] = (rng.uniform(-1, 1, (3 * H, H)) * 2 / np.sqrt(H)).astype(np.float32)
        params["bias_ih_l0" + sfx] = rng.uniform(-1, 1, 3 * H).astype(np.float32)
        params["bias_hh_l0" + sfx] = rng.uniform(-1, 1, 3 * H).astype(np.float32)
    x = rng.standard_normal((2, T, In)).astype(np.float32)
    lengths = np.array([T, T - 13], np.int32)
    want = _gru_float64(x, lengths, params, H)

    exported = GraphRNN("gru", H, True, params)(ms.Tensor(x), ms.Tensor(lengths)).asnumpy()
    stack = [np.stack([params[n], params[n + "_reverse"]]) for n in ("weight_hh_l0", "bias_hh_l0", "bias_ih_l0")]
    xp = np.concatenate([x @ params["weight_ih_l0"].T, x @ params["weight_ih_l0_reverse"].T], -1)
    compiled = KR.gru_forward(xp.astype(np.float32), lengths, *stack)[0]
    for name, got in (("exported", exported), ("compiled", compiled)):
        err = np.abs(got - want)
        print(f"{name}: max {err.max():.3g}, mean {err.mean():.3g}")
        assert err.max() <= 8e-7 and err.mean() <= 7e-8, (name, err.max(), err.mean())
