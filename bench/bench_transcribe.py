"""Peak memory of `python -m ds2exp.transcribe` against the length of the audio (it streams long files).

    .venv/bin/python -m bench.bench_transcribe                          1, 20 and 60 minutes, a tiny model
    .venv/bin/python -m bench.bench_transcribe --minutes 1 5 --checkpoint outputs/<run>
    .venv/bin/python -m bench.bench_transcribe --exported model.mindir  the file export.py wrote

The audio is synthesised speech (espeak-ng, ten sentences, four voices) with low noise, repeated to the
length asked for and written as 16 kHz FLAC a block at a time. Each length is transcribed by a fresh
process; its peak resident memory (ru_maxrss of that child, from wait4) and wall time are printed, then
the ratio of the longest's peak to the shortest's (the target: <= 1.2). Without --checkpoint a randomly
initialised ds2_tiny is used: the memory of the pipeline, not of a good transcript, is measured.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import List

import numpy as np

import ds2exp  # noqa: F401  (first: the protobuf implementation before MindSpore)
from bench.host import machine

SENTENCES = ["the quick brown fox jumps over the lazy dog", "open the door and let the light in",
             "she sells sea shells by the sea shore", "a small world of sound and colour",
             "we will meet at the station at seven", "turn left at the second corner",
             "the weather today is warm and bright", "please read the numbers out loud",
             "music fills the empty hall at night", "the train leaves in ten minutes"]
VOICES = ["en-us", "en-us+f3", "en-us+m3", "en-us+f1"]
RATE = 16000
TARGET_RATIO = 1.2


def speech_loop(seed: int = 0) -> np.ndarray:
    """About a minute of synthesised speech with short pauses."""
    from ds2exp.data.synth import EspeakVoice

    voice = EspeakVoice()
    rng = np.random.default_rng(seed)
    parts = []
    for i, text in enumerate(SENTENCES * 2):
        parts.append(voice.synthesize(text, VOICES[i % len(VOICES)], 150 + 10 * (i % 4), 50))
        parts.append(np.zeros(int(RATE * rng.uniform(0.3, 0.9)), np.float32))
    return np.concatenate(parts).astype(np.float32)


def write_long_audio(path: Path, minutes: float, loop: np.ndarray, seed: int = 0) -> Path:
    import soundfile as sf

    rng = np.random.default_rng(seed)
    total = int(minutes * 60 * RATE)
    with sf.SoundFile(str(path), "w", samplerate=RATE, channels=1, format="FLAC", subtype="PCM_16") as fh:
        written = 0
        while written < total:
            n = min(len(loop), total - written)
            noise = rng.normal(0, 0.003, n).astype(np.float32)
            fh.write(np.clip(loop[:n] + noise, -1, 1))
            written += n
    return path


def tiny_checkpoint(path: Path) -> Path:
    from dataclasses import asdict

    from omegaconf import OmegaConf

    from ds2exp.config import FeatureConfig, ModelConfig
    from ds2exp.models.deepspeech2 import build_model
    from ds2exp.checkpoints.io import save_checkpoint

    tiny = OmegaConf.merge(OmegaConf.structured(ModelConfig), OmegaConf.load(Path(__file__).resolve().parents[1]
                                                                             / "conf" / "model" / "ds2_tiny.yaml"))
    mcfg = OmegaConf.to_container(tiny, enum_to_str=True)
    model = build_model(OmegaConf.create(mcfg))
    return save_checkpoint(path, model, meta={"step": 0, "config": {"model": mcfg,
                                                                    "dataset": {"feature": asdict(FeatureConfig())}}})


def run_transcribe(model_arg: str, audio: Path, chunk_seconds: float):
    """(peak RSS in MB, wall seconds, transcript length) of one transcribe process."""
    cmd = [sys.executable, "-m", "ds2exp.transcribe", model_arg, f"audio=[{audio}]", f"chunk_seconds={chunk_seconds}"]
    t0 = time.perf_counter()
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, cwd=Path(__file__).resolve().parents[1])
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        wall = time.perf_counter() - t0
        out.seek(0)
        err.seek(0)
        text = out.read().decode()
        if proc.returncode != 0:
            raise SystemExit(f"transcribe failed ({proc.returncode}): {err.read().decode()[-2000:]}")
    return usage.ru_maxrss / 1024.0, wall, len(text.split(": ", 1)[-1].strip())


def main(argv: List[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, nargs="+", default=[1, 20, 60], help="audio lengths (default 1 20 60)")
    group = ap.add_mutually_exclusive_group()
    group.add_argument("--checkpoint", help="a .ckpt or run directory (default: a randomly initialised ds2_tiny)")
    group.add_argument("--exported", help="a .mindir written by export.py")
    ap.add_argument("--chunk-seconds", type=float, default=20.0)
    ap.add_argument("--workdir", help="where the audio is written (default: a temporary folder)")
    args = ap.parse_args(argv)
    if any(m <= 0 for m in args.minutes):
        ap.error("--minutes: lengths must be > 0")

    print(f"machine: {machine()}")
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        tmp = Path(tmp)
        if args.exported:
            model_arg, what = f"exported={args.exported}", f"exported {args.exported}"
        elif args.checkpoint:
            model_arg, what = f"checkpoint={args.checkpoint}", f"checkpoint {args.checkpoint}"
        else:
            model_arg, what = f"checkpoint={tiny_checkpoint(tmp / 'ds2_tiny.ckpt')}", "ds2_tiny (random weights)"
        print(f"model: {what}; chunk_seconds={args.chunk_seconds:g}")
        loop = speech_loop()
        peaks = {}
        for minutes in sorted(args.minutes):
            audio = write_long_audio(tmp / f"{minutes:g}min.flac", minutes, loop)
            peak, wall, chars = run_transcribe(model_arg, audio, args.chunk_seconds)
            peaks[minutes] = peak
            print(f"{minutes:6g} min of audio ({audio.stat().st_size / 1e6:.0f} MB FLAC): peak RSS {peak:7.0f} MB, "
                  f"{wall:6.1f} s ({wall / (60 * minutes):.2f} x real time), {chars} characters", flush=True)
            audio.unlink()
    if len(peaks) > 1:
        lo, hi = min(peaks), max(peaks)
        ratio = peaks[hi] / peaks[lo]
        print(f"peak RSS {hi:g} min / {lo:g} min = {ratio:.3f} ({'PASS' if ratio <= TARGET_RATIO else 'MISS'}, "
              f"target <= {TARGET_RATIO})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
