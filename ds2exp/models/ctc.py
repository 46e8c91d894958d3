"""CTC: the loss, which transcripts a model can emit at all, and best-path (greedy) decoding.

Scores are per-frame over the label set ``ds2exp.data.labels.LABELS``, whose CTC blank is the LAST
index (``BLANK_INDEX == 28``). ``length`` (valid frame count) trims padding frames; ``None`` means
all ``T`` frames. Greedy decoding takes the argmax per frame, collapses repeats and drops blanks; its
output is the raw collapsed label string (no whitespace normalisation), so that
``greedy_decode_with_offsets`` can return one frame offset per output character. Beam search lives in
``ds2exp.evaluation.decoding``.
"""
from __future__ import annotations

from typing import Sequence

import mindspore as ms
import numpy as np
from mindspore import ops

from ds2exp.data.labels import BLANK_INDEX, LABELS


def ctc_losses(logits, out_lengths, labels, label_lengths):
    """Per-utterance CTC negative log-likelihood (fp32), blank = last label."""
    log_probs = ops.log_softmax(logits.astype(ms.float32), -1).transpose(1, 0, 2)
    out = ops.ctc_loss(log_probs, labels, out_lengths, label_lengths, blank=BLANK_INDEX, reduction="none",
                       zero_infinity=False)
    return out[0] if isinstance(out, (tuple, list)) else out


def infeasible_rows(batch) -> np.ndarray:
    """Rows whose transcript needs more CTC frames than the model outputs (loss = +inf)."""
    from ds2exp.data.dataset import ctc_min_frames, output_frames

    return np.array([ctc_min_frames(list(lab[: int(n)])) > output_frames(int(f))
                     for lab, n, f in zip(batch.labels, batch.label_lengths, batch.feature_lengths)], dtype=bool)


def check_scores(log_probs: np.ndarray, labels: Sequence[str], length: int | None) -> np.ndarray:
    arr = np.asarray(log_probs)
    if arr.ndim != 2:
        raise ValueError(f"expected scores of shape (T, C), got shape {arr.shape}")
    if arr.shape[1] != len(labels):
        raise ValueError(f"scores have {arr.shape[1]} classes but the label set has {len(labels)}")
    if length is not None:
        length = int(length)
        if not 0 <= length <= arr.shape[0]:
            raise ValueError(f"length {length} outside [0, {arr.shape[0]}]")
        arr = arr[:length]
    return arr


def _collapse(best: np.ndarray, blank: int, labels: Sequence[str]) -> tuple[str, list[int]]:
    chars: list[str] = []
    offsets: list[int] = []
    prev = -1
    for t, k in enumerate(best.tolist()):
        if k != prev and k != blank:
            chars.append(labels[k])
            offsets.append(t)
        prev = k
    return "".join(chars), offsets


def greedy_decode_with_offsets(
    log_probs: np.ndarray,
    length: int | None = None,
    blank: int = BLANK_INDEX,
    labels: Sequence[str] = LABELS,
) -> tuple[str, list[int]]:
    """Best-path decoding; returns (text, frame index where each output character starts).

    A label repeated over consecutive frames is emitted once; a blank between two equal
    labels separates them (``A A _ A`` -> ``"AA"``).  Works on log-probabilities,
    probabilities or raw logits alike (only the per-frame argmax matters).
    """
    arr = check_scores(log_probs, labels, length)
    if arr.shape[0] == 0:
        return "", []
    return _collapse(np.argmax(arr, axis=1), blank, labels)


def greedy_decode(
    log_probs: np.ndarray,
    length: int | None = None,
    blank: int = BLANK_INDEX,
    labels: Sequence[str] = LABELS,
) -> str:
    """Best-path decoding of a ``(T, C)`` score matrix (see greedy_decode_with_offsets)."""
    return greedy_decode_with_offsets(log_probs, length, blank, labels)[0]


def batch_greedy_decode(
    log_probs: np.ndarray,
    lengths: Sequence[int] | np.ndarray | None = None,
    blank: int = BLANK_INDEX,
    labels: Sequence[str] = LABELS,
) -> list[str]:
    """Greedy-decode a ``(B, T, C)`` batch; ``lengths`` (B,) gives valid frames per item."""
    arr = np.asarray(log_probs)
    if arr.ndim != 3:
        raise ValueError(f"expected scores of shape (B, T, C), got shape {arr.shape}")
    if arr.shape[2] != len(labels):
        raise ValueError(f"scores have {arr.shape[2]} classes but the label set has {len(labels)}")
    b, t, _ = arr.shape
    if lengths is None:
        lens = [t] * b
    else:
        lens = [int(n) for n in np.asarray(lengths).reshape(-1)]
        if len(lens) != b:
            raise ValueError(f"{len(lens)} lengths for a batch of {b}")
        for n in lens:
            if not 0 <= n <= t:
                raise ValueError(f"length {n} outside [0, {t}]")
    best = np.argmax(arr, axis=2) if t > 0 else np.zeros((b, 0), dtype=np.int64)
    return [_collapse(best[i, : lens[i]], blank, labels)[0] for i in range(b)]
