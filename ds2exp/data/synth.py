"""A deterministic synthetic English speech corpus, voiced by espeak-ng, in LibriSpeech layout.

The corpus is meant for fast, offline, end-to-end checks of the training stack: it is small,
builds in seconds, and every transcript is in the 29-symbol label set (A-Z, apostrophe, space).

Content
    Sentences are random word sequences drawn uniformly from ``wordlist.txt`` (>= 1,000 common
    English words). Every sentence string is unique across the whole corpus, so no dev or test
    sentence occurs in train. Each utterance gets a voice (an English accent plus an espeak voice
    variant), a speaking rate (130-210 wpm) and a pitch (30-70). A random subset of the
    accent/variant combinations is held out: it voices the test split only. Dev reuses the
    training voices with new sentences.

Layout (exactly LibriSpeech's)::

    <root>/LibriSpeech/<subset>/<speaker>/<chapter>/<speaker>-<chapter>-<utt:04d>.flac
    <root>/LibriSpeech/<subset>/<speaker>/<chapter>/<speaker>-<chapter>.trans.txt
    <root>/BUILD_INFO.json      # written last: the marker that the build is complete

with subsets ``train-synth``, ``dev-synth``, ``test-synth``; 16 kHz mono 16-bit FLAC. A speaker
id stands for one accent/variant combination (``(accent_index + 1) * 100 + variant_index``), a
chapter for a group of at most 50 of its utterances in one subset (chapter ids are unique across
the corpus). The build goes into a temporary directory next to ``LibriSpeech`` and is renamed
into place at the end.

Determinism
    The same spec gives byte-identical transcripts and sample-identical audio, whatever the
    number of workers. espeak-ng keeps DSP state in function-level statics (pitch-flutter
    phase, automatic gain, echo buffer, noise generator) that neither ``espeak_Terminate`` nor
    ``espeak_Initialize`` reset, so an utterance would otherwise depend on which utterances the
    same process voiced before it. :class:`EspeakVoice` therefore unloads and reloads its private
    instance of the shared library between utterances (about 0.5 ms), which restores the
    library's pristine static state.

espeak-ng is not thread safe: parallelism uses worker processes (``spawn``, so a script that
calls :func:`build_corpus` with ``workers > 1`` needs the usual ``if __name__ == "__main__"``
guard), each with its own :class:`EspeakVoice`.

    python -m ds2exp.data.synth --name synth_tiny --root DIR
"""
from __future__ import annotations

import argparse
import contextlib
import ctypes
import hashlib
import json
import logging
import multiprocessing
import os
import shutil
import sys
import tempfile
import time
import weakref
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from ds2exp.atomic import atomic_write_text

log = logging.getLogger(__name__)

SAMPLE_RATE = 16000
FORMAT_VERSION = 1
MARKER_NAME = "BUILD_INFO.json"
SPLIT_DIRS = {"train": "train-synth", "val": "dev-synth", "test": "test-synth"}
_SPLIT_CODE = {"train": 1, "val": 2, "test": 3}
CHAPTER_SIZE = 50
RATE_RANGE = (130, 210)  # words per minute, inclusive
PITCH_RANGE = (30, 70)  # espeak pitch 0-100, inclusive
TEST_VOICE_FRACTION = 0.2

# English accents (espeak voice name, language file under espeak-ng-data/lang). The order is
# part of the corpus definition: it fixes the speaker ids.
ACCENTS: tuple[tuple[str, str], ...] = (
    ("en-us", "gmw/en-US"),
    ("en-us-nyc", "gmw/en-US-nyc"),
    ("en", "gmw/en"),
    ("en-gb-x-rp", "gmw/en-GB-x-rp"),
    ("en-gb-scotland", "gmw/en-GB-scotland"),
    ("en-gb-x-gbclan", "gmw/en-GB-x-gbclan"),
    ("en-gb-x-gbcwmd", "gmw/en-GB-x-gbcwmd"),
    ("en-029", "gmw/en-029"),
)
# Voice variants (files in espeak-ng-data/voices/!v); "" is the accent's own default voice.
# Chosen to sound like plain speech: no echo/robot/whisper/joke variants. Append only: the
# index is part of the speaker id.
VARIANTS: tuple[str, ...] = (
    "", "m1", "m2", "m3", "m4", "m5", "m6", "m7", "m8", "f1", "f2", "f3", "f4", "f5",
    "klatt", "klatt2", "klatt3", "Alex", "Andy", "Annie", "Gene", "Jacky", "Michael", "Storm",
    "adam", "anika", "antonio", "belinda", "benjamin", "david", "ed", "edward", "gustave", "iven",
    "linda", "max", "michel", "paul", "quincy", "rob", "robert", "steph", "travis", "victor",
)

