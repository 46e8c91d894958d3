"""DeepSpeech2 input features: log1p STFT magnitude, per-utterance mean/std normalisation.

Numerically the reference recipe's (librosa.stft with n_fft = win = 320, hop 160, a symmetric
scipy Hamming window, centred; then log1p and (x - mean) / std with NumPy's population std),
computed here with NumPy alone so it is fast and independent of librosa's version. The
reference ran librosa < 0.10, whose centred STFT padded by reflection (`pad_mode`).
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from ds2exp.data.audio import load_audio


@dataclass(frozen=True)
class FeatureSettings:
    sample_rate: int = 16000
    window_size: float = 0.02
    window_stride: float = 0.01
    window: str = "hamming"
    pad_mode: str = "reflect"
    normalize: bool = True

    @classmethod
    def from_config(cls, cfg) -> "FeatureSettings":
        return cls(**{k: cfg[k] for k in ("sample_rate", "window_size", "window_stride", "window",
                                           "pad_mode", "normalize")})

    @property
    def n_fft(self) -> int:
        return int(round(self.sample_rate * self.window_size))

    @property
    def hop(self) -> int:
        return int(round(self.sample_rate * self.window_stride))

    @property
    def num_bins(self) -> int:
        return self.n_fft // 2 + 1

    def key(self) -> str:
        """Stable digest of the settings: the feature cache is keyed by it."""
        blob = json.dumps(asdict(self), sort_keys=True).encode()
        return hashlib.sha1(blob).hexdigest()[:12]

    def num_frames(self, num_samples: int) -> int:
        return 1 + num_samples // self.hop  # centred STFT


_WINDOWS = {"hamming": np.hamming, "hann": np.hanning, "hanning": np.hanning,
            "blackman": np.blackman, "bartlett": np.bartlett}


def window_array(name: str, length: int) -> np.ndarray:
    # Symmetric windows, as scipy.signal.hamming(N) that the reference passes to librosa.
    try:
        return _WINDOWS[name](length).astype(np.float64)
    except KeyError:
        raise ValueError(f"unknown window {name!r}; allowed: {', '.join(_WINDOWS)}") from None


def stft_magnitude(y: np.ndarray, n_fft: int, hop: int, window: str = "hamming",
                   pad_mode: str = "reflect") -> np.ndarray:
    """|STFT| as (n_fft//2+1, frames), centred like librosa.stft(center=True)."""
    y = np.asarray(y, dtype=np.float64)
    pad = n_fft // 2
    if pad_mode == "reflect" and y.shape[0] <= pad:
        pad_mode = "constant"  # reflection needs more samples than the pad
    y = np.pad(y, (pad, pad), mode=pad_mode)
    frames = 1 + (y.shape[0] - n_fft) // hop
    idx = np.arange(n_fft)[None, :] + hop * np.arange(frames)[:, None]
    spec = np.fft.rfft(y[idx] * window_array(window, n_fft)[None, :], n=n_fft, axis=1)
    return np.abs(spec).T


def compute_features(y: np.ndarray, settings: FeatureSettings) -> np.ndarray:
    """(num_bins, frames) float32 log1p magnitude, normalised per utterance."""
    spect = np.log1p(stft_magnitude(y, settings.n_fft, settings.hop, settings.window, settings.pad_mode))
    if settings.normalize:
        mean = spect.mean()
        std = spect.std()
        spect = (spect - mean) / (std if std > 0 else 1.0)
    return spect.astype(np.float32)


class FeatureCache:
    """On-disk cache of features, one .npy per utterance, keyed by feature settings and file.

    The key includes the audio file's absolute path, size and modification time, so a changed
    file is recomputed. Writes go to a temporary file and are renamed into place, so a crash
    never leaves a half-written entry.
    """

    def __init__(self, directory: str | Path, settings: FeatureSettings, enabled: bool = True):
        self.settings = settings
        self.enabled = enabled
        self.directory = Path(directory) / settings.key()
        if enabled:
            self.directory.mkdir(parents=True, exist_ok=True)
            meta = self.directory / "settings.json"
            if not meta.exists():
                meta.write_text(json.dumps(asdict(settings), indent=2))

    def _entry(self, audio_path: str | Path) -> Path:
        p = Path(audio_path).resolve()
        st = p.stat()
        digest = hashlib.sha1(f"{p}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()
        return self.directory / digest[:2] / f"{digest}.npy"

    def get(self, audio_path: str | Path) -> np.ndarray:
        if not self.enabled:
            return compute_features(load_audio(audio_path, self.settings.sample_rate), self.settings)
        entry = self._entry(audio_path)
        if entry.exists():
            try:
                return np.load(entry, allow_pickle=False)
            except (ValueError, OSError, EOFError):
                entry.unlink(missing_ok=True)  # damaged entry: recompute below
        feats = compute_features(load_audio(audio_path, self.settings.sample_rate), self.settings)
        entry.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=entry.parent, suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as fh:
                np.save(fh, feats, allow_pickle=False)
            os.replace(tmp, entry)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return feats


def spec_augment(feats: np.ndarray, rng: np.random.Generator, freq_masks: int = 2, freq_width: int = 20,
                 time_masks: int = 2, time_width: int = 30, length: Optional[int] = None) -> np.ndarray:
    """SpecAugment frequency and time masking (no warping); masked cells set to 0 (the mean)."""
    out = feats.copy()
    bins, frames = out.shape
    frames = frames if length is None else min(frames, length)
    for _ in range(freq_masks):
        w = int(rng.integers(0, freq_width + 1))
        if w and bins > w:
            f0 = int(rng.integers(0, bins - w))
            out[f0:f0 + w, :] = 0.0
    for _ in range(time_masks):
        w = int(rng.integers(0, min(time_width, max(frames // 5, 1)) + 1))
        if w and frames > w:
            t0 = int(rng.integers(0, frames - w))
            out[:, t0:t0 + w] = 0.0
    return out
