"""DeepSpeech2 input features: log1p STFT magnitude, per-utterance mean/std normalisation.

Numerically the reference recipe's: the model zoo's `src/dataset.py` calls
`librosa.stft(y, n_fft=320, hop_length=160, win_length=320, window="hamming")`, then log1p and
(x - mean) / std with NumPy's population std. librosa turns the window *name* into a periodic
window (`scipy.signal.get_window(name, n, fftbins=True)`), as deepspeech.pytorch V2.1 does, so
`hamming` here is periodic too; `hamming_symmetric` is `np.hamming(n)` (what ds2exp used before
features version 2), `hann` the zoo's evaluation window (its eval_config says "hanning").
Computed with NumPy alone so it is fast and independent of librosa's version. The reference
ran librosa < 0.10, whose centred STFT padded by reflection (`pad_mode`).
"""
from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from ds2exp.atomic import atomic_open
from ds2exp.data.audio import AudioError, load_audio

log = logging.getLogger(__name__)

# Part of every cache key: bump it whenever the same settings would compute different numbers,
# so entries of an older computation are never reused. 2: periodic windows (librosa's).
FEATURES_VERSION = 2


@dataclass(frozen=True)
class FeatureSettings:
    sample_rate: int = 16000
    window_size: float = 0.02
    window_stride: float = 0.01
    window: str = "hamming"
    pad_mode: str = "reflect"
    normalize: bool = True
    zero_std_guard: bool = True

    def __post_init__(self):
        name = str(getattr(self.window, "value", self.window))
        if name not in _WINDOWS:
            raise ValueError(f"dataset.feature.window={name!r} is not allowed; expected one of {', '.join(_WINDOWS)}")
        object.__setattr__(self, "window", name)

    @classmethod
    def from_config(cls, cfg) -> "FeatureSettings":
        return cls(**{k: cfg[k] for k in ("sample_rate", "window_size", "window_stride", "window",
                                           "pad_mode", "normalize", "zero_std_guard")})

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
        """Stable digest of the settings and FEATURES_VERSION: the feature cache is keyed by it."""
        blob = json.dumps({"features_version": FEATURES_VERSION, **asdict(self)}, sort_keys=True).encode()
        return hashlib.sha1(blob).hexdigest()[:12]

    def num_frames(self, num_samples: int) -> int:
        return 1 + num_samples // self.hop  # centred STFT


def _periodic(fn):
    # scipy.signal.get_window(name, n, fftbins=True): the symmetric window of n + 1, last point dropped
    return lambda n: fn(n + 1)[:-1]


_WINDOWS = {"hamming": _periodic(np.hamming), "hamming_symmetric": np.hamming,
            "hann": _periodic(np.hanning), "hanning": _periodic(np.hanning), "hann_symmetric": np.hanning,
            "blackman": _periodic(np.blackman), "bartlett": _periodic(np.bartlett)}
WINDOW_NAMES = tuple(_WINDOWS)


def window_array(name: str, length: int) -> np.ndarray:
    """The analysis window: periodic unless the name ends in `_symmetric` (librosa's convention)."""
    try:
        return np.asarray(_WINDOWS[name](length), dtype=np.float64)
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
        if std > 0 or settings.zero_std_guard:
            spect = (spect - mean) / (std if std > 0 else 1.0)
        else:  # the zoo's unguarded division: 0/0 for silent audio
            with np.errstate(invalid="ignore", divide="ignore"):
                spect = (spect - mean) / std
    return spect.astype(np.float32)


CACHE_MODES = ("auto", "on", "off")
_TRUE = {"on", "true", "yes", "1"}
_FALSE = {"off", "false", "no", "0"}
# A *.tmp older than this was left by a killed writer (a write takes milliseconds).
STALE_TMP_SECONDS = 600.0
NPY_HEADER_BYTES = 128


def cache_mode(value) -> str:
    """`dataset.feature.cache` as one of auto/on/off (booleans and their spellings accepted)."""
    text = str(getattr(value, "value", value)).strip().lower()
    if text in _TRUE:
        return "on"
    if text in _FALSE:
        return "off"
    if text == "auto":
        return "auto"
    raise ValueError(f"dataset.feature.cache={value!r} is not allowed; expected auto, on (true) or off (false)")


def cache_bytes(frames: Sequence[int], settings: FeatureSettings) -> int:
    """Bytes the cache takes for utterances of these frame counts (float32 .npy, one per utterance)."""
    return int(sum(frames)) * settings.num_bins * 4 + NPY_HEADER_BYTES * len(frames)


def librispeech_cache_gb(hours: float, settings: FeatureSettings) -> float:
    """Cache size for `hours` of audio, as for train-clean-100 (100.6 h) and the 960 h set."""
    return hours * 3600 * settings.sample_rate / settings.hop * settings.num_bins * 4 / 1e9


