"""Build a word n-gram language model (ARPA) from training transcripts, for the beam decoder.

    python -m ds2exp.evaluation.ngram --manifest data/synth_tiny/manifests/train-synth.jsonl \
        --order 2 --out data/synth_tiny/lm/train-2gram.arpa

The beam decoder (``decoder=beam decoder.lm_path=...``) reads ARPA through KenLM. KenLM's own
estimator (``lmplz``) is a C++ binary that pip does not install, so this module estimates a
small model itself: interpolated absolute discounting (Ney, Essen & Kneser 1994) with one
discount ``D`` per order, the lowest order interpolated with a uniform distribution over the
vocabulary plus ``<unk>``. In the interpolated form the ARPA back-off weight of a context ``h``
is exactly its interpolation weight ``D * N1+(h .) / c(h)``, so the file is exact, not an
approximation. That is enough for what it is used for here - a vocabulary and word-frequency
prior that turns near-miss spellings ("INSTROMENT") into words - and for LibriSpeech the
published 3/4-gram ARPA files can be passed to the decoder instead.

KenLM refuses a unigram-only ARPA, so ``order`` is at least 2.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
from collections import Counter
from pathlib import Path
from typing import Dict, Iterable, List, Sequence, Tuple

from ds2exp.atomic import atomic_write_text
from ds2exp.data.manifest import ManifestError, read_manifest

BOS, EOS, UNK = "<s>", "</s>", "<unk>"


def _log10(p: float) -> float:
    return math.log10(p) if p > 0 else -99.0


def build_arpa(sentences: Iterable[str], order: int = 2, discount: float = 0.7) -> str:
    """The ARPA text of an interpolated absolute-discounting model of `sentences` (one per item,
    words separated by whitespace)."""
    if order < 2:
        raise ValueError(f"order must be >= 2 (KenLM does not load unigram-only models), got {order}")
    if not 0.0 < discount < 1.0:
        raise ValueError(f"discount must be in (0, 1), got {discount}")
    # by_order[n][gram]: counts of n-grams; a gram never reaches back past the sentence's <s>,
    # so the n-grams that start a sentence are shorter ("<s> w" in a trigram model).
    by_order: List[Counter] = [Counter() for _ in range(order + 1)]
    n_sentences = 0
    for text in sentences:
        words = text.split()
        if not words:
            continue
        n_sentences += 1
        seq = [BOS] + words + [EOS]
        for i in range(1, len(seq)):
            for n in range(1, min(order, i + 1) + 1):
                by_order[n][tuple(seq[i - n + 1:i + 1])] += 1
    if n_sentences == 0:
        raise ValueError("no non-empty transcripts to build a language model from")

    vocab = sorted(w for (w,) in by_order[1])
    v_size = len(vocab) + 1  # + <unk>
    probs: List[Dict[Tuple[str, ...], float]] = [dict() for _ in range(order + 1)]
    backoff: List[Dict[Tuple[str, ...], float]] = [dict() for _ in range(order + 1)]

    # order 1: discounted counts interpolated with the uniform distribution
    total = sum(by_order[1].values())
    lam = discount * len(by_order[1]) / total
    for (w,), c in by_order[1].items():
        probs[1][(w,)] = (c - discount) / total + lam / v_size
    probs[1][(UNK,)] = lam / v_size

    def lower(gram: Tuple[str, ...]) -> float:
        """P(w | shorter history) by back-off through the already computed lower orders."""
        n = len(gram)
        if gram in probs[n]:
            return probs[n][gram]
        if n == 1:
            return probs[1][(UNK,)]
        return backoff[n - 1].get(gram[:-1], 1.0) * lower(gram[1:])

    for n in range(2, order + 1):
        ctx_total: Counter = Counter()
        ctx_types: Counter = Counter()
        for gram, c in by_order[n].items():
            ctx_total[gram[:-1]] += c
            ctx_types[gram[:-1]] += 1
        for ctx, c in ctx_total.items():
            backoff[n - 1][ctx] = discount * ctx_types[ctx] / c
        for gram, c in by_order[n].items():
            ctx = gram[:-1]
            probs[n][gram] = (c - discount) / ctx_total[ctx] + backoff[n - 1][ctx] * lower(gram[1:])

    lines = ["", "\\data\\"]
    unigrams = dict(probs[1])
    unigrams[(BOS,)] = 0.0  # never predicted; listed because contexts start with it
    sizes = [len(unigrams)] + [len(probs[n]) for n in range(2, order + 1)]
    lines += [f"ngram {n}={k}" for n, k in enumerate(sizes, start=1)]
    for n in range(1, order + 1):
        lines += ["", f"\\{n}-grams:"]
        table = unigrams if n == 1 else probs[n]
        for gram in sorted(table):
            p = -99.0 if gram == (BOS,) else _log10(table[gram])
            line = f"{p:.6f}\t{' '.join(gram)}"
            if n < order and gram in backoff[n]:
                line += f"\t{_log10(backoff[n][gram]):.6f}"
            lines.append(line)
    lines += ["", "\\end\\", ""]
    return "\n".join(lines)


def transcripts_from_manifests(paths: Sequence[str | os.PathLike]) -> List[str]:
    out: List[str] = []
    for p in paths:
        if not Path(p).is_file():
            raise FileNotFoundError(f"manifest not found: {p}")
        out += [u.transcript for u in read_manifest(p)]
    return out


def write_lm(manifests: Sequence[str | os.PathLike], out: str | os.PathLike, order: int = 2,
             discount: float = 0.7) -> Path:
    """Build from the transcripts of `manifests` and write `out` atomically; returns its path."""
    text = build_arpa(transcripts_from_manifests(manifests), order=order, discount=discount)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, text)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--manifest", action="append", required=True, help="a training manifest (repeatable)")
    ap.add_argument("--out", required=True, help="the ARPA file to write")
    ap.add_argument("--order", type=int, default=2)
    ap.add_argument("--discount", type=float, default=0.7)
    args = ap.parse_args(argv)
    try:
        path = write_lm(args.manifest, args.out, order=args.order, discount=args.discount)
    except (OSError, ValueError, ManifestError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
