"""`make bench`: every number measured in this one run, printed as tables.

1. Feature extraction speed (multiples of real time) from FLAC and from the feature cache.
2. A DeepSpeech2 training step (bench/bench_step.py), ds2_tiny and ds2_reference: ds2exp's Trainer
   (fast kernels, blocking launch) against the naive path the model zoo recipe builds (nn.Conv2d +
   nn.LSTM, default asynchronous launch, padded to 1250 frames, batch 1) and the same architecture
   in PyTorch; GFLOP/s against a GEMM peak, data wait, peak memory, epoch projection, targets.
3. The ds2_tiny step op by op under MindSpore's profiler (bench/profile_step.py).
4. The layer benchmark (bench/bench_layers.py --quick).

Every table says the machine it ran on and its load.
"""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import ds2exp  # noqa: F401  (protobuf implementation before mindspore)
from bench.host import machine, where

ROOT = Path(__file__).resolve().parents[1]


def feature_speed(data_dir: Path, limit: int = 300) -> list:
    from ds2exp.data.audio import load_audio
    from ds2exp.data.features import FeatureCache, FeatureSettings, compute_features
    from ds2exp.data.synth import SYNTH_PRESETS, build_corpus

    libri = build_corpus(SYNTH_PRESETS["synth_tiny"], data_dir / "synth_tiny", workers=2, progress=False)
    files = sorted(libri.glob("train-synth/*/*/*.flac"))[:limit]
    settings = FeatureSettings()
    audio_s = 0.0
    t0 = time.perf_counter()
    for f in files:
        y = load_audio(f)
        audio_s += len(y) / 16000
        compute_features(y, settings)
    flac = time.perf_counter() - t0
    with tempfile.TemporaryDirectory() as tmp:
        cache = FeatureCache(tmp, settings)
        for f in files:
            cache.get(f)  # fill
        t0 = time.perf_counter()
        for f in files:
            cache.get(f)
        cached = time.perf_counter() - t0
    return [("features from FLAC (decode + STFT)", len(files), audio_s, flac),
            ("features from the cache", len(files), audio_s, cached)]


def main() -> int:
    t_start = time.perf_counter()
    print(f"ds2exp bench, {time.strftime('%Y-%m-%d %H:%M')}, {machine()}\n")
    data_dir = Path(os.environ.get("DS2EXP_BENCH_DATA", ROOT / "data"))
    print(f"Feature extraction (161-bin log STFT, 16 kHz) {where()}:")
    print(f"  {'source':40s} {'files':>6s} {'audio s':>8s} {'wall s':>8s} {'x real time':>12s}")
    for name, n, audio, wall in feature_speed(data_dir):
        print(f"  {name:40s} {n:6d} {audio:8.1f} {wall:8.2f} {audio / wall:12.0f}")
    print("\nTraining step (bench/bench_step.py):", flush=True)
    from bench import bench_step

    bench_step.run(out=lambda line: print(line, flush=True))
    print("\nThe ds2_tiny step op by op (python -m bench.profile_step):", flush=True)
    prof = subprocess.run([sys.executable, "-m", "bench.profile_step"], cwd=ROOT, check=False, capture_output=True,
                          text=True)  # the profiler's own progress lines go to stderr: shown only on failure
    print(prof.stdout + (f"  failed (exit {prof.returncode}): {prof.stderr[-2000:]}" if prof.returncode else ""),
          flush=True)
    print(f"\nLayers (python -m bench.bench_layers --quick) {where()}:", flush=True)
    subprocess.run([sys.executable, "-m", "bench.bench_layers", "--quick"], cwd=ROOT, check=False)
    print(f"\n(make bench total wall time {time.perf_counter() - t_start:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