def measure_feature_seconds(paths: Sequence, settings: FeatureSettings) -> tuple:
    """(seconds spent, audio seconds) decoding and computing features of these files."""
    audio_s = spent = 0.0
    for p in paths:
        t0 = time.perf_counter()
        try:
            y = load_audio(p, settings.sample_rate, warn=False)
        except AudioError:
            continue  # the loader reports broken files where it meets them
        compute_features(y, settings)
        spent += time.perf_counter() - t0
        audio_s += len(y) / settings.sample_rate
    return spent, audio_s


class FeatureCache:
    """On-disk cache of features, one float32 .npy per utterance, keyed by feature settings and file.

    `enabled`: on, off, or auto (see `plan`): the cache is kept where it pays, i.e. where the
    corpus is small (its size at most `max_gb`); above that features are computed on the fly,
    which costs a few percent of a step at most (docs/storage.md has the measurements).
    The key includes FEATURES_VERSION and the audio file's absolute path, size and modification
    time, so a changed file or a changed computation is recomputed. Writes go to a temporary file
    renamed into place, so a crash never leaves a half-written entry; temporary files left by
    killed processes are removed when a cache is opened.
    """

    def __init__(self, directory: str | Path, settings: FeatureSettings, enabled=True, max_gb: float = 4.0):
        self.settings = settings
        self.mode = cache_mode(enabled)
        self.max_gb = float(max_gb)
        self.directory = Path(directory) / settings.key()
        self.planned = False
        self.enabled = False
        if self.mode != "off":
            self._open()  # auto until planned: cache (the smaller the corpus, the more it pays)

    def _open(self) -> None:
        if self.enabled:
            return
        self.directory.mkdir(parents=True, exist_ok=True)
        meta = self.directory / "settings.json"
        if not meta.exists():
            meta.write_text(json.dumps({"features_version": FEATURES_VERSION, **asdict(self.settings)}, indent=2))
        self.remove_stale_tmp()
        self.enabled = True

    def remove_stale_tmp(self, older_than: float = STALE_TMP_SECONDS) -> int:
        """Delete *.tmp files older than `older_than` seconds (left by killed writers); returns how many."""
        now = time.time()
        removed = 0
        for tmp in self.directory.glob("*/*.tmp"):
            try:
                if now - tmp.stat().st_mtime > older_than:
                    tmp.unlink()
                    removed += 1
            except FileNotFoundError:
                continue  # another process removed or renamed it meanwhile
        if removed:
            log.info("feature cache: removed %d temporary files left by interrupted writes in %s",
                     removed, self.directory)
        return removed

    def plan(self, split_name: str, examples: Sequence, batch_size: int, sample: int = 3) -> Optional[str]:
        """Decide `auto` from the first split it sees (training's) and log one line: the cache size
        this split takes, the same for LibriSpeech, and the measured feature cost per batch.
        `examples` are ds2exp.data.dataset.Example (utt.audio_path, utt.duration, frames)."""
        if self.planned or not examples:
            return None
        self.planned = True
        size_gb = cache_bytes([e.frames for e in examples], self.settings) / 1e9
        hours = sum(e.utt.duration for e in examples) / 3600
        step = max(1, len(examples) // sample)
        spent, audio_s = measure_feature_seconds([e.utt.audio_path for e in examples[::step][:sample]],
                                                 self.settings)
        mean_dur = hours * 3600 / len(examples)
        per_batch_ms = 1000 * spent / max(audio_s, 1e-9) * mean_dur * batch_size
        if self.mode == "auto":
            decision = "on" if size_gb <= self.max_gb else "off"
            why = f"auto: {'<=' if decision == 'on' else '>'} dataset.feature.cache_max_gb={self.max_gb:g}"
        else:
            decision, why = self.mode, f"dataset.feature.cache={self.mode}"
        line = (f"feature cache: {split_name} {hours:.2f} h -> {size_gb:.3g} GB float32 "
                f"(train-clean-100 {librispeech_cache_gb(100.6, self.settings):.0f} GB, 960 h "
                f"{librispeech_cache_gb(960, self.settings):.0f} GB); features cost {per_batch_ms:.0f} ms per "
                f"batch of {batch_size} ({audio_s / max(spent, 1e-9):.0f}x real time); cache {decision} ({why})")
        log.info(line)
        if decision == "on":
            self._open()
        else:
            self.enabled = False
        return line

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
        with atomic_open(entry, "wb", fsync=False) as fh:  # a lost entry is recomputed: no fsync
            np.save(fh, feats, allow_pickle=False)
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
