"""Shared fixtures: real audio made with espeak-ng, the synthetic corpus, a manifest of spoken phrases.
Shared functions and constants live in tests/helpers/."""
from __future__ import annotations

import numpy as np
import pytest

import ds2exp  # noqa: F401  (protobuf implementation before mlflow/mindspore)
from tests.helpers import write_flac


@pytest.fixture(scope="session")
def voice():
    from ds2exp.data.synth import EspeakVoice

    return EspeakVoice()


@pytest.fixture(scope="session")
def say(voice):
    def _say(text: str, voice_name: str = "en-us", rate: int = 170, pitch: int = 50) -> np.ndarray:
        return voice.synthesize(text, voice_name, rate, pitch)

    return _say


@pytest.fixture(scope="session")
def shared_data_dir(tmp_path_factory):
    """One data folder for the whole test session, so the synthetic corpus is built once."""
    return tmp_path_factory.mktemp("ds2exp-data")


@pytest.fixture(scope="session")
def synth_data_dir(shared_data_dir):
    """shared_data_dir with the synth_tiny corpus built (once), so that the time limits of a test's
    training processes never include building it, whichever test of the session comes first."""
    from ds2exp.cli import check_overrides
    from ds2exp.data.dataset import resolve_manifests

    resolve_manifests(check_overrides([f"paths.data_dir={shared_data_dir}"]), progress=False)
    return shared_data_dir


@pytest.fixture(scope="module")
def spoken_manifest(tmp_path_factory, say):
    """A manifest (m.jsonl) of 8 short phrases spoken by espeak-ng, written as u0.flac .. u7.flac beside it
    (for a Trainer built in the test process: tests.helpers.trainers.make_trainer)."""
    import soundfile as sf

    from ds2exp.data.manifest import Utterance, write_jsonl

    tmp = tmp_path_factory.mktemp("div")
    utts = []
    texts = ["GOOD MORNING", "OPEN THE DOOR", "THE BLUE CAR", "HELLO THERE", "SIT DOWN", "A RED HAT",
             "COME HERE NOW", "ONE TWO THREE"]
    for i, text in enumerate(texts):
        p = write_flac(tmp / f"u{i}.flac", say(text.lower()))
        utts.append(Utterance(f"u{i}", str(p), text, sf.info(str(p)).duration, 16000))
    write_jsonl(utts, tmp / "m.jsonl")
    return tmp / "m.jsonl"
