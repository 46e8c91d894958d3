"""Model zoo checkpoints of MindSpore <= 1.5: each LSTM layer as one flat vector (cuDNN layout).

MindSpore 1.x's `nn.LSTM` held all of a layer's weights in one Parameter `weight` of shape
(N, 1, 1) and handed it to the GPU kernel (cuDNN) as is, so the zoo's DeepSpeech2 checkpoints of
that era name them `RNN.weight0` .. `RNN.weight4` (one per `RNN.lstms[i]`). The layout, derived in
docs/fidelity.md: for each direction (forward, then reverse), `weight_ih` (4H x In, rows in gate
order i, f, g, o), `weight_hh` (4H x H), `bias_ih` (4H), `bias_hh` (4H), row-major, back to back.
MindSpore 1.6's own `nn.LSTM` builds this vector from per-gate tensors by exactly that
concatenation before calling the same kernel. The conversion is shape-generic: it slices the flat
vector into the model's per-gate tensors in that order (a GRU's 3-gate blocks work the same way).
"""
from __future__ import annotations

import logging
import re
from typing import Dict, List, Tuple

import numpy as np

log = logging.getLogger(__name__)

# RNN.weight0 (the zoo's naming), also RNN.lstms.0.weight and the `rnn.` spelling
_FLAT = re.compile(r"^(RNN|rnn)\.(?:weight(\d+)|lstms\.(\d+)\.weight)$")
_ORDER = ("weight_ih_l0", "weight_hh_l0", "bias_ih_l0", "bias_hh_l0")


class FlatLayoutError(ValueError):
    pass


def flat_rnn_keys(state: Dict[str, object]) -> Dict[int, str]:
    """Layer index -> name of each flat RNN weight in a checkpoint state."""
    out = {}
    for name in state:
        m = _FLAT.match(name)
        if m:
            out[int(m.group(2) if m.group(2) is not None else m.group(3))] = name
    return out


def per_gate_targets(model_params: Dict[str, Tuple[int, ...]], layer: int) -> List[Tuple[str, Tuple[int, ...]]]:
    """The model's tensors of RNN layer `layer` in flat order: each direction's ih, hh, biases."""
    out = []
    for suffix in ("", "_reverse"):
        for base in _ORDER:
            name = f"RNN.lstms.{layer}.{base}{suffix}"
            if name in model_params:
                out.append((name, model_params[name]))
    return out


def unflatten(flat: np.ndarray, targets: List[Tuple[str, Tuple[int, ...]]], source: str) -> Dict[str, np.ndarray]:
    flat = np.asarray(flat).reshape(-1)
    need = sum(int(np.prod(shape)) for _, shape in targets)
    if flat.size != need:
        shapes = ", ".join(f"{n.split('.')[-1]} {tuple(s)}" for n, s in targets)
        raise FlatLayoutError(f"{source}: {flat.size} values, but the model's layer needs {need} ({shapes}); "
                              "set model.rnn_hidden / model.rnn_layers / model.bidirectional to the checkpoint's")
    out, offset = {}, 0
    for name, shape in targets:
        n = int(np.prod(shape))
        out[name] = flat[offset:offset + n].reshape(shape).copy()
        offset += n
    return out


def flatten(per_gate: Dict[str, np.ndarray], layer: int) -> np.ndarray:
    """The inverse (a flat (N, 1, 1) vector as MindSpore 1.x stored it), for tests and export to old tools."""
    shapes = {k: v.shape for k, v in per_gate.items()}
    parts = [np.asarray(per_gate[name]).reshape(-1) for name, _ in per_gate_targets(shapes, layer)]
    return np.concatenate(parts).reshape(-1, 1, 1)


def convert_flat_rnn(state: Dict[str, object], model_params: Dict[str, Tuple[int, ...]]) -> Dict[str, object]:
    """A state with every flat `RNN.weightN` replaced by the per-gate tensors of the model's layer N.

    `model_params`: canonical parameter name (`RNN.`) -> shape. States without flat weights come
    back unchanged; a flat vector of the wrong size raises FlatLayoutError naming the sizes."""
    flat = flat_rnn_keys(state)
    if not flat:
        return state
    out = {k: v for k, v in state.items() if k not in flat.values()}
    for layer, key in sorted(flat.items()):
        targets = per_gate_targets(model_params, layer)
        if not targets:
            layers = {n.split('.')[2] for n in model_params if n.startswith('RNN.lstms.')}
            raise FlatLayoutError(f"checkpoint has {key} but the model has no RNN layer {layer} "
                                  f"(model.rnn_layers is {len(layers)})")
        value = state[key]
        arr = value.asnumpy() if hasattr(value, "asnumpy") else np.asarray(value)
        out.update(unflatten(arr.astype(np.float32, copy=False), targets, key))
    names = sorted(flat.values(), key=lambda k: int(re.findall(r"\d+", k)[0]))
    log.info("converted %d flat LSTM weights of a MindSpore <= 1.5 checkpoint (%s .. %s, cuDNN layout) to "
             "per-gate weight_ih/weight_hh/bias_ih/bias_hh", len(names), names[0], names[-1])
    return out
