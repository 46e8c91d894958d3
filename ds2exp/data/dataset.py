"""Splits, CTC feasibility, length-bucketed batches and a prefetching batch loader."""
from __future__ import annotations

import json
import logging
import math
import queue
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from ds2exp.data.audio import AudioError
from ds2exp.data.features import FeatureCache, FeatureSettings, spec_augment
from ds2exp.data.labels import TranscriptError, encode
from ds2exp.data.layout import describe_missing, manifest_path, subset_folder
from ds2exp.atomic import atomic_write_text
from ds2exp.data.manifest import ManifestError, Utterance, read_manifest
from ds2exp.config import enum_value
from ds2exp.geometry import output_frames


_log = logging.getLogger(__name__)


class DatasetError(Exception):
    pass


def ctc_min_frames(labels: Sequence[int]) -> int:
    """CTC needs one frame per label plus a blank between each pair of equal neighbours."""
    repeats = sum(1 for a, b in zip(labels, labels[1:]) if a == b)
    return len(labels) + repeats


def ctc_shortfall(labels: Sequence[int], frames: int) -> Optional[Tuple[int, int]]:
    """(CTC frames needed, frames the model emits) when a transcript does not fit `frames` input frames
    (its CTC loss is infinite); None when it fits."""
    need, have = ctc_min_frames(labels), int(output_frames(frames))
    return (need, have) if need > have else None


@dataclass
class Example:
    utt: Utterance
    labels: List[int]
    frames: int  # input feature frames


@dataclass
class SplitData:
    name: str
    examples: List[Example]
    dropped: Dict[str, List[str]] = field(default_factory=dict)  # reason -> ids

    @property
    def total_audio_seconds(self) -> float:
        return sum(e.utt.duration for e in self.examples)

    def drop_counts(self) -> Dict[str, int]:
        return {k: len(v) for k, v in self.dropped.items()}


def resolve_manifests(cfg, progress: bool = True) -> Dict[str, List[Path]]:
    """Manifests for train/val/test from the dataset config, building/preparing as needed."""
    d = cfg.dataset
    source = enum_value(d.source)
    if source == "manifest":
        out = {"train": [Path(d.train_manifest)]}
        out["val"] = [Path(d.val_manifest)] if d.val_manifest else []
        out["test"] = [Path(d.test_manifest)] if d.test_manifest else []
        return out
    root = Path(d.root)
    if source == "synth":
        from ds2exp.data.synth import SYNTH_PRESETS, build_corpus

        if d.name not in SYNTH_PRESETS:
            raise DatasetError(f"dataset.name={d.name!r} is not a synthetic preset; allowed: "
                               f"{', '.join(SYNTH_PRESETS)}")
        build_corpus(SYNTH_PRESETS[d.name], root, workers=max(1, d.num_workers), progress=progress)
    out: Dict[str, List[Path]] = {}
    for split, subsets in (("train", d.train_subsets), ("val", d.val_subsets), ("test", d.test_subsets)):
        paths = []
        for subset in subsets:
            m = manifest_path(root, subset)
            folder = subset_folder(root, subset)
            # A manifest older than its subset folder describes audio that has since been replaced
            # (a synthetic corpus rebuilt after its preset changed): prepare it again.
            stale = m.exists() and folder is not None and m.stat().st_mtime < folder.stat().st_mtime
            if not m.exists() or stale:
                from ds2exp.data.librispeech import prepare_subset

                if folder is None:
                    raise DatasetError(f"dataset.root={root}: {describe_missing(root, [subset])}")
                _log.info("%s: preparing %s into %s", subset, folder, m.parent)
                prepare_subset(subset, folder, m.parent, workers=max(1, d.num_workers), progress=progress)
            paths.append(m)
        out[split] = paths
    return out


def read_manifests(manifests: Sequence[Path], problems: List[dict]) -> List[Utterance]:
    """The utterances of every manifest, in order; lines that cannot be read are appended to
    `problems`, a manifest that cannot be read at all is a DatasetError."""
    utts: List[Utterance] = []
    for m in manifests:
        try:
            utts.extend(read_manifest(m, problems))
        except ManifestError as exc:
            raise DatasetError(str(exc)) from exc
    return utts


