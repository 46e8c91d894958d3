"""WER/CER and CTC decoding (greedy, pyctcdecode beam search, numpy prefix beam search)."""
from __future__ import annotations

import collections
import importlib.util
import itertools
import math
import random

import numpy as np
import pytest

from ds2exp.data.labels import BLANK_INDEX, LABELS
from ds2exp.evaluation.decoding import (
    BeamSearchDecoder,
    batch_greedy_decode,
    greedy_decode,
    greedy_decode_with_offsets,
    prefix_beam_search,
    prefix_beam_search_nbest,
)
from ds2exp.training.metrics import ErrorRateAccumulator, char_errors, word_errors

HAVE_PYCTCDECODE = importlib.util.find_spec("pyctcdecode") is not None
needs_pyctcdecode = pytest.mark.skipif(not HAVE_PYCTCDECODE, reason="pyctcdecode not installed")
C = len(LABELS)
IDX = {c: i for i, c in enumerate(LABELS)}


# ------------------------------------------------------------------ helpers (independent)
def dp_edit_distance(a, b) -> int:
    """Plain O(len(a)*len(b)) Levenshtein distance over any two sequences."""
    prev = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        cur = [i] + [0] * len(b)
        for j, y in enumerate(b, 1):
            cur[j] = min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (x != y))
        prev = cur
    return prev[-1]


def collapse(alignment) -> str:
    out, prev = [], None
    for k in alignment:
        if k != prev and k != BLANK_INDEX:
            out.append(LABELS[k])
        prev = k
    return "".join(out)


def brute_force_labelling_probs(probs: np.ndarray) -> list[tuple[str, float]]:
    """P(text) summed over every alignment (all C**T of them, zero-probability classes
    skipped since they contribute exactly 0), text = collapsed and whitespace-normalised."""
    t_len = probs.shape[0]
    support = [np.flatnonzero(probs[t] > 0) for t in range(t_len)]
    totals: dict[str, float] = collections.defaultdict(float)
    for alignment in itertools.product(*support):
        p = 1.0
        for t, k in enumerate(alignment):
            p *= probs[t, k]
        totals[" ".join(collapse(alignment).split())] += p
    return sorted(totals.items(), key=lambda kv: -kv[1])


def frames(spec: str, peak: float = 0.9) -> np.ndarray:
    """Log-probs with one frame per symbol of ``spec`` ('_' = blank) peaked on it."""
    probs = np.full((len(spec), C), (1.0 - peak) / (C - 1))
    for t, ch in enumerate(spec):
        probs[t, IDX[ch]] = peak
    return np.log(probs)


def with_zeros(dist: dict[str, float], t_len: int) -> np.ndarray:
    """Same distribution at each of t_len frames; labels not in ``dist`` get probability 0."""
    probs = np.zeros((t_len, C))
    for ch, p in dist.items():
        probs[:, IDX[ch]] = p
    assert np.allclose(probs.sum(axis=1), 1.0)
    return probs


# ------------------------------------------------------------------------------ metrics
def test_word_errors_hand_worked():
    # CAT->BAT substitution, ON insertion
    assert word_errors("THE CAT SAT", "THE BAT SAT ON") == (2, 3)
    assert word_errors("THE CAT SAT", "THE CAT SAT") == (0, 3)
    # AB CD -> ABCD: one substitution and one deletion
    assert word_errors("AB CD", "ABCD") == (2, 2)
    assert word_errors("A B C", "") == (3, 3)
    # whitespace runs do not create words
    assert word_errors("  THE   CAT ", "THE CAT") == (0, 2)


