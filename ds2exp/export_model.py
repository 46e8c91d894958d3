"""Export a checkpoint as a graph that serves any utterance, and check the exported file against it.

The exported MindIR takes features (B, 161, T) float32 and their true lengths (B,) int32, with the
batch B and the number of frames T both free (dynamic axes), and returns log-probabilities
(B, T', 29) and output lengths (B,), T' = (T + 1) // 2. Frames of a row past its length are padding;
nothing valid depends on them. `frames=N` exports a graph fixed at N frames instead (pad to N).

The graph is the model built with MindSpore's own conv ops (the training kernels are Custom ops running
Python, which a serialised graph cannot hold) with each RNN layer replaced by a `GraphRNN` on the same
parameters (ds2exp/models/graph_rnn.py: MindSpore's fused LSTM kernel; for GRUs a loop over time that
stays a loop), so nothing is unrolled per time step: export takes seconds at any length.

Checked: the written file is loaded back as a deployment loads it (`ds2exp.mindir.load_graph`:
`ms.load` + `nn.GraphCell` with dynamic inputs) and run on real utterances of different lengths, each
alone and all as one padded batch, against the checkpoint's model as configured (its training kernels):
max |difference| of the log-probabilities over valid frames must be <= tolerance.

`user_info["ds2exp"]` of the MindIR holds what a deployment needs besides the graph: the feature
settings, the labels and the input layout (`ds2exp.mindir.read_export_info` reads it).
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

import mindspore as ms
import numpy as np
from mindspore import nn, ops
from omegaconf import OmegaConf

from ds2exp.config import enum_value
from ds2exp.data.labels import BLANK_INDEX, LABELS
from ds2exp.models.graph_rnn import use_graph_rnns
from ds2exp.checkpoints.loading import build_from_checkpoint, load_model
from ds2exp.mindir import load_graph, write_export_info

log = logging.getLogger("ds2exp.export")
SUFFIX = {"MINDIR": ".mindir", "ONNX": ".onnx", "AIR": ".air"}


class ExportError(Exception):
    pass


@dataclass
class ExportResult:
    path: Path
    max_abs_diff: Optional[float]  # exported file vs the checkpoint's model
    utterances: int
    frames: Optional[int]  # fixed input length, None: any
    lengths: List[int] = field(default_factory=list)  # the lengths the file was run at
    export_seconds: float = 0.0
    verify_seconds: float = 0.0


class InferenceGraph(nn.Cell):
    """What is exported: (features (B, 161, T), lengths (B,)) -> (log-probabilities (B, T', 29),
    output lengths (B,))."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def construct(self, x, lengths):
        logits, out_lengths = self.model(x, lengths)
        return ops.log_softmax(logits, -1), out_lengths


def export_info(loaded, fallback_model_cfg, frames: Optional[int]) -> dict:
    from ds2exp.checkpoints.io import model_config_for

    meta_cfg = loaded.meta.get("config") or {}
    feature = (meta_cfg.get("dataset") or {}).get("feature")
    model_cfg = OmegaConf.to_container(model_config_for(loaded, fallback_model_cfg), enum_to_str=True)
    return {"format": 1, "inputs": ["features (batch, 161, frames) float32", "lengths (batch,) int32"],
            "outputs": ["log_probs (batch, (frames + 1) // 2, 29) float32", "output_lengths (batch,) int32"],
            "frames": frames, "labels": "".join(LABELS), "blank_index": BLANK_INDEX, "feature": feature,
            "model": model_cfg, "checkpoint": str(loaded.path), "step": loaded.meta.get("step")}


def verification_inputs(cfg, count: int) -> List[np.ndarray]:
    from ds2exp.evaluation.compare import build_eval_loader

    loader = build_eval_loader(cfg, cfg.split)
    # utterances of different lengths: the file is run at each of them
    by_length: Dict[int, np.ndarray] = {}
    for ex in loader.split.examples:
        if len(by_length) >= count:
            break
        if ex.frames not in by_length:
            f = loader.cache.get(ex.utt.audio_path)
            by_length.setdefault(f.shape[1], f)
    if not by_length:
        raise ExportError(f"no utterance to verify with in the {cfg.split} split")
    return list(by_length.values())


def _batch(feats: List[np.ndarray], frames: Optional[int]):
    width = frames or max(f.shape[1] for f in feats)
    x = np.zeros((len(feats), feats[0].shape[0], width), np.float32)
    lengths = np.zeros(len(feats), np.int32)
    for i, f in enumerate(feats):
        n = min(width, f.shape[1])
        x[i, :, :n] = f[:, :n]
        lengths[i] = n
    return x, lengths


def _max_diff(a: np.ndarray, b: np.ndarray, out_lengths: np.ndarray) -> float:
    return max(float(np.max(np.abs(a[i, :n] - b[i, :n]))) for i, n in enumerate(out_lengths))


def export_checkpoint(cfg) -> ExportResult:
    if not cfg.checkpoint:
        raise ExportError("give checkpoint=PATH")
    model, loaded, why = load_model(cfg.checkpoint, cfg.model, impl="plain")
    if why:
        log.info(why)
    path = loaded.path
    fmt = enum_value(cfg.format)
    out = Path(cfg.output) if cfg.output else path.with_suffix(SUFFIX[fmt])
    frames = int(cfg.frames) or None
    feats = verification_inputs(cfg, max(1, int(cfg.verify_utterances)))
    graph = InferenceGraph(use_graph_rnns(model))
    graph.set_train(False)

    out.parent.mkdir(parents=True, exist_ok=True)
    inputs = (ms.Tensor(shape=[None, feats[0].shape[0], frames], dtype=ms.float32),
              ms.Tensor(shape=[None], dtype=ms.int32))
    info = export_info(loaded, cfg.model, frames)

    def add_info(proto):
        write_export_info(proto, info)

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
    worst, lengths = _verify(out, loaded, cfg.model, feats, frames)
    return ExportResult(out, worst, len(feats), frames, lengths, export_seconds, time.perf_counter() - t0)


def _verify(out: Path, loaded, model_cfg, feats: List[np.ndarray], frames: Optional[int]):
    """Run the written file at each utterance's length and on all of them as one padded batch, against the
    checkpoint's model (as configured: its training kernels)."""
    reference = InferenceGraph(build_from_checkpoint(loaded, model_cfg))
    reference.set_train(False)
    exported = load_graph(out, frames)
    worst = 0.0
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
        if len(batch) == 1:
            lengths.append(int(n[0]))
    return worst, lengths