def load_split(name: str, manifests: List[Path], cfg, settings: FeatureSettings,
               report_dir: Optional[Path] = None) -> SplitData:
    """Read manifests and drop what cannot train: bad transcripts, durations, infeasible CTC."""
    d = cfg.dataset
    problems: List[dict] = []
    utts = read_manifests(manifests, problems)
    dropped: Dict[str, List[str]] = {}
    for p in problems:
        dropped.setdefault(p["reason"], []).append(p["id"])
    examples: List[Example] = []
    seen = set()
    train = name == "train"
    crop = d.get("crop_frames") if train else None
    label_pad = d.get("label_pad") if train else None
    for u in utts:
        reason = None
        labels: List[int] = []
        if u.id in seen:
            reason = "duplicate id"
        elif not (d.min_duration <= u.duration <= d.max_duration):
            reason = f"duration outside [{d.min_duration}, {d.max_duration}] s"
        else:
            try:
                labels = encode(u.transcript)
            except TranscriptError as exc:
                reason = str(exc)
        frames = settings.num_frames(int(round(u.duration * settings.sample_rate)))
        seen_frames = min(frames, crop) if crop else frames  # what the model sees after a training crop
        if reason is None and d.drop_infeasible and ctc_shortfall(labels, seen_frames):
            reason = ("infeasible CTC (transcript longer than output frames)" if seen_frames == frames else
                      f"infeasible CTC after the crop to dataset.crop_frames={crop}")
        if reason is None and label_pad and len(labels) > label_pad:
            reason = f"transcript longer than dataset.label_pad={label_pad} characters"
        if reason:
            dropped.setdefault(reason, []).append(u.id)
            continue
        seen.add(u.id)
        examples.append(Example(u, labels, frames))
    if d.max_utterances:
        examples = examples[: d.max_utterances]
    if report_dir is not None and dropped:
        atomic_write_text(Path(report_dir) / f"dropped_{name}.json", json.dumps(dropped, indent=1))
    return SplitData(name, examples, dropped)


def _crop(features: np.ndarray, frames: int, rng: np.random.Generator) -> np.ndarray:
    """A random window of `frames` frames of a longer utterance (the model zoo's training crop)."""
    extra = features.shape[1] - frames
    if extra <= 0:
        return features
    start = int(rng.integers(0, extra + 1))
    return features[:, start:start + frames]


def bucket_lengths(frames: Sequence[int], num_buckets: int, multiple: int = 32) -> List[int]:
    """A few padded lengths (quantiles rounded up to `multiple`) so compiled steps see few shapes."""
    if not len(frames):
        return []
    qs = np.quantile(np.asarray(frames), np.linspace(0, 1, num_buckets + 1)[1:])
    return sorted({int(math.ceil(q / multiple) * multiple) for q in qs})


@dataclass
class Batch:
    features: np.ndarray  # (B, bins, T) float32
    feature_lengths: np.ndarray  # (B,) int32 input frames
    labels: np.ndarray  # (B, Lmax) int32, padded with 0
    label_lengths: np.ndarray  # (B,) int32
    ids: List[str]
    durations: List[float]
    transcripts: List[str]

    @property
    def size(self) -> int:
        return len(self.ids)

    @property
    def audio_seconds(self) -> float:
        return float(sum(self.durations))


class BucketBatchSampler:
    """Groups utterances of similar length; each batch is padded to its bucket's length.

    Epoch order is a seeded shuffle of batches; with SortaGrad the first epoch goes from the
    shortest bucket to the longest. Sharding (`rank`, `world`) gives each data-parallel rank a
    disjoint slice of every epoch's batches.
    """

    def __init__(self, examples: List[Example], batch_size: int, num_buckets: int, seed: int,
                 sortagrad: bool = False, drop_last: bool = False, rank: int = 0, world: int = 1):
        self.examples = examples
        self.batch_size = batch_size
        self.lengths = bucket_lengths([e.frames for e in examples], num_buckets)
        # the longest transcript (in labels) of each bucket: a compiled step pads labels to it too
        self.label_lengths: Dict[int, int] = {}
        for e in examples:
            b = self.bucket_of(e.frames)
            self.label_lengths[b] = max(self.label_lengths.get(b, 0), len(e.labels))
        self.seed = seed
        self.sortagrad = sortagrad
        self.drop_last = drop_last
        self.rank, self.world = rank, world

    def bucket_of(self, frames: int) -> int:
        for length in self.lengths:
            if frames <= length:
                return length
        return self.lengths[-1]

    def epoch_batches(self, epoch: int) -> List[List[int]]:
        rng = np.random.default_rng(self.seed + epoch)
        by_bucket: Dict[int, List[int]] = {}
        for i, e in enumerate(self.examples):
            by_bucket.setdefault(self.bucket_of(e.frames), []).append(i)
        batches: List[List[int]] = []
        for length in sorted(by_bucket):
            idx = by_bucket[length]
            if epoch == 0 and self.sortagrad:
                idx = sorted(idx, key=lambda i: self.examples[i].frames)
            else:
                idx = [idx[j] for j in rng.permutation(len(idx))]
            for s in range(0, len(idx), self.batch_size):
                chunk = idx[s:s + self.batch_size]
                if self.drop_last and len(chunk) < self.batch_size:
                    continue
                batches.append(chunk)
        if not (epoch == 0 and self.sortagrad):
            batches = [batches[j] for j in rng.permutation(len(batches))]
        if self.world > 1:
            usable = len(batches) - len(batches) % self.world
            batches = batches[self.rank:usable:self.world]
        return batches

    def __len__(self) -> int:
        return len(self.epoch_batches(1))


