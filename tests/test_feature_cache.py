"""Feature cache: versioned keys, stale temporary files, the auto/on/off decision and its log line."""
import hashlib
import json
import logging
import os
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest

from ds2exp.data.features import (FeatureCache, FeatureSettings, cache_bytes, cache_mode, compute_features,
                                  librispeech_cache_gb)
from ds2exp.data.audio import load_audio
from tests.helpers import write_flac


@pytest.fixture(scope="module")
def audio(tmp_path_factory, say):
    return write_flac(tmp_path_factory.mktemp("cache-audio") / "a.flac", say("a cached utterance"))


def legacy_entry(root: Path, settings: FeatureSettings, audio_path: Path) -> Path:
    """Where a cache before features version 2 kept this file's entry: key = digest of the settings alone."""
    key = hashlib.sha1(json.dumps(asdict(settings), sort_keys=True).encode()).hexdigest()[:12]
    p = Path(audio_path).resolve()
    st = p.stat()
    digest = hashlib.sha1(f"{p}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()
    return root / key / digest[:2] / f"{digest}.npy"


def test_old_version_entries_are_not_reused(tmp_path, audio):
    settings = FeatureSettings()
    old = legacy_entry(tmp_path, settings, audio)
    old.parent.mkdir(parents=True)
    stale = np.zeros((161, 5), np.float32)  # what an old-window entry would hold: anything but today's
    np.save(old, stale)
    cache = FeatureCache(tmp_path, settings)
    assert cache.directory != old.parents[1]
    feats = cache.get(audio)
    np.testing.assert_array_equal(feats, compute_features(load_audio(audio), settings))
    assert np.load(old).shape == (161, 5)  # untouched, and not read
    assert json.loads((cache.directory / "settings.json").read_text())["features_version"] >= 2


def test_key_follows_window(tmp_path):
    keys = {FeatureSettings(window=w).key() for w in ("hamming", "hamming_symmetric", "hann")}
    assert len(keys) == 3


def test_stale_tmp_files_are_removed_fresh_ones_kept(tmp_path, audio):
    settings = FeatureSettings()
    cache = FeatureCache(tmp_path, settings)
    cache.get(audio)
    sub = next(p for p in cache.directory.iterdir() if p.is_dir())
    stale, fresh = sub / "tmpkilled.tmp", sub / "tmpwriting.tmp"
    stale.write_bytes(b"half")
    fresh.write_bytes(b"half")
    old = time.time() - 3600
    os.utime(stale, (old, old))
    FeatureCache(tmp_path, settings)  # opening the cache cleans up
    assert not stale.exists() and fresh.exists()
    assert len(list(cache.directory.rglob("*.npy"))) == 1


def test_cache_modes():
    assert cache_mode(True) == "on" and cache_mode("False") == "off" and cache_mode("auto") == "auto"
    with pytest.raises(ValueError, match="dataset.feature.cache"):
        cache_mode("sometimes")


def _examples(audio_path, n):
    from ds2exp.data.dataset import Example
    from ds2exp.data.manifest import Utterance

    dur = len(load_audio(audio_path)) / 16000
    frames = FeatureSettings().num_frames(int(dur * 16000))
    return [Example(Utterance(f"u{i}", str(audio_path), "a cached utterance", dur, 16000), [1], frames)
            for i in range(n)]


def test_auto_caches_small_corpora_and_computes_large_ones_on_the_fly(tmp_path, audio, caplog):
    exs = _examples(audio, 4)
    caplog.set_level(logging.INFO, logger="ds2exp.data.features")
    small = FeatureCache(tmp_path / "small", FeatureSettings(), enabled="auto", max_gb=1.0)
    line = small.plan("train", exs, batch_size=2)
    print(line)
    assert small.enabled and "cache on (auto" in line and "ms per batch of 2" in line
    assert "train-clean-100 23 GB" in line and "960 h 223 GB" in line
    small.get(audio)
    assert len(list(small.directory.rglob("*.npy"))) == 1
    big = FeatureCache(tmp_path / "big", FeatureSettings(), enabled="auto", max_gb=1e-9)
    line = big.plan("train", exs, batch_size=2)
    assert not big.enabled and "cache off (auto" in line
    big.get(audio)
    assert not list((tmp_path / "big").rglob("*.npy"))
    assert big.plan("val", exs, batch_size=2) is None  # decided once, by the first split
    assert any("feature cache: train" in r.getMessage() for r in caplog.records)
    off = FeatureCache(tmp_path / "off", FeatureSettings(), enabled=False)
    off.get(audio)
    assert not (tmp_path / "off").exists()


def test_cache_size_formula():
    s = FeatureSettings()
    # 100 frames per second, 161 float32 bins: 64.4 kB per second of audio
    assert cache_bytes([100], s) == 100 * 161 * 4 + 128
    assert round(librispeech_cache_gb(100.6, s)) == 23 and round(librispeech_cache_gb(960, s)) == 223
