"""Prepare LibriSpeech (or anything in its layout) in one command.

    python -m ds2exp.data.librispeech /data/LibriSpeech/train-clean-100 dev-clean.tar.gz --out data/manifests

Inputs are extracted subset folders, a folder holding `LibriSpeech/<subset>/`, or `.tar.gz`
archives (extracted next to the output). FLAC is read directly (no sox, no WAV copies). Every
file is decoded once in parallel workers so corrupt files are found now, not mid-training.
Per subset it writes `<subset>.jsonl` (id, audio_path, transcript, duration, sample_rate) and
`<subset>.report.json` (what was skipped or repaired, by reason, file by file); optionally the
deepspeech.pytorch JSON (`--json`) and the model zoo CSV (`--csv`).

Rules for bad input (one bad file never stops preparation):
  skipped:  missing file, unreadable/corrupt/truncated/empty audio, empty transcript,
            transcript not UTF-8, characters outside the label set, duplicate id,
            an id that is not a plain name (LibriSpeech's `<speaker>-<chapter>-<n>`: letters, digits,
            `-` and `_`; never a path separator or `..`), a folder where a transcript or audio
            file belongs, a file that resolves outside its input folder (symlink),
            duration outside [--min-duration, --max-duration] (defaults 0.1 s and 60 s: LibriSpeech's
            longest utterance is 35 s; 0 turns a limit off)
  repaired: sample rate other than 16 kHz (resampled when loaded), more than one channel (mixed)
Nothing is read outside the inputs and nothing is written outside --out.
"""
from __future__ import annotations

import argparse
import json
import math
import re
import sys
import tarfile
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Tuple

from tqdm import tqdm

from ds2exp.data.audio import AudioError, load_audio, probe
from ds2exp.data.labels import invalid_characters, normalise_transcript
from ds2exp.atomic import atomic_write_text
from ds2exp.data.manifest import Utterance, write_deepspeech_json, write_jsonl, write_zoo_csv

TARGET_RATE = 16000
DEFAULT_MIN_DURATION = 0.1  # seconds; shorter is not speech (a 1-sample file)
DEFAULT_MAX_DURATION = 60.0  # seconds; LibriSpeech's longest utterance is 35 s
# LibriSpeech ids are <speaker>-<chapter>-<n>; any plain name is accepted, nothing that could be a path
_SAFE_ID = re.compile(r"^[A-Za-z0-9_]+(-[A-Za-z0-9_]+)*$")


@dataclass
class SubsetReport:
    subset: str
    kept: int = 0
    skipped: Counter = field(default_factory=Counter)
    repaired: Counter = field(default_factory=Counter)
    entries: List[dict] = field(default_factory=list)

    def add(self, uid: str, path: str, reason: str, kind: str) -> None:
        (self.skipped if kind == "skipped" else self.repaired)[reason] += 1
        self.entries.append({"id": uid, "path": path, "reason": reason, "action": kind})

    def to_json(self) -> dict:
        return {"subset": self.subset, "kept": self.kept, "skipped": dict(self.skipped),
                "repaired": dict(self.repaired), "entries": self.entries}


def _safe_extract(archive: Path, dest: Path) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    with tarfile.open(archive, "r:*") as tar:
        try:
            tar.extractall(dest, filter="data")  # refuses absolute paths and links outside dest
        except TypeError:  # Python without extraction filters
            for m in tar.getmembers():
                target = (dest / m.name).resolve()
                if not str(target).startswith(str(dest.resolve())):
                    raise ValueError(f"{archive}: unsafe path in archive: {m.name}")
            tar.extractall(dest)


