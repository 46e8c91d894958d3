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


@pytest.fixture(scope="session")
def synth_data_dir(shared_data_dir):
    """shared_data_dir with the synth_tiny corpus built (once), so that the time limits of a test's
    training processes never include building it, whichever test of the session comes first."""
    from ds2exp.cli import check_overrides
    from ds2exp.data.dataset import resolve_manifests

    resolve_manifests(check_overrides([f"paths.data_dir={shared_data_dir}"]), progress=False)
    return shared_data_dir
