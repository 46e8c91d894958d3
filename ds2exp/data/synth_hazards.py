"""The hazards LibriSpeech has, planted in a synthetic corpus (`dataset=synth_long`).

Besides utterances up to ~35 s (LibriSpeech's longest), the training split gets one chapter of its
own (speaker 9999) holding what makes CTC training blow up in the model zoo's pipeline: silent and
constant clips (a zero standard deviation: NaN features under an unguarded normalisation), a clipped
recording, a transcript with characters outside the labels, a transcript longer than its audio can
carry (infinite CTC loss) and a recording at 8 kHz. `HAZARDS` is the list the audit must find.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Tuple

import numpy as np

HAZARD_SPEAKER, HAZARD_CHAPTER = 9999, 1


@dataclass(frozen=True)
class Hazard:
    index: int
    kind: str  # silent, constant, clipped, out_of_labels, infeasible, sample_rate
    transcript: str
    spoken: str  # what espeak says ("" for no speech)

    @property
    def uid(self) -> str:
        return f"{HAZARD_SPEAKER}-{HAZARD_CHAPTER}-{self.index:04d}"


HAZARDS: Tuple[Hazard, ...] = (
    Hazard(0, "silent", "THE ROOM WAS QUIET", ""),
    Hazard(1, "silent", "NOTHING WAS SAID AT ALL", ""),
    Hazard(2, "constant", "A STEADY HUM", ""),
    Hazard(3, "clipped", "THE SIGNAL WAS FAR TOO LOUD", "the signal was far too loud"),
    Hazard(4, "out_of_labels", "CAFÉ NUMBER 42", "cafe number forty two"),
    Hazard(5, "infeasible", "THIS TRANSCRIPT GOES ON FOR FAR LONGER THAN THE SHORT CLIP THAT CARRIES IT COULD",
           "this"),
    Hazard(6, "sample_rate", "SPOKEN AT A LOWER RATE", "spoken at a lower rate"),
)


def _audio(h: Hazard, say: Callable[[str], np.ndarray]) -> Tuple[np.ndarray, int]:
    if h.kind == "silent":
        return np.zeros(16000 * (3 if h.index == 0 else 2), np.float32), 16000
    if h.kind == "constant":
        return np.full(16000 * 2, 0.25, np.float32), 16000
    speech = say(h.spoken)
    if h.kind == "clipped":
        return np.clip(speech * 20.0, -1.0, 1.0).astype(np.float32), 16000
    if h.kind == "infeasible":
        return speech[:12800], 16000  # 0.8 s for an 80-character transcript
    if h.kind == "sample_rate":
        import soxr

        return soxr.resample(speech, 16000, 8000).astype(np.float32), 8000
    return speech, 16000


def plant_hazards(train_dir: Path, say: Callable[[str], np.ndarray]) -> None:
    """Write the hazard chapter into a LibriSpeech-layout training subset folder."""
    import soundfile as sf

    chapter = Path(train_dir) / str(HAZARD_SPEAKER) / str(HAZARD_CHAPTER)
    chapter.mkdir(parents=True, exist_ok=True)
    for h in HAZARDS:
        audio, rate = _audio(h, say)
        sf.write(str(chapter / f"{h.uid}.flac"), audio, rate, format="FLAC", subtype="PCM_16")
    lines = "".join(f"{h.uid} {h.transcript}\n" for h in HAZARDS)
    (chapter / f"{HAZARD_SPEAKER}-{HAZARD_CHAPTER}.trans.txt").write_text(lines, encoding="utf-8")