# --- espeak-ng C API constants (speak_lib.h) -------------------------------------------------
AUDIO_OUTPUT_RETRIEVAL = 1
AUDIO_OUTPUT_SYNCHRONOUS = 2
espeakINITIALIZE_DONT_EXIT = 0x8000
espeakRATE = 1
espeakPITCH = 3
POS_CHARACTER = 1
espeakCHARS_UTF8 = 1
espeakENDPAUSE = 0x1000
EE_OK = 0

_SYNTH_CALLBACK = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p)


class _EspeakVoiceStruct(ctypes.Structure):  # espeak_VOICE, leading fields only (read-only use)
    _fields_ = [
        ("name", ctypes.c_char_p),
        ("languages", ctypes.c_char_p),
        ("identifier", ctypes.c_char_p),
        ("gender", ctypes.c_ubyte),
        ("age", ctypes.c_ubyte),
        ("variant", ctypes.c_ubyte),
    ]


# --- spec ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SynthSpec:
    name: str  # "synth_tiny" / "synth_small"
    n_train: int
    n_val: int
    n_test: int
    min_words: int = 3
    max_words: int = 8
    seed: int = 1234

    def __post_init__(self) -> None:
        if min(self.n_train, self.n_val, self.n_test) < 0 or self.n_train < 1:
            raise ValueError(f"{self.name}: split sizes must be >= 0 and n_train >= 1")
        if not 1 <= self.min_words <= self.max_words:
            raise ValueError(f"{self.name}: need 1 <= min_words <= max_words")


SYNTH_PRESETS: dict[str, SynthSpec] = {
    "synth_tiny": SynthSpec("synth_tiny", n_train=4000, n_val=100, n_test=100, min_words=3, max_words=8),
    "synth_small": SynthSpec("synth_small", n_train=4000, n_val=500, n_test=500, min_words=3, max_words=12),
}


# --- library location ------------------------------------------------------------------------
def _default_paths() -> tuple[str, str]:
    try:
        import espeakng_loader
    except ImportError as exc:  # pragma: no cover - dependency is declared
        raise RuntimeError("the synthetic corpus needs the 'espeakng-loader' package") from exc
    return str(espeakng_loader.get_library_path()), str(espeakng_loader.get_data_path())


def _is_resident(path: str) -> bool:
    """Whether the shared object at `path` is currently mapped into this process."""
    import _ctypes

    try:
        handle = _ctypes.dlopen(path, os.RTLD_NOLOAD | os.RTLD_NOW)
    except OSError:
        return False
    _ctypes.dlclose(handle)
    return True


_VERSION_CACHE: dict[str, str] = {}


def espeak_version(library_path: str | None = None) -> str:
    """espeak-ng's version string (loads the library briefly; no initialisation)."""
    lib_path = library_path or _default_paths()[0]
    if lib_path not in _VERSION_CACHE:
        import _ctypes

        try:
            lib = ctypes.CDLL(lib_path)
        except OSError as exc:
            raise RuntimeError(f"could not load the espeak-ng library {lib_path}: {exc}") from exc
        try:
            lib.espeak_Info.restype = ctypes.c_char_p
            lib.espeak_Info.argtypes = [ctypes.c_void_p]
            _VERSION_CACHE[lib_path] = (lib.espeak_Info(None) or b"unknown").decode()
        finally:
            _ctypes.dlclose(lib._handle)
    return _VERSION_CACHE[lib_path]


# --- voices ----------------------------------------------------------------------------------
def _voice_name(accent: str, variant: str) -> str:
    return f"{accent}+{variant}" if variant else accent


def _all_voice_ids() -> dict[str, int]:
    """Every curated voice name -> its fixed speaker id."""
    return {
        _voice_name(accent, variant): (a + 1) * 100 + v
        for a, (accent, _) in enumerate(ACCENTS)
        for v, variant in enumerate(VARIANTS)
    }


