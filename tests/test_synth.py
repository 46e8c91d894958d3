"""The synthetic espeak-ng corpus: layout, audio, determinism, held-out voices and sentences."""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from ds2exp.data import synth
from ds2exp.data.labels import encode
from ds2exp.data.synth import (
    SPLIT_DIRS,
    SYNTH_PRESETS,
    EspeakVoice,
    SynthSpec,
    build_corpus,
    list_english_voices,
    load_wordlist,
    plan_corpus,
)

SPEC = SynthSpec("synth_unit", n_train=12, n_val=4, n_test=4, min_words=3, max_words=6, seed=7)
LINE = re.compile(r"^(\d+)-(\d+)-(\d{4}) ([A-Z']+(?: [A-Z']+)*)$")


@pytest.fixture(scope="module")
def builds(tmp_path_factory):
    """Same spec built twice (2 worker processes, then in-process), plus another seed."""
    a = tmp_path_factory.mktemp("synth_a")
    b = tmp_path_factory.mktemp("synth_b")
    c = tmp_path_factory.mktemp("synth_c")
    out_a = build_corpus(SPEC, a, workers=2, progress=False)
    out_b = build_corpus(SPEC, b, workers=1, progress=False)
    other = SynthSpec(**{**SPEC.__dict__, "seed": 8})
    out_c = build_corpus(other, c, workers=1, progress=False)
    return out_a, out_b, out_c


def _transcripts(libri: Path) -> dict[str, dict[str, str]]:
    """subset -> {utt_id: transcript}"""
    out: dict[str, dict[str, str]] = {}
    for trans in sorted(libri.glob("*/*/*/*.trans.txt")):
        subset = trans.relative_to(libri).parts[0]
        for line in trans.read_text(encoding="utf-8").splitlines():
            uid, text = line.split(" ", 1)
            out.setdefault(subset, {})[uid] = text
    return out


def test_layout_is_librispeech(builds):
    libri = builds[0]
    root = libri.parent
    assert libri == root / "LibriSpeech"
    assert sorted(p.name for p in root.iterdir() if not p.name.startswith(".")) == ["BUILD_INFO.json", "LibriSpeech"]
    assert not list(root.glob(".LibriSpeech.*")), "temporary build directories left behind"
    assert sorted(p.name for p in libri.iterdir()) == sorted(SPLIT_DIRS.values())
    counts = {}
    for subset in libri.iterdir():
        n = 0
        for spk_dir in subset.iterdir():
            assert spk_dir.is_dir() and spk_dir.name.isdigit()
            for ch_dir in spk_dir.iterdir():
                assert ch_dir.is_dir() and ch_dir.name.isdigit()
                spk, ch = spk_dir.name, ch_dir.name
                files = sorted(p.name for p in ch_dir.iterdir())
                trans = f"{spk}-{ch}.trans.txt"
                assert trans in files
                text = (ch_dir / trans).read_text(encoding="utf-8")
                assert text.endswith("\n") and "\r" not in text
                ids = []
                for line in text.splitlines():
                    m = LINE.match(line)
                    assert m, line
                    assert (m.group(1), m.group(2)) == (spk, ch)
                    encode(m.group(4))  # inside the 29-symbol label set
                    ids.append(f"{spk}-{ch}-{m.group(3)}")
                assert ids == [f"{spk}-{ch}-{i:04d}" for i in range(len(ids))]
                assert 1 <= len(ids) <= synth.CHAPTER_SIZE
                assert sorted(f for f in files if f != trans) == sorted(f"{i}.flac" for i in ids)
                n += len(ids)
        counts[subset.name] = n
    assert counts == {"train-synth": 12, "dev-synth": 4, "test-synth": 4}
    info = json.loads((root / "BUILD_INFO.json").read_text())
    assert info["counts"] == counts
    assert info["name"] == SPEC.name and info["seed"] == SPEC.seed
    assert info["vocabulary_size"] >= 1000 and info["espeak_version"]
    # utterance ids are unique across the whole corpus (chapters differ per subset)
    ids = [uid for subset in _transcripts(libri).values() for uid in subset]
    assert len(ids) == len(set(ids)) == 20


