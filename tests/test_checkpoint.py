"""Checkpoints: atomic writes, damaged files detected, reference (model zoo) names load."""

import mindspore as ms
import numpy as np
import pytest

from ds2exp.models.deepspeech2 import DeepSpeech2, count_parameters, load_state
from ds2exp.checkpoints.io import CheckpointError, find_latest_checkpoint, load_checkpoint, save_checkpoint
from tests.helpers import ROOT
from tests.helpers.models import tiny_model


def test_save_load_roundtrip_with_meta(tmp_path):
    m = tiny_model()
    p = save_checkpoint(tmp_path / "c.ckpt", m, meta={"step": 7, "config": {"a": [1, 2]}})
    assert p.is_file() and not list(tmp_path.glob(".*tmp*"))
    c = load_checkpoint(p)
    assert c.meta == {"step": 7, "config": {"a": [1, 2]}}
    for name, param in m.parameters_and_names():
        np.testing.assert_array_equal(c.model_state[name], param.asnumpy())


def test_truncated_checkpoint_is_detected_and_previous_used(tmp_path):
    m = tiny_model()
    save_checkpoint(tmp_path / "last.prev.ckpt", m, meta={"step": 1})
    last = save_checkpoint(tmp_path / "last.ckpt", m, meta={"step": 2})
    data = last.read_bytes()
    last.write_bytes(data[: len(data) // 3])
    with pytest.raises(CheckpointError, match="last.ckpt"):
        load_checkpoint(last)
    assert find_latest_checkpoint(tmp_path) == tmp_path / "last.prev.ckpt"
    assert load_checkpoint(tmp_path).meta["step"] == 1


def test_disk_full_names_the_path_and_keeps_previous(tmp_path):
    """A write that runs out of space (file size limit in a child process) fails clearly."""
    import subprocess
    import sys
    import textwrap

    m = tiny_model(rnn_hidden=64)
    good = save_checkpoint(tmp_path / "last.ckpt", m, meta={"step": 1})
    before = good.read_bytes()
    script = textwrap.dedent(f"""
        import resource, signal
        import ds2exp
        from ds2exp.checkpoints.io import save_checkpoint, CheckpointError
        from tests.helpers.models import tiny_model
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (20000, 20000))
        try:
            save_checkpoint({str(good)!r}, tiny_model(rnn_hidden=64), meta={{"step": 2}})
        except CheckpointError as e:
            print("ERR", e)
    """)
    # `python -c` puts its working directory, the repository root, on the path for `tests`
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert f"ERR could not write checkpoint {good}" in r.stdout, r.stdout + r.stderr
    assert good.read_bytes() == before
    assert load_checkpoint(good).meta["step"] == 1
    assert not list(tmp_path.glob(".*tmp*"))


def test_reference_architecture_and_model_zoo_names_load(tmp_path):
    """A checkpoint written with the reference names/shapes (and `rnn.` spelling) loads."""
    ref = DeepSpeech2(conv_channels=32, activation="tanh", rnn_layers=5, rnn_hidden=1024, conv_impl="plain",
                      rnn_impl="plain")
    assert count_parameters(ref) == 86_608_096
    rng = np.random.default_rng(0)
    shapes = {"conv.conv1.weight": (32, 1, 41, 11), "conv.conv2.weight": (32, 32, 21, 11),
              "fc.module.weight": (29, 1024)}
    for i in range(5):
        inp = 1312 if i == 0 else 1024
        for sfx in ("", "_reverse"):
            shapes[f"rnn.lstms.{i}.weight_ih_l0{sfx}"] = (4096, inp)
            shapes[f"rnn.lstms.{i}.weight_hh_l0{sfx}"] = (4096, 1024)
            shapes[f"rnn.lstms.{i}.bias_ih_l0{sfx}"] = (4096,)
            shapes[f"rnn.lstms.{i}.bias_hh_l0{sfx}"] = (4096,)
    for bn in ("bn1", "bn2"):
        for k in ("gamma", "beta", "moving_mean", "moving_variance"):
            shapes[f"conv.{bn}.{k}"] = (32,)
    entries = [{"name": n, "data": ms.Tensor(rng.standard_normal(s).astype(np.float32))} for n, s in shapes.items()]
    path = tmp_path / "zoo.ckpt"
    ms.save_checkpoint(entries, str(path))
    loaded = load_checkpoint(path)
    load_state(ref, loaded.model_state)
    got = dict(ref.parameters_and_names())
    np.testing.assert_array_equal(got["RNN.lstms.3.weight_hh_l0_reverse"].asnumpy(),
                                  loaded.model_state["rnn.lstms.3.weight_hh_l0_reverse"])
    np.testing.assert_array_equal(got["fc.module.weight"].asnumpy(), loaded.model_state["fc.module.weight"])


def test_mismatched_architecture_lists_every_mismatch(tmp_path):
    small, other = tiny_model(), tiny_model(rnn_hidden=16, rnn_layers=2)
    p = save_checkpoint(tmp_path / "o.ckpt", other)
    with pytest.raises(ValueError) as err:
        load_state(small, load_checkpoint(p).model_state)
    msg = str(err.value)
    assert "RNN.lstms.0.weight_hh_l0: checkpoint (64, 16) vs model (32, 8)" in msg
    assert "not in model: RNN.lstms.1." in msg


def _record_ends(path):
    from ds2exp.checkpoints.io import _fields

    data = path.read_bytes()
    return data, [stop for _, _, stop in _fields(data, 0, len(data))]


def test_truncation_at_a_record_boundary_and_a_flipped_byte_are_detected(tmp_path):
    """MindSpore loads a file cut between two records; the SHA-256 record catches it."""
    from ds2exp.checkpoints.io import verify_checkpoint

    good = save_checkpoint(tmp_path / "good.ckpt", tiny_model(), meta={"step": 9})
    info = verify_checkpoint(good)
    assert info.checksum is True and info.step == 9 and info.shapes["fc.module.weight"] == (29, 8)
    data, ends = _record_ends(good)
    for cut in (ends[0], ends[len(ends) // 2], ends[-2]):  # after the meta, mid-way, just before the checksum
        p = tmp_path / f"cut{cut}.ckpt"
        p.write_bytes(data[:cut])
        ms.load_checkpoint(str(p))  # MindSpore alone does not notice
        with pytest.raises(CheckpointError, match=r"truncated checkpoint \(its SHA-256 record is missing\)"):
            load_checkpoint(p)
    flipped = bytearray(data)
    flipped[ends[3] - 5] ^= 0xFF  # inside a tensor's bytes
    (tmp_path / "flipped.ckpt").write_bytes(bytes(flipped))
    with pytest.raises(CheckpointError, match="SHA-256 does not match"):
        load_checkpoint(tmp_path / "flipped.ckpt")
    # a checkpoint without the record (MindSpore's own, the model zoo's) is read as before
    plain = tmp_path / "plain.ckpt"
    ms.save_checkpoint(tiny_model(), str(plain))
    assert verify_checkpoint(plain).checksum is None and load_checkpoint(plain).model_state


def test_run_directory_falls_back_to_the_newest_intact_checkpoint_and_says_which(tmp_path, caplog):
    """Disk full mid-write: last.ckpt gone or cut at a record boundary; last.prev.ckpt is older than a
    complete best-*: resume takes the best-* (newest intact by step), not last.prev blindly."""
    d = tmp_path / "run" / "checkpoints"
    m = tiny_model()
    save_checkpoint(d / "last.prev.ckpt", m, meta={"step": 5})
    save_checkpoint(d / "best-step0000010-cer58.12.ckpt", m, meta={"step": 10})
    save_checkpoint(d / "best-step0000004-cer70.00.ckpt", m, meta={"step": 4})
    assert load_checkpoint(tmp_path / "run").meta["step"] == 10  # last.ckpt missing (the write failed)
    last = save_checkpoint(d / "last.ckpt", m, meta={"step": 12})
    assert load_checkpoint(tmp_path / "run").path == last
    data, ends = _record_ends(last)
    last.write_bytes(data[:ends[len(ends) // 2]])
    caplog.set_level("WARNING", logger="ds2exp.checkpoints.io")
    loaded = load_checkpoint(tmp_path / "run")
    assert loaded.meta["step"] == 10 and loaded.path.name == "best-step0000010-cer58.12.ckpt"
    text = caplog.text
    assert f"skipping damaged checkpoint {last}: truncated checkpoint" in text
    assert "using " + str(d / "best-step0000010-cer58.12.ckpt") + " (step 10), the newest intact checkpoint" in text