def list_english_voices(data_path: str | os.PathLike | None = None) -> list[str]:
    """Voice+variant names usable for English, in speaker-id order (e.g. "en-us+f3").

    Only combinations whose language file and variant file exist in espeak-ng-data are listed.
    """
    data = Path(data_path or _default_paths()[1])
    variant_dir = data / "voices" / "!v"
    out = []
    for accent, lang_file in ACCENTS:
        if not (data / "lang" / lang_file).is_file():
            continue
        for variant in VARIANTS:
            if variant and not (variant_dir / variant).is_file():
                continue
            out.append(_voice_name(accent, variant))
    return out


def speaker_id(voice: str) -> int:
    try:
        return _all_voice_ids()[voice]
    except KeyError:
        raise ValueError(f"not a corpus voice: {voice!r}") from None


# --- the ctypes wrapper ----------------------------------------------------------------------
class EspeakVoice:
    """One espeak-ng instance (ctypes, synchronous, samples collected by callback).

    Create one per process: espeak-ng is not thread safe. ``synthesize`` reloads the library
    before every utterance after the first, so that the output depends only on the arguments
    (see the module docstring). If some other code in this process holds the same library
    mapped, a private copy of the shared object is used instead, so the reload still works.
    """

    def __init__(self, library_path: str | os.PathLike | None = None, data_path: str | os.PathLike | None = None):
        default_lib, default_data = _default_paths() if library_path is None or data_path is None else ("", "")
        self.library_path = str(library_path or default_lib)
        self.data_path = str(data_path or default_data)
        self._load_path = self.library_path
        self._private_dir: str | None = None
        self._finalizer: weakref.finalize | None = None
        self._lib: ctypes.CDLL | None = None
        self._dirty = False
        self._closed = False
        self._chunks: list[np.ndarray] = []
        self._callback = _SYNTH_CALLBACK(self._on_samples)  # keep a reference for the C side
        self.native_rate = 0
        self.version = "unknown"
        if _is_resident(self.library_path):
            self._use_private_copy()
        self._load()

    # -- lifecycle
    def _use_private_copy(self) -> None:
        if self._private_dir is None:
            self._private_dir = tempfile.mkdtemp(prefix="ds2exp-espeak-")
            self._finalizer = weakref.finalize(self, shutil.rmtree, self._private_dir, True)
            self._load_path = os.path.join(self._private_dir, os.path.basename(self.library_path))
            shutil.copy2(self.library_path, self._load_path)

    def _load(self) -> None:
        try:
            lib = ctypes.CDLL(self._load_path)
        except OSError as exc:
            raise RuntimeError(f"could not load the espeak-ng library {self.library_path}: {exc}") from exc
        try:
            lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
            lib.espeak_Initialize.restype = ctypes.c_int
            lib.espeak_SetSynthCallback.argtypes = [_SYNTH_CALLBACK]
            lib.espeak_SetSynthCallback.restype = None
            lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
            lib.espeak_SetVoiceByName.restype = ctypes.c_int
            lib.espeak_GetCurrentVoice.argtypes = []
            lib.espeak_GetCurrentVoice.restype = ctypes.POINTER(_EspeakVoiceStruct)
            lib.espeak_SetParameter.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
            lib.espeak_SetParameter.restype = ctypes.c_int
            lib.espeak_Synth.argtypes = [
                ctypes.c_void_p, ctypes.c_size_t, ctypes.c_uint, ctypes.c_int,
                ctypes.c_uint, ctypes.c_uint, ctypes.c_void_p, ctypes.c_void_p,
            ]
            lib.espeak_Synth.restype = ctypes.c_int
            lib.espeak_Synchronize.restype = ctypes.c_int
            lib.espeak_Terminate.restype = ctypes.c_int
            lib.espeak_Info.argtypes = [ctypes.c_void_p]
            lib.espeak_Info.restype = ctypes.c_char_p
        except AttributeError as exc:
            self._dlclose(lib)
            raise RuntimeError(f"{self.library_path} does not look like espeak-ng: {exc}") from exc
        rate = lib.espeak_Initialize(
            AUDIO_OUTPUT_SYNCHRONOUS, 0, self.data_path.encode(), espeakINITIALIZE_DONT_EXIT
        )
        if rate <= 0:
            self._dlclose(lib)
            raise RuntimeError(
                f"espeak_Initialize failed (returned {rate}) for the espeak-ng library "
                f"{self.library_path} with data directory {self.data_path}"
            )
        lib.espeak_SetSynthCallback(self._callback)
        if hasattr(lib, "espeak_ng_SetRandSeed"):  # noise generator (breathy voices)
            lib.espeak_ng_SetRandSeed.argtypes = [ctypes.c_long]
            lib.espeak_ng_SetRandSeed.restype = None
            lib.espeak_ng_SetRandSeed(0)
        self.native_rate = int(rate)
        self.version = (lib.espeak_Info(None) or b"unknown").decode()
        self._lib = lib
        self._dirty = False

    @staticmethod
    def _dlclose(lib: ctypes.CDLL) -> None:
        import _ctypes

        _ctypes.dlclose(lib._handle)

    def _unload(self) -> None:
        if self._lib is not None:
            self._lib.espeak_Terminate()
            self._dlclose(self._lib)
            self._lib = None

    def reset(self) -> None:
        """Reload the library so that its static synthesis state is pristine again."""
        self._unload()
        if _is_resident(self._load_path):
            # Someone else holds this file mapped: its statics would survive the reload.
            if self._private_dir is not None:
                raise RuntimeError(f"cannot unload the private espeak-ng copy {self._load_path}")
            self._use_private_copy()
        self._load()

    def close(self) -> None:
        self._closed = True
        self._unload()
        if self._finalizer is not None:
            self._finalizer()

    def __enter__(self) -> "EspeakVoice":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- synthesis
    def _on_samples(self, wav, numsamples, events) -> int:
        if numsamples > 0 and wav:
            self._chunks.append(np.ctypeslib.as_array(wav, shape=(numsamples,)).copy())
        return 0

    def set_voice(self, voice: str) -> None:
        lib = self._require()
        rc = lib.espeak_SetVoiceByName(voice.encode())
        if rc != EE_OK:
            raise RuntimeError(f"espeak-ng has no voice {voice!r} (error {rc})")
        if "+" in voice:  # espeak silently ignores an unknown variant: check it was applied
            current = lib.espeak_GetCurrentVoice()
            ident = (current.contents.identifier or b"").decode() if current else ""
            if not ident.lower().endswith("+" + voice.split("+", 1)[1].lower()):
                raise RuntimeError(f"espeak-ng did not apply the variant of {voice!r} (got {ident!r})")

    def synthesize(self, text: str, voice: str = "en-us", rate: int = 175, pitch: int = 50) -> np.ndarray:
        """Speak `text`; returns float32 mono samples in [-1, 1] at 16 kHz."""
        if self._closed:
            raise RuntimeError("EspeakVoice is closed")
        if self._dirty or self._lib is None:
            self.reset()
        lib = self._require()
        self._dirty = True
        self.set_voice(voice)
        for param, value in ((espeakRATE, rate), (espeakPITCH, pitch)):
            rc = lib.espeak_SetParameter(param, int(value), 0)
            if rc != EE_OK:
                raise RuntimeError(f"espeak_SetParameter({param}, {value}) failed with error {rc}")
        data = text.encode("utf-8") + b"\0"
        self._chunks = []
        rc = lib.espeak_Synth(data, len(data), 0, POS_CHARACTER, 0, espeakCHARS_UTF8 | espeakENDPAUSE, None, None)
        if rc != EE_OK:
            raise RuntimeError(f"espeak_Synth failed with error {rc} for {text!r}")
        lib.espeak_Synchronize()
        pcm = np.concatenate(self._chunks) if self._chunks else np.zeros(0, np.int16)
        self._chunks = []
        audio = pcm.astype(np.float32) / 32768.0
        if self.native_rate != SAMPLE_RATE and audio.size:
            import soxr

            audio = soxr.resample(audio, self.native_rate, SAMPLE_RATE, quality="HQ").astype(np.float32)
        return audio

    def _require(self) -> ctypes.CDLL:
        if self._lib is None:
            raise RuntimeError("EspeakVoice is closed")
        return self._lib


