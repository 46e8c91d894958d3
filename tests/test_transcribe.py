"""Transcription by a model trained here, in the test, to recognise a synthesised utterance."""
import json
import os
import subprocess
import sys

import Levenshtein
import numpy as np
import pytest
import soundfile as sf

from tests.conftest import ROOT, write_flac

TEXT = "OPEN THE DOOR"


@pytest.fixture(scope="module")
def overfit_model(tmp_path_factory, say):
    tmp = tmp_path_factory.mktemp("transcribe")
    y = say(TEXT.lower(), "en-us", 160, 50)
    audio = write_flac(tmp / "u.flac", y)
    with open(tmp / "m.jsonl", "w") as f:
        for i in range(4):
            f.write(json.dumps({"id": f"u{i}", "audio_path": str(audio), "transcript": TEXT,
                                "duration": len(y) / 16000, "sample_rate": 16000}) + "\n")
    env = {**os.environ, "DS2EXP_ROOT": str(tmp)}
    r = subprocess.run([sys.executable, str(ROOT / "train.py"), "dataset=manifest",
                        f"dataset.train_manifest={tmp / 'm.jsonl'}", "dataset.batch_size=4",
                        "model.conv_channels=4", "model.rnn_hidden=64", "model.rnn_layers=1", "optimizer.lr=5e-3",
                        "trainer.max_steps=250", "trainer.eval_every=1000", "logger=none", "trainer.progress=false",
                        f"hydra.run.dir={tmp / 'run'}"], capture_output=True, text=True, cwd=ROOT, env=env,
                       timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    return tmp, audio, y


def transcribe(*args):
    return subprocess.run([sys.executable, "-m", "ds2exp.transcribe", *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=300)


def test_transcribes_what_it_was_trained_on_with_times(overfit_model, tmp_path):
    tmp, audio, y = overfit_model
    import soxr

    stereo8k = tmp_path / "stereo8k.wav"
    low = soxr.resample(y, 16000, 8000)
    sf.write(str(stereo8k), np.stack([low, low], axis=1), 8000)
    r = transcribe(f"checkpoint={tmp / 'run'}", f"audio=[{audio},{stereo8k},{tmp_path / 'missing.flac'}]",
                   "json=true")
    assert r.returncode == 1  # one file failed, the others were transcribed
    assert "missing.flac: missing file" in r.stderr
    assert "resampled from 8000 Hz" in r.stderr and "mixed down to mono" in r.stderr
    results = [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]
    assert len(results) == 2
    for res in results:
        hyp = res["transcript"].replace(" ", "")
        assert Levenshtein.distance(hyp, TEXT.replace(" ", "")) <= 1, res["transcript"]
        times = res["char_times"]
        assert len(times) == len(res["transcript"].replace(" ", "")) + res["transcript"].count(" ")
        assert times == sorted(times) and 0 <= times[0] and times[-1] <= res["duration"]


def test_long_audio_is_chunked(overfit_model):
    tmp, audio, y = overfit_model
    long_file = write_flac(tmp / "long.flac", np.concatenate([y, np.zeros(4000, np.float32), y]))
    r = transcribe(f"checkpoint={tmp / 'run'}", f"audio=[{long_file}]", "chunk_seconds=1.48")
    assert r.returncode == 0, r.stderr[-2000:]
    text = r.stdout.split(": ", 1)[1].strip().replace(" ", "")
    assert Levenshtein.distance(text, 2 * TEXT.replace(" ", "")) <= 3, text


def test_bad_arguments_are_one_line_errors(tmp_path):
    cases = [(["checkpoint=x", "audoi=[a.wav]"], "unknown config key 'audoi'"),
             (["audio=[a.wav]"], "checkpoint"),
             (["checkpoint=x", "exported=y", "audio=[a.wav]"], "one of checkpoint"),
             ([f"exported={tmp_path / 'nope.mindir'}", "audio=[a.wav]"], "exported="),
             (["checkpoint=x", "audio=[a.wav]", "chunk_seconds=1000000"], "chunk_seconds=1000000"),
             (["checkpoint=x", "audio=[a.wav]", "chunk_seconds=nan"], "chunk_seconds"),
             (["checkpoint=x", "audio=[a.wav]", "chunk_seconds=0.5"], "chunk_seconds"),
             (["checkpoint=x", "audio=[]"], "audio")]
    for args, needle in cases:
        r = transcribe(*args)
        assert r.returncode == 2 and needle in r.stderr, (args, r.stderr)
        assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr, (args, r.stderr)
    assert not (ROOT / "outputs" / "transcribe").exists()


def test_help_starts_with_examples():
    r = transcribe("--help")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert "Examples:" in lines[:6], r.stdout
    assert "python -m ds2exp.transcribe checkpoint=" in r.stdout and "exported=" in r.stdout