def test_char_errors_hand_worked():
    # THECAT vs THEBATON: C->B, +O, +N
    assert char_errors("THE CAT", "THE BAT ON", remove_space=True) == (3, 6)
    # THE CAT vs THE BAT ON: C->B, +' ', +O, +N ; 7 reference characters with the space
    assert char_errors("THE CAT", "THE BAT ON", remove_space=False) == (4, 7)
    # a missing space is free when spaces are removed, one deletion otherwise
    assert char_errors("AB CD", "ABCD", remove_space=True) == (0, 4)
    assert char_errors("AB CD", "ABCD", remove_space=False) == (1, 5)
    # doubled / leading spaces are normalised away
    assert char_errors("AB CD", " AB  CD ", remove_space=False) == (0, 5)
    assert char_errors("KITTEN", "SITTING", remove_space=True) == (3, 6)


def test_accumulator_two_definitions_hand_worked():
    pairs = [("THE CAT SAT", "THE BAT SAT ON"), ("AB CD", "ABCD")]
    ref_acc = ErrorRateAccumulator("reference")
    std_acc = ErrorRateAccumulator("standard")
    for r, h in pairs:
        ref_acc.add(r, h)
        std_acc.add(r, h)
    # words: (2 + 2) / (3 + 2)
    assert ref_acc.wer == pytest.approx(80.0)
    assert std_acc.wer == pytest.approx(80.0)
    # no spaces: THECATSAT/THEBATSATON = 3 of 9, ABCD/ABCD = 0 of 4 -> 3/13
    assert ref_acc.cer == pytest.approx(100.0 * 3 / 13)
    # spaces: THE CAT SAT/THE BAT SAT ON = 4 of 11, AB CD/ABCD = 1 of 5 -> 5/16
    assert std_acc.cer == pytest.approx(100.0 * 5 / 16)
    assert ref_acc.per_utterance[1] == {
        "id": 1, "reference": "AB CD", "hypothesis": "ABCD",
        "word_errors": 2, "ref_words": 2, "char_errors": 0, "ref_chars": 4,
    }
    summary = std_acc.summary()
    assert (summary["word_errors"], summary["ref_words"], summary["char_errors"], summary["ref_chars"]) == (4, 5, 5, 16)


def test_accumulator_sums_over_corpus_not_mean_of_utterances():
    acc = ErrorRateAccumulator()
    acc.add("A", "B", "short")  # 1 error / 1 word: 100 %
    acc.add("ONE TWO THREE FOUR FIVE SIX SEVEN EIGHT NINE", "ONE TWO THREE FOUR FIVE SIX SEVEN EIGHT NINE", "long")
    mean_of_utterances = np.mean([100.0 * r["word_errors"] / r["ref_words"] for r in acc.per_utterance])
    assert mean_of_utterances == pytest.approx(50.0)
    assert acc.wer == pytest.approx(10.0)  # 1 / 10
    # characters (spaces removed): 1 / (1 + 36)
    assert acc.cer == pytest.approx(100.0 / 37)
    assert [r["id"] for r in acc.per_utterance] == ["short", "long"]


def test_empty_references():
    acc = ErrorRateAccumulator()
    rec = acc.add("", "HELLO WORLD")
    assert (rec["word_errors"], rec["ref_words"], rec["char_errors"], rec["ref_chars"]) == (2, 0, 10, 0)
    with pytest.raises(ValueError, match="no words"):
        acc.wer
    with pytest.raises(ValueError, match="no characters"):
        acc.cer
    acc.add("HELLO", "HELLO")
    assert acc.wer == pytest.approx(200.0)  # 2 insertions over 1 reference word
    assert acc.cer == pytest.approx(200.0)  # 10 / 5
    with pytest.raises(ValueError):
        ErrorRateAccumulator().wer
    with pytest.raises(ValueError, match="definition"):
        ErrorRateAccumulator("mean")


