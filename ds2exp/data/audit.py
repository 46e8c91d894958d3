"""A preflight audit of a corpus for what makes CTC training blow up (`python -m ds2exp.audit`).

Every audio file is decoded once, in worker processes, and measured (rate, length, peak, whether every
sample is the same, the share of samples at full scale); transcripts are checked against the labels
and against the CTC frames the model emits for the utterance, uncropped and, for the training split
with `dataset.crop_frames` set, after that crop. The hazards found:

  fatal (training would see a non-finite loss or features, or cannot use the entry):
    unreadable_audio, nonfinite_samples, silent_or_constant, unreadable_transcript, empty_transcript,
    invalid_characters, infeasible_ctc, infeasible_after_crop
  warning: clipping, duration_outlier, sample_rate_mismatch, duplicate_id, unusable_entry

A LibriSpeech-layout source (dataset.source librispeech or synth) is audited from its subset folders,
not from the prepared manifests: preparation skips some hazards into its report, where a user moving
from a recipe that reads the folders directly would never look.

The measurements of each source (a manifest file, a subset folder) are cached as JSON under
`<paths.cache_dir>/audit/`, keyed by the source's files (manifest, or every `*.trans.txt`: path, size,
mtime). The config values (feature rate and hop, duration limits, crop) are applied to the cached
measurements on every call, so they are not part of that key: changing `dataset.crop_frames` re-judges
the corpus without reading a file again.
"""
from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from ds2exp.atomic import atomic_write_text
from ds2exp.config import enum_value
from ds2exp.data.audio import NONFINITE_SAMPLES, AudioError, load_audio, probe
from ds2exp.data.dataset import DatasetError, ctc_shortfall, resolve_manifests
from ds2exp.data.features import FeatureSettings
from ds2exp.data.labels import encode, invalid_characters, normalise_transcript
from ds2exp.data.layout import describe_missing, manifest_path, subset_folder
from ds2exp.data.manifest import ManifestError, read_manifest

AUDIT_VERSION = 1  # part of every cache key: bump when a measurement changes
SILENT_PEAK = 1e-4  # below this peak a file is silence (int16 audio: 3 LSB)
CLIP_LEVEL = 0.999  # |x| at or above this is full scale
# Clipping when more than this share of the samples is at full scale. Not 0.1%: espeak-ng's own speech
# reaches full scale in up to 0.2% of its samples in a quarter of synth_tiny, which trains fine.
CLIP_SHARE = 0.01
LONG_TAIL = 5.0  # a duration over this many times the median is an outlier
PROGRESS_FROM = 200  # files; a smaller corpus is audited without a progress bar

FATAL = ("unreadable_audio", "nonfinite_samples", "silent_or_constant", "unreadable_transcript",
         "empty_transcript", "invalid_characters", "infeasible_ctc", "infeasible_after_crop")
WARNING = ("clipping", "duration_outlier", "sample_rate_mismatch", "duplicate_id", "unusable_entry")
KINDS = FATAL + WARNING


class AuditError(Exception):
    """A source that cannot be audited at all (no manifest, no subset folder); one line."""


# ------------------------------------------------------------------------------------------ measuring

def measure(path: str) -> dict:
    """The one read of an audio file (runs in a worker): what the checks need, nothing of the audio kept."""
    try:
        rate = probe(path).sample_rate
        audio = load_audio(path, sample_rate=rate, warn=False)  # the native rate: no resampling to pay for
    except AudioError as exc:
        # libsndfile's message repeats the full path, which the report gives beside it
        return {"error": exc.reason.replace(str(path), Path(path).name),
                "kind": "nonfinite_samples" if exc.reason == NONFINITE_SAMPLES else "unreadable_audio"}
    mag = np.abs(audio)
    # max == min rather than std == 0: a float32 std of a constant is not always exactly 0
    return {"sr": rate, "n": int(audio.shape[0]), "peak": float(mag.max()), "first": float(audio[0]),
            "constant": bool(audio.max() == audio.min()),
            "clip": float(np.count_nonzero(mag >= CLIP_LEVEL)) / audio.shape[0]}