# --- corpus planning -------------------------------------------------------------------------
@dataclass(frozen=True)
class Utterance:
    split: str  # "train" / "val" / "test"
    speaker: int
    chapter: int
    index: int  # within the chapter
    text: str  # the transcript, upper case
    voice: str
    rate: int
    pitch: int

    @property
    def utt_id(self) -> str:
        return f"{self.speaker}-{self.chapter}-{self.index:04d}"

    def relpath(self) -> str:
        return f"{SPLIT_DIRS[self.split]}/{self.speaker}/{self.chapter}/{self.utt_id}.flac"


def load_wordlist(path: str | os.PathLike | None = None) -> list[str]:
    """The vocabulary: unique upper-case words (A-Z and apostrophe), in file order."""
    path = Path(path) if path else Path(__file__).with_name("wordlist.txt")
    words, seen = [], set()
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        word = line.strip()
        if not word:
            continue
        if not all("A" <= c <= "Z" or c == "'" for c in word) or not any(c != "'" for c in word):
            raise ValueError(f"{path}:{lineno}: bad word {word!r}")
        if word not in seen:
            seen.add(word)
            words.append(word)
    return words


def _rng(seed: int, stream: int) -> np.random.Generator:
    return np.random.default_rng([int(seed), stream])


def _split_voices(spec: SynthSpec, voices: Sequence[str]) -> tuple[list[str], list[str]]:
    if len(voices) < 2:
        raise RuntimeError(f"need at least 2 English espeak voices, found {list(voices)}")
    n_test = min(len(voices) - 1, max(1, round(TEST_VOICE_FRACTION * len(voices))))
    perm = _rng(spec.seed, 1).permutation(len(voices))
    test = sorted((voices[i] for i in perm[:n_test]), key=speaker_id)
    train = sorted((voices[i] for i in perm[n_test:]), key=speaker_id)
    return train, test


