"""Manifests: ds2exp's JSON-lines, deepspeech.pytorch's JSON and the model zoo's CSV.

JSON-lines (ds2exp's own): one object per line with id, audio_path, transcript, duration,
sample_rate. deepspeech.pytorch JSON: {"root_path": ..., "samples": [{"wav_path", "transcript_path"}]}.
Model zoo CSV: header-less lines `wav_path,txt_path`. All three read back into `Utterance`s,
so a model zoo user's existing files work unchanged.
"""
from __future__ import annotations

import csv
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable, List, Optional, Tuple

from ds2exp.atomic import atomic_write_text
from ds2exp.data.audio import AudioError, probe


@dataclass
class Utterance:
    id: str
    audio_path: str
    transcript: str
    duration: float
    sample_rate: int


class ManifestError(Exception):
    pass


def write_jsonl(utterances: Iterable[Utterance], path: str | Path) -> None:
    atomic_write_text(path, "".join(json.dumps(asdict(u), ensure_ascii=False) + "\n" for u in utterances))


def write_transcript_files(utterances: List[Utterance], txt_dir: str | Path) -> List[Tuple[Utterance, Path]]:
    """One `<id>.txt` per utterance, as the reference's data scripts write them."""
    txt_dir = Path(txt_dir)
    txt_dir.mkdir(parents=True, exist_ok=True)
    out = []
    for u in utterances:
        p = txt_dir / f"{u.id}.txt"
        p.write_text(u.transcript, encoding="utf-8")
        out.append((u, p.resolve()))
    return out


def write_deepspeech_json(utterances: List[Utterance], path: str | Path, txt_dir: str | Path) -> None:
    pairs = write_transcript_files(utterances, txt_dir)
    root = os.path.commonpath([str(Path(u.audio_path).parent) for u, _ in pairs]) if pairs else ""
    samples = [{"wav_path": os.path.relpath(u.audio_path, root), "transcript_path": os.path.relpath(t, root)}
               for u, t in pairs]
    atomic_write_text(path, json.dumps({"root_path": root, "samples": samples}, indent=1))


def write_zoo_csv(utterances: List[Utterance], path: str | Path, txt_dir: str | Path) -> None:
    pairs = write_transcript_files(utterances, txt_dir)
    atomic_write_text(path, "".join(f"{Path(u.audio_path).resolve()},{t}\n" for u, t in pairs))


def detect_format(path: str | Path) -> str:
    p = Path(path)
    head = p.read_text(encoding="utf-8", errors="replace")[:4096].lstrip()
    if head.startswith("{") and '"samples"' in head and '"root_path"' in head:
        return "deepspeech_json"
    if head.startswith("{"):
        return "jsonl"
    if head.startswith("["):
        raise ManifestError(f"{p}: a JSON list is not a known manifest format")
    return "csv"


def _read_text_file(path: Path) -> str:
    return path.read_bytes().decode("utf-8").strip()


def _pairs_to_utterances(pairs: List[Tuple[Path, Path]], problems: List[dict]) -> List[Utterance]:
    utts = []
    for audio, txt in pairs:
        uid = audio.stem
        try:
            info = probe(audio)
        except AudioError as exc:
            problems.append({"id": uid, "path": str(audio), "reason": exc.reason})
            continue
        try:
            text = _read_text_file(txt)
        except FileNotFoundError:
            problems.append({"id": uid, "path": str(txt), "reason": "missing transcript file"})
            continue
        except UnicodeDecodeError:
            problems.append({"id": uid, "path": str(txt), "reason": "transcript is not UTF-8"})
            continue
        utts.append(Utterance(uid, str(audio), text, info.duration, info.sample_rate))
    return utts


def read_manifest(path: str | Path, problems: Optional[List[dict]] = None) -> List[Utterance]:
    """Read any of the three formats. Entries whose files are unusable go to `problems`.

    Raises ManifestError when the manifest is missing, empty, or none of its files exist
    (naming a few of them).
    """
    p = Path(path)
    if not p.is_file():
        raise ManifestError(f"manifest not found: {p}")
    problems = [] if problems is None else problems
    fmt = detect_format(p)
    if fmt == "jsonl":
        utts = []
        for lineno, raw in enumerate(p.read_bytes().splitlines(), 1):
            if not raw.strip():
                continue
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:  # one bad line (e.g. a Latin-1 transcript) skips that entry only
                try:
                    uid = str(json.loads(raw.decode("utf-8", errors="replace"))["id"])
                except (ValueError, KeyError, TypeError):
                    uid = f"{p.name}:{lineno}"
                problems.append({"id": uid, "path": f"{p}:{lineno}", "reason": "transcript is not UTF-8"})
                continue
            try:
                obj = json.loads(line)
                utts.append(Utterance(str(obj["id"]), str(obj["audio_path"]), str(obj["transcript"]),
                                      float(obj["duration"]), int(obj.get("sample_rate", 16000))))
            except (ValueError, KeyError, TypeError) as exc:
                raise ManifestError(f"{p}:{lineno}: not a ds2exp manifest line ({exc})") from exc
        missing = [u for u in utts if not Path(u.audio_path).is_file()]
        for u in missing:
            problems.append({"id": u.id, "path": u.audio_path, "reason": "missing file"})
        utts = [u for u in utts if Path(u.audio_path).is_file()]
    elif fmt == "deepspeech_json":
        obj = json.loads(p.read_text(encoding="utf-8"))
        root = Path(obj.get("root_path") or p.parent)
        pairs = [(root / s["wav_path"], root / s["transcript_path"]) for s in obj["samples"]]
        utts = _pairs_to_utterances(pairs, problems)
    else:
        pairs = []
        with p.open(newline="", encoding="utf-8") as fh:
            for lineno, row in enumerate(csv.reader(fh), 1):
                if not row:
                    continue
                if len(row) != 2:
                    raise ManifestError(f"{p}:{lineno}: expected 'wav_path,txt_path', got {len(row)} fields")
                base = p.parent
                pairs.append(((base / row[0].strip()), (base / row[1].strip())))
        utts = _pairs_to_utterances(pairs, problems)
    if not utts:
        if problems:
            some = ", ".join(x["path"] for x in problems[:3])
            raise ManifestError(f"{p}: none of its {len(problems)} entries is usable (e.g. {some})")
        raise ManifestError(f"{p}: the manifest is empty")
    return utts
