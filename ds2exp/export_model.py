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
    frames = int(cfg.frames) or None
    feats = verification_inputs(cfg, max(1, int(cfg.verify_utterances)))
    graph = InferenceGraph(graph_model(loaded, cfg.model))
    graph.set_train(False)

    out.parent.mkdir(parents=True, exist_ok=True)
    inputs = (ms.Tensor(shape=[None, feats[0].shape[0], frames], dtype=ms.float32),
              ms.Tensor(shape=[None], dtype=ms.int32))
    info = json.dumps(export_info(loaded, cfg.model, frames))

    def add_info(proto):
        proto.user_info[INFO_KEY] = info

    t0 = time.perf_counter()
    try:
        kwargs = {"custom_func": add_info} if fmt == "MINDIR" else {}
        ms.export(graph, *inputs, file_name=str(out.with_suffix("")), file_format=fmt, **kwargs)
    except Exception as exc:  # report MindSpore's own reason for formats it cannot write here
        raise ExportError(f"MindSpore cannot export this model as {fmt}: {str(exc).strip().splitlines()[0][:300]}") \
            from exc
    export_seconds = time.perf_counter() - t0
    if not out.exists():
        raise ExportError(f"MindSpore reported success but {out} was not written")
    if fmt != "MINDIR":
        return ExportResult(out, None, 0, frames, export_seconds=export_seconds)
    t0 = time.perf_counter()
    worst, kernel_worst, lengths = _verify(out, loaded, cfg.model, feats, frames)
    return ExportResult(out, worst, len(feats), frames, lengths, kernel_worst, export_seconds,
                        time.perf_counter() - t0)


def _verify(out: Path, loaded, model_cfg, feats: List[np.ndarray], frames: Optional[int]):
    """Run the written file at each utterance's length and on all of them as one padded batch, against
    the checkpoint's model with MindSpore's plain ops; also measure the training kernels against those."""
    reference = InferenceGraph(build_from_checkpoint(loaded, model_cfg, impl="plain"))
    trained = InferenceGraph(build_from_checkpoint(loaded, model_cfg))  # as configured (training kernels)
    reference.set_train(False)
    trained.set_train(False)
    exported = load_graph(out, frames)
    worst = kernel_worst = 0.0
    lengths = []
    for batch in [[f] for f in feats] + ([feats] if len(feats) > 1 else []):
        x, n = _batch(batch, frames)
        xt, nt = ms.Tensor(x), ms.Tensor(n)
        want, out_lengths = (t.asnumpy() for t in reference(xt, nt))
        got = exported(xt, nt)[0].asnumpy()
        if got.shape != want.shape:
            raise ExportError(f"the exported graph returned shape {got.shape} for input {x.shape}, the model "
                              f"{want.shape}")
        worst = max(worst, _max_diff(want, got, out_lengths))
        kernel_worst = max(kernel_worst, _max_diff(want, trained(xt, nt)[0].asnumpy(), out_lengths))
        if len(batch) == 1:
            lengths.append(int(n[0]))
    return worst, kernel_worst, lengths