class BatchLoader:
    """Builds padded batches in background threads (feature decode and cache I/O overlap the step)."""

    def __init__(self, split: SplitData, sampler: BucketBatchSampler, cache: FeatureCache,
                 num_workers: int = 2, spec_augment_cfg=None, seed: int = 0, prefetch: int = 4,
                 fixed_label_length: bool = False, crop_frames: Optional[int] = None,
                 label_pad: Optional[int] = None):
        """fixed_label_length: pad labels to the bucket's longest transcript rather than the batch's, so
        that a step compiled per input shape (hardware.mode=graph) sees one label shape per bucket.
        crop_frames: longer utterances are cut to this many frames at a random offset, transcript kept;
        label_pad: the label matrix's width (load_split dropped longer transcripts)."""
        self.split = split
        self.crop_frames, self.label_pad = crop_frames, label_pad  # training only (load_split applied both)
        self.fixed_label_length = fixed_label_length
        self.sampler = sampler
        self.cache = cache
        self.num_workers = max(1, num_workers)
        self.spec_augment_cfg = spec_augment_cfg
        self.seed = seed
        self.prefetch = prefetch
        self.failures: Dict[str, str] = {}  # id -> reason, for audio that failed to decode
        # the first split a cache serves (training's) decides dataset.feature.cache=auto and logs
        # the cache size and the feature cost per batch
        cache.plan(split.name, split.examples, sampler.batch_size)

    def _features(self, ex: Example) -> Optional[np.ndarray]:
        try:
            return self.cache.get(ex.utt.audio_path)
        except AudioError as exc:
            self.failures[ex.utt.id] = exc.reason
            return None

    def make_batch(self, indices: List[int], epoch: int = 0, batch_no: int = 0) -> Optional[Batch]:
        exs = [self.split.examples[i] for i in indices]
        feats = [self._features(e) for e in exs]
        keep = [(e, f) for e, f in zip(exs, feats) if f is not None]
        if not keep:
            return None
        rng = np.random.default_rng((self.seed, epoch, batch_no))
        if self.crop_frames:
            keep = [(e, _crop(f, self.crop_frames, rng)) for e, f in keep]
        length = self.sampler.bucket_of(max(f.shape[1] for _, f in keep))
        if self.crop_frames:  # the buckets were cut from uncropped lengths
            length = min(length, self.crop_frames)
        length = max(length, max(f.shape[1] for _, f in keep))
        bins = keep[0][1].shape[0]
        x = np.zeros((len(keep), bins, length), dtype=np.float32)
        lmax = max(len(e.labels) for e, _ in keep)
        if self.fixed_label_length:
            lmax = max(lmax, self.sampler.label_lengths.get(self.sampler.bucket_of(length), 0))
        if self.label_pad:
            lmax = max(lmax, self.label_pad)
        y = np.zeros((len(keep), lmax), dtype=np.int32)
        sa = self.spec_augment_cfg
        for j, (e, f) in enumerate(keep):
            if sa is not None and sa.enabled:
                f = spec_augment(f, rng, sa.freq_masks, sa.freq_width, sa.time_masks, sa.time_width)
            x[j, :, : f.shape[1]] = f
            y[j, : len(e.labels)] = e.labels
        return Batch(x, np.array([f.shape[1] for _, f in keep], np.int32), y,
                     np.array([len(e.labels) for e, _ in keep], np.int32), [e.utt.id for e, _ in keep],
                     [e.utt.duration for e, _ in keep], [e.utt.transcript for e, _ in keep])

    def iterate(self, epoch: int, start_batch: int = 0) -> Iterator[Batch]:
        """Batches of one epoch from `start_batch` on, built ahead by a thread pool."""
        plan = self.sampler.epoch_batches(epoch)[start_batch:]
        q: "queue.Queue" = queue.Queue(maxsize=self.prefetch)
        stop = threading.Event()

        def produce() -> None:
            try:
                with ThreadPoolExecutor(self.num_workers) as pool:
                    futures = []
                    for k, idx in enumerate(plan):
                        futures.append(pool.submit(self.make_batch, idx, epoch, start_batch + k))
                        while len(futures) > self.prefetch:
                            if stop.is_set():
                                return
                            q.put(futures.pop(0).result())
                    for fut in futures:
                        if stop.is_set():
                            return
                        q.put(fut.result())
            except BaseException as exc:  # surfaced in the consumer below
                q.put(exc)
            finally:
                q.put(StopIteration)

        t = threading.Thread(target=produce, daemon=True)
        t.start()
        try:
            while True:
                item = q.get()
                if item is StopIteration:
                    break
                if isinstance(item, BaseException):
                    raise item
                if item is not None:
                    yield item
        finally:
            stop.set()
            while t.is_alive():
                try:
                    q.get_nowait()
                except queue.Empty:
                    t.join(0.05)
