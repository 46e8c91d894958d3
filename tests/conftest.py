"""Shared fixtures: real audio made with espeak-ng, a small corpus in LibriSpeech's layout."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import ds2exp  # noqa: E402,F401  (protobuf implementation before mlflow/mindspore)


@pytest.fixture(scope="session")
def voice():
    from ds2exp.data.synth import EspeakVoice

    return EspeakVoice()


@pytest.fixture(scope="session")
def say(voice):
    def _say(text: str, voice_name: str = "en-us", rate: int = 170, pitch: int = 50) -> np.ndarray:
        return voice.synthesize(text, voice_name, rate, pitch)

    return _say


def write_flac(path: Path, audio: np.ndarray, sr: int = 16000) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(str(path), audio, sr, format="FLAC", subtype="PCM_16")
    return path


@pytest.fixture(scope="session")
def shared_data_dir(tmp_path_factory):
    """One data folder for the whole test session, so the synthetic corpus is built once."""
    return tmp_path_factory.mktemp("ds2exp-data")
