"""The reference 29-symbol label set and text normalisation for it."""
from __future__ import annotations

import re
from typing import Sequence

# Same order as the reference recipe's labels.json: apostrophe, A..Z, space, blank.
# The CTC blank '_' is the LAST index (28), which is what ops.CTCLoss expects and what
# reference checkpoints were trained with.
LABELS: tuple[str, ...] = ("'",) + tuple(chr(c) for c in range(ord("A"), ord("Z") + 1)) + (" ", "_")
BLANK = "_"
BLANK_INDEX = LABELS.index(BLANK)
NUM_CLASSES = len(LABELS)
_CHAR_TO_INDEX = {c: i for i, c in enumerate(LABELS)}
_SPACES = re.compile(r"\s+")


class TranscriptError(ValueError):
    """A transcript that cannot be turned into label indices."""


def normalise_transcript(text: str) -> str:
    """Upper-case, collapse whitespace, strip. Does not drop unknown characters."""
    return _SPACES.sub(" ", text.upper()).strip()


def invalid_characters(text: str) -> set[str]:
    return {c for c in text if c not in _CHAR_TO_INDEX or c == BLANK}


def encode(text: str) -> list[int]:
    """Map a normalised transcript to label indices; raises TranscriptError on bad input."""
    text = normalise_transcript(text)
    if not text:
        raise TranscriptError("empty transcript")
    bad = invalid_characters(text)
    if bad:
        raise TranscriptError(f"characters outside the label set: {''.join(sorted(bad))!r}")
    return [_CHAR_TO_INDEX[c] for c in text]


def decode_indices(indices: Sequence[int]) -> str:
    return "".join(LABELS[i] for i in indices if i != BLANK_INDEX)
