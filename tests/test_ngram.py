"""The word n-gram builder writes a normalised ARPA model that KenLM loads and the beam decoder uses."""
import json
import math

import numpy as np
import pytest
import soundfile as sf

from ds2exp.data.labels import BLANK_INDEX, LABELS
from ds2exp.evaluation.decoding import BeamSearchDecoder, greedy_decode
from ds2exp.evaluation.ngram import build_arpa, main

kenlm = pytest.importorskip("kenlm", reason="the lm extra (pip install 'ds2exp[lm]') is not installed")

SENTENCES = ["THE CAT SAT", "THE CAT RAN", "A DOG SAT", "THE DOG RAN HOME", "A CAT"]


def _model(tmp_path, sentences=SENTENCES, order=2):
    path = tmp_path / f"lm{order}.arpa"
    path.write_text(build_arpa(sentences, order=order))
    return kenlm.Model(str(path))


def _vocab():
    return sorted({w for s in SENTENCES for w in s.split()}) + ["</s>", "<unk>"]


@pytest.mark.parametrize("order", [2, 3])
@pytest.mark.parametrize("context", [[], ["THE"], ["DOG"], ["HOME"], ["THE", "CAT"], ["ZEBRA"]])
def test_every_context_is_a_probability_distribution(tmp_path, order, context):
    # seen contexts, a context seen only at the end of a sentence, an unseen word: each sums to 1
    model = _model(tmp_path, order=order)
    state = kenlm.State()
    model.BeginSentenceWrite(state)
    for w in context:
        nxt = kenlm.State()
        model.BaseScore(state, w, nxt)
        state = nxt
    total = sum(10 ** model.BaseScore(state, w, kenlm.State()) for w in _vocab())
    assert total == pytest.approx(1.0, abs=1e-4)


def test_seen_continuations_beat_unseen_ones(tmp_path):
    model = _model(tmp_path)
    # "THE CAT" was seen twice, "THE SAT" never; a word outside the vocabulary is worst of all
    assert model.score("THE CAT", eos=False) > model.score("THE SAT", eos=False)
    assert model.score("THE SAT", eos=False) > model.score("THE ZEBRA", eos=False)
    counts = {"THE CAT": 2, "THE DOG": 1}
    # with discount D the seen bigram probabilities keep their count order
    p = {k: model.score(k, bos=True, eos=False) - model.score("THE", bos=True, eos=False) for k in counts}
    assert p["THE CAT"] > p["THE DOG"]


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="order"):
        build_arpa(SENTENCES, order=1)
    with pytest.raises(ValueError, match="discount"):
        build_arpa(SENTENCES, discount=1.0)
    with pytest.raises(ValueError, match="no non-empty transcripts"):
        build_arpa(["", "   "])


def test_cli_reads_a_manifest_and_names_a_missing_one(tmp_path, capsys):
    manifest = tmp_path / "train.jsonl"
    lines = []
    for i, s in enumerate(SENTENCES):
        wav = tmp_path / f"u{i}.wav"
        sf.write(wav, np.zeros(1600, np.float32), 16000)
        lines.append(json.dumps({"id": f"u{i}", "audio_path": str(wav), "transcript": s, "duration": 0.1,
                                 "sample_rate": 16000}) + "\n")
    manifest.write_text("".join(lines))
    out = tmp_path / "lm" / "train.arpa"
    assert main(["--manifest", str(manifest), "--out", str(out)]) == 0
    model = kenlm.Model(str(out))
    assert model.order == 2
    assert "THE" in model and "ZEBRA" not in model
    assert main(["--manifest", str(tmp_path / "missing.jsonl"), "--out", str(out)]) == 1
    assert "missing.jsonl" in capsys.readouterr().err
    assert kenlm.Model(str(out)).order == 2  # the earlier file is still there, intact


def test_the_built_model_fixes_a_misspelling_in_beam_search(tmp_path):
    # frames that spell "THE KAT" most likely; the model built from the sentences knows CAT, not KAT
    def frame(**probs):
        row = np.full(len(LABELS), 1e-4)
        for ch, p in probs.items():
            row[BLANK_INDEX if ch == "_" else LABELS.index(" " if ch == "SP" else ch)] = p
        return row / row.sum()

    frames = [frame(T=0.9), frame(H=0.9), frame(E=0.9), frame(SP=0.9), frame(K=0.55, C=0.45), frame(A=0.9),
              frame(T=0.9), frame(_=0.9)]
    log_probs = np.log(np.stack(frames))
    assert greedy_decode(log_probs) == "THE KAT"
    path = tmp_path / "lm.arpa"
    path.write_text(build_arpa(SENTENCES))
    decoder = BeamSearchDecoder(beam_width=16, lm_path=path, alpha=0.5, beta=1.0)
    assert decoder.decode(log_probs) == "THE CAT"


def test_log10_probabilities_are_finite_numbers(tmp_path):
    text = build_arpa(SENTENCES, order=3)
    for line in text.splitlines():
        fields = line.split("\t")
        if len(fields) >= 2:
            assert math.isfinite(float(fields[0]))
