"""CTC decoding: greedy (best path) and beam search.

All decoders take per-frame scores of shape ``(T, C)`` (or ``(B, T, C)`` for the batch
helpers) over the label set ``ds2exp.data.labels.LABELS``, whose CTC blank is the LAST
index (``BLANK_INDEX == 28``) and whose word separator is ``" "``.  ``length`` (valid
frame count) trims padding frames; ``None`` means all ``T`` frames.

* ``greedy_decode`` (from ``ds2exp.models.ctc``) – argmax per frame, collapse repeats, drop blanks.  The output is
  the raw collapsed label string (no whitespace normalisation) so that
  ``greedy_decode_with_offsets`` can return one frame offset per output character.
* ``BeamSearchDecoder`` – CTC prefix beam search through ``pyctcdecode`` (optionally
  with a KenLM n-gram model), falling back to :func:`prefix_beam_search` (pure Python /
  numpy, no LM) when ``pyctcdecode`` is not installed.  Beam outputs are whitespace
  normalised (runs of spaces collapsed, ends stripped) – pyctcdecode works on words.
"""
from __future__ import annotations

import importlib
import importlib.util
import logging
import math
import os
import sys
from typing import Sequence

import numpy as np

from ds2exp.data.labels import BLANK_INDEX, LABELS
from ds2exp.models.ctc import (  # greedy decoding is part of this module's API (__all__)
    batch_greedy_decode, check_scores, greedy_decode, greedy_decode_with_offsets)

__all__ = [
    "BeamSearchDecoder",
    "batch_greedy_decode",
    "greedy_decode",
    "greedy_decode_with_offsets",
    "log_softmax",
    "prefix_beam_search",
    "prefix_beam_search_nbest",
    "pyctcdecode_available",
]

_NEG_INF = float("-inf")


