"""Untrusted files: nothing unpickles, servers bind localhost, checkpoints apply only by name and shape."""
from __future__ import annotations

import numpy as np
import pytest

from tests.helpers import ROOT

UNSAFE = [r"\bpickle\.loads?\(", r"\bcPickle\b", r"\bcloudpickle\b", r"\bdill\b", r"\bjoblib\.load\(",
          r"allow_pickle\s*=\s*True", r"\btorch\.load\(", r"\byaml\.load\((?![^)]*SafeLoader)", r"\bmarshal\.loads?\(",
          r"\bshelve\.open\(", r"\beval\(", r"\bexec\("]


def _sources():
    files = sorted((ROOT / "ds2exp").rglob("*.py")) + sorted((ROOT / "bench").rglob("*.py"))
    return files + [ROOT / "train.py", ROOT / "evaluate.py", ROOT / "export.py"]


def test_nothing_deserialises_user_files_unsafely():
    """No pickle/torch.load/unsafe YAML/eval anywhere in the package, the scripts or the bench; every
    np.load says allow_pickle=False. Checkpoints are MindSpore protobuf, loaded by name and shape."""
    import re

    hits = []
    for path in _sources():
        text = path.read_text()
        for pattern in UNSAFE:
            for m in re.finditer(pattern, text):
                line = text[: m.start()].count("\n") + 1
                hits.append(f"{path.relative_to(ROOT)}:{line}: {pattern}")
        for m in re.finditer(r"\bnp\.load\(([^)]*)\)", text):
            if "allow_pickle=False" not in m.group(1):
                hits.append(f"{path.relative_to(ROOT)}: np.load without allow_pickle=False")
    assert not hits, "\n".join(hits)


def test_servers_bind_localhost_only():
    makefile = (ROOT / "Makefile").read_text()
    ui = [ln for ln in makefile.splitlines() if "mlflow ui" in ln or "mlflow server" in ln]
    assert ui and all("--host 127.0.0.1" in ln for ln in ui), ui
    for path in _sources():
        assert "0.0.0.0" not in path.read_text(), path


def test_checkpoint_with_foreign_names_or_shapes_is_refused(tmp_path):
    """A checkpoint is only ever applied by matching names and shapes: anything else is an error."""
    import mindspore as ms

    from ds2exp.models.deepspeech2 import load_state
    from ds2exp.checkpoints.io import CheckpointError, load_checkpoint
    from tests.helpers.models import tiny_model

    model = tiny_model()
    before = {n: p.asnumpy().copy() for n, p in model.parameters_and_names()}
    state = {n: np.ones_like(v) for n, v in before.items()}
    state["conv.conv1.weight"] = np.ones((3, 3), np.float32)
    state["fc.payload"] = np.ones(3, np.float32)
    bogus = tmp_path / "bogus.ckpt"
    ms.save_checkpoint([{"name": n, "data": ms.Tensor(v)} for n, v in state.items()], str(bogus))
    with pytest.raises(ValueError) as err:
        load_state(model, load_checkpoint(bogus).model_state)
    assert "shape mismatches: conv.conv1.weight" in str(err.value) and "not in model: fc.payload" in str(err.value)
    for n, p in model.parameters_and_names():  # refused as a whole: nothing was applied
        np.testing.assert_array_equal(p.asnumpy(), before[n])
    junk = tmp_path / "junk.ckpt"
    junk.write_bytes(b"\x80\x04\x95" + b"cos\nsystem\n(S'echo pwned'\ntR." * 10)  # a pickle, not a checkpoint
    with pytest.raises(CheckpointError, match="not a readable MindSpore checkpoint"):
        load_checkpoint(junk)