def _pool_context():
    # A process that has MindSpore loaded (training calls audit_split) holds runtime threads a fork
    # would copy mid-state; spawn is safe there and costs a second or two of start-up, as each worker
    # imports this module and the caller's main script (train.py imports nothing heavy at its top).
    return multiprocessing.get_context("spawn" if "mindspore" in sys.modules else None)


def measure_all(paths: Sequence[str], workers: int, progress: bool) -> Dict[str, dict]:
    from tqdm import tqdm

    out: Dict[str, dict] = {}
    bar = tqdm(total=len(paths), desc="audit", unit="file", file=sys.stderr,
               disable=not progress or len(paths) < PROGRESS_FROM, dynamic_ncols=True)
    if workers > 1 and len(paths) > 1:
        chunk = max(1, min(64, len(paths) // (workers * 8)))
        with ProcessPoolExecutor(max_workers=workers, mp_context=_pool_context()) as pool:
            for path, m in zip(paths, pool.map(measure, paths, chunksize=chunk)):
                out[path] = m
                bar.update()
    else:
        for path in paths:
            out[path] = measure(path)
            bar.update()
    bar.close()
    return out


# ------------------------------------------------------------------------------------------ sources

@dataclass
class Source:
    split: str
    kind: str  # "manifest" (a manifest file) or "folder" (a LibriSpeech-layout subset folder)
    path: Path

    def files(self) -> List[Path]:
        if self.kind == "manifest":
            return [self.path]
        return sorted(self.path.glob("*/*/*.trans.txt"))

    def cache_prefix(self) -> str:
        """`<name>-<digest of the path>`: the name for people, the digest so that two `train.jsonl` differ."""
        return f"{self.path.name}-{hashlib.sha1(str(self.path.resolve()).encode()).hexdigest()[:8]}"

    def key(self) -> str:
        """Digest of what the source's entries come from: its files' paths, sizes and mtimes."""
        stats = []
        for f in self.files():
            st = f.stat()
            stats.append((str(f.resolve()), st.st_size, st.st_mtime_ns))
        blob = json.dumps({"version": AUDIT_VERSION, "kind": self.kind, "path": str(self.path.resolve()),
                           "files": stats})
        return hashlib.sha1(blob.encode()).hexdigest()[:16]

    def entries(self) -> List[dict]:
        """{id, path, text, problem} per entry; `text` None where the entry has no transcript to check."""
        if self.kind == "manifest":
            problems: List[dict] = []
            try:
                utts = read_manifest(self.path, problems)
            except ManifestError as exc:
                raise AuditError(str(exc)) from exc
            out = [{"id": u.id, "path": u.audio_path, "text": u.transcript, "problem": None} for u in utts]
            for p in problems:  # missing or unreadable audio, missing or non-UTF-8 transcript files
                kind = "unreadable_transcript" if "transcript" in p["reason"] else "unreadable_audio"
                out.append({"id": p["id"], "path": p["path"], "text": None, "problem": [kind, p["reason"]]})
            return out
        from ds2exp.data.librispeech import SubsetReport, scan_subset

        report = SubsetReport(self.path.name)
        out = [{"id": uid, "path": str(audio), "text": text, "problem": None}
               for uid, audio, text in scan_subset(self.path, report)]
        for e in report.entries:  # what preparation would skip without a word in the manifest
            reason = e["reason"]
            if reason == "duplicate id":
                kind = "duplicate_id"
            elif reason.startswith(("transcript not UTF-8", "transcript unreadable")):
                kind = "unreadable_transcript"
            else:
                kind = "unusable_entry"
            out.append({"id": e["id"], "path": e["path"], "text": None, "problem": [kind, reason]})
        return out


def split_sources(cfg, split: str = "train", progress: bool = False) -> List[Source]:
    """The sources of `split` (train, val, test or all) in the config's dataset."""
    d = cfg.dataset
    splits = ("train", "val", "test") if split == "all" else (split,)
    source = enum_value(d.source)
    out: List[Source] = []
    if source == "manifest":
        for s in splits:
            m = d.get(f"{s}_manifest")
            if m:
                out.append(Source(s, "manifest", Path(m)))
    else:
        if source == "synth":
            try:  # builds the corpus when it is not built yet (and prepares its manifests, unused here)
                resolve_manifests(cfg, progress=progress)
            except DatasetError as exc:
                raise AuditError(str(exc)) from exc
        root = Path(d.root)
        for s in splits:
            for subset in d[f"{s}_subsets"]:
                folder = subset_folder(root, subset)
                if folder is not None:
                    out.append(Source(s, "folder", folder))
                elif manifest_path(root, subset).is_file():  # the source folders went, the prepared manifest stays
                    out.append(Source(s, "manifest", manifest_path(root, subset)))
                else:
                    raise AuditError(f"dataset.root={root}: {describe_missing(root, [subset])}")
    if not out:
        raise AuditError(f"no manifest is configured for split {split} (dataset.{splits[0]}_manifest)")
    return out


def load_sources(sources: Sequence[Source], cache_dir: Optional[Path], workers: int,
                 progress: bool) -> Tuple[List[Tuple[Source, List[dict]]], bool]:
    """Each source's entries with their measurements, from the cache where it is current; the files of
    every source not cached are measured in one pool. Returns them and whether all came from the cache."""
    done: List[Optional[List[dict]]] = []
    todo: List[Tuple[int, Path, List[dict]]] = []
    for i, src in enumerate(sources):
        cache = Path(cache_dir) / f"{src.cache_prefix()}-{src.key()}.json" if cache_dir else None
        cached = _read_cache(cache)
        done.append(cached)
        if cached is None:
            todo.append((i, cache, src.entries()))
    paths = sorted({e["path"] for _, _, es in todo for e in es if e["problem"] is None})
    measured = measure_all(paths, workers, progress) if paths else {}
    for i, cache, entries in todo:
        for e in entries:
            e["m"] = measured.get(e["path"]) if e["problem"] is None else None
        done[i] = entries
        if cache is not None:
            atomic_write_text(cache, json.dumps({"version": AUDIT_VERSION, "source": str(sources[i].path),
                                                 "entries": entries}))
            for old in cache.parent.glob(f"{sources[i].cache_prefix()}-*.json"):  # this source's stale ones
                if old != cache:
                    old.unlink(missing_ok=True)
    return [(src, entries or []) for src, entries in zip(sources, done)], not todo


def _read_cache(path: Optional[Path]) -> Optional[List[dict]]:
    if path is None or not path.is_file():
        return None
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):  # a damaged cache file is measured again, not trusted
        return None
    return obj.get("entries") if obj.get("version") == AUDIT_VERSION else None


# ------------------------------------------------------------------------------------------ judging

@dataclass
class Limits:
    """The config values the checks use."""
    settings: FeatureSettings
    min_duration: float
    max_duration: float
    crop_frames: Optional[int]

    @classmethod
    def from_config(cls, cfg) -> "Limits":
        d = cfg.dataset
        return cls(FeatureSettings.from_config(d.feature), float(d.min_duration), float(d.max_duration),
                   d.get("crop_frames"))

    def to_json(self) -> dict:
        return {"sample_rate": self.settings.sample_rate, "hop": self.settings.hop, "min_duration": self.min_duration,
                "max_duration": self.max_duration, "crop_frames": self.crop_frames}


def _judge(split: str, e: dict, limits: Limits) -> Dict[str, str]:
    """kind -> detail for one entry, but the checks that need the whole split (duplicates, the median)."""
    found: Dict[str, str] = {}
    if e["problem"]:
        found[e["problem"][0]] = e["problem"][1]
    m = e.get("m")
    if m and "error" in m:
        found[m["kind"]] = m["error"]
        m = None
    if m:
        if m["peak"] < SILENT_PEAK:
            found["silent_or_constant"] = f"silent, peak {m['peak']:.2g}"
        elif m["constant"]:
            found["silent_or_constant"] = f"constant, every sample {m['first']:.4g}"
        if m["clip"] > CLIP_SHARE:
            found["clipping"] = f"{m['clip']:.1%} of samples at full scale"
        if m["sr"] != limits.settings.sample_rate:
            found["sample_rate_mismatch"] = f"{m['sr']} Hz, features at {limits.settings.sample_rate} Hz"
        secs = m["n"] / m["sr"]
        if not limits.min_duration <= secs <= limits.max_duration:
            found["duration_outlier"] = (f"{secs:.2f} s outside [dataset.min_duration, dataset.max_duration] = "
                                         f"[{limits.min_duration:g}, {limits.max_duration:g}] s")
    if e["text"] is None:
        return found
    text = normalise_transcript(e["text"])
    bad = invalid_characters(text)
    if not text:
        found["empty_transcript"] = "no transcript"
    elif bad:
        found["invalid_characters"] = f"characters outside the labels: {''.join(sorted(bad))!r}"
    elif m:
        labels = encode(text)
        rate = limits.settings.sample_rate
        samples = m["n"] if m["sr"] == rate else int(round(m["n"] * rate / m["sr"]))  # as loaded: resampled
        frames = limits.settings.num_frames(samples)
        short = ctc_shortfall(labels, frames)
        crop = limits.crop_frames if split == "train" else None  # load_split crops the training split only
        if short:
            found["infeasible_ctc"] = f"needs {short[0]} CTC frames, the model emits {short[1]}"
        elif crop and frames > crop and ctc_shortfall(labels, crop):
            need, have = ctc_shortfall(labels, crop)
            found["infeasible_after_crop"] = (f"needs {need} CTC frames, the model emits {have} after the crop "
                                              f"to dataset.crop_frames={crop} ({frames} uncropped)")
    return found


@dataclass
class AuditReport:
    split: str
    sources: List[str]
    utterances: int
    audio_seconds: float
    seconds: float  # wall time of the audit (this call)
    cached: bool  # every source's measurements came from the cache
    limits: dict
    entries: List[dict]  # per entry with a hazard: id, path, hazards (kinds), details (kind -> detail)
    path: Optional[Path] = None  # where write() put the JSON report
    _by_id: Dict[str, List[str]] = field(default_factory=dict, repr=False)

    def __post_init__(self):
        for e in self.entries:
            kinds = self._by_id.setdefault(e["id"], [])
            kinds.extend(k for k in e["hazards"] if k not in kinds)

    def hazards_of(self, uid: str) -> List[str]:
        """The hazard kinds found for utterance `uid` (every entry with that id), in KINDS order."""
        return sorted(self._by_id.get(uid, []), key=KINDS.index)

    def counts(self) -> Dict[str, int]:
        """Kind -> the number of distinct utterance ids with it."""
        ids: Dict[str, set] = {}
        for e in self.entries:
            for k in e["hazards"]:
                ids.setdefault(k, set()).add(e["id"])
        return {k: len(ids[k]) for k in KINDS if k in ids}

    @property
    def fatal(self) -> bool:
        return any(k in FATAL for k in self.counts())

    def lines(self) -> List[str]:
        """One line per hazard kind present (or `no hazard found`), then the summary line."""
        out = []
        for kind, n in self.counts().items():
            examples, seen = [], set()
            for e in self.entries:
                if kind in e["hazards"] and e["id"] not in seen and len(seen) < 3:
                    seen.add(e["id"])
                    examples.append(f"{e['id']}: {e['details'][kind]}")
            severity = "fatal" if kind in FATAL else "warning"
            out.append(f"{kind}: {n} utterance{'s' if n != 1 else ''}, {severity} (e.g. {'; '.join(examples)})")
        if not out:
            out.append("no hazard found")
        total = sum(self.counts().values())
        out.append(f"audited {self.utterances} utterances ({self.audio_seconds / 3600:.2f} h) in {self.seconds:.1f} s"
                   f"{' (cached)' if self.cached else ''}: {total} hazards, fatal: {'yes' if self.fatal else 'no'}; "
                   f"report: {self.path or 'not written'}")
        return out

    def to_json(self) -> dict:
        return {"version": AUDIT_VERSION, "split": self.split, "sources": self.sources,
                "utterances": self.utterances, "audio_hours": round(self.audio_seconds / 3600, 4),
                "seconds": round(self.seconds, 3), "cached": self.cached, "fatal": self.fatal,
                "counts": self.counts(), "severity": {k: "fatal" if k in FATAL else "warning" for k in self.counts()},
                "limits": self.limits, "utterances_with_hazards": self.entries}

    def write(self, path: Path) -> Path:
        self.path = Path(path)
        atomic_write_text(self.path, json.dumps(self.to_json(), indent=1, ensure_ascii=False))
        return self.path


def judge(loaded: Sequence[Tuple[Source, List[dict]]], limits: Limits, split: str, started: float,
          cached: bool) -> AuditReport:
    """The report of measured entries: each entry's own hazards, then duplicates and the long tail."""
    flat = [(src.split, e) for src, entries in loaded for e in entries]
    found = [_judge(s, e, limits) for s, e in flat]
    durations = {e["path"]: e["m"]["n"] / e["m"]["sr"] for _, e in flat if e.get("m") and "error" not in e["m"]}
    median = statistics.median(durations.values()) if durations else 0.0
    ids: Dict[str, int] = {}
    for _, e in flat:
        ids[e["id"]] = ids.get(e["id"], 0) + 1
    for (_, e), f in zip(flat, found):
        secs = durations.get(e["path"]) if e.get("m") else None
        if secs is not None and median > 0 and secs > LONG_TAIL * median and "duration_outlier" not in f:
            f["duration_outlier"] = f"{secs:.2f} s, over {LONG_TAIL:g}x the median {median:.2f} s"
        if ids[e["id"]] > 1:
            f["duplicate_id"] = f"{ids[e['id']]} entries"
    entries = [{"id": e["id"], "path": e["path"], "hazards": sorted(f, key=KINDS.index),
                "details": {k: f[k] for k in sorted(f, key=KINDS.index)}} for (_, e), f in zip(flat, found) if f]
    return AuditReport(split, [str(src.path) for src, _ in loaded], len(flat), sum(durations.values()),
                       time.perf_counter() - started, cached, limits.to_json(), entries)


# ------------------------------------------------------------------------------------------ entry points

def _cache_dir(cfg) -> Optional[Path]:
    paths = cfg.get("paths")
    return Path(paths.cache_dir) / "audit" if paths is not None and paths.get("cache_dir") else None


def audit_sources(sources: Sequence[Source], cfg, split: str, progress: bool = False,
                  workers: Optional[int] = None, started: Optional[float] = None) -> AuditReport:
    started = time.perf_counter() if started is None else started
    limits = Limits.from_config(cfg)
    workers = max(1, workers if workers is not None else int(cfg.dataset.get("num_workers", 2)))
    loaded, cached = load_sources(sources, _cache_dir(cfg), workers, progress)
    return judge(loaded, limits, split, started, cached)


def audit_split(cfg, split: str = "train", progress: bool = False, workers: Optional[int] = None) -> AuditReport:
    """Audit the config's `split` (train, val, test or all); measurements cached per source under
    `<paths.cache_dir>/audit/`, so a second call reads no audio. Raises AuditError for a missing source."""
    if split not in ("train", "val", "test", "all"):
        raise ValueError(f"split={split!r}; expected train, val, test or all")
    sources = split_sources(cfg, split, progress)  # may build a synthetic corpus: not part of the audit's time
    return audit_sources(sources, cfg, split, progress, workers)


def audit_manifests(manifests: Sequence[Path], cfg, split: str = "train", progress: bool = False,
                    workers: Optional[int] = None) -> AuditReport:
    """Audit manifest files (any format read_manifest reads) with `cfg`'s limits, as `split`."""
    return audit_sources([Source(split, "manifest", Path(m)) for m in manifests], cfg, split, progress, workers)


def default_report_path(cfg, report: AuditReport) -> Path:
    """`<paths.cache_dir>/audit/report-<split>-<digest of the sources>.json` (or the working folder)."""
    digest = hashlib.sha1("\n".join(report.sources).encode()).hexdigest()[:10]
    return (_cache_dir(cfg) or Path(os.getcwd())) / f"report-{report.split}-{digest}.json"
