"""The corpus audit (`python -m ds2exp.audit`, ds2exp/data/audit.py) on real audio files: a LibriSpeech-layout
tree with planted hazards, a clean tree, manifest corpora (NaN samples, a duplicate id, a training crop),
and the cache of its measurements."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from omegaconf import open_dict

from ds2exp.audit import main
from ds2exp.cli import check_overrides
from ds2exp.data.audit import FATAL, audit_manifests, audit_split
from ds2exp.data.manifest import Utterance, write_jsonl
from tests.helpers import ROOT, write_flac
from tests.helpers.libri_tree import make_libri_tree

HAZARD_CHAPTER = Path("train-clean-100") / "9000" / "1"
INFEASIBLE = "THIS TRANSCRIPT GOES ON FOR FAR LONGER THAN THE SHORT CLIP THAT CARRIES IT COULD"
# id -> (transcript, the one hazard the audit must report)
PLANTED = {
    "9000-1-0000": ("THE ROOM WAS QUIET", "silent_or_constant"),
    "9000-1-0001": ("A STEADY HUM", "silent_or_constant"),
    "9000-1-0002": ("THE SIGNAL WAS FAR TOO LOUD", "clipping"),
    "9000-1-0003": ("SPOKEN AT A LOWER RATE", "sample_rate_mismatch"),
    "9000-1-0004": ("CAFÉ NUMBER 42", "invalid_characters"),
    "9000-1-0005": (INFEASIBLE, "infeasible_ctc"),
    "9000-1-0006": ("A BROKEN FILE", "unreadable_audio"),
}


def _plant(root: Path, say) -> None:
    folder = root / "LibriSpeech" / HAZARD_CHAPTER
    speech = say("the signal was far too loud")
    write_flac(folder / "9000-1-0000.flac", np.zeros(24000, np.float32))
    write_flac(folder / "9000-1-0001.flac", np.full(24000, 0.25, np.float32))  # DC: every sample the same
    write_flac(folder / "9000-1-0002.flac", np.clip(speech * 20.0, -1.0, 1.0))
    import soxr

    write_flac(folder / "9000-1-0003.flac", soxr.resample(say("spoken at a lower rate"), 16000, 8000), sr=8000)
    write_flac(folder / "9000-1-0004.flac", say("cafe number forty two"))
    short = say("this transcript goes on for far longer")[:12800]
    assert short.shape[0] == 12800  # 0.8 s of speech for an 80-character transcript
    write_flac(folder / "9000-1-0005.flac", short)
    (folder / "9000-1-0006.flac").write_bytes(b"fLaC" + bytes(np.random.default_rng(0).integers(0, 255, 400, np.uint8)))
    (folder / "9000-1.trans.txt").write_text("".join(f"{uid} {text}\n" for uid, (text, _) in PLANTED.items()),
                                             encoding="utf-8")


@pytest.fixture(scope="module")
def clean_tree(tmp_path_factory, say):
    return make_libri_tree(tmp_path_factory.mktemp("clean"), say)


@pytest.fixture(scope="module")
def hazard_tree(tmp_path_factory, clean_tree, say):
    root = tmp_path_factory.mktemp("hazards")
    shutil.copytree(clean_tree / "LibriSpeech", root / "LibriSpeech")
    _plant(root, say)
    return root


def _overrides(tree: Path, data_dir: Path):
    # min_duration 0.1: the LibriSpeech dataset's 1 s would make the planted 0.8 s clip an outlier too
    return ["dataset=librispeech", f"dataset.root={tree}", "dataset.min_duration=0.1", f"paths.data_dir={data_dir}"]


def test_hazard_tree_lists_every_planted_hazard_and_nothing_else(hazard_tree, tmp_path):
    out = tmp_path / "report.json"
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "ds2exp.audit", *_overrides(hazard_tree, tmp_path / "data"),
                           "--json", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    print(proc.stdout, f"({time.monotonic() - t0:.1f} s with start-up)")
    assert proc.returncode == 1, proc.stderr
    lines = proc.stdout.strip().splitlines()
    expected_kinds = {kind for _, kind in PLANTED.values()}
    assert len(lines) == len(expected_kinds) + 1  # one line per kind, then the summary
    by_kind = {line.split(":", 1)[0]: line for line in lines[:-1]}
    assert set(by_kind) == expected_kinds
    for uid, (_, kind) in PLANTED.items():
        assert uid in by_kind[kind]
    assert by_kind["silent_or_constant"].startswith("silent_or_constant: 2 utterances, fatal")
    assert "needs 81 CTC frames, the model emits 41" in by_kind["infeasible_ctc"]  # 80 letters and one RR
    summary = lines[-1]
    assert re.match(r"audited 13 utterances \(0\.\d\d h\) in [\d.]+ s: 7 hazards, fatal: yes; report: ", summary)
    assert summary.endswith(str(out))
    report = json.loads(out.read_text())
    assert {e["id"]: e["hazards"] for e in report["utterances_with_hazards"]} == {
        uid: [kind] for uid, (_, kind) in PLANTED.items()}
    assert report["fatal"] is True and report["counts"]["silent_or_constant"] == 2
    assert all(Path(e["path"]).name == f"{e['id']}.flac" for e in report["utterances_with_hazards"])


def test_clean_tree_exits_0_with_no_hazard(clean_tree, tmp_path, capsys):
    assert main(_overrides(clean_tree, tmp_path / "data") + ["--split", "all"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0] == "no hazard found"
    assert "audited 18 utterances" in lines[1] and "fatal: no" in lines[1]
    report = Path(lines[1].rsplit("report: ", 1)[1])  # default: <paths.cache_dir>/audit/report-all-<digest>.json
    assert report.parent == tmp_path / "data" / "feature_cache" / "audit" and report.name.startswith("report-all-")
    assert json.loads(report.read_text())["counts"] == {}


def _manifest_corpus(folder: Path, say) -> Path:
    """Three clean FLACs, a float32 WAV holding NaN samples, and one id listed twice."""
    utts = []
    for i, text in enumerate(("hello world", "the cat sat", "good morning")):
        path = write_flac(folder / f"m-{i}.flac", say(text))
        utts.append(Utterance(f"m-{i}", str(path), text.upper(), sf.info(str(path)).duration, 16000))
    nan = say("open the door")
    nan[1000:1010] = np.nan
    sf.write(str(folder / "m-nan.wav"), nan, 16000, subtype="FLOAT")
    utts.append(Utterance("m-nan", str(folder / "m-nan.wav"), "OPEN THE DOOR", len(nan) / 16000, 16000))
    utts.append(Utterance("m-1", utts[1].audio_path, utts[1].transcript, utts[1].duration, 16000))
    manifest = folder / "train.jsonl"
    write_jsonl(utts, manifest)
    return manifest


def test_manifest_nan_samples_and_duplicate_id(tmp_path, say, capsys):
    manifest = _manifest_corpus(tmp_path, say)
    assert main(["--manifest", str(manifest), f"paths.data_dir={tmp_path / 'data'}"]) == 1
    out = capsys.readouterr().out
    assert "nonfinite_samples: 1 utterance, fatal (e.g. m-nan: audio contains NaN or Inf samples)" in out
    assert "duplicate_id: 1 utterance, warning (e.g. m-1: 2 entries)" in out
    cfg = check_overrides(["dataset=manifest", f"dataset.train_manifest={manifest}", f"paths.data_dir={tmp_path}"])
    report = audit_manifests([manifest], cfg)
    assert report.hazards_of("m-nan") == ["nonfinite_samples"] and report.hazards_of("m-1") == ["duplicate_id"]
    assert report.hazards_of("m-0") == [] and report.fatal
    assert report.to_json()["counts"] == {"nonfinite_samples": 1, "duplicate_id": 1}


def test_cache_is_read_and_a_changed_manifest_invalidates_it(tmp_path, say):
    manifest = _manifest_corpus(tmp_path, say)
    cfg = check_overrides(["dataset=manifest", f"dataset.train_manifest={manifest}", f"paths.data_dir={tmp_path}"])
    first = audit_split(cfg)
    cache = list((tmp_path / "feature_cache" / "audit").glob("train.jsonl-*.json"))
    assert not first.cached and len(cache) == 1
    second = audit_split(cfg)
    assert second.cached and second.to_json()["counts"] == first.to_json()["counts"]
    lines = manifest.read_text().splitlines()
    manifest.write_text("\n".join(line for line in lines if '"m-nan"' not in line) + "\n")
    os.utime(manifest, ns=(time.time_ns(), time.time_ns() + 10**9))  # a new mtime even on a coarse clock
    third = audit_split(cfg)
    assert not third.cached and third.hazards_of("m-nan") == [] and third.hazards_of("m-1") == ["duplicate_id"]
    assert len(list((tmp_path / "feature_cache" / "audit").glob("train.jsonl-*.json"))) == 1  # the stale one went


def test_crop_makes_a_long_transcript_infeasible(tmp_path, say):
    text = "the quick brown fox jumps over the lazy dog near the river bank"
    long = np.resize(say(text), 96000)  # 6 s (the speech said again from the start): 601 frames uncropped
    utts = []
    for uid, audio, words in (("long", long, text), ("a", say("the cat sat on the mat by the door"), "the cat sat"),
                              ("b", say("good morning to you all my friend"), "good morning")):
        path = write_flac(tmp_path / f"{uid}.flac", audio)
        utts.append(Utterance(uid, str(path), words.upper(), len(audio) / 16000, 16000))
    manifest = tmp_path / "crop.jsonl"
    write_jsonl(utts, manifest)
    cfg = check_overrides(["dataset=manifest", f"dataset.train_manifest={manifest}", f"paths.data_dir={tmp_path}"])
    assert audit_manifests([manifest], cfg).hazards_of("long") == []
    with open_dict(cfg):  # 100 frames: 50 output frames, fewer than the 63 labels need
        cfg.dataset.crop_frames = 100
    report = audit_manifests([manifest], cfg)
    assert report.hazards_of("long") == ["infeasible_after_crop"] and report.fatal
    assert "infeasible_after_crop" in FATAL
    assert report.hazards_of("a") == [] and report.hazards_of("b") == []
    assert "after the crop to dataset.crop_frames=100" in report.lines()[0]
    assert audit_manifests([manifest], cfg, split="val").hazards_of("long") == []  # only training crops


def test_bad_arguments_exit_2_in_one_line(tmp_path):
    for args in (["--workers", "0"], ["--split", "dev"], ["--manifest", str(tmp_path / "none.jsonl")],
                 ["dataset.no_such_key=1"]):
        proc = subprocess.run([sys.executable, "-m", "ds2exp.audit", *args], cwd=ROOT, capture_output=True,
                              text=True, timeout=60)
        assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, (args, proc.stderr)


@pytest.mark.slow
def test_2000_utterances_audit_in_under_a_minute(tmp_path, say):
    sources = [write_flac(tmp_path / f"src-{i}.flac", say(t)) for i, t in enumerate(
        ("hello world", "the cat sat on the mat", "good morning to you all", "open the door", "two birds"))]
    utts = []
    for i in range(2000):
        path = tmp_path / "audio" / f"u-{i:04d}.flac"
        path.parent.mkdir(exist_ok=True)
        shutil.copyfile(sources[i % len(sources)], path)
        utts.append(Utterance(f"u-{i:04d}", str(path), "HELLO WORLD", 1.0, 16000))
    write_jsonl(utts, tmp_path / "big.jsonl")
    proc = subprocess.run([sys.executable, "-m", "ds2exp.audit", "--manifest", str(tmp_path / "big.jsonl"),
                           f"paths.data_dir={tmp_path / 'data'}", "--workers", "2"], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    print(proc.stdout)
    seconds = float(re.search(r"audited 2000 utterances \(.*\) in ([\d.]+) s", proc.stdout).group(1))
    assert seconds < 60