def test_random_pairs_match_dynamic_programming():
    rng = random.Random(1234)
    vocab = ["A", "AN", "THE", "CAT", "CATS", "SAT", "ON", "MAT", "IT'S", "DOG"]
    for _ in range(200):
        ref = " ".join(rng.choice(vocab) for _ in range(rng.randint(0, 8)))
        hyp = " ".join(rng.choice(vocab) for _ in range(rng.randint(0, 8)))
        if rng.random() < 0.3:  # raw character soup, including runs of spaces
            ref = "".join(rng.choice("AB C'") for _ in range(rng.randint(0, 12)))
            hyp = "".join(rng.choice("AB C'") for _ in range(rng.randint(0, 12)))
        rw, hw = ref.split(), hyp.split()
        assert word_errors(ref, hyp) == (dp_edit_distance(rw, hw), len(rw))
        r_norm, h_norm = " ".join(rw), " ".join(hw)
        assert char_errors(ref, hyp, remove_space=False) == (dp_edit_distance(r_norm, h_norm), len(r_norm))
        r_ns, h_ns = r_norm.replace(" ", ""), h_norm.replace(" ", "")
        assert char_errors(ref, hyp, remove_space=True) == (dp_edit_distance(r_ns, h_ns), len(r_ns))


def test_many_distinct_words():
    # a large vocabulary must map to distinct stand-in characters
    ref = " ".join(f"W{i}" for i in range(3000))
    hyp = " ".join(f"W{i}" for i in range(1, 3001))
    assert word_errors(ref, hyp) == (2, 3000)


# ------------------------------------------------------------------------------ greedy
def test_greedy_decode_collapses_and_drops_blanks():
    lp = frames("AA_BB_B")
    assert greedy_decode(lp) == "ABB"
    assert greedy_decode_with_offsets(lp) == ("ABB", [0, 3, 6])
    assert greedy_decode_with_offsets(lp, length=5) == ("AB", [0, 3])
    assert greedy_decode(lp, length=0) == ""
    assert greedy_decode_with_offsets(frames("_IT'S  A_")) == ("IT'S A", [1, 2, 3, 4, 5, 7])
    # works on probabilities too (only the argmax matters)
    assert greedy_decode(np.exp(lp)) == "ABB"
    with pytest.raises(ValueError):
        greedy_decode(lp, length=8)
    with pytest.raises(ValueError):
        greedy_decode(lp[:, :-1])


def test_batch_greedy_decode_respects_lengths():
    a = frames("AA_BB_B")
    b = frames("C_CD")
    batch = np.stack([a, np.concatenate([b, frames("EEE")])])  # second item padded with E frames
    assert batch_greedy_decode(batch, np.array([7, 4])) == ["ABB", "CCD"]
    assert batch_greedy_decode(batch) == ["ABB", "CCDE"]
    with pytest.raises(ValueError):
        batch_greedy_decode(batch, [7])


# ------------------------------------------------------------------------- beam search
def test_pyctcdecode_label_mapping():
    dec = BeamSearchDecoder(beam_width=4, backend="numpy")
    labels = dec.pyctcdecode_labels()
    assert labels[BLANK_INDEX] == "" and labels[27] == " " and labels[0] == "'" and labels[1] == "A"
    assert len(labels) == C


TWO_FRAME = {"_": 0.4, "A": 0.35, "B": 0.25}  # best path "" (0.16) but P("A") = 0.4025


@pytest.mark.parametrize("t_len", [2, 3])
def test_beam_beats_greedy_where_best_path_is_wrong(t_len):
    probs = with_zeros(TWO_FRAME, t_len)
    ranked = brute_force_labelling_probs(probs)
    best_text, best_p = ranked[0]
    assert best_text == "A" and best_p > ranked[1][1]
    if t_len == 2:
        # worked by hand: AA + A_ + _A = 0.35**2 + 2 * 0.35 * 0.4
        assert best_p == pytest.approx(0.4025)
    with np.errstate(divide="ignore"):
        lp = np.log(probs)  # -inf for impossible labels
    greedy = greedy_decode(lp)
    assert greedy == "" != best_text

    backends = ["numpy"] + (["pyctcdecode"] if HAVE_PYCTCDECODE else [])
    for backend in backends:
        assert BeamSearchDecoder(beam_width=10, backend=backend).decode(lp) == best_text, backend
    nbest = prefix_beam_search_nbest(lp, beam_width=10)
    assert nbest[0][0] == best_text
    assert math.exp(nbest[0][1]) == pytest.approx(best_p)


