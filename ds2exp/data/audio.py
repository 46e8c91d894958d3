"""Reading speech audio: FLAC/WAV through libsndfile, mono, 16 kHz, with clear errors."""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf


# The reason load_audio gives for NaN/Inf samples; the corpus audit tells it apart from unreadable files.
NONFINITE_SAMPLES = "audio contains NaN or Inf samples"


class AudioError(Exception):
    """An audio file that cannot be used; the message names the file and the reason."""

    def __init__(self, path: str | Path, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path = str(path)
        self.reason = reason


@dataclass(frozen=True)
class AudioInfo:
    sample_rate: int
    channels: int
    frames: int

    @property
    def duration(self) -> float:
        return self.frames / float(self.sample_rate) if self.sample_rate else 0.0


def probe(path: str | Path) -> AudioInfo:
    """Header information without decoding; raises AudioError for missing/unreadable files."""
    p = Path(path)
    if not p.is_file():
        raise AudioError(p, "missing file")
    try:
        info = sf.info(str(p))
    except Exception as exc:  # libsndfile raises RuntimeError/LibsndfileError for bad headers
        raise AudioError(p, f"unreadable audio ({_short(exc)})") from exc
    return AudioInfo(int(info.samplerate), int(info.channels), int(info.frames))


def _short(exc: BaseException) -> str:
    return str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__


def load_audio(path: str | Path, sample_rate: int = 16000, warn: bool = True) -> np.ndarray:
    """Decode a file to float32 mono at `sample_rate`.

    16-bit files are scaled by 1/32767 as the reference recipe does (it reads int16 and divides
    by 32767), so features match it exactly. Stereo is averaged to mono and other rates are
    resampled (soxr), each with a warning. Corrupt, truncated or empty files raise AudioError.
    """
    p = Path(path)
    info = probe(p)
    try:
        subtype = sf.info(str(p)).subtype
        if subtype == "PCM_16":
            data, sr = sf.read(str(p), dtype="int16", always_2d=True)
            audio = data.astype(np.float32) / 32767.0
        else:
            audio, sr = sf.read(str(p), dtype="float32", always_2d=True)
    except Exception as exc:
        raise AudioError(p, f"corrupt or truncated audio ({_short(exc)})") from exc
    if audio.shape[0] == 0:
        raise AudioError(p, "empty audio (0 samples)")
    if audio.shape[0] < info.frames * 0.99:
        raise AudioError(p, f"truncated audio ({audio.shape[0]} of {info.frames} samples decoded)")
    if audio.shape[1] > 1:
        if warn:
            warnings.warn(f"{p}: {audio.shape[1]} channels mixed down to mono", stacklevel=2)
        audio = audio.mean(axis=1, dtype=np.float32)
    else:
        audio = audio[:, 0]
    if sr != sample_rate:
        if warn:
            warnings.warn(f"{p}: resampled from {sr} Hz to {sample_rate} Hz", stacklevel=2)
        import soxr

        audio = soxr.resample(audio, sr, sample_rate).astype(np.float32)
    if not np.all(np.isfinite(audio)):
        raise AudioError(p, NONFINITE_SAMPLES)
    return np.ascontiguousarray(audio, dtype=np.float32)
