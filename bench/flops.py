"""DeepSpeech2 shapes and counts for the step bench (no MindSpore or PyTorch needed): the
architecture of a conf/model/ file, FLOPs, parameters, the synthetic batch, the epoch projection."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Optional, Tuple

ROOT = Path(__file__).resolve().parents[1]

NUM_BINS = 161
NUM_CLASSES = 29
BLANK = 28
FRAMES_PER_SECOND = 100  # 10 ms feature stride
NAIVE_FRAMES = 1250  # the model zoo pads every utterance to 1250 frames
TRAIN_CLEAN_100_HOURS = 100.6
ARCH_KEYS = ("conv_channels", "activation", "batch_norm", "rnn_type", "rnn_layers", "rnn_hidden", "bidirectional",
             "merge")
ARCH_DEFAULTS = {"batch_norm": True, "rnn_type": "lstm", "bidirectional": True, "merge": "sum"}


def model_arch(name: str) -> Dict[str, Any]:
    """Architecture keys of conf/model/<name>.yaml (missing keys take the schema defaults)."""
    from omegaconf import OmegaConf

    raw = OmegaConf.to_container(OmegaConf.load(ROOT / "conf" / "model" / f"{name}.yaml"))
    arch = {k: raw.get(k, ARCH_DEFAULTS.get(k)) for k in ARCH_KEYS}
    missing = [k for k, v in arch.items() if v is None]
    if missing:
        raise ValueError(f"conf/model/{name}.yaml lacks {missing}")
    return arch


def conv_shapes(frames: int, bins: int = NUM_BINS) -> Tuple[int, int, int, int]:
    """(F1, T1, F2, T2) after conv1 (41x11, stride 2x2, pad 20/5) and conv2 (21x11, stride 2x1, pad 10/5)."""
    f1 = (bins + 40 - 41) // 2 + 1
    t1 = (frames + 10 - 11) // 2 + 1
    f2 = (f1 + 20 - 21) // 2 + 1
    t2 = (t1 + 10 - 11) // 1 + 1
    return f1, t1, f2, t2


def rnn_dims(arch: Dict[str, Any]) -> Tuple[int, int, int]:
    h = int(arch["rnn_hidden"])
    d = 2 if arch["bidirectional"] else 1
    g = (4 if str(arch["rnn_type"]) == "lstm" else 3) * h
    return h, d, g


def forward_flops(arch: Dict[str, Any], batch: int, frames: int, bins: int = NUM_BINS,
                  classes: int = NUM_CLASSES) -> Dict[str, float]:
    """Multiply-add FLOPs (2 per MAC) of one forward pass, by component.

    conv: 2 * B * O * F_out * T_out * C_in * kF * kT. RNN, per layer and direction:
    input projection 2 * B * T' * G * In and recurrence 2 * B * T' * G * H (G = 4H for LSTM, 3H
    for GRU). FC: 2 * B * T' * H_out * classes. BN, activations, gate non-linearities, the
    direction sum, log-softmax and CTC are element-wise and left out.
    """
    c = int(arch["conv_channels"])
    f1, t1, f2, t2 = conv_shapes(frames, bins)
    out: Dict[str, float] = {}
    out["conv1"] = 2.0 * batch * c * f1 * t1 * 1 * 41 * 11
    out["conv2"] = 2.0 * batch * c * f2 * t2 * c * 21 * 11
    h, d, g = rnn_dims(arch)
    size = c * f2
    ih = hh = 0.0
    for _ in range(int(arch["rnn_layers"])):
        ih += 2.0 * batch * t2 * d * g * size
        hh += 2.0 * batch * t2 * d * g * h
        size = h if (d == 1 or arch["merge"] == "sum") else d * h
    out["rnn_input"] = ih
    out["rnn_recurrent"] = hh
    out["fc"] = 2.0 * batch * t2 * size * classes
    out["total"] = sum(out.values())
    return out


def train_flops(arch: Dict[str, Any], batch: int, frames: int) -> float:
    """Forward + backward = 3 x the forward FLOPs."""
    return 3.0 * forward_flops(arch, batch, frames)["total"]


def parameter_count(arch: Dict[str, Any], bins: int = NUM_BINS, classes: int = NUM_CLASSES) -> int:
    """Trainable parameters (convs without bias, BN gamma/beta, RNN with both biases, FC without bias)."""
    c = int(arch["conv_channels"])
    _, _, f2, _ = conv_shapes(100, bins)
    n = c * 41 * 11 + c * c * 21 * 11 + (4 * c if arch["batch_norm"] else 0)
    h, d, g = rnn_dims(arch)
    size = c * f2
    for _ in range(int(arch["rnn_layers"])):
        n += d * (g * size + g * h + 2 * g)
        size = h if (d == 1 or arch["merge"] == "sum") else d * h
    return n + size * classes


def label_length(frames: int) -> int:
    """Synthetic transcript length: 12.5 characters per second of audio (synth_tiny: about 13)."""
    return max(1, frames // 8)


def synthetic_batch(batch: int, frames: int, pad_to: Optional[int] = None, seed: int = 0):
    """features (B, 161, pad_to or frames) float32 (zero beyond `frames`), lengths, labels, label lengths.

    The same seed gives the same numbers in every row (MindSpore or PyTorch)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    total = pad_to or frames
    x = np.zeros((batch, NUM_BINS, total), np.float32)
    x[:, :, :frames] = rng.standard_normal((batch, NUM_BINS, frames)).astype(np.float32)
    lengths = np.full((batch,), frames, np.int32)
    n = label_length(frames)
    y = rng.integers(0, BLANK, (batch, n)).astype(np.int32)  # letters only, never the blank
    y_len = np.full((batch,), n, np.int32)
    return x, lengths, y, y_len


def epoch_hours(audio_per_s: Optional[float], hours: float = TRAIN_CLEAN_100_HOURS) -> Optional[float]:
    """Wall hours to train once on `hours` of audio at `audio_per_s` audio seconds per second."""
    if not audio_per_s or audio_per_s <= 0:
        return None
    return hours / audio_per_s