def test_prefix_beam_search_probabilities_exact_with_spaces():
    # spaces included: texts are whitespace-normalised, so "A B", " A  B" ... all count as "A B"
    rng = np.random.default_rng(7)
    active = [IDX["A"], IDX["B"], IDX[" "], BLANK_INDEX]
    for _ in range(3):
        probs = np.zeros((6, C))
        probs[:, active] = rng.dirichlet(np.ones(len(active)), size=6)
        ranked = dict(brute_force_labelling_probs(probs))
        with np.errstate(divide="ignore"):
            nbest = prefix_beam_search_nbest(np.log(probs), beam_width=10_000)
        assert sum(math.exp(s) for _, s in nbest) == pytest.approx(1.0)
        for text, score in nbest:
            assert math.exp(score) == pytest.approx(ranked[text], rel=1e-9)


@needs_pyctcdecode
def test_prefix_beam_search_agrees_with_pyctcdecode():
    rng = np.random.default_rng(3)
    active = [IDX["A"], IDX["B"], IDX[" "], BLANK_INDEX]
    # wide beam, no score-based pruning: both searches are then exact on these small cases
    dec = BeamSearchDecoder(beam_width=1000, backend="pyctcdecode", token_min_logp=-30.0, beam_prune_logp=-1000.0)
    for _ in range(8):
        probs = np.zeros((7, C))
        probs[:, active] = rng.dirichlet(np.ones(len(active)), size=7)
        with np.errstate(divide="ignore"):
            lp = np.log(probs)
        truth = brute_force_labelling_probs(probs)[0][0]
        assert prefix_beam_search(lp, beam_width=1000) == truth
        assert dec.decode(lp) == truth


def _noisy_utterance(text: str, rng: np.random.Generator) -> tuple[np.ndarray, str]:
    spec = []
    for i, ch in enumerate(text):
        if i and text[i - 1] == ch:
            spec.append("_")
        spec.extend([ch] * int(rng.integers(1, 3)))
        spec.extend("_" * int(rng.integers(0, 3)))
    logits = rng.normal(scale=1.0, size=(len(spec), C))
    for t, ch in enumerate(spec):
        logits[t, IDX[ch]] += 6.0
    return logits, text


def test_beam_and_greedy_decode_clear_utterance():
    rng = np.random.default_rng(0)
    logits, text = _noisy_utterance("IT'S A GOOD TEST", rng)
    lp = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    assert greedy_decode(lp) == text
    assert prefix_beam_search(lp, beam_width=16, token_min_logp=-5.0) == text
    for backend in ["numpy"] + (["pyctcdecode"] if HAVE_PYCTCDECODE else []):
        dec = BeamSearchDecoder(beam_width=16, backend=backend)
        assert dec.decode(logits) == text  # raw logits are log-softmaxed
        padded = np.concatenate([lp, np.log(np.full((5, C), 1.0 / C))])
        assert dec.decode(padded, length=len(lp)) == text
        assert dec.decode_batch(padded[None], [len(lp)]) == [text]


def test_lm_without_kenlm_gives_clear_error(tmp_path):
    if importlib.util.find_spec("kenlm") is not None:
        pytest.skip("kenlm is installed")
    arpa = tmp_path / "lm.arpa"
    arpa.write_text("\\data\\\nngram 1=1\n\n\\1-grams:\n-1.0\t<unk>\n\n\\end\\\n")
    with pytest.raises(ImportError, match=r"ds2exp\[lm\]"):
        BeamSearchDecoder(lm_path=str(arpa))
    with pytest.raises(ValueError):
        BeamSearchDecoder(lm_path=str(arpa), backend="numpy")
