"""Shared fixtures: real audio made with espeak-ng, a small corpus in LibriSpeech's layout."""
from __future__ import annotations

import numpy as np
import pytest

import ds2exp  # noqa: F401  (protobuf implementation before mlflow/mindspore)
from tests.helpers import ROOT, write_flac  # noqa: F401  (imported from here by many tests)


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