def _sentences(spec: SynthSpec, vocab: Sequence[str], count: int) -> list[str]:
    rng = _rng(spec.seed, 2)
    out: list[str] = []
    seen: set[str] = set()
    attempts = 0
    while len(out) < count:
        attempts += 1
        if attempts > 20 * count + 1000:
            raise ValueError(f"{spec.name}: cannot draw {count} distinct sentences from {len(vocab)} words")
        n = int(rng.integers(spec.min_words, spec.max_words + 1))
        sentence = " ".join(vocab[i] for i in rng.integers(0, len(vocab), size=n))
        if sentence not in seen:
            seen.add(sentence)
            out.append(sentence)
    return out


def plan_corpus(spec: SynthSpec, vocab: Sequence[str], voices: Sequence[str]) -> dict[str, list[Utterance]]:
    """Every utterance of every split, fully determined by (spec, vocab, voices)."""
    train_voices, test_voices = _split_voices(spec, voices)
    sizes = {"train": spec.n_train, "val": spec.n_val, "test": spec.n_test}
    texts = _sentences(spec, vocab, sum(sizes.values()))  # all distinct: no sentence in 2 splits
    split_voices = {"train": train_voices, "test": test_voices}
    plan: dict[str, list[Utterance]] = {}
    start = 0
    for stream, split in enumerate(("train", "val", "test"), start=10):
        n = sizes[split]
        rng = _rng(spec.seed, stream)
        pool = split_voices.get(split, [])
        if split == "val":  # dev: voices heard in training, new sentences
            pool = sorted({u.voice for u in plan["train"]}, key=speaker_id)
        # Balanced: every voice of the split gets floor/ceil(n / len(pool)) utterances.
        assignment = rng.permutation(np.resize(rng.permutation(len(pool)), n)) if n else []
        rates = rng.integers(RATE_RANGE[0], RATE_RANGE[1] + 1, size=n)
        pitches = rng.integers(PITCH_RANGE[0], PITCH_RANGE[1] + 1, size=n)
        by_speaker: dict[int, list[int]] = {}
        for k, v in enumerate(assignment):
            by_speaker.setdefault(speaker_id(pool[int(v)]), []).append(k)
        utts: list[Utterance] = []
        for spk in sorted(by_speaker):
            items = by_speaker[spk]
            n_chapters = (len(items) + CHAPTER_SIZE - 1) // CHAPTER_SIZE
            if n_chapters > 100:
                raise ValueError(f"{spec.name}: more than {100 * CHAPTER_SIZE} utterances for one speaker")
            for c in range(n_chapters):
                chapter = _SPLIT_CODE[split] * 100000 + spk * 100 + c
                for j, k in enumerate(items[c * CHAPTER_SIZE:(c + 1) * CHAPTER_SIZE]):
                    voice = pool[int(assignment[k])]
                    utts.append(Utterance(
                        split, spk, chapter, j, texts[start + k], voice, int(rates[k]), int(pitches[k])
                    ))
        plan[split] = utts
        start += n
    return plan