def log_softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    """Numerically stable log-softmax (idempotent on log-probabilities)."""
    x = np.asarray(x, dtype=np.float64)
    m = np.max(x, axis=axis, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    with np.errstate(divide="ignore"):
        return x - m - np.log(np.sum(np.exp(x - m), axis=axis, keepdims=True))


# -------------------------------------------------------- pure-python prefix search
def _lse(a: float, b: float) -> float:
    if a == _NEG_INF:
        return b
    if b == _NEG_INF:
        return a
    if a > b:
        return a + math.log1p(math.exp(b - a))
    return b + math.log1p(math.exp(a - b))


def prefix_beam_search_nbest(
    log_probs: np.ndarray,
    beam_width: int = 100,
    length: int | None = None,
    blank: int = BLANK_INDEX,
    labels: Sequence[str] = LABELS,
    token_min_logp: float | None = None,
    beam_prune_logp: float | None = None,
) -> list[tuple[str, float]]:
    """CTC prefix beam search without LM; returns [(text, log P(text)), ...] best first.

    Each prefix keeps two log-probabilities: paths ending in blank and paths ending in
    the prefix's last label, so the score of a prefix is the total probability of all
    alignments that collapse to it (up to beam pruning).  Prefixes are whitespace
    normalised while searching (a space after an empty prefix or after a space does not
    extend the prefix; trailing spaces are dropped at the end), which matches how
    pyctcdecode merges its word-level beams, so ``log P(text)`` is the total mass of all
    alignments whose collapsed, whitespace-normalised labelling is ``text``.

    ``log_probs`` may also be raw logits: a log-softmax is applied per frame.
    ``token_min_logp``: at each frame, labels below this log-probability are skipped
    unless they are the frame's argmax (speed); ``None`` keeps all labels.
    ``beam_prune_logp``: prefixes scoring below best + this value are dropped.
    """
    if beam_width < 1:
        raise ValueError("beam_width must be >= 1")
    arr = log_softmax(check_scores(log_probs, labels, length), axis=1)
    space = labels.index(" ") if " " in labels else None
    # prefix (tuple of label ids) -> [logp ending in blank, logp ending in last label]
    beams: dict[tuple[int, ...], list[float]] = {(): [0.0, _NEG_INF]}
    for frame in arr:
        cand = np.flatnonzero(np.isfinite(frame))
        if token_min_logp is not None:
            keep = frame[cand] >= token_min_logp
            cand = np.union1d(cand[keep], [int(np.argmax(frame))]).astype(int)
        cand_lp = [(int(c), float(frame[c])) for c in cand]
        nxt: dict[tuple[int, ...], list[float]] = {}

        def _get(p: tuple[int, ...]) -> list[float]:
            s = nxt.get(p)
            if s is None:
                s = nxt[p] = [_NEG_INF, _NEG_INF]
            return s

        for prefix, (pb, pnb) in beams.items():
            total = _lse(pb, pnb)
            last = prefix[-1] if prefix else None
            for c, lp in cand_lp:
                if c == blank:
                    s = _get(prefix)
                    s[0] = _lse(s[0], total + lp)
                elif c == space and (last is None or last == space):
                    # leading / doubled space: normalised away, prefix unchanged
                    s = _get(prefix)
                    s[1] = _lse(s[1], total + lp)
                elif c == last:
                    s = _get(prefix)  # repeat collapses
                    s[1] = _lse(s[1], pnb + lp)
                    if pb != _NEG_INF:  # separated by a blank: new label
                        s = _get(prefix + (c,))
                        s[1] = _lse(s[1], pb + lp)
                else:
                    s = _get(prefix + (c,))
                    s[1] = _lse(s[1], total + lp)
        scored = [(p, s) for p, s in nxt.items() if _lse(*s) != _NEG_INF]
        scored.sort(key=lambda kv: _lse(*kv[1]), reverse=True)
        if beam_prune_logp is not None and scored:
            floor = _lse(*scored[0][1]) + beam_prune_logp
            scored = [kv for kv in scored if _lse(*kv[1]) >= floor]
        beams = dict(scored[:beam_width])

    final: dict[str, float] = {}
    for prefix, (pb, pnb) in beams.items():
        text = "".join(labels[i] for i in prefix).strip(" ")
        final[text] = _lse(final.get(text, _NEG_INF), _lse(pb, pnb))
    return sorted(final.items(), key=lambda kv: kv[1], reverse=True)


def prefix_beam_search(log_probs: np.ndarray, *args, **kwargs) -> str:
    """Top hypothesis of :func:`prefix_beam_search_nbest` (same arguments; pure numpy/Python, no LM)."""
    nbest = prefix_beam_search_nbest(log_probs, *args, **kwargs)
    return nbest[0][0] if nbest else ""


# ---------------------------------------------------------------- beam search class
def pyctcdecode_available() -> bool:
    return importlib.util.find_spec("pyctcdecode") is not None


class BeamSearchDecoder:
    """CTC beam search decoder, optionally with a KenLM n-gram language model.

    Uses ``pyctcdecode`` when installed (``backend="pyctcdecode"``); otherwise, and only
    without a language model, the pure-Python :func:`prefix_beam_search`
    (``backend="numpy"``).  ``alpha`` (LM weight) and ``beta`` (word insertion bonus)
    only have an effect with ``lm_path``.

    ``lm_path``: a KenLM model (ARPA ``.arpa`` or binary).  Requires the ``kenlm``
    Python module (``pip install ds2exp[lm]``).  Unigrams are read from ARPA files.

    ``token_min_logp`` / ``beam_prune_logp`` are the pyctcdecode pruning knobs (labels
    below ``token_min_logp`` at a frame are skipped unless argmax; beams more than
    ``-beam_prune_logp`` below the best are dropped) and are applied by both backends.
    ``unk_score_offset`` (with an LM): log-score added to a word the LM does not know.

    ``prune_history`` (pyctcdecode only) keeps, among beams that share the last LM-order
    words, only the best one: faster, but it discards probability mass, so it is off by
    default (pyctcdecode's own ``decode()`` always turns it on).
    """

    def __init__(
        self,
        beam_width: int = 100,
        alpha: float = 0.5,
        beta: float = 1.5,
        lm_path: str | os.PathLike[str] | None = None,
        labels: Sequence[str] = LABELS,
        blank: int = BLANK_INDEX,
        token_min_logp: float = -5.0,
        beam_prune_logp: float = -10.0,
        prune_history: bool = False,
        backend: str | None = None,
        unk_score_offset: float = -10.0,
    ) -> None:
        if beam_width < 1:
            raise ValueError("beam_width must be >= 1")
        if not 0 <= blank < len(labels):
            raise ValueError(f"blank index {blank} outside the label set of size {len(labels)}")
        self.beam_width = int(beam_width)
        self.alpha = float(alpha)
        self.beta = float(beta)
        self.lm_path = None if lm_path is None else os.fspath(lm_path)
        self.labels = tuple(labels)
        self.blank = int(blank)
        self.token_min_logp = float(token_min_logp)
        self.beam_prune_logp = float(beam_prune_logp)
        self.prune_history = bool(prune_history)
        self.unk_score_offset = float(unk_score_offset)

        if backend is None:
            backend = "pyctcdecode" if (pyctcdecode_available() or self.lm_path) else "numpy"
        if backend not in ("pyctcdecode", "numpy"):
            raise ValueError(f"unknown backend {backend!r}; expected 'pyctcdecode' or 'numpy'")
        if backend == "numpy" and self.lm_path is not None:
            raise ValueError("the numpy fallback decoder does not support a language model")
        self.backend = backend
        self._decoder = self._build_pyctcdecode() if backend == "pyctcdecode" else None

    # pyctcdecode wants "" for the blank; everything else maps 1:1 (space is " ").
    def pyctcdecode_labels(self) -> list[str]:
        out = list(self.labels)
        out[self.blank] = ""
        if len(set(out)) != len(out):
            raise ValueError("label set has duplicate entries")
        return out

    def _build_pyctcdecode(self):
        if self.lm_path is not None:
            if not os.path.exists(self.lm_path):
                raise FileNotFoundError(f"language model not found: {self.lm_path}")
            try:
                importlib.import_module("kenlm")
            except ImportError as exc:
                raise ImportError(
                    "Decoding with a language model (lm_path) needs the 'kenlm' Python module, "
                    "which is not installed. Install the lm extra: pip install ds2exp[lm]"
                ) from exc
        # pyctcdecode warns at import time when kenlm is missing; that is only relevant
        # when an LM was asked for (and then we have already checked kenlm above).
        pyctc_logger = logging.getLogger("pyctcdecode")
        old_level = pyctc_logger.level
        if "pyctcdecode" not in sys.modules:
            pyctc_logger.setLevel(logging.ERROR)
        try:
            from pyctcdecode import build_ctcdecoder
        except ImportError as exc:
            raise ImportError(
                "the pyctcdecode backend (required for LM decoding) needs pyctcdecode: pip install pyctcdecode"
            ) from exc
        finally:
            pyctc_logger.setLevel(old_level)
        return build_ctcdecoder(
            self.pyctcdecode_labels(),
            kenlm_model_path=self.lm_path,
            alpha=self.alpha,
            beta=self.beta,
            unk_score_offset=self.unk_score_offset,
        )

    def decode(self, log_probs: np.ndarray, length: int | None = None) -> str:
        """Decode one ``(T, C)`` matrix of log-probabilities (or logits); returns the text."""
        arr = log_softmax(check_scores(log_probs, self.labels, length), axis=1)
        if arr.shape[0] == 0:
            return ""
        if self._decoder is None:
            return prefix_beam_search(
                arr,
                self.beam_width,
                blank=self.blank,
                labels=self.labels,
                token_min_logp=self.token_min_logp,
                beam_prune_logp=self.beam_prune_logp,
            )
        # decode_beams rather than pyctcdecode's decode(), which hard-wires prune_history=True
        beams = self._decoder.decode_beams(
            arr,
            beam_width=self.beam_width,
            token_min_logp=self.token_min_logp,
            beam_prune_logp=self.beam_prune_logp,
            prune_history=self.prune_history,
        )
        return beams[0][0] if beams else ""

    def decode_batch(
        self, log_probs: np.ndarray, lengths: Sequence[int] | np.ndarray | None = None
    ) -> list[str]:
        """Decode a ``(B, T, C)`` batch sequentially."""
        arr = np.asarray(log_probs)
        if arr.ndim != 3:
            raise ValueError(f"expected scores of shape (B, T, C), got shape {arr.shape}")
        lens = [None] * arr.shape[0] if lengths is None else [int(n) for n in np.asarray(lengths).reshape(-1)]
        if len(lens) != arr.shape[0]:
            raise ValueError(f"{len(lens)} lengths for a batch of {arr.shape[0]}")
        return [self.decode(arr[i], lens[i]) for i in range(arr.shape[0])]

    def __repr__(self) -> str:
        return (
            f"BeamSearchDecoder(beam_width={self.beam_width}, alpha={self.alpha}, beta={self.beta}, "
            f"lm_path={self.lm_path!r}, backend={self.backend!r})"
        )
