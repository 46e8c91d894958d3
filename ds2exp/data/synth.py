"""A deterministic synthetic English speech corpus, voiced by espeak-ng, in LibriSpeech layout.

The corpus is meant for fast, offline, end-to-end checks of the training stack: it is small,
builds in seconds, and every transcript is in the 29-symbol label set (A-Z, apostrophe, space).
What it holds (sentences, voices, speakers, held-out test voices) is planned in
:mod:`ds2exp.data.synth_plan`; the audio comes from :mod:`ds2exp.data.espeak`. This module
voices the plan and writes the tree. Its names, and the public names of those two modules, are
importable from here.

Layout (exactly LibriSpeech's)::

    <root>/LibriSpeech/<subset>/<speaker>/<chapter>/<speaker>-<chapter>-<utt:04d>.flac
    <root>/LibriSpeech/<subset>/<speaker>/<chapter>/<speaker>-<chapter>.trans.txt
    <root>/BUILD_INFO.json      # written last: the marker that the build is complete

with subsets ``train-synth``, ``dev-synth``, ``test-synth``; 16 kHz mono 16-bit FLAC. The build
goes into a temporary directory next to ``LibriSpeech`` and is renamed into place at the end.

Determinism
    The same spec gives byte-identical transcripts and sample-identical audio, whatever the
    number of workers (see :mod:`ds2exp.data.espeak` for how the audio is kept independent of
    what the process voiced before).

espeak-ng is not thread safe: parallelism uses worker processes (``spawn``, so a script that
calls :func:`build_corpus` with ``workers > 1`` needs the usual ``if __name__ == "__main__"``
guard), each with its own :class:`EspeakVoice`.

    python -m ds2exp.data.synth --name synth_tiny --root DIR
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import multiprocessing
import os
import shutil
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from ds2exp.atomic import atomic_write_text
from ds2exp.data.espeak import (
    AUDIO_OUTPUT_RETRIEVAL,
    AUDIO_OUTPUT_SYNCHRONOUS,
    EE_OK,
    POS_CHARACTER,
    SAMPLE_RATE,
    EspeakVoice,
    espeak_version,
    espeakCHARS_UTF8,
    espeakENDPAUSE,
    espeakINITIALIZE_DONT_EXIT,
    espeakPITCH,
    espeakRATE,
)
from ds2exp.data.synth_plan import (
    ACCENTS,
    CHAPTER_SIZE,
    PITCH_RANGE,
    RATE_RANGE,
    SPLIT_DIRS,
    SYNTH_PRESETS,
    TEST_VOICE_FRACTION,
    VARIANTS,
    SynthSpec,
    Utterance,
    list_english_voices,
    load_wordlist,
    plan_corpus,
    speaker_id,
)

# One import path for the whole corpus API, so callers need not know which module holds a name.
__all__ = [
    "ACCENTS", "AUDIO_OUTPUT_RETRIEVAL", "AUDIO_OUTPUT_SYNCHRONOUS", "CHAPTER_SIZE", "EE_OK", "FORMAT_VERSION",
    "MARKER_NAME", "PITCH_RANGE", "POS_CHARACTER", "RATE_RANGE", "SAMPLE_RATE", "SPLIT_DIRS", "SYNTH_PRESETS",
    "TEST_VOICE_FRACTION", "VARIANTS", "EspeakVoice", "SynthSpec", "Utterance", "build_corpus", "espeak_version",
    "espeakCHARS_UTF8", "espeakENDPAUSE", "espeakINITIALIZE_DONT_EXIT", "espeakPITCH", "espeakRATE",
    "list_english_voices", "load_wordlist", "main", "plan_corpus", "read_build_info", "speaker_id",
]

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
MARKER_NAME = "BUILD_INFO.json"


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
        # `hazards` counts only when set: a preset without them keeps the identity of the corpus it built
        "spec": {k: v for k, v in asdict(spec).items() if k != "hazards" or v},
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
            if spec.hazards:
                from ds2exp.data.synth_hazards import plant_hazards

                voice = EspeakVoice()
                try:
                    plant_hazards(tmp / SPLIT_DIRS["train"], lambda text: voice.synthesize(text, "en-us", 170, 50))
                finally:
                    voice.close()
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