# --- building --------------------------------------------------------------------------------
def _to_pcm16(audio: np.ndarray) -> np.ndarray:
    return np.clip(np.round(audio.astype(np.float64) * 32768.0), -32768, 32767).astype(np.int16)


def _speakable(transcript: str) -> str:
    # Lower case so that espeak reads words, not all-caps abbreviations ("US", "IT").
    return transcript.lower() + "."


_WORKER_VOICE: EspeakVoice | None = None


def _synth_job(job: tuple[str, str, int, int, str]) -> tuple[str, int, int]:
    """Voice one utterance into a FLAC file; returns (path, n_samples, peak)."""
    global _WORKER_VOICE
    import soundfile as sf

    text, voice, rate, pitch, path = job
    if _WORKER_VOICE is None:  # once per process (not in a Pool initializer: errors would loop)
        _WORKER_VOICE = EspeakVoice()
    pcm = _to_pcm16(_WORKER_VOICE.synthesize(_speakable(text), voice, rate, pitch))
    if pcm.size == 0:
        raise RuntimeError(f"espeak-ng produced no audio for {text!r} ({voice})")
    sf.write(path, pcm, SAMPLE_RATE, format="FLAC", subtype="PCM_16")
    return path, int(pcm.size), int(np.abs(pcm.astype(np.int32)).max())


def _vocab_sha256(vocab: Sequence[str]) -> str:
    return hashlib.sha256("\n".join(vocab).encode()).hexdigest()


def _identity(spec: SynthSpec, vocab: Sequence[str], version: str) -> dict:
    """What must match for an existing build to be reused."""
    return {
        "format_version": FORMAT_VERSION,
        "spec": asdict(spec),
        "vocabulary_sha256": _vocab_sha256(vocab),
        "espeak_version": version,
        "sample_rate": SAMPLE_RATE,
    }