def test_audio_is_16k_mono_flac_and_speech_like(builds):
    libri = builds[0]
    for subset, utts in _transcripts(libri).items():
        for uid, text in utts.items():
            spk, ch, _ = uid.split("-")
            path = libri / subset / spk / ch / f"{uid}.flac"
            info = sf.info(str(path))
            assert (info.format, info.subtype, info.samplerate, info.channels) == ("FLAC", "PCM_16", 16000, 1)
            x, sr = sf.read(str(path), dtype="int16")
            n_words = len(text.split())
            seconds = len(x) / sr
            assert 0.15 * n_words < seconds < 0.8 * n_words + 1.0, (uid, n_words, seconds)
            assert np.abs(x.astype(np.int32)).max() > 2000
            assert np.sqrt(np.mean(x.astype(np.float64) ** 2)) > 200


def test_same_seed_identical_different_seed_differs(builds):
    a, b, c = builds
    ta, tb, tc = _transcripts(a), _transcripts(b), _transcripts(c)
    for trans in a.glob("*/*/*/*.trans.txt"):
        assert trans.read_bytes() == (b / trans.relative_to(a)).read_bytes()
    assert ta == tb
    for flac in a.glob("*/*/*/*.flac"):
        xa, _ = sf.read(str(flac), dtype="int16")
        xb, _ = sf.read(str(b / flac.relative_to(a)), dtype="int16")
        assert np.array_equal(xa, xb), flac.name
    assert set(ta["train-synth"].values()) != set(tc["train-synth"].values())


def test_test_voices_and_sentences_are_held_out(builds):
    libri = builds[0]
    speakers = {s: {p.name for p in (libri / s).iterdir()} for s in SPLIT_DIRS.values()}
    assert not speakers["test-synth"] & speakers["train-synth"]
    assert speakers["dev-synth"] <= speakers["train-synth"]
    info = json.loads((libri.parent / "BUILD_INFO.json").read_text())
    assert not set(info["voices"]["test-synth"]) & set(info["voices"]["train-synth"])
    texts = {s: set(t.values()) for s, t in _transcripts(libri).items()}
    assert not texts["test-synth"] & texts["train-synth"]
    assert not texts["dev-synth"] & texts["train-synth"]


def test_preset_plan_holds_out_voices_and_sentences():
    """The full synth_tiny plan (no audio): disjoint test voices, new sentences, ranges."""
    spec = SYNTH_PRESETS["synth_tiny"]
    plan = plan_corpus(spec, load_wordlist(), list_english_voices())
    assert [len(plan[s]) for s in ("train", "val", "test")] == [spec.n_train, spec.n_val, spec.n_test]
    voices = {s: {u.voice for u in utts} for s, utts in plan.items()}
    assert not voices["test"] & voices["train"] and voices["val"] <= voices["train"]
    assert len(voices["test"]) >= 10
    texts = {s: [u.text for u in utts] for s, utts in plan.items()}
    assert not set(texts["test"]) & set(texts["train"]) and not set(texts["val"]) & set(texts["train"])
    everything = [u for utts in plan.values() for u in utts]
    assert all(spec.min_words <= len(u.text.split()) <= spec.max_words for u in everything)
    assert {u.rate for u in everything} <= set(range(130, 211)) and len({u.rate for u in everything}) > 40
    assert {u.pitch for u in everything} <= set(range(30, 71)) and len({u.pitch for u in everything}) > 20
    assert plan == plan_corpus(spec, load_wordlist(), list_english_voices())


def test_vocabulary():
    words = load_wordlist()
    assert len(words) >= 1000
    raw = [w for w in Path(synth.__file__).with_name("wordlist.txt").read_text().splitlines() if w]
    assert len(raw) == len(set(raw)) == len(words)
    assert all(re.fullmatch(r"[A-Z']+", w) for w in raw)


def test_corpus_api_is_one_import_path():
    """The planner and the espeak wrapper live in their own modules; callers import from synth."""
    from ds2exp.data import espeak, synth_plan

    for name in synth.__all__:
        assert hasattr(synth, name), name
    assert synth.EspeakVoice is espeak.EspeakVoice and synth.plan_corpus is synth_plan.plan_corpus
    public = {n for mod in (espeak, synth_plan) for n in vars(mod) if not n.startswith("_") and n.isidentifier()}
    modules_and_helpers = {"annotations", "ctypes", "dataclass", "np", "os", "shutil", "tempfile", "weakref",
                           "Path", "Sequence", "default_paths"}
    assert public - modules_and_helpers <= set(synth.__all__)


