"""`make train`'s driver end to end on a tiny budget: train, build the word LM, score greedy and beam+LM."""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

import pytest

from tests.helpers import ROOT
from bench.small_runs import MICRO_MODEL

kenlm = pytest.importorskip("kenlm", reason="the lm extra (pip install 'ds2exp[lm]') is not installed")


def _rows(folder):
    files = sorted(folder.glob("*.utterances.csv"))
    assert len(files) == 1, list(folder.iterdir())
    with open(files[0], newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
def test_quickstart_trains_and_scores_greedy_and_with_the_training_transcripts_lm(tmp_path, shared_data_dir):
    run_dir = tmp_path / "run"
    env = {**os.environ, "DS2EXP_ROOT": str(tmp_path)}
    r = subprocess.run([sys.executable, "-m", "ds2exp.quickstart", f"paths.data_dir={shared_data_dir}",
                        "trainer.max_steps=3", *MICRO_MODEL,
                        "trainer.progress=false", f"hydra.run.dir={run_dir}"],
                       capture_output=True, text=True, cwd=ROOT, env=env, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "greedy (acoustic model alone)" in r.stdout
    assert "beam search with a word 2-gram LM of the training transcripts" in r.stdout
    assert f"run directory: {run_dir}" in r.stdout

    # the LM: built from the training split's transcripts, next to the corpus
    lm_path = shared_data_dir / "synth_tiny" / "lm" / "train-2gram.arpa"
    model = kenlm.Model(str(lm_path))
    train_words = set()
    with open(shared_data_dir / "synth_tiny" / "manifests" / "train-synth.jsonl") as f:
        for line in f:
            train_words.update(json.loads(line)["transcript"].split())
    assert all(w in model for w in list(train_words)[:200])
    assert "NOTAWORDOFTHECORPUS" not in model

    # both decoders scored the same 100 held-out test utterances
    greedy, beam = _rows(run_dir / "evaluation" / "greedy"), _rows(run_dir / "evaluation" / "beam_lm")
    assert len(greedy) == 100
    assert [x["id"] for x in greedy] == [x["id"] for x in beam]
    assert all(int(x["ref_chars"]) > 0 for x in beam)
    # a second run reuses the LM file rather than rebuilding it
    mtime = lm_path.stat().st_mtime_ns
    r2 = subprocess.run([sys.executable, "-m", "ds2exp.quickstart", f"paths.data_dir={shared_data_dir}",
                         "trainer.max_steps=1", *MICRO_MODEL,
                         "trainer.progress=false", "logger=none", f"hydra.run.dir={tmp_path / 'run2'}"],
                        capture_output=True, text=True, cwd=ROOT, env=env, timeout=900)
    assert r2.returncode == 0, r2.stderr[-3000:]
    assert lm_path.stat().st_mtime_ns == mtime
