"""Length buckets, CTC feasibility, and bad audio met during training."""
import numpy as np
import pytest

from ds2exp.cli import check_overrides
from ds2exp.data.dataset import (BatchLoader, BucketBatchSampler, ctc_min_frames, load_split, output_frames)
from ds2exp.data.features import FeatureCache, FeatureSettings
from ds2exp.data.labels import encode
from ds2exp.data.manifest import Utterance, write_jsonl
from tests.helpers import write_flac


def test_ctc_min_frames_counts_repeats():
    assert ctc_min_frames(encode("AB")) == 2
    assert ctc_min_frames(encode("ALL")) == 4  # L L needs a blank between
    assert output_frames(100) == 50 and output_frames(101) == 51


@pytest.fixture()
def corpus(tmp_path, say):
    utts = []
    for i, text in enumerate(["HELLO WORLD", "GOOD MORNING EVERYONE", "THE CAT", "OPEN THE DOOR PLEASE"]):
        p = write_flac(tmp_path / f"u{i}.flac", say(text.lower()))
        utts.append(Utterance(f"u{i}", str(p), text, 0.0, 16000))
    import soundfile as sf

    for u in utts:
        u.duration = sf.info(u.audio_path).duration
    # infeasible: a long transcript on a short clip
    p = write_flac(tmp_path / "short.flac", say("hi"))
    utts.append(Utterance("short", str(p), "THIS TRANSCRIPT IS FAR TOO LONG FOR SUCH A SHORT CLIP OF AUDIO",
                          sf.info(str(p)).duration, 16000))
    utts.append(Utterance("digits", str(p), "ROOM 101", sf.info(str(p)).duration, 16000))
    utts.append(Utterance("blank", str(p), "   ", sf.info(str(p)).duration, 16000))
    m = tmp_path / "m.jsonl"
    write_jsonl(utts, m)
    return tmp_path, m


def test_load_split_drops_and_lists_infeasible_and_bad_transcripts(corpus):
    tmp, manifest = corpus
    cfg = check_overrides(["dataset=manifest", f"dataset.train_manifest={manifest}", f"paths.root_dir={tmp}"])
    split = load_split("train", [manifest], cfg, FeatureSettings(), report_dir=tmp)
    assert sorted(e.utt.id for e in split.examples) == ["u0", "u1", "u2", "u3"]
    reasons = {r: ids for r, ids in split.dropped.items()}
    assert reasons["infeasible CTC (transcript longer than output frames)"] == ["short"]
    assert any("outside the label set" in r and ids == ["digits"] for r, ids in reasons.items())
    assert reasons["empty transcript"] == ["blank"]
    assert (tmp / "dropped_train.json").is_file()


def test_buckets_pad_to_few_lengths_and_sortagrad(corpus):
    tmp, manifest = corpus
    cfg = check_overrides(["dataset=manifest", f"dataset.train_manifest={manifest}", f"paths.root_dir={tmp}"])
    split = load_split("train", [manifest], cfg, FeatureSettings())
    sampler = BucketBatchSampler(split.examples, batch_size=2, num_buckets=2, seed=0, sortagrad=True)
    assert all(length % 32 == 0 for length in sampler.lengths) and len(sampler.lengths) <= 2
    first = sampler.epoch_batches(0)
    frames = [max(split.examples[i].frames for i in b) for b in first]
    assert frames == sorted(frames)  # SortaGrad: shortest first in epoch 0
    loader = BatchLoader(split, sampler, FeatureCache(tmp / "cache", FeatureSettings()), num_workers=2)
    batches = list(loader.iterate(0))
    assert sum(b.size for b in batches) == 4
    for b in batches:
        assert b.features.shape[2] in sampler.lengths
        assert b.features.shape[1] == 161 and b.labels.shape[0] == b.size
    # sharding for data parallel ranks: disjoint, together the whole epoch
    r0 = BucketBatchSampler(split.examples, 1, 2, 0, rank=0, world=2).epoch_batches(1)
    r1 = BucketBatchSampler(split.examples, 1, 2, 0, rank=1, world=2).epoch_batches(1)
    assert not set(map(tuple, r0)) & set(map(tuple, r1)) and len(r0) + len(r1) == 4


def test_audio_broken_after_preparation_is_skipped_not_fatal(corpus):
    tmp, manifest = corpus
    cfg = check_overrides(["dataset=manifest", f"dataset.train_manifest={manifest}", f"paths.root_dir={tmp}"])
    split = load_split("train", [manifest], cfg, FeatureSettings())
    (tmp / "u1.flac").write_bytes(b"not audio any more")
    sampler = BucketBatchSampler(split.examples, batch_size=4, num_buckets=1, seed=0)
    loader = BatchLoader(split, sampler, FeatureCache(tmp / "cache2", FeatureSettings()), num_workers=1)
    batches = list(loader.iterate(0))
    assert sum(b.size for b in batches) == 3
    assert "u1" in loader.failures and "unreadable" in loader.failures["u1"]
    assert np.isfinite(batches[0].features).all()
