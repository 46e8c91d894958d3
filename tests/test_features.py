import numpy as np
import pytest
import scipy.signal

from ds2exp.data.features import FeatureCache, FeatureSettings, compute_features, spec_augment


def reference_features(y, pad_mode="reflect", window=scipy.signal.windows.hamming):
    """librosa STFT + numpy normalisation with the window given as a function (used as given)."""
    import librosa

    d = librosa.stft(y.astype(np.float64), n_fft=320, hop_length=160, win_length=320,
                     window=window, center=True, pad_mode=pad_mode)
    spect, _ = librosa.magphase(d)
    spect = np.log1p(spect)
    return (spect - spect.mean()) / spect.std()


def zoo_parse_audio(audio_path, window="hamming", **stft_extra):
    """The model zoo's LoadAudioAndTranscript.parse_audio (src/dataset.py), line by line: int16 read
    scaled by 1/32767, librosa.stft with the window *name* from its SpectConfig, magphase, log1p,
    (mag - mean) / std."""
    import librosa
    import soundfile as sf

    sound, _ = sf.read(str(audio_path), dtype="int16")
    sound = sound.astype("float32") / 32767
    sample_rate, window_size, window_stride = 16000, 0.02, 0.01
    n_fft = int(sample_rate * window_size)
    win_length = n_fft
    hop_length = int(sample_rate * window_stride)
    D = librosa.stft(y=sound, n_fft=n_fft, hop_length=hop_length, win_length=win_length, window=window,
                     **stft_extra)
    mag, _ = librosa.magphase(D)
    mag = np.log1p(mag)
    mean = mag.mean()
    std = mag.std()
    return (mag - mean) / std


@pytest.fixture(scope="module")
def speech_file(tmp_path_factory, say):
    """About 8 s of real-length speech, written as 16-bit FLAC like LibriSpeech."""
    from tests.helpers import write_flac

    parts = [say(t) for t in ("she had your dark suit in greasy wash water all year",
                              "don't ask me to carry an oily rag like that",
                              "the birch canoe slid on the smooth planks")]
    y = np.concatenate([np.concatenate([p, np.zeros(1600, np.float32)]) for p in parts])
    return write_flac(tmp_path_factory.mktemp("speech") / "utt.flac", y)


def test_features_equal_zoo_librosa_hamming_call(speech_file):
    """Default features vs librosa.stft(..., window="hamming") called as the zoo calls it: the
    installed librosa's own centre padding, and the reflection padding of librosa < 0.10 that the
    zoo ran (our pad_mode)."""
    import inspect

    import librosa

    from ds2exp.data.audio import load_audio

    y = load_audio(speech_file)
    assert len(y) / 16000 > 6.0
    installed_pad = inspect.signature(librosa.stft).parameters["pad_mode"].default
    for pad_mode, extra in ((installed_pad, {}), ("reflect", {"pad_mode": "reflect"})):
        ref = zoo_parse_audio(speech_file, **extra)
        ours = compute_features(y, FeatureSettings(pad_mode=pad_mode))
        assert ours.shape == ref.shape == (161, 1 + len(y) // 160)
        diff = float(np.max(np.abs(ours - ref)))
        print(f"features vs zoo librosa.stft(window='hamming'), pad_mode={pad_mode}, "
              f"{len(y) / 16000:.1f} s: max |diff| = {diff:.3g}")
        assert diff <= 1e-5
    # the symmetric window the features used before version 2 is visibly different
    old = compute_features(y, FeatureSettings(window="hamming_symmetric"))
    assert np.max(np.abs(old - zoo_parse_audio(speech_file, pad_mode="reflect"))) > 1e-2


@pytest.mark.parametrize("window,ref_window", [("hamming_symmetric", scipy.signal.windows.hamming),
                                               ("hann", "hann"), ("hann_symmetric", scipy.signal.windows.hann)])
def test_window_options_match_librosa(speech_file, window, ref_window):
    from ds2exp.data.audio import load_audio

    y = load_audio(speech_file)
    ours = compute_features(y, FeatureSettings(window=window))
    diff = float(np.max(np.abs(ours - reference_features(y, "reflect", ref_window))))
    print(f"window={window}: max |diff| vs librosa = {diff:.3g}")
    assert diff <= 1e-5


def test_unknown_window_is_refused():
    with pytest.raises(ValueError, match="dataset.feature.window"):
        FeatureSettings(window="kaiser")


@pytest.mark.parametrize("pad_mode", ["reflect", "constant"])
def test_features_match_librosa_reference(say, pad_mode):
    y = say("the quick brown fox")
    settings = FeatureSettings(pad_mode=pad_mode)
    ours = compute_features(y, settings)
    ref = reference_features(y, pad_mode, window="hamming")
    assert ours.shape == ref.shape == (161, 1 + len(y) // 160)
    assert np.max(np.abs(ours - ref)) < 1e-5


def test_feature_settings_key_changes_with_settings():
    assert FeatureSettings().key() != FeatureSettings(window="hann").key()
    assert FeatureSettings().n_fft == 320 and FeatureSettings().hop == 160 and FeatureSettings().num_bins == 161


def test_feature_cache_reuses_and_recomputes(tmp_path, say):
    from tests.helpers import write_flac

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


@pytest.mark.parametrize("n", [16000, 16123, 16160, 4800])
def test_constant_padding_equals_installed_librosa_at_every_frame(n):
    """pad_mode=constant is librosa >= 0.10's default centre padding: every frame, the last one included,
    also when the length is a multiple of the hop (where its pad_mode="reflect" has an edge case of its own)."""
    import librosa

    from ds2exp.data.features import stft_magnitude

    y = (np.random.default_rng(n).standard_normal(n) * 0.1).astype(np.float32)
    ours = stft_magnitude(y, 320, 160, "hamming", "constant")
    theirs = np.abs(librosa.stft(y, n_fft=320, hop_length=160, win_length=320, window="hamming", center=True))
    assert ours.shape == theirs.shape
    assert np.abs(ours - theirs).max(axis=0).max() < 1e-5
    whole = np.abs(np.fft.rfft(np.pad(y.astype(np.float64), 160, mode="reflect")[np.arange(320)[None, :]
                                     + 160 * np.arange(ours.shape[1])[:, None]] * np.hamming(321)[:-1], axis=1)).T
    assert np.abs(stft_magnitude(y, 320, 160, "hamming", "reflect") - whole).max() < 1e-9  # librosa < 0.10
