"""Does the feature cache pay? Training step time with and without it, on the same batches.

    python -m bench.bench_features                      # ds2_tiny on synth_small (built on first use)
    python -m bench.bench_features --model ds2_reference --batch 4 --steps 3

A real Trainer's train_step fed by the real BatchLoader (its loader threads decode audio and compute
features while the step runs), once with a filled cache and once computing features on the fly,
alternating in rounds over the same batches so both see the same load. Also printed: the features'
own cost per batch (computed serially) and the cache's size for this corpus and for LibriSpeech.
The decision these numbers support is in docs/storage.md.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import ds2exp  # noqa: E402,F401  (protobuf implementation before mindspore)


def build(model: str, dataset: str, batch: int, workers: int):
    from ds2exp.cli import compose_config
    from ds2exp.data.dataset import BucketBatchSampler, load_split, resolve_manifests
    from ds2exp.data.features import FeatureSettings
    from ds2exp.models.deepspeech2 import build_model
    from ds2exp.tracking.mlflow_tracker import NullTracker
    from ds2exp.training.optim import build_optimizer
    from ds2exp.runtime import setup_mindspore
    from ds2exp.training.trainer import Trainer

    cfg = compose_config([f"model={model}", f"dataset={dataset}", "logger=none", "trainer.progress=false",
                          f"dataset.batch_size={batch}", f"dataset.num_workers={workers}"])
    setup_mindspore(cfg.hardware, int(cfg.trainer.seed))
    net = build_model(cfg.model)
    trainer = Trainer(cfg, net, build_optimizer(net.trainable_params(), cfg.optimizer), None, None, NullTracker(),
                      Path(tempfile.mkdtemp(prefix="ds2exp-bench-features-")), steps_per_epoch=1)
    net.set_train(True)
    settings = FeatureSettings.from_config(cfg.dataset.feature)
    manifests = resolve_manifests(cfg, progress=True)
    split = load_split("train", manifests["train"], cfg, settings)
    sampler = BucketBatchSampler(split.examples, batch, cfg.dataset.num_buckets, cfg.trainer.seed)
    return cfg, trainer, settings, split, sampler


def timed_block(loader, trainer, start: int, steps: int) -> tuple:
    """Wall seconds per step (waiting for the batch + train_step) over `steps` batches from `start`,
    and the process CPU seconds per step (step and loader threads together: on a loaded machine the
    robust measure of the work); the first batch, which waits for the loader's threads to start, is
    left out."""
    out = []
    t0 = time.perf_counter()
    c0 = None
    for k, batch in enumerate(loader.iterate(epoch=1, start_batch=start)):
        trainer.train_step(batch)
        now = time.perf_counter()
        if k:
            out.append(now - t0)
        else:
            c0 = time.process_time()
        t0 = now
        if k >= steps:
            break
    return out, (time.process_time() - c0) / max(1, len(out))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="ds2_tiny")
    ap.add_argument("--dataset", default="synth_small")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=8, help="timed steps per block")
    ap.add_argument("--rounds", type=int, default=2, help="blocks per mode, alternating cache on/off")
    ap.add_argument("--workers", type=int, default=2, help="loader threads")
    args = ap.parse_args(argv)

    from bench.host import machine
    from ds2exp.data.dataset import BatchLoader
    from ds2exp.data.features import FeatureCache, cache_bytes, compute_features, librispeech_cache_gb
    from ds2exp.data.audio import load_audio

    t_start = time.perf_counter()
    cfg, trainer, settings, split, sampler = build(args.model, args.dataset, args.batch, args.workers)
    with tempfile.TemporaryDirectory(prefix="ds2exp-feature-cache-") as tmp:
        cached = FeatureCache(tmp, settings, enabled="on")
        plain = FeatureCache(tmp, settings, enabled="off")
        plan = sampler.epoch_batches(1)
        need = 1 + args.rounds * (args.steps + 1)
        used = plan[:need]
        feature_s, audio_s = [], []
        feature_cpu = []
        for idx in used:  # fill the cache for the batches used, and time the features themselves
            t0, c0 = time.perf_counter(), time.thread_time()
            secs = 0.0
            for i in idx:
                path = split.examples[i].utt.audio_path
                y = load_audio(path, settings.sample_rate)
                compute_features(y, settings)
                secs += len(y) / settings.sample_rate
            feature_s.append(time.perf_counter() - t0)
            feature_cpu.append(time.thread_time() - c0)
            audio_s.append(secs)
            for i in idx:
                cached.get(split.examples[i].utt.audio_path)
        on_loader = BatchLoader(split, sampler, cached, args.workers)
        off_loader = BatchLoader(split, sampler, plain, args.workers)
        timed_block(on_loader, trainer, 0, 1)  # warm-up: first shapes, kernels, caches
        on, off, cpu_on, cpu_off = [], [], [], []
        start = 1
        for r in range(args.rounds):  # the same batches for both modes, order alternating
            order = [(on_loader, on, cpu_on), (off_loader, off, cpu_off)]
            for loader, sink, cpu in (order if r % 2 == 0 else order[::-1]):
                wall, cpu_s = timed_block(loader, trainer, start, args.steps)
                sink.extend(wall)
                cpu.append(cpu_s)
            start += args.steps + 1
    s_on, s_off = statistics.median(on), statistics.median(off)
    f_batch = statistics.median(feature_s)
    a_batch = statistics.median(audio_s)
    hours = split.total_audio_seconds / 3600
    gb = cache_bytes([e.frames for e in split.examples], settings) / 1e9
    load = os.getloadavg()[0]
    print(f"bench_features {time.strftime('%Y-%m-%d %H:%M')}, {machine()}, load {load:.1f}")
    print(f"  {args.model} on {args.dataset} train ({len(split.examples)} utterances, {hours:.2f} h), batch "
          f"{args.batch}, {args.workers} loader threads, {len(on)}+{len(off)} timed steps")
    c_on, c_off = statistics.mean(cpu_on), statistics.mean(cpu_off)
    print(f"  step with the cache    {s_on:.3f} s wall (median; steps {', '.join(f'{t:.2f}' for t in on)}), "
          f"{c_on:.3f} CPU s")
    print(f"  step without the cache {s_off:.3f} s wall (median; steps {', '.join(f'{t:.2f}' for t in off)}), "
          f"{c_off:.3f} CPU s")
    f_cpu = statistics.median(feature_cpu)
    print(f"  without / with: wall {s_off / s_on:.3f}, CPU {c_off / c_on:.3f}")
    print(f"  features alone (decode + STFT, one thread): {1000 * f_batch:.0f} ms wall, {1000 * f_cpu:.0f} ms CPU per "
          f"batch of {a_batch:.0f} audio s ({a_batch / f_cpu:.0f}x real time in CPU time) = "
          f"{100 * f_batch / s_on:.1f}% of a cached step's wall time, {100 * f_cpu / c_on:.1f}% of its CPU time")
    print(f"  cache size: this split {gb:.3f} GB; "
          f"LibriSpeech train-clean-100 {librispeech_cache_gb(100.6, settings):.1f} GB, "
          f"960 h {librispeech_cache_gb(960, settings):.0f} GB (float32)")
    print(f"  (wall time {time.perf_counter() - t_start:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