def find_subsets(path: Path, extract_dir: Path) -> List[Tuple[str, Path]]:
    """(subset name, folder) pairs for an input path or archive."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"input not found: {path}")
    if path.is_file():
        if not (path.name.endswith(".tar.gz") or path.name.endswith(".tgz") or path.name.endswith(".tar")):
            raise ValueError(f"{path}: expected a folder or a .tar.gz archive")
        target = extract_dir / path.name.split(".")[0]
        marker = target / ".extracted"
        if not marker.exists():
            _safe_extract(path, target)
            marker.touch()
        path = target
    if (path / "LibriSpeech").is_dir():
        path = path / "LibriSpeech"
    if any(path.glob("*/*/*.trans.txt")):
        return [(path.name, path)]
    subsets = sorted((p.name, p) for p in path.iterdir() if p.is_dir() and any(p.glob("*/*/*.trans.txt")))
    if not subsets:
        raise ValueError(f"{path}: no LibriSpeech subset found (expected <subset>/<speaker>/<chapter>/*.trans.txt)")
    return subsets


def _inside(path: Path, folder: Path) -> bool:
    try:
        path.resolve().relative_to(folder.resolve())
        return True
    except (ValueError, OSError):
        return False


def scan_subset(folder: Path, report: SubsetReport) -> List[Tuple[str, Path, str]]:
    """(id, flac path, transcript) for every transcript line; bad lines go to the report."""
    items: List[Tuple[str, Path, str]] = []
    seen: set = set()
    listed: set = set()
    for trans in sorted(folder.glob("*/*/*.trans.txt")):
        if trans.is_dir():
            report.add(trans.name, str(trans), "a folder where a transcript file belongs", "skipped")
            continue
        if not _inside(trans, folder):
            report.add(trans.name, str(trans), "transcript outside the input folder (symlink)", "skipped")
            continue
        try:
            raw_lines = trans.read_bytes().splitlines()
        except OSError as exc:
            report.add(trans.name, str(trans), f"transcript unreadable ({exc.strerror or exc})", "skipped")
            continue
        for raw in raw_lines:
            if not raw.strip():
                continue
            parts = raw.split(None, 1)
            uid = parts[0].decode("ascii", errors="replace")
            if not _SAFE_ID.match(uid):
                report.add(uid, str(trans), "id is not a plain <speaker>-<chapter>-<n> name "
                                            "(path separator, '..' or other characters)", "skipped")
                continue
            audio = trans.parent / f"{uid}.flac"
            listed.add(audio.name)
            try:
                text = parts[1].decode("utf-8") if len(parts) > 1 else ""
            except UnicodeDecodeError:
                report.add(uid, str(trans), "transcript not UTF-8", "skipped")
                continue
            if uid in seen:
                report.add(uid, str(audio), "duplicate id", "skipped")
                continue
            seen.add(uid)
            if audio.is_dir():
                report.add(uid, str(audio), "a folder where an audio file belongs", "skipped")
                continue
            if audio.exists() and not _inside(audio, folder):
                report.add(uid, str(audio), "audio outside the input folder (symlink)", "skipped")
                continue
            items.append((uid, audio, text))
    for flac in sorted(folder.glob("*/*/*.flac")):
        if flac.name not in listed:
            report.add(flac.stem, str(flac), "no transcript line", "skipped")
    return items


def _check_audio(args: Tuple[str, str]) -> Tuple[str, Optional[str], float, int, int]:
    """Runs in a worker: decode fully; returns (id, error reason or None, duration, rate, channels)."""
    uid, path = args
    try:
        info = probe(path)
        load_audio(path, sample_rate=info.sample_rate, warn=False)  # full decode finds corruption
    except AudioError as exc:
        return uid, exc.reason, 0.0, 0, 0
    return uid, None, info.duration, info.sample_rate, info.channels


def prepare_subset(name: str, folder: Path, out_dir: Path, min_duration: float = DEFAULT_MIN_DURATION,
                   max_duration: float = DEFAULT_MAX_DURATION, workers: int = 2, progress: bool = True,
                   write_csv: bool = False, write_json: bool = False) -> Tuple[Path, SubsetReport]:
    report = SubsetReport(name)
    items = scan_subset(folder, report)
    texts: Dict[str, Tuple[Path, str]] = {}
    for uid, audio, text in items:
        norm = normalise_transcript(text)
        if not norm:
            report.add(uid, str(audio), "empty transcript", "skipped")
            continue
        bad = invalid_characters(norm)
        if bad:
            report.add(uid, str(audio), f"characters outside the label set: {''.join(sorted(bad))!r}", "skipped")
            continue
        texts[uid] = (audio, norm)
    jobs = [(uid, str(audio)) for uid, (audio, _) in texts.items()]
    results = []
    bar = tqdm(total=len(jobs), desc=f"prepare {name}", unit="file", disable=not progress, file=sys.stderr)
    if workers > 1 and len(jobs) > 1:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            for r in pool.map(_check_audio, jobs, chunksize=16):
                results.append(r)
                bar.update()
    else:
        for job in jobs:
            results.append(_check_audio(job))
            bar.update()
    bar.close()
    utterances: List[Utterance] = []
    for uid, reason, duration, rate, channels in results:
        audio, text = texts[uid]
        if reason is not None:
            report.add(uid, str(audio), reason, "skipped")
            continue
        if duration < min_duration:
            report.add(uid, str(audio), f"shorter than {min_duration} s (it is {duration:.4g} s)", "skipped")
            continue
        if duration > max_duration:
            report.add(uid, str(audio), f"longer than {max_duration} s (it is {duration:.4g} s)", "skipped")
            continue
        if rate != TARGET_RATE:
            report.add(uid, str(audio), f"sample rate {rate} Hz (resampled to {TARGET_RATE} Hz when loaded)",
                       "repaired")
        if channels > 1:
            report.add(uid, str(audio), f"{channels} channels (mixed to mono when loaded)", "repaired")
        utterances.append(Utterance(uid, str(Path(audio).resolve()), text, round(duration, 4), rate))
    utterances.sort(key=lambda u: u.id)
    report.kept = len(utterances)
    out_dir.mkdir(parents=True, exist_ok=True)
    manifest = out_dir / f"{name}.jsonl"
    write_jsonl(utterances, manifest)
    if write_csv:
        write_zoo_csv(utterances, out_dir / f"{name}.csv", out_dir / "txt" / name)
    if write_json:
        write_deepspeech_json(utterances, out_dir / f"{name}.json", out_dir / "txt" / name)
    atomic_write_text(out_dir / f"{name}.report.json", json.dumps(report.to_json(), indent=1))
    return manifest, report


def prepare(inputs: Iterable[str | Path], out_dir: str | Path, min_duration: float = DEFAULT_MIN_DURATION,
            max_duration: float = DEFAULT_MAX_DURATION, workers: int = 2, progress: bool = True,
            write_csv: bool = False, write_json: bool = False,
            extract_dir: Optional[Path] = None) -> Dict[str, Tuple[Path, SubsetReport]]:
    out = Path(out_dir)
    extract_dir = Path(extract_dir) if extract_dir else out / "extracted"
    results = {}
    for inp in inputs:
        for name, folder in find_subsets(Path(inp), extract_dir):
            results[name] = prepare_subset(name, folder, out, min_duration, max_duration, workers,
                                           progress, write_csv, write_json)
    return results


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m ds2exp.data.librispeech", description=__doc__.split("\n\n")[0])
    ap.add_argument("inputs", nargs="+", help="subset folders, folders holding LibriSpeech/, or .tar.gz archives")
    ap.add_argument("--out", required=True, help="output folder for manifests and reports")
    ap.add_argument("--min-duration", type=float, default=DEFAULT_MIN_DURATION,
                    help=f"seconds; shorter files are dropped (default {DEFAULT_MIN_DURATION}; 0: no limit)")
    ap.add_argument("--max-duration", type=float, default=DEFAULT_MAX_DURATION,
                    help=f"seconds; longer files are dropped (default {DEFAULT_MAX_DURATION:g}; 0: no limit)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--csv", action="store_true", help="also write the model zoo's wav_path,txt_path CSV")
    ap.add_argument("--json", action="store_true", help="also write deepspeech.pytorch's JSON manifest")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    for flag, value in (("--min-duration", args.min_duration), ("--max-duration", args.max_duration)):
        if not (math.isfinite(value) and value >= 0):
            print(f"config error: {flag}={value} is not allowed; expected seconds >= 0 (0: no limit)", file=sys.stderr)
            return 2
    max_duration = args.max_duration if args.max_duration > 0 else float("inf")
    if args.min_duration >= max_duration:
        print(f"config error: --min-duration={args.min_duration} is not allowed; expected less than --max-duration "
              f"({args.max_duration})", file=sys.stderr)
        return 2
    if args.workers < 1:
        ap.error("--workers must be >= 1")
    try:
        results = prepare(args.inputs, args.out, args.min_duration, max_duration, args.workers,
                          not args.no_progress, args.csv, args.json)
    except (FileNotFoundError, ValueError, tarfile.TarError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for name, (manifest, report) in results.items():
        skipped = sum(report.skipped.values())
        repaired = sum(report.repaired.values())
        print(f"{name}: {report.kept} utterances -> {manifest} ({skipped} skipped, {repaired} repaired; "
              f"see {manifest.with_suffix('').with_suffix('.report.json').name})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
