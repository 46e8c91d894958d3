"""A fuzzed corpus (truncated, empty, 8 kHz, non-UTF-8, missing, duplicate entries, Hypothesis-generated
real files): preparation and loading complete and report every bad entry with its reason."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

CLIP_TEXTS = ["HELLO WORLD", "OPEN THE DOOR", "GOOD MORNING"]
KINDS = ["good", "truncated", "zero_length", "wrong_rate", "non_utf8", "missing", "duplicate"]
# what each kind of entry must be reported as (None: kept without comment)
PREPARE_REASON = {"truncated": r"truncated|corrupt|unreadable", "zero_length": r"unreadable|empty",
                  "non_utf8": r"not UTF-8", "missing": r"missing file", "duplicate": r"duplicate id",
                  "wrong_rate": r"sample rate 8000 Hz"}
entries_strategy = st.lists(st.tuples(st.sampled_from(KINDS), st.integers(0, len(CLIP_TEXTS) - 1),
                                      st.floats(0.15, 0.85)), min_size=1, max_size=7)


@pytest.fixture(scope="module")
def clips(say):
    return [say(t.lower()) for t in CLIP_TEXTS]


def _write_entries(folder: Path, entries, clips):
    """Real files for each fuzzed entry: (uid, kind) rows, transcript lines (bytes), 16 kHz FLACs."""
    import soundfile as sf
    import soxr

    folder.mkdir(parents=True, exist_ok=True)
    rows, lines = [], []
    entries = [("good", 0, 0.5)] + list(entries)  # at least one usable utterance
    duplicates = []
    for i, (kind, clip, frac) in enumerate(entries):
        uid = f"19-198-{i:04d}"
        path = folder / f"{uid}.flac"
        text = CLIP_TEXTS[clip].encode()
        if kind == "duplicate":
            duplicates.append(("duplicate", rows[0][0]))  # the id of the first (good) entry again
            continue
        if kind == "wrong_rate":
            sf.write(str(path), soxr.resample(clips[clip], 16000, 8000), 8000, format="FLAC", subtype="PCM_16")
        elif kind != "missing":
            sf.write(str(path), clips[clip], 16000, format="FLAC", subtype="PCM_16")
        if kind == "truncated":
            data = path.read_bytes()
            path.write_bytes(data[: max(64, int(len(data) * frac))])
        elif kind == "zero_length":
            path.write_bytes(b"")
        elif kind == "non_utf8":
            text = text[:3] + b"\xff\xfe" + text[3:]
        rows.append((uid, kind))
        lines.append(uid.encode() + b" " + text)
    for kind, uid in duplicates:
        rows.append((uid, kind))
        lines.append(uid.encode() + b" " + CLIP_TEXTS[1].encode())
    (folder / "19-198.trans.txt").write_bytes(b"\n".join(lines) + b"\n")
    return rows


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(entries=entries_strategy)
def test_fuzzed_librispeech_subset_prepares_and_reports_every_bad_entry(clips, entries):
    """Preparation never stops on bad input; its report lists each bad entry with its reason, and the
    manifest it writes loads as a training split."""
    import re
    import tempfile

    from ds2exp.cli import check_overrides
    from ds2exp.data.dataset import load_split
    from ds2exp.data.features import FeatureSettings
    from ds2exp.data.librispeech import prepare_subset

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        folder = tmp / "LibriSpeech" / "dev-fuzz"
        rows = _write_entries(folder / "19" / "198", entries, clips)
        manifest, report = prepare_subset("dev-fuzz", folder, tmp / "manifests", workers=1, progress=False)
        kept = {json.loads(x)["id"] for x in manifest.read_text().splitlines()}
        reported = [(e["id"], e["reason"], e["action"]) for e in report.entries]
        for uid, kind in rows:
            if kind == "good":
                assert uid in kept
                continue
            hits = [(r, a) for i, r, a in reported if i == uid and re.search(PREPARE_REASON[kind], r)]
            assert hits, (uid, kind, reported)
            assert (uid in kept) == (kind in ("wrong_rate", "duplicate"))  # repaired / first copy kept
            assert hits[0][1] == ("repaired" if kind == "wrong_rate" else "skipped")
        assert len([e for e in report.entries if e["action"] == "skipped"]) == sum(
            1 for _, k in rows if k not in ("good", "wrong_rate"))
        assert report.kept == len(kept)
        cfg = check_overrides(["dataset=manifest", f"dataset.train_manifest={manifest}", f"paths.root_dir={tmp}"])
        split = load_split("train", [manifest], cfg, FeatureSettings())
        assert {e.utt.id for e in split.examples} == kept and not split.dropped


@pytest.mark.filterwarnings("ignore:.*resampled from")
@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(entries=entries_strategy)
def test_fuzzed_manifest_loads_and_every_bad_entry_is_dropped_or_skipped_with_its_reason(clips, entries):
    """A JSON-lines manifest whose files went bad after it was written: `load_split` drops what it can
    see (missing file, non-UTF-8 line, duplicate id), the batch loader skips what only decoding shows
    (truncated, zero-length), each with its reason; 8 kHz audio is resampled and trains."""
    import tempfile

    import soundfile as sf

    from ds2exp.cli import check_overrides
    from ds2exp.data.dataset import BatchLoader, BucketBatchSampler, load_split
    from ds2exp.data.features import FeatureCache, FeatureSettings

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        rows = _write_entries(tmp / "audio", entries, clips)
        lines = (tmp / "audio" / "19-198.trans.txt").read_bytes().splitlines()
        manifest = tmp / "m.jsonl"
        out = []
        for (uid, kind), line in zip(rows, lines):
            text = line.split(b" ", 1)[1]
            duration = len(clips[0]) / 16000 if kind == "missing" else None
            path = tmp / "audio" / f"{uid}.flac"
            if duration is None:
                duration = sf.info(str(path)).duration if kind in ("good", "wrong_rate", "duplicate") else 1.0
            obj = {"id": uid, "audio_path": str(path), "transcript": "@@", "duration": duration,
                   "sample_rate": 8000 if kind == "wrong_rate" else 16000}
            out.append(json.dumps(obj).encode().replace(b"@@", text))  # raw bytes: non-UTF-8 stays so
        manifest.write_bytes(b"\n".join(out) + b"\n")
        cfg = check_overrides(["dataset=manifest", f"dataset.train_manifest={manifest}", f"paths.root_dir={tmp}"])
        settings_ = FeatureSettings()
        split = load_split("train", [manifest], cfg, settings_, report_dir=tmp)
        loader = BatchLoader(split, BucketBatchSampler(split.examples, 2, 1, seed=0),
                             FeatureCache(tmp / "cache", settings_, enabled=False), num_workers=1)
        trained = {uid for b in loader.iterate(0) for uid in b.ids}
        dropped = {(uid, reason) for reason, ids in split.dropped.items() for uid in ids}
        failures = loader.failures
        for uid, kind in rows:
            if kind in ("good", "wrong_rate"):
                assert uid in trained, (uid, kind, dropped, failures)
            elif kind == "missing":
                assert (uid, "missing file") in dropped
            elif kind == "non_utf8":
                assert (uid, "transcript is not UTF-8") in dropped
            elif kind == "duplicate":
                assert (uid, "duplicate id") in dropped
            else:  # truncated / zero-length: only decoding finds out
                assert uid not in trained
                assert uid in failures and any(w in failures[uid] for w in ("truncated", "corrupt", "unreadable",
                                                                           "empty")), (uid, failures)
        if split.dropped:
            assert json.loads((tmp / "dropped_train.json").read_text()) == split.dropped
