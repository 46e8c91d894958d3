"""Where a LibriSpeech-layout corpus keeps its subsets and manifests under `dataset.root`.

`dataset.root` may be the folder holding `LibriSpeech/` (as the archives extract) or the
`LibriSpeech/` folder itself; both are accepted so that the path a user copies from `ls` works.
Manifests are written to `<dataset.root>/manifests/`. Imports nothing heavy: the command-line
checks use it before any work starts.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable, List, Optional

LIBRISPEECH_DIR = "LibriSpeech"


def subset_folder(root: Path, subset: str) -> Optional[Path]:
    """The extracted folder of `subset`: `<root>/LibriSpeech/<subset>`, else `<root>/<subset>`; None if neither."""
    for base in (Path(root) / LIBRISPEECH_DIR, Path(root)):
        if (base / subset).is_dir():
            return base / subset
    return None


def manifest_path(root: Path, subset: str) -> Path:
    return Path(root) / "manifests" / f"{subset}.jsonl"


def missing_subsets(root: Path, subsets: Iterable[str]) -> List[str]:
    """The subsets that have neither an extracted folder nor a prepared manifest under `root`."""
    return [s for s in subsets if subset_folder(root, s) is None and not manifest_path(root, s).exists()]


def describe_missing(root: Path, missing: List[str]) -> str:
    """Why `root` does not hold `missing`, naming the places looked in."""
    root = Path(root)
    present = sorted(p.name for base in (root / LIBRISPEECH_DIR, root) if base.is_dir()
                     for p in base.iterdir() if p.is_dir() and "-" in p.name)
    return (f"subset folder {', '.join(missing)} not found in {root / LIBRISPEECH_DIR} or {root}, and no "
            f"{root / 'manifests'}/<subset>.jsonl; give the folder holding LibriSpeech/ or LibriSpeech/ itself"
            + (f" (subsets found there: {', '.join(present)})" if present else ""))
