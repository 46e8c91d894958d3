"""Transcription by a model trained here, in the test, to recognise a synthesised utterance."""
import json
import os
import subprocess
import sys

import Levenshtein
import numpy as np
import pytest
import soundfile as sf

from tests.helpers import ROOT, write_flac

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


# transcribe from an exported file, then list the ds2exp modules that were loaded
EXPORTED_ONLY = """
import sys
import ds2exp.transcribe as t
status = t.main(sys.argv[1:])
print("modules:", " ".join(sorted(m for m in sys.modules if m.startswith("ds2exp"))))
sys.exit(status)
"""


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


@pytest.mark.slow
def test_exported_file_alone_gives_the_checkpoints_text(overfit_model, tmp_path):
    """export.py's MindIR, run by transcribe exported= without ds2exp's model code: the same transcripts and
    character times as transcribe checkpoint=, on a file in one chunk and a long one in several."""
    tmp, audio, y = overfit_model
    long_file = write_flac(tmp_path / "long.flac", np.concatenate([y, np.zeros(4000, np.float32), y, y]))
    mindir = tmp_path / "model.mindir"
    r = subprocess.run([sys.executable, str(ROOT / "export.py"), f"checkpoint={tmp / 'run'}", f"output={mindir}",
                        "dataset=manifest", f"dataset.train_manifest={tmp / 'm.jsonl'}",
                        f"dataset.test_manifest={tmp / 'm.jsonl'}", f"hydra.run.dir={tmp_path / 'export'}",
                        "verify_utterances=1"], capture_output=True, text=True, cwd=ROOT, timeout=900,
                       env={**os.environ, "DS2EXP_ROOT": str(tmp)})
    assert r.returncode == 0, r.stderr[-3000:]
    args = [f"audio=[{audio},{long_file}]", "json=true", "chunk_seconds=1.48"]
    from_ckpt = transcribe(f"checkpoint={tmp / 'run'}", *args)
    from_file = subprocess.run([sys.executable, "-c", EXPORTED_ONLY, f"exported={mindir}", *args],
                               capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert from_ckpt.returncode == 0 and from_file.returncode == 0, from_ckpt.stderr[-2000:] + from_file.stderr[-2000:]
    a = [json.loads(line) for line in from_ckpt.stdout.splitlines() if line.startswith("{")]
    b = [json.loads(line) for line in from_file.stdout.splitlines() if line.startswith("{")]
    assert len(a) == len(b) == 2
    for x, z in zip(a, b):
        print(f"{x['file']}: checkpoint {x['transcript']!r} / exported {z['transcript']!r}")
        assert x["transcript"] == z["transcript"] and x["char_times"] == z["char_times"]
    assert Levenshtein.distance(b[0]["transcript"], TEXT) <= 1 and b[1]["transcript"].count("OPEN") >= 2
    modules = next(line for line in from_file.stdout.splitlines() if line.startswith("modules:")).split()[1:]
    assert not [m for m in modules if m.startswith(("ds2exp.models.deepspeech2", "ds2exp.models.layers",
                                                    "ds2exp.kernels", "ds2exp.export_model"))], modules
