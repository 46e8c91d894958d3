"""bench/recipe_study.py: its variants compose, its CER is the corpus CER of evaluate.py's records, and
its side-by-side timing steps real Trainers."""
import json

import pytest

from bench import recipe_study
from ds2exp.cli import compose_config


@pytest.mark.parametrize("name", sorted(recipe_study.VARIANTS))
def test_every_variant_composes_with_the_quickstart_experiment(name):
    cfg = compose_config(["experiment=quickstart", "trainer.max_minutes=null", "trainer.max_steps=900", "logger=none",
                          *recipe_study.VARIANTS[name]])
    assert cfg.trainer.max_steps == 900 and cfg.trainer.max_minutes is None
    for override in recipe_study.VARIANTS[name]:
        key, value = override.split("=", 1)
        node = cfg
        for part in key.split("."):
            node = node[part]
        assert str(node).lower() == value.lower() or float(node) == float(value), override


def test_corpus_cer_sums_errors_over_characters(tmp_path):
    records = [{"char_errors": 3, "ref_chars": 10}, {"char_errors": 0, "ref_chars": 30}]
    (tmp_path / "best.utterances.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    assert recipe_study.corpus_cer(tmp_path) == pytest.approx(100 * 3 / 40)  # not the mean of 30% and 0%
    with pytest.raises(RuntimeError, match="no scored utterances"):
        recipe_study.corpus_cer(tmp_path / "missing")


def test_speed_steps_each_variant_in_turn():
    speed = recipe_study.measure_speed(["baseline", "gru_192"], rounds=1)
    assert set(speed) == {"baseline", "gru_192"}
    assert all(s > 0 for s in speed.values())
