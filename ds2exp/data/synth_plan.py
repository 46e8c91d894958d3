"""What the synthetic corpus holds: its presets, voices, vocabulary and per-utterance plan.

Sentences are random word sequences drawn uniformly from ``wordlist.txt`` (>= 1,000 common
English words). Every sentence string is unique across the whole corpus, so no dev or test
sentence occurs in train. Each utterance gets a voice (an English accent plus an espeak voice
variant), a speaking rate (130-210 wpm) and a pitch (30-70). A random subset of the
accent/variant combinations is held out: it voices the test split only. Dev reuses the training
voices with new sentences.

A speaker id stands for one accent/variant combination (``(accent_index + 1) * 100 +
variant_index``), a chapter for a group of at most 50 of its utterances in one subset (chapter
ids are unique across the corpus). The plan is a pure function of (spec, vocabulary, voices):
no audio is made here.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from ds2exp.data.espeak import default_paths

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
    hazards: bool = False  # plant ds2exp.data.synth_hazards.HAZARDS in the training split

    def __post_init__(self) -> None:
        if min(self.n_train, self.n_val, self.n_test) < 0 or self.n_train < 1:
            raise ValueError(f"{self.name}: split sizes must be >= 0 and n_train >= 1")
        if not 1 <= self.min_words <= self.max_words:
            raise ValueError(f"{self.name}: need 1 <= min_words <= max_words")


SYNTH_PRESETS: dict[str, SynthSpec] = {
    "synth_tiny": SynthSpec("synth_tiny", n_train=4000, n_val=100, n_test=100, min_words=3, max_words=8),
    "synth_small": SynthSpec("synth_small", n_train=4000, n_val=500, n_test=500, min_words=3, max_words=12),
    # LibriSpeech's hazards at a size that trains on 2 cores: 3-85 words (about 1-35 s) and synth_hazards
    "synth_long": SynthSpec("synth_long", n_train=48, n_val=8, n_test=8, min_words=3, max_words=85, hazards=True),
}


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
    data = Path(data_path or default_paths()[1])
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

