"""`make bench`: every number measured in this one run, printed as tables.

1. Feature extraction speed (multiples of real time) from FLAC and from the feature cache.
2. A DeepSpeech2 training step: ds2exp's trainer path (fast kernels, blocking launch) against the
   naive path the model zoo recipe builds (nn.Conv2d + nn.LSTM, default asynchronous launch),
   same model, same batch.
3. The layer benchmark (bench/bench_layers.py --quick).
"""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import ds2exp  # noqa: E402,F401

ROOT = Path(__file__).resolve().parents[1]


def machine() -> str:
    import platform

    cpu = "unknown CPU"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, Python {platform.python_version()}"


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


def step_speed(repeats: int = 3) -> list:
    """Seconds per training step, ds2exp path vs the naive path, on one synthetic batch."""
    script = r'''
import sys, time, json, numpy as np
sys.path.insert(0, sys.argv[1])
import ds2exp, mindspore as ms
from mindspore import ops
mode, impl, T, B, repeats = sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6])
ms.set_device("CPU"); ms.set_context(mode=ms.PYNATIVE_MODE)
if mode == "blocking":
    ms.runtime.launch_blocking()
from ds2exp.models.deepspeech2 import DeepSpeech2
from ds2exp.evaluation.runner import ctc_losses
ms.set_seed(0)
model = DeepSpeech2(conv_channels=8, rnn_layers=2, rnn_hidden=192, conv_impl=impl, rnn_impl=impl)
model.set_train(True)
opt = ms.nn.Adam(model.trainable_params(), learning_rate=1e-4)
rng = np.random.default_rng(0)
x = ms.Tensor(rng.standard_normal((B, 161, T)).astype(np.float32))
xl = ms.Tensor(np.full((B,), T, np.int32))
y = ms.Tensor(rng.integers(0, 28, (B, 30)).astype(np.int32))
yl = ms.Tensor(np.full((B,), 30, np.int32))
def fwd(x, xl, y, yl):
    logits, ol = model(x, xl)
    return ctc_losses(logits, ol, y, yl).mean()
grad = ms.value_and_grad(fwd, None, opt.parameters)
def step():
    loss, g = grad(x, xl, y, yl); opt(g); return float(loss.asnumpy())
step()
ts = []
for _ in range(repeats):
    t0 = time.perf_counter(); step(); ts.append(time.perf_counter() - t0)
print(json.dumps({"s": sorted(ts)[len(ts)//2]}))
'''
    rows = []
    B, T = 16, 300  # 16 utterances of 3 s (synth_tiny's typical length)
    for label, mode, impl in (("ds2exp (fast kernels, blocking launch)", "blocking", "fast"),
                              ("naive (nn.Conv2d + nn.LSTM, async launch)", "async", "plain")):
        r = subprocess.run([sys.executable, "-c", script, str(ROOT), mode, impl, str(T), str(B), str(repeats)],
                           capture_output=True, text=True, timeout=1800)
        if r.returncode != 0:
            rows.append((label, B, T, None, r.stderr.strip().splitlines()[-1][:120]))
            continue
        import json

        s = json.loads(r.stdout.strip().splitlines()[-1])["s"]
        rows.append((label, B, T, s, ""))
    return rows


def main() -> int:
    print(f"ds2exp bench, {time.strftime('%Y-%m-%d %H:%M')}, {machine()}\n")
    data_dir = Path(os.environ.get("DS2EXP_BENCH_DATA", ROOT / "data"))
    print("Feature extraction (161-bin log STFT, 16 kHz):")
    print(f"  {'source':40s} {'files':>6s} {'audio s':>8s} {'wall s':>8s} {'x real time':>12s}")
    for name, n, audio, wall in feature_speed(data_dir):
        print(f"  {name:40s} {n:6d} {audio:8.1f} {wall:8.2f} {audio / wall:12.0f}")
    print("\nTraining step, ds2_tiny (1.42 M parameters), batch 16 x 3 s of audio:")
    print(f"  {'path':44s} {'s/step':>8s} {'audio s/s':>10s} {'speed-up':>9s}")
    rows = step_speed()
    base = next((r[3] for r in rows if r[0].startswith("naive") and r[3]), None)
    for label, B, T, s, err in rows:
        if s is None:
            print(f"  {label:44s} failed: {err}")
            continue
        audio = B * T / 100
        print(f"  {label:44s} {s:8.3f} {audio / s:10.1f} {base / s if base else float('nan'):8.1f}x")
    print("\nLayers (bench/bench_layers.py --quick):", flush=True)
    subprocess.run([sys.executable, str(ROOT / "bench" / "bench_layers.py"), "--quick"], check=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
