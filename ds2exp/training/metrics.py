"""Word and character error rates for transcripts.

Edit distances
--------------
``word_errors(ref, hyp)`` is the Levenshtein distance (substitutions + deletions +
insertions, each cost 1) between the whitespace-split word sequences of ``ref`` and
``hyp``; the second value returned is the number of reference words.  Words are mapped
to unique single characters so that the C implementation in python-Levenshtein can do
the work (the same trick as deepspeech.pytorch / the MindSpore model-zoo DS2 decoder).

``char_errors(ref, hyp, remove_space)`` is the Levenshtein distance between the two
strings, character by character; the second value is the number of reference characters.
Both strings first have their whitespace normalised (runs collapsed to one space,
leading/trailing whitespace stripped).  With ``remove_space=True`` every space is then
deleted from both strings before measuring.

Metric definitions (``ErrorRateAccumulator(definition=...)``)
-----------------------------------------------------------
Both definitions are *corpus level*: edit distances and reference lengths are summed
over all utterances and divided once at the end,

    WER = 100 * sum_u word_errors_u / sum_u ref_words_u
    CER = 100 * sum_u char_errors_u / sum_u ref_chars_u

They are **not** the mean of per-utterance rates (that mean weights a 2-word utterance
the same as a 40-word one).  The values are percentages and can exceed 100.

``"reference"`` (default)
    The definition of the MindSpore model-zoo DeepSpeech2 ``eval.py`` and of
    deepspeech.pytorch, i.e. what published reference numbers were computed with.
    WER as above.  CER is computed with **all spaces removed** from reference and
    hypothesis (``ref.replace(' ', '')``), and the denominator is the number of
    reference characters excluding spaces.

``"standard"``
    WER identical to ``"reference"``.  CER keeps the (normalised) spaces: a space is a
    character that can be substituted/inserted/deleted and counts in the denominator.

Empty references
----------------
An utterance with an empty reference contributes 0 reference words/characters and as
many errors as the hypothesis has words/characters (all insertions).  If, over the whole
corpus, the reference word (or character) count is 0, the rate is undefined and reading
``wer`` (or ``cer``) raises ``ValueError``.

Inputs should already be normalised the same way (e.g. with
``ds2exp.data.labels.normalise_transcript``); no case folding is done here.
"""
from __future__ import annotations

from typing import Any, Hashable, Iterable, Sequence

import Levenshtein

__all__ = [
    "DEFINITIONS",
    "ErrorRateAccumulator",
    "char_errors",
    "normalise_whitespace",
    "word_errors",
]

DEFINITIONS: tuple[str, ...] = ("reference", "standard")


def normalise_whitespace(text: str) -> str:
    """Collapse whitespace runs to a single space and strip both ends."""
    return " ".join(text.split())


def _first_codepoints() -> Iterable[int]:
    """Code points usable as stand-ins for words (skips the surrogate block)."""
    yield from range(0xD800)
    yield from range(0xE000, 0x110000)


def _sequence_distance(a: Sequence[Hashable], b: Sequence[Hashable]) -> int:
    """Levenshtein distance between two token sequences via a token -> char mapping."""
    mapping: dict[Hashable, str] = {}
    codes = iter(_first_codepoints())
    for tok in (*a, *b):
        if tok not in mapping:
            mapping[tok] = chr(next(codes))
    return Levenshtein.distance("".join(mapping[t] for t in a), "".join(mapping[t] for t in b))


def word_errors(ref: str, hyp: str) -> tuple[int, int]:
    """(word-level edit distance, number of reference words)."""
    ref_words = ref.split()
    hyp_words = hyp.split()
    return _sequence_distance(ref_words, hyp_words), len(ref_words)


def char_errors(ref: str, hyp: str, remove_space: bool) -> tuple[int, int]:
    """(character-level edit distance, number of reference characters).

    Whitespace is normalised first; with ``remove_space`` all spaces are then dropped
    (the "reference" CER definition).
    """
    ref = normalise_whitespace(ref)
    hyp = normalise_whitespace(hyp)
    if remove_space:
        ref = ref.replace(" ", "")
        hyp = hyp.replace(" ", "")
    return Levenshtein.distance(ref, hyp), len(ref)


class ErrorRateAccumulator:
    """Accumulate corpus-level WER/CER over utterances (see module docstring).

    >>> acc = ErrorRateAccumulator()
    >>> acc.add("THE CAT SAT", "THE BAT SAT ON")
    >>> round(acc.wer, 4)
    66.6667
    """

    def __init__(self, definition: str = "reference", keep_records: bool = True) -> None:
        if definition not in DEFINITIONS:
            raise ValueError(f"unknown metric definition {definition!r}; expected one of {DEFINITIONS}")
        self.definition = definition
        self.keep_records = keep_records
        self.per_utterance: list[dict[str, Any]] = []
        self.num_utterances = 0
        self.total_word_errors = 0
        self.total_ref_words = 0
        self.total_char_errors = 0
        self.total_ref_chars = 0

    @property
    def remove_space(self) -> bool:
        return self.definition == "reference"

    def add(self, ref: str, hyp: str, utt_id: Any = None) -> dict[str, Any]:
        """Score one utterance and add it to the totals; returns its record.

        ``utt_id`` defaults to the running utterance index (0, 1, ...).
        """
        w_err, w_ref = word_errors(ref, hyp)
        c_err, c_ref = char_errors(ref, hyp, remove_space=self.remove_space)
        record = {
            "id": self.num_utterances if utt_id is None else utt_id,
            "reference": ref,
            "hypothesis": hyp,
            "word_errors": w_err,
            "ref_words": w_ref,
            "char_errors": c_err,
            "ref_chars": c_ref,
        }
        self.num_utterances += 1
        self.total_word_errors += w_err
        self.total_ref_words += w_ref
        self.total_char_errors += c_err
        self.total_ref_chars += c_ref
        if self.keep_records:
            self.per_utterance.append(record)
        return record

    def extend(self, refs: Iterable[str], hyps: Iterable[str], ids: Iterable[Any] | None = None) -> None:
        refs, hyps = list(refs), list(hyps)
        if len(refs) != len(hyps):
            raise ValueError(f"{len(refs)} references but {len(hyps)} hypotheses")
        id_list = [None] * len(refs) if ids is None else list(ids)
        if len(id_list) != len(refs):
            raise ValueError(f"{len(id_list)} ids for {len(refs)} utterances")
        for r, h, i in zip(refs, hyps, id_list):
            self.add(r, h, i)

    def _rate(self, name: str, errors: int, total: int, unit: str) -> float:
        if total == 0:
            raise ValueError(f"{name} is undefined: the {self.num_utterances} reference transcript(s) added "
                             f"contain no {unit} (empty corpus or only empty references)")
        return 100.0 * errors / total

    @property
    def wer(self) -> float:
        """Corpus word error rate in percent."""
        return self._rate("WER", self.total_word_errors, self.total_ref_words, "words")

    @property
    def cer(self) -> float:
        """Corpus character error rate in percent (spaces per ``definition``)."""
        return self._rate("CER", self.total_char_errors, self.total_ref_chars, "characters")

    def summary(self) -> dict[str, Any]:
        """Totals and rates as a plain dict (rates are None when undefined)."""
        out: dict[str, Any] = {
            "definition": self.definition,
            "num_utterances": self.num_utterances,
            "word_errors": self.total_word_errors,
            "ref_words": self.total_ref_words,
            "char_errors": self.total_char_errors,
            "ref_chars": self.total_ref_chars,
        }
        out["wer"] = self.wer if self.total_ref_words else None
        out["cer"] = self.cer if self.total_ref_chars else None
        return out
