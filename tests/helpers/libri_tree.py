"""A tiny corpus in LibriSpeech's exact layout: `<root>/LibriSpeech/<subset>/<speaker>/<chapter>/`
with `<spk>-<ch>-<n>.flac` and `<spk>-<ch>.trans.txt`, spoken by espeak-ng."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

from tests.helpers import write_flac

SENTENCES = ("HELLO WORLD", "THE CAT SAT", "GOOD MORNING", "OPEN THE DOOR", "TWO BIRDS", "A RED BOX")
RECIPE_SUBSETS = ("train-clean-100", "dev-clean", "test-clean")


def make_libri_tree(parent: Path, say, subsets: Sequence[str] = RECIPE_SUBSETS,
                    sentences: Sequence[str] = SENTENCES) -> Path:
    """Write the tree under `parent` and return `parent` (the folder holding LibriSpeech/)."""
    for k, subset in enumerate(subsets):
        speaker, chapter = 84 + k, 121123
        folder = Path(parent) / "LibriSpeech" / subset / str(speaker) / str(chapter)
        lines = []
        for i, text in enumerate(sentences):
            uid = f"{speaker}-{chapter}-{i:04d}"
            write_flac(folder / f"{uid}.flac", say(text.lower()))
            lines.append(f"{uid} {text}")
        (folder / f"{speaker}-{chapter}.trans.txt").write_text("\n".join(lines) + "\n")
    return Path(parent)
