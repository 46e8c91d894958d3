"""LibriSpeech preparation on a small tree in LibriSpeech's exact layout, with broken files."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from ds2exp.data.manifest import ManifestError, read_manifest
from tests.helpers import ROOT, write_flac

SENTENCES = ["HELLO WORLD", "THE CAT SAT", "GOOD MORNING", "IT'S RAINING", "OPEN THE DOOR", "TWO BIRDS"]


@pytest.fixture(scope="module")
def libri_tree(tmp_path_factory, say):
    """LibriSpeech/<subset>/<speaker>/<chapter>/<spk>-<ch>-<utt>.flac + <spk>-<ch>.trans.txt."""
    root = tmp_path_factory.mktemp("libri") / "LibriSpeech"
    expected = {}
    for subset, speaker in (("dev-clean", 84), ("test-clean", 1089)):
        chapter = 121123
        d = root / subset / str(speaker) / str(chapter)
        lines = []
        good = []
        for i, text in enumerate(SENTENCES):
            uid = f"{speaker}-{chapter}-{i:04d}"
            write_flac(d / f"{uid}.flac", say(text.lower()))
            lines.append(f"{uid} {text}")
            good.append(uid)
        broken = {}
        # corrupt: random bytes with a .flac name
        uid = f"{speaker}-{chapter}-0100"
        (d / f"{uid}.flac").write_bytes(b"fLaC" + bytes(np.random.default_rng(0).integers(0, 255, 500, np.uint8)))
        lines.append(f"{uid} CORRUPT FILE")
        broken[uid] = "unreadable"
        # truncated: a real FLAC cut in half
        uid = f"{speaker}-{chapter}-0101"
        full = write_flac(d / f"{uid}.flac", say("this file is cut short on purpose")).read_bytes()
        (d / f"{uid}.flac").write_bytes(full[: len(full) // 2])
        lines.append(f"{uid} THIS FILE IS CUT SHORT ON PURPOSE")
        broken[uid] = "truncated"
        # listed but missing
        uid = f"{speaker}-{chapter}-0102"
        lines.append(f"{uid} NOT THERE")
        broken[uid] = "missing file"
        # empty transcript
        uid = f"{speaker}-{chapter}-0103"
        write_flac(d / f"{uid}.flac", say("nothing"))
        lines.append(f"{uid}")
        broken[uid] = "empty transcript"
        # characters outside the label set
        uid = f"{speaker}-{chapter}-0104"
        write_flac(d / f"{uid}.flac", say("one two"))
        lines.append(f"{uid} 1 2")
        broken[uid] = "characters outside the label set"
        # 8 kHz: kept, resampled
        uid = f"{speaker}-{chapter}-0105"
        import soxr

        write_flac(d / f"{uid}.flac", soxr.resample(say("low rate"), 16000, 8000), sr=8000)
        lines.append(f"{uid} LOW RATE")
        good.append(uid)
        (d / f"{speaker}-{chapter}.trans.txt").write_text("\n".join(lines) + "\n")
        expected[subset] = (good, broken)
    return root, expected


def test_prepare_cli_writes_manifests_exports_and_report(libri_tree, tmp_path):
    root, expected = libri_tree
    out = tmp_path / "manifests"
    r = subprocess.run([sys.executable, "-m", "ds2exp.data.librispeech", str(root / "dev-clean"),
                        str(root / "test-clean"), "--out", str(out), "--csv", "--json", "--workers", "2"],
                       capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "dev-clean: 7 utterances" in r.stdout
    for subset, (good, broken) in expected.items():
        rows = [json.loads(x) for x in (out / f"{subset}.jsonl").read_text().splitlines()]
        assert sorted(x["id"] for x in rows) == sorted(good)
        for x in rows:
            assert set(x) == {"id", "audio_path", "transcript", "duration", "sample_rate"}
            assert Path(x["audio_path"]).is_file() and x["duration"] > 0.3
        assert {x["id"]: x["sample_rate"] for x in rows}[good[-1]] == 8000
        report = json.loads((out / f"{subset}.report.json").read_text())
        reasons = {e["id"]: e["reason"] for e in report["entries"] if e["action"] == "skipped"}
        assert set(reasons) == set(broken)
        for uid, why in broken.items():
            assert why in reasons[uid], (uid, reasons[uid])
        assert sum(report["skipped"].values()) == len(broken)
        assert report["repaired"] and report["kept"] == len(good)
        # exports read back as datasets, with the same transcripts
        for export in (f"{subset}.csv", f"{subset}.json"):
            back = read_manifest(out / export)
            assert sorted(u.id for u in back) == sorted(good)
            assert {u.id: u.transcript for u in back} == {x["id"]: x["transcript"] for x in rows}
        csv_line = (out / f"{subset}.csv").read_text().splitlines()[0]
        wav, txt = csv_line.split(",")
        assert wav.endswith(".flac") and txt.endswith(".txt") and "," not in wav  # header-less wav_path,txt_path


def test_prepare_from_tar_gz(libri_tree, tmp_path):
    import tarfile

    root, expected = libri_tree
    archive = tmp_path / "dev-clean.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(root / "dev-clean", arcname="LibriSpeech/dev-clean")
    from ds2exp.data.librispeech import prepare

    results = prepare([archive], tmp_path / "out", workers=1, progress=False, max_duration=1.0)
    manifest, report = results["dev-clean"]
    assert manifest.exists()
    assert any("longer than 1.0 s" in e["reason"] for e in report.entries)


def test_manifest_dataset_reads_zoo_csv_through_config(libri_tree, tmp_path):
    root, _ = libri_tree
    from ds2exp.data.librispeech import prepare

    prepare([root / "dev-clean"], tmp_path, workers=1, progress=False, write_csv=True)
    from ds2exp.cli import check_overrides
    from ds2exp.data.dataset import load_split, resolve_manifests
    from ds2exp.data.features import FeatureSettings

    cfg = check_overrides(["dataset=manifest", f"dataset.train_manifest={tmp_path / 'dev-clean.csv'}",
                           f"paths.root_dir={tmp_path}"])
    manifests = resolve_manifests(cfg)
    split = load_split("train", manifests["train"], cfg, FeatureSettings())
    assert len(split.examples) == 7


def test_manifest_with_all_files_missing_names_some(tmp_path):
    m = tmp_path / "m.csv"
    m.write_text("".join(f"/nowhere/{i}.flac,/nowhere/{i}.txt\n" for i in range(5)))
    with pytest.raises(ManifestError, match=r"none of its 5 entries is usable \(e.g. /nowhere/0.flac"):
        read_manifest(m)


def test_empty_manifest_is_a_clear_error(tmp_path):
    m = tmp_path / "empty.jsonl"
    m.write_text("")
    with pytest.raises(ManifestError, match="empty"):
        read_manifest(m)


def test_unsafe_ids_folders_and_durations_are_reported_and_nothing_leaves_out(tmp_path, say):
    """A `../` id, a folder named like a transcript, a 1-sample and a 61 s file: each one report entry;
    no audio read from outside the corpus, no file written outside --out."""
    corpus = tmp_path / "corpus"
    subset = corpus / "LibriSpeech" / "dev-clean"
    chapter = subset / "84" / "121123"
    write_flac(chapter / "84-121123-0000.flac", say("hello world"))
    write_flac(chapter / "84-121123-0001.flac", np.zeros(1, np.float32))  # one sample
    write_flac(chapter / "84-121123-0002.flac", np.zeros(16000 * 61, np.float32))  # 61 s
    # what the `../../../../outside` id points at, from the chapter folder: tmp_path/outside.flac
    write_flac(tmp_path / "outside.flac", say("secret words"))
    (chapter / "84-121123.trans.txt").write_text(
        "84-121123-0000 HELLO WORLD\n84-121123-0001 ONE SAMPLE\n84-121123-0002 TOO LONG\n"
        "../../../../outside SECRET WORDS\n84/../../x EVEN MORE\n")
    (subset / "84" / "999" / "84-999.trans.txt").mkdir(parents=True)  # a folder, not a file
    out = tmp_path / "work" / "out"
    before = sorted(p for p in tmp_path.rglob("*") if out not in p.parents)
    r = subprocess.run([sys.executable, "-m", "ds2exp.data.librispeech", str(subset), "--out", str(out), "--csv",
                        "--json", "--workers", "1", "--no-progress"], capture_output=True, text=True, cwd=ROOT,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    assert "dev-clean: 1 utterances" in r.stdout, r.stdout
    after = sorted(p for p in tmp_path.rglob("*") if out not in p.parents and p != out)
    assert after == before + [tmp_path / "work"], set(after) ^ set(before)  # only --out (and its parent) appear
    report = json.loads((out / "dev-clean.report.json").read_text())
    reasons = {e["id"]: e["reason"] for e in report["entries"]}
    assert "not a plain <speaker>-<chapter>-<n> name" in reasons["../../../../outside"]
    assert "not a plain" in reasons["84/../../x"]
    assert "a folder where a transcript file belongs" in reasons["84-999.trans.txt"]
    assert "shorter than 0.1 s" in reasons["84-121123-0001"]
    assert "longer than 60.0 s (it is 61 s)" in reasons["84-121123-0002"]
    rows = [json.loads(x) for x in (out / "dev-clean.jsonl").read_text().splitlines()]
    assert [x["id"] for x in rows] == ["84-121123-0000"]
    assert sorted(p.name for p in (out / "txt" / "dev-clean").iterdir()) == ["84-121123-0000.txt"]
    # no limits: --max-duration 0 keeps the long file
    r = subprocess.run([sys.executable, "-m", "ds2exp.data.librispeech", str(subset),
                        "--out", str(tmp_path / "work" / "all"), "--max-duration", "0", "--min-duration", "0",
                        "--workers", "1", "--no-progress"],
                       capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 0 and "dev-clean: 3 utterances" in r.stdout, r.stdout + r.stderr