def read_build_info(root: str | os.PathLike) -> dict | None:
    try:
        return json.loads((Path(root) / MARKER_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _marker_matches(root: Path, identity: dict) -> bool:
    info = read_build_info(root)
    if not isinstance(info, dict) or not (root / "LibriSpeech").is_dir():
        return False
    return all(info.get(k) == v for k, v in identity.items())


@contextlib.contextmanager
def _build_lock(root: Path) -> Iterator[None]:
    import fcntl

    with open(root / ".synth.lock", "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _run_jobs(jobs: list[tuple[str, str, int, int, str]], workers: int, bar) -> list[tuple[str, int, int]]:
    results = []
    if workers <= 1 or len(jobs) < 2:
        for job in jobs:
            results.append(_synth_job(job))
            bar.update(1)
        return results
    ctx = multiprocessing.get_context("spawn")  # no fork: the parent may hold threads/espeak
    chunksize = max(1, min(16, len(jobs) // (workers * 8)))
    with ctx.Pool(processes=workers) as pool:
        for res in pool.imap_unordered(_synth_job, jobs, chunksize=chunksize):
            results.append(res)
            bar.update(1)
    return results


def build_corpus(spec: SynthSpec, root: Path, workers: int = 2, progress: bool = True) -> Path:
    """Build (or reuse) the corpus; returns root/"LibriSpeech"."""
    from tqdm import tqdm

    root = Path(root)
    dest = root / "LibriSpeech"
    vocab = load_wordlist()
    version = espeak_version()  # fails early, naming the library, if espeak cannot load
    identity = _identity(spec, vocab, version)
    if _marker_matches(root, identity):
        log.info("synthetic corpus %s already built in %s", spec.name, root)
        return dest
    root.mkdir(parents=True, exist_ok=True)
    with _build_lock(root):
        if _marker_matches(root, identity):  # built by a concurrent process meanwhile
            return dest
        if dest.exists():
            foreign = sorted(p.name for p in dest.iterdir() if p.name not in SPLIT_DIRS.values())
            if foreign:
                raise RuntimeError(
                    f"{dest} exists and holds {foreign}, which this builder did not make; "
                    "refusing to replace it (choose another root)"
                )
        t0 = time.time()
        voices = list_english_voices()
        plan = plan_corpus(spec, vocab, voices)
        tmp = Path(tempfile.mkdtemp(prefix=".LibriSpeech.tmp-", dir=root))
        try:
            jobs = []
            for split, utts in plan.items():
                (tmp / SPLIT_DIRS[split]).mkdir()
                chapters: dict[tuple[int, int], list[Utterance]] = {}
                for u in utts:
                    chapters.setdefault((u.speaker, u.chapter), []).append(u)
                for (spk, ch), members in chapters.items():
                    cdir = tmp / SPLIT_DIRS[split] / str(spk) / str(ch)
                    cdir.mkdir(parents=True)
                    lines = "".join(f"{u.utt_id} {u.text}\n" for u in sorted(members, key=lambda u: u.index))
                    (cdir / f"{spk}-{ch}.trans.txt").write_text(lines, encoding="utf-8")
                    jobs.extend((u.text, u.voice, u.rate, u.pitch, str(tmp / u.relpath())) for u in members)
            with tqdm(total=len(jobs), desc=f"synth {spec.name}", unit="utt", file=sys.stderr,
                      disable=not progress, dynamic_ncols=True) as bar:
                results = _run_jobs(jobs, workers, bar)
            lengths = {path: n for path, n, _ in results}
            silent = [path for path, _, peak in results if peak < 64]
            if len(lengths) != len(jobs) or silent:
                raise RuntimeError(
                    f"synthesis incomplete or silent: {len(lengths)}/{len(jobs)} files, silent={silent[:3]}"
                )
            seconds = {
                split: sum(lengths[str(tmp / u.relpath())] for u in utts) / SAMPLE_RATE
                for split, utts in plan.items()
            }
            # Swap into place: drop the old marker first, so no marker ever describes the wrong tree.
            (root / MARKER_NAME).unlink(missing_ok=True)
            old = None
            if dest.exists():
                old = root / f".LibriSpeech.old-{os.getpid()}-{int(time.time())}"
                dest.rename(old)
            tmp.rename(dest)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        info = dict(identity)
        info.update({
            "name": spec.name,
            "seed": spec.seed,
            "subsets": {split: SPLIT_DIRS[split] for split in plan},
            "counts": {SPLIT_DIRS[s]: len(u) for s, u in plan.items()},
            "hours": {SPLIT_DIRS[s]: round(sec / 3600.0, 4) for s, sec in seconds.items()},
            "voices": {SPLIT_DIRS[s]: sorted({u.voice for u in utts}, key=speaker_id) for s, utts in plan.items()},
            "speakers": {SPLIT_DIRS[s]: sorted({u.speaker for u in utts}) for s, utts in plan.items()},
            "vocabulary_size": len(vocab),
            "rate_range_wpm": list(RATE_RANGE),
            "pitch_range": list(PITCH_RANGE),
            "build_seconds": round(time.time() - t0, 2),
            "workers": workers,
        })
        atomic_write_text(root / MARKER_NAME, json.dumps(info, indent=2, sort_keys=True) + "\n")
    log.info("built synthetic corpus %s in %s (%.1fs)", spec.name, dest, info["build_seconds"])
    return dest


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Build a synthetic espeak-ng corpus in LibriSpeech layout.")
    parser.add_argument("--name", default="synth_tiny", choices=sorted(SYNTH_PRESETS))
    parser.add_argument("--root", required=True, type=Path, help="directory to hold LibriSpeech/ and BUILD_INFO.json")
    parser.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--seed", type=int, default=None, help="override the preset's seed")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    spec = SYNTH_PRESETS[args.name]
    if args.seed is not None:
        spec = SynthSpec(**{**asdict(spec), "seed": args.seed})
    t0 = time.time()
    path = build_corpus(spec, args.root, workers=args.workers, progress=not args.no_progress)
    print(f"{path} ({time.time() - t0:.1f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
