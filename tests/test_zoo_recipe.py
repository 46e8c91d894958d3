"""experiment=zoo_recipe and the hazard corpus: the zoo's crop, label padding and unguarded normalisation
as config keys, real audio and real training steps; the diagnosis names the utterance that broke the run."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.helpers import ROOT, write_flac
from tests.helpers.processes import train_env


@pytest.fixture(scope="module")
def long_data_dir(shared_data_dir):
    """shared_data_dir with synth_long built (once)."""
    from ds2exp.cli import check_overrides
    from ds2exp.data.dataset import resolve_manifests

    resolve_manifests(check_overrides([f"paths.data_dir={shared_data_dir}", "dataset=synth_long"]), progress=False)
    return shared_data_dir


def _manifest(tmp_path: Path, say, items):
    """A JSON-lines manifest of real espeak audio: (id, spoken text, transcript)."""
    lines = []
    for uid, spoken, transcript in items:
        audio = say(spoken)
        path = write_flac(tmp_path / f"{uid}.flac", audio)
        lines.append(json.dumps({"id": uid, "audio_path": str(path), "transcript": transcript,
                                 "duration": len(audio) / 16000}))
    m = tmp_path / "train.jsonl"
    m.write_text("\n".join(lines) + "\n")
    return m


def test_the_crop_cuts_long_inputs_at_random_and_keeps_the_transcript(tmp_path, say):
    from ds2exp.cli import check_overrides
    from ds2exp.data.dataset import BatchLoader, BucketBatchSampler, load_split
    from ds2exp.data.features import FeatureCache, FeatureSettings

    m = _manifest(tmp_path, say, [("a", "one two three four five six seven", "ONE TWO"),
                                  ("b", "yes", "YES")])
    cfg = check_overrides(["dataset=manifest", f"dataset.train_manifest={m}", "dataset.crop_frames=80",
                           f"paths.data_dir={tmp_path}"])
    settings = FeatureSettings.from_config(cfg.dataset.feature)
    split = load_split("train", [m], cfg, settings)
    long, short = sorted(split.examples, key=lambda e: -e.frames)
    assert long.frames > 100 and short.frames < 80
    loader = BatchLoader(split, BucketBatchSampler(split.examples, 1, 1, 0), FeatureCache(tmp_path, settings, "off"),
                         crop_frames=80)
    i = split.examples.index(long)
    full = loader.cache.get(long.utt.audio_path)
    crops = [loader.make_batch([i], epoch=e) for e in range(4)]
    for b in crops:
        assert b.features.shape[2] == 80 and b.feature_lengths.tolist() == [80]
        assert b.labels[0, :b.label_lengths[0]].tolist() == long.labels  # the whole transcript
        start = next(s for s in range(full.shape[1] - 79) if np.array_equal(full[:, s:s + 80], b.features[0]))
        assert 0 <= start <= full.shape[1] - 80
    assert len({b.features.tobytes() for b in crops}) > 1  # a new window each epoch
    again = loader.make_batch([i], epoch=0)
    assert np.array_equal(again.features, crops[0].features)  # seeded: the same window for the same epoch
    short_batch = loader.make_batch([split.examples.index(short)])
    assert short_batch.feature_lengths.tolist() == [short.frames]  # shorter inputs are kept whole
    assert short_batch.features.shape[2] <= 80  # and padded no further than the crop


def test_crop_and_label_pad_decide_what_is_dropped(tmp_path, say):
    from ds2exp.cli import check_overrides
    from ds2exp.data.dataset import load_split
    from ds2exp.data.features import FeatureSettings

    # 2.2 s of speech with 40 characters: feasible whole (110 output frames), not after a 60-frame crop (30)
    m = _manifest(tmp_path, say, [("fits", "the quick brown fox jumps over it now",
                                   "THE QUICK BROWN FOX JUMPS OVER IT NOW X"), ("short", "hello", "HELLO")])
    settings = FeatureSettings()

    def dropped(*extra):
        cfg = check_overrides(["dataset=manifest", f"dataset.train_manifest={m}", f"paths.data_dir={tmp_path}",
                               *extra])
        return load_split("train", [m], cfg, settings).dropped

    assert dropped() == {}
    assert dropped("dataset.crop_frames=60") == {"infeasible CTC after the crop to dataset.crop_frames=60": ["fits"]}
    assert dropped("dataset.crop_frames=60", "dataset.drop_infeasible=false") == {}
    assert dropped("dataset.label_pad=10") == {"transcript longer than dataset.label_pad=10 characters": ["fits"]}


def test_unguarded_normalisation_turns_silence_into_nan_features():
    from ds2exp.data.features import FeatureSettings, compute_features

    silence = np.zeros(16000, np.float32)
    assert np.all(compute_features(silence, FeatureSettings()) == 0)
    assert np.all(np.isnan(compute_features(silence, FeatureSettings(zero_std_guard=False))))
    speech = np.sin(np.arange(16000) / 7.0).astype(np.float32)
    assert np.array_equal(compute_features(speech, FeatureSettings()),
                          compute_features(speech, FeatureSettings(zero_std_guard=False)))


def _train(tmp_path, data_dir, *overrides, timeout=900):
    run_dir = tmp_path / "run"
    r = subprocess.run([sys.executable, str(ROOT / "train.py"), f"paths.data_dir={data_dir}", "logger=none",
                        "trainer.progress=false", "trainer.eval_every=1000000", f"hydra.run.dir={run_dir}",
                        *overrides], capture_output=True, text=True, cwd=ROOT, env=train_env(tmp_path),
                       timeout=timeout)
    return r, run_dir


def test_zoo_recipe_on_the_hazard_corpus_stops_at_the_silent_clip_and_names_it(tmp_path, long_data_dir):
    r, run_dir = _train(tmp_path, long_data_dir, "experiment=zoo_recipe", "dataset=synth_long", "model=ds2_tiny",
                        "trainer.max_steps=40")
    assert r.returncode == 1, r.stderr[-3000:]
    s = json.loads((run_dir / "summary.json").read_text())
    assert s["status"] == "diverged" and s["cause"] == "bad_input_features"
    assert [u["id"] for u in s["batch"]] == ["9999-1-0001"]  # "NOTHING WAS SAID AT ALL": 2 s of zeros
    assert "silent" in ", ".join(s["batch"][0]["hazards"])
    assert "bad batch:       9999-1-0001 (" in r.stdout
    assert "9999-1-0001" in (run_dir / "diagnosis.txt").read_text()
    dropped = json.loads((run_dir / "dropped_train.json").read_text())
    assert len(dropped["transcript longer than dataset.label_pad=350 characters"]) > 0  # the long ones


def test_ds2exp_defaults_train_the_hazard_corpus_with_no_nonfinite_step(tmp_path, long_data_dir):
    """Shortest first (sortagrad): the hazard chapter's short clips all come in the first 20 steps."""
    r, run_dir = _train(tmp_path, long_data_dir, "dataset=synth_long", "model=ds2_tiny", "trainer.max_steps=20")
    assert r.returncode == 0, r.stderr[-3000:]
    s = json.loads((run_dir / "summary.json").read_text())
    assert s["status"] == "finished" and s["nonfinite_steps"] == 0 and s["step"] == 20


def test_the_audit_of_synth_long_lists_every_planted_hazard_and_nothing_else(long_data_dir, tmp_path):
    from ds2exp.data.synth_hazards import HAZARDS

    kind = {"silent": "silent_or_constant", "constant": "silent_or_constant", "clipped": "clipping",
            "out_of_labels": "invalid_characters", "infeasible": "infeasible_ctc",
            "sample_rate": "sample_rate_mismatch"}
    r = subprocess.run([sys.executable, "-m", "ds2exp.audit", "dataset=synth_long", f"paths.data_dir={long_data_dir}",
                        "--json", str(tmp_path / "audit.json")], capture_output=True, text=True, cwd=ROOT,
                       env=train_env(tmp_path), timeout=300)
    assert r.returncode == 1, r.stdout + r.stderr  # silent clips and an infeasible transcript: fatal
    report = json.loads((tmp_path / "audit.json").read_text())
    found = {u["id"]: sorted(u["hazards"]) for u in report["utterances_with_hazards"]}
    assert found == {h.uid: [kind[h.kind]] for h in HAZARDS}, found
    for k in set(kind.values()):
        assert any(line.startswith(f"{k}: ") for line in r.stdout.splitlines()), r.stdout