def test_rebuild_skipped_when_marker_matches_and_redone_when_not(tmp_path):
    spec = SynthSpec("synth_mini", n_train=3, n_val=1, n_test=1, seed=1)
    libri = build_corpus(spec, tmp_path, workers=1, progress=False)
    marker = tmp_path / "BUILD_INFO.json"
    flac = next(libri.glob("train-synth/*/*/*.flac"))
    before = (marker.read_bytes(), flac.stat().st_mtime_ns, flac.stat().st_ino)
    assert build_corpus(spec, tmp_path, workers=1, progress=False) == libri
    assert (marker.read_bytes(), flac.stat().st_mtime_ns, flac.stat().st_ino) == before
    # a different request on the same root replaces the corpus
    other = SynthSpec("synth_mini", n_train=3, n_val=1, n_test=1, seed=2)
    build_corpus(other, tmp_path, workers=1, progress=False)
    assert json.loads(marker.read_text())["seed"] == 2
    assert len(list(libri.glob("*/*/*/*.flac"))) == 5
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".LibriSpeech")]


def test_refuses_to_replace_foreign_librispeech(tmp_path):
    (tmp_path / "LibriSpeech" / "train-clean-100").mkdir(parents=True)
    with pytest.raises(RuntimeError, match="refusing"):
        build_corpus(SynthSpec("synth_mini", 2, 1, 1), tmp_path, workers=1, progress=False)
    assert (tmp_path / "LibriSpeech" / "train-clean-100").is_dir()


def test_espeak_voice_wrapper():
    voices = list_english_voices()
    assert len(voices) >= 20 and "en-us" in voices and all(v.startswith("en") for v in voices)
    with EspeakVoice() as engine:
        a = engine.synthesize("seven green apples.", "en-us+f3", rate=160, pitch=60)
        assert a.dtype == np.float32 and a.ndim == 1
        assert 0.5 < len(a) / 16000 < 3.0 and np.abs(a).max() > 0.05
        engine.synthesize("something else entirely.", "en-gb-x-rp+klatt", rate=200, pitch=35)
        assert np.array_equal(a, engine.synthesize("seven green apples.", "en-us+f3", rate=160, pitch=60))
        with pytest.raises(RuntimeError, match="variant"):
            engine.synthesize("hello.", "en-us+nosuchvariant")
        with pytest.raises(RuntimeError, match="no voice"):
            engine.synthesize("hello.", "xx-nosuchlanguage")


def test_load_failure_names_the_library(tmp_path):
    missing = tmp_path / "libespeak-ng.so"
    with pytest.raises(RuntimeError, match=re.escape(str(missing))):
        EspeakVoice(library_path=missing, data_path=tmp_path)
    bogus = tmp_path / "bogus.so"
    bogus.write_bytes(b"not a shared object")
    with pytest.raises(RuntimeError, match=re.escape(str(bogus))):
        EspeakVoice(library_path=bogus, data_path=tmp_path)


def test_manifests_follow_a_rebuilt_corpus(tmp_path, monkeypatch):
    """Changing a preset rebuilds the corpus; the manifests made from the old audio must not be reused."""
    from ds2exp.cli import check_overrides
    from ds2exp.data.dataset import resolve_manifests

    cfg = check_overrides(["dataset=synth_tiny", f"dataset.root={tmp_path}", "dataset.num_workers=1"])
    monkeypatch.setitem(SYNTH_PRESETS, "synth_tiny", SynthSpec("synth_tiny", n_train=3, n_val=1, n_test=1, seed=3))
    train = resolve_manifests(cfg, progress=False)["train"][0]
    assert len(train.read_text().splitlines()) == 3
    monkeypatch.setitem(SYNTH_PRESETS, "synth_tiny", SynthSpec("synth_tiny", n_train=5, n_val=1, n_test=1, seed=3))
    again = resolve_manifests(cfg, progress=False)["train"][0]
    assert again == train and len(train.read_text().splitlines()) == 5
    ids = [json.loads(line)["id"] for line in train.read_text().splitlines()]
    assert all((tmp_path / "LibriSpeech" / "train-synth").rglob(f"{i}.flac") for i in ids)
