import numpy as np
import pytest
import scipy.signal

from ds2exp.data.features import FeatureCache, FeatureSettings, compute_features, spec_augment


def reference_features(y, pad_mode="reflect"):
    """The reference recipe's computation, independently: librosa STFT + numpy normalisation."""
    import librosa

    d = librosa.stft(y.astype(np.float64), n_fft=320, hop_length=160, win_length=320,
                     window=scipy.signal.windows.hamming, center=True, pad_mode=pad_mode)
    spect, _ = librosa.magphase(d)
    spect = np.log1p(spect)
    return (spect - spect.mean()) / spect.std()


@pytest.mark.parametrize("pad_mode", ["reflect", "constant"])
def test_features_match_librosa_reference(say, pad_mode):
    y = say("the quick brown fox")
    settings = FeatureSettings(pad_mode=pad_mode)
    ours = compute_features(y, settings)
    ref = reference_features(y, pad_mode)
    assert ours.shape == ref.shape == (161, 1 + len(y) // 160)
    assert np.max(np.abs(ours - ref)) < 1e-5


def test_feature_settings_key_changes_with_settings():
    assert FeatureSettings().key() != FeatureSettings(window="hann").key()
    assert FeatureSettings().n_fft == 320 and FeatureSettings().hop == 160 and FeatureSettings().num_bins == 161


def test_feature_cache_reuses_and_recomputes(tmp_path, say):
    from tests.conftest import write_flac

    audio = write_flac(tmp_path / "a.flac", say("hello world"))
    cache = FeatureCache(tmp_path / "cache", FeatureSettings())
    first = cache.get(audio)
    entries = list((tmp_path / "cache").rglob("*.npy"))
    assert len(entries) == 1
    # a damaged cache entry is detected and recomputed, not returned
    entries[0].write_bytes(b"garbage")
    again = cache.get(audio)
    np.testing.assert_array_equal(first, again)
    # a changed file gets a new entry
    write_flac(tmp_path / "a.flac", say("something else entirely"))
    changed = cache.get(audio)
    assert changed.shape != first.shape


def test_spec_augment_masks_and_is_seeded():
    feats = np.random.default_rng(0).standard_normal((161, 300)).astype(np.float32)
    a = spec_augment(feats, np.random.default_rng(5), 2, 20, 2, 30)
    b = spec_augment(feats, np.random.default_rng(5), 2, 20, 2, 30)
    np.testing.assert_array_equal(a, b)
    assert (a == 0).sum() > 0 and a.shape == feats.shape
