"""Export a checkpoint (MindIR, ONNX, AIR) and verify the exported graph against it.

The fast CPU kernels are MindSpore Custom ops running Python code, which a serialised graph
cannot carry; they have plain twins with the same parameters (`model.*_impl=plain`), so the
export is built from the plain model and then compared with the checkpoint's model on real
utterances: the export is accepted only if max |difference| of the logits <= tolerance.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional

import mindspore as ms
import numpy as np
from mindspore import nn
from omegaconf import OmegaConf

from ds2exp.training.checkpoint import load_checkpoint
from ds2exp.config import enum_value

log = logging.getLogger("ds2exp.export")
SUFFIX = {"MINDIR": ".mindir", "ONNX": ".onnx", "AIR": ".air"}



class ExportError(Exception):
    pass


@dataclass
class ExportResult:
    path: Path
    max_abs_diff: Optional[float]
    utterances: int
    frames: int


class _Inference(nn.Cell):
    """Graph to export: features (1, 161, T) -> log-probabilities (1, T', 29), full length."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def construct(self, x):
        lengths = ms.ops.fill(ms.int32, (x.shape[0],), x.shape[2])
        logits, _ = self.model(x, lengths)
        return ms.ops.log_softmax(logits, -1)


def build_from_checkpoint(loaded, fallback_model_cfg, impl: Optional[str] = None):
    from ds2exp.evaluation.compare import model_config_for
    from ds2exp.models.deepspeech2 import build_model, load_state

    mcfg = OmegaConf.create(OmegaConf.to_container(model_config_for(loaded, fallback_model_cfg), enum_to_str=True))
    if impl:
        mcfg.conv_impl = impl
        mcfg.rnn_impl = impl
    model = build_model(mcfg)
    load_state(model, loaded.model_state)
    model.set_train(False)
    return model


def verification_inputs(cfg, count: int) -> List[np.ndarray]:
    from ds2exp.evaluation.compare import build_eval_loader

    loader = build_eval_loader(cfg, cfg.split)
    feats = []
    for ex in loader.split.examples[:count]:
        feats.append(loader.cache.get(ex.utt.audio_path))
    if not feats:
        raise ExportError(f"no utterance to verify with in the {cfg.split} split")
    return feats


def export_checkpoint(cfg) -> ExportResult:
    if not cfg.checkpoint:
        raise ExportError("give checkpoint=PATH")
    from ds2exp.evaluation.compare import resolve_checkpoint

    path = resolve_checkpoint(cfg.checkpoint, announce=log.info)
    loaded = load_checkpoint(path)
    fmt = enum_value(cfg.format)
    out = Path(cfg.output) if cfg.output else path.with_suffix(SUFFIX[fmt])
    feats = verification_inputs(cfg, max(1, int(cfg.verify_utterances)))
    frames = int(cfg.frames) or max(f.shape[1] for f in feats)
    reference = _Inference(build_from_checkpoint(loaded, cfg.model))  # the checkpoint as trained
    plain = _Inference(build_from_checkpoint(loaded, cfg.model, impl="plain"))
    plain.set_train(False)
    reference.set_train(False)

    def pad(f):
        x = np.zeros((1, f.shape[0], frames), np.float32)
        x[0, :, : min(frames, f.shape[1])] = f[:, :frames]
        return x

    out.parent.mkdir(parents=True, exist_ok=True)
    example = ms.Tensor(pad(feats[0]))
    try:
        ms.export(plain, example, file_name=str(out.with_suffix("")), file_format=fmt)
    except Exception as exc:  # report MindSpore's own reason for formats it cannot write here
        raise ExportError(f"MindSpore cannot export this model as {fmt}: {str(exc).strip().splitlines()[0][:300]}") \
            from exc
    if not out.exists():
        raise ExportError(f"MindSpore reported success but {out} was not written")
    if fmt != "MINDIR":
        return ExportResult(out, None, 0, frames)  # only MindIR can be loaded back by MindSpore itself
    graph = nn.GraphCell(ms.load(str(out)))
    worst = 0.0
    for f in feats:
        x = ms.Tensor(pad(f))
        want = reference(x).asnumpy()
        got = graph(x).asnumpy()
        worst = max(worst, float(np.max(np.abs(want - got))))
    return ExportResult(out, worst, len(feats), frames)
