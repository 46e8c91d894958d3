"""Beam search with a real KenLM n-gram model (the `lm` extra) changes the answer as it should."""
import numpy as np
import pytest

from ds2exp.data.labels import BLANK_INDEX, LABELS
from ds2exp.evaluation.decoding import BeamSearchDecoder, greedy_decode

kenlm = pytest.importorskip("kenlm", reason="the lm extra (pip install 'ds2exp[lm]') is not installed")

ARPA = """\\data\\
ngram 1=5
ngram 2=4

\\1-grams:
-1.0\t<s>\t-0.3
-1.0\t</s>
-0.6\tTHE\t-0.3
-0.5\tCAT\t-0.3
-4.0\tCAR\t-0.3

\\2-grams:
-0.1\t<s> THE
-0.2\tTHE CAT
-3.0\tTHE CAR
-0.1\tCAT </s>

\\end\\
"""


def frames_for(spec):
    """One frame per entry: {label: probability}, the rest spread over the other labels."""
    out = np.full((len(spec), len(LABELS)), 1e-4)
    for t, probs in enumerate(spec):
        for ch, p in probs.items():
            out[t, BLANK_INDEX if ch == "_" else LABELS.index(ch)] = p
    out /= out.sum(axis=1, keepdims=True)
    return np.log(out)


def test_language_model_resolves_an_acoustically_ambiguous_word(tmp_path):
    lm = tmp_path / "tiny.arpa"
    lm.write_text(ARPA)
    # "THE CA?" where the acoustics slightly prefer R over T
    spec = [{"T": 0.9}, {"H": 0.9}, {"E": 0.9}, {" ": 0.9}, {"C": 0.9}, {"A": 0.9}, {"R": 0.5, "T": 0.45}, {"_": 0.9}]
    log_probs = frames_for(spec)
    assert greedy_decode(log_probs) == "THE CAR"
    assert BeamSearchDecoder(beam_width=16).decode(log_probs) == "THE CAR"
    with_lm = BeamSearchDecoder(beam_width=16, alpha=1.0, beta=0.0, lm_path=lm)
    assert with_lm.decode(log_probs) == "THE CAT"


def test_missing_language_model_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.arpa"):
        BeamSearchDecoder(lm_path=tmp_path / "nope.arpa")


def test_unknown_word_penalty_decides_between_an_oov_spelling_and_a_known_word(tmp_path):
    from ds2exp.evaluation.ngram import build_arpa

    lm = tmp_path / "built.arpa"  # has an <unk> entry, as models from ds2exp.evaluation.ngram do
    lm.write_text(build_arpa(["THE CAT SAT", "THE DOG SAT", "A CAT RAN"]))
    # the acoustics clearly say "KAT", a word the model does not know; CAT is the known neighbour
    spec = [{"T": 0.9}, {"H": 0.9}, {"E": 0.9}, {" ": 0.9}, {"K": 0.9, "C": 0.05}, {"A": 0.9}, {"T": 0.9},
            {"_": 0.9}]
    log_probs = frames_for(spec)
    lenient = BeamSearchDecoder(beam_width=16, alpha=0.5, beta=0.0, lm_path=lm, unk_score_offset=0.0)
    strict = BeamSearchDecoder(beam_width=16, alpha=0.5, beta=0.0, lm_path=lm, unk_score_offset=-30.0)
    assert lenient.decode(log_probs) == "THE KAT"
    assert strict.decode(log_probs) == "THE CAT"


def test_evaluate_passes_the_unknown_word_penalty_to_the_decoder():
    from ds2exp.cli import compose_config

    cfg = compose_config(["decoder=beam", "decoder.unk_score_offset=-25"], config_name="evaluate")
    assert cfg.decoder.unk_score_offset == -25.0
    with pytest.raises(Exception, match="unk_score_offset"):
        compose_config(["decoder=beam", "decoder.unk_score_offset=lots"], config_name="evaluate")
