"""The MindSpore model zoo's DeepSpeech2 evaluation (`official/audio/DeepSpeech2/eval.py`), reproduced.

`python evaluate.py checkpoint=... compat=zoo` scores a checkpoint the way the zoo's eval.py does, so
that its number can stand beside one the zoo printed. What the zoo does, and this module with it:

- data: every utterance of the split's manifests, in order (no duration or transcript filter), in
  batches of 20 (eval_config); when the count is not a multiple of 20 the last batch is the last 20
  utterances (`ASRDataset.bins`), so the utterances it shares with the batch before are scored twice.
- features (`LoadAudioAndTranscript.parse_audio`): int16 samples / 32767, channels averaged, no
  resampling; `librosa.stft(n_fft=320, hop_length=160, win_length=320, window="hanning")` - eval_config's
  window, a periodic Hann (scipy's former alias), not the Hamming the zoo trains with - centred with
  reflection padding (librosa < 0.10); magnitude, log1p, then (x - mean) / std over the utterance.
- padding: every utterance is zero-padded to 3500 frames (TEST_INPUT_PAD_LENGTH) and the network runs
  over the padding without masks (its MaskConv masks nothing and its LSTMs get no lengths), so each
  backward LSTM reads the padding before it reaches an utterance's last frame.
- output lengths (`get_seq_lens`): (n - 1) // 2 + 1 frames are decoded.
- references (`parse_transcript`): each character mapped through labels.json and `filter(None, ...)`:
  the apostrophe, label index 0, is falsy and dropped, as is every character outside the labels
  (lower-case letters, digits, punctuation); targets are split per utterance from the batch's flat
  target list as eval.py does, and turned back into text without blanks.
- decoding (`MSGreedyDecoder`): softmax, argmax per frame, a character kept when it is not the blank
  and differs from the previous frame's; the apostrophe output is kept, so a hypothesis "DON'T" meets
  the reference "DONT".
- metrics: per utterance the word edit distance (words mapped to characters) and the character edit
  distance with spaces removed; WER = sum of word distances / sum of reference words, CER = sum of
  character distances / sum of reference characters without spaces (x 100 here, as the zoo prints).

The network is the checkpoint's (model zoo checkpoints carry no architecture: give `model=`), run with
MindSpore's plain conv ops and its fused LSTM kernel, as the zoo's network runs on CPU.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

import Levenshtein
import mindspore as ms
import numpy as np
import soundfile as sf
from mindspore import ops

from ds2exp.data.labels import BLANK_INDEX, LABELS
from ds2exp.data.manifest import Utterance

BATCH_SIZE = 20  # eval_config.DataConfig.batch_size
EVAL_FRAMES = 3500  # src/dataset.py TEST_INPUT_PAD_LENGTH
SAMPLE_RATE = 16000
N_FFT = 320  # int(16000 * 0.02)
HOP = 160  # int(16000 * 0.01)
# eval_config's "hanning": scipy's name for the periodic Hann window until it dropped the alias
WINDOW = "hann"
_LABEL_INDEX = {c: i for i, c in enumerate(LABELS)}
_SPACE_INDEX = LABELS.index(" ")


class ZooEvalError(ValueError):
    pass


def zoo_features(path: str | Path) -> np.ndarray:
    """(161, frames) float32 features as the zoo's eval data pipeline computes them."""
    import librosa

    sound, sr = sf.read(str(path), dtype="int16")
    if sr != SAMPLE_RATE:
        raise ZooEvalError(f"{path}: {sr} Hz audio; the zoo's eval.py reads audio as 16 kHz without resampling")
    sound = sound.astype("float32") / 32767
    if sound.ndim > 1:
        sound = sound.squeeze() if sound.shape[1] == 1 else sound.mean(axis=1)
    d = librosa.stft(y=sound, n_fft=N_FFT, hop_length=HOP, win_length=N_FFT, window=WINDOW, pad_mode="reflect")
    mag, _ = librosa.magphase(d)
    mag = np.log1p(mag)
    return (mag - mag.mean()) / mag.std()


def reference_labels(transcript: str) -> List[int]:
    """The zoo's parse_transcript: label indices with index 0 (') and unknown characters dropped."""
    return list(filter(None, [_LABEL_INDEX.get(c) for c in transcript.replace("\n", "")]))


def labels_to_text(sequence: Sequence[int], size: int, remove_repetitions: bool) -> str:
    """deepspeech.pytorch's GreedyDecoder.process_string (MSGreedyDecoder)."""
    out = []
    for i in range(size):
        char = LABELS[int(sequence[i])]
        if char == LABELS[BLANK_INDEX]:
            continue
        if remove_repetitions and i != 0 and char == LABELS[int(sequence[i - 1])]:
            continue
        out.append(" " if int(sequence[i]) == _SPACE_INDEX else char)
    return "".join(out)


def word_distance(s1: str, s2: str) -> int:
    """deepspeech.pytorch's Decoder.wer: edit distance over words, each word mapped to one character."""
    vocab = set(s1.split() + s2.split())
    word2char = dict(zip(vocab, range(len(vocab))))
    return Levenshtein.distance("".join(chr(word2char[w]) for w in s1.split()),
                                "".join(chr(word2char[w]) for w in s2.split()))


def char_distance(s1: str, s2: str) -> int:
    """deepspeech.pytorch's Decoder.cer: edit distance with spaces removed."""
    return Levenshtein.distance(s1.replace(" ", ""), s2.replace(" ", ""))


def zoo_batches(items: List) -> List[List]:
    """ASRDataset.bins: consecutive batches; a short last batch is replaced by the last BATCH_SIZE items."""
    bins = [items[i:i + BATCH_SIZE] for i in range(0, len(items), BATCH_SIZE)]
    if len(items) % BATCH_SIZE != 0:
        bins = bins[:-1]
        bins.append(items[-BATCH_SIZE:])
    return bins


def split_targets(target_indices: np.ndarray, targets: np.ndarray) -> List[List[int]]:
    """eval.py's split of a batch's flat targets by their row index (an utterance whose transcript
    filters to nothing has no row, and shifts the split as it does in the zoo)."""
    out: List[List[int]] = []
    start, count, last_id = 0, 0, 0
    for i in range(np.shape(targets)[0]):
        if target_indices[i, 0] == last_id:
            count += 1
        else:
            out.append(list(targets[start:count]))
            last_id += 1
            start = count
            count += 1
    out.append(list(targets[start:]))
    return out


def batch_inputs(utts: List[Utterance]) -> Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """ASRDataset.__getitem__ in eval mode: padded features, lengths, target indices, flat targets."""
    feats = [zoo_features(u.audio_path) for u in utts]
    inputs = np.zeros((len(utts), feats[-1].shape[0], EVAL_FRAMES), np.float32)
    lengths = np.zeros(len(utts), np.float32)
    target_indices, targets = [], []
    for k, (u, f) in enumerate(zip(utts, feats)):
        if f.shape[1] > EVAL_FRAMES:
            raise ZooEvalError(f"{u.id}: {f.shape[1]} frames ({u.duration:.1f} s) exceed the zoo's eval length "
                               f"of {EVAL_FRAMES} frames; its eval.py cannot score this utterance")
        lengths[k] = f.shape[1]
        labels = reference_labels(u.transcript)
        targets.extend(labels)
        target_indices.extend([k, m] for m in range(len(labels)))
        inputs[k, :, : f.shape[1]] = f
    return inputs, lengths, np.array(target_indices, np.int64).reshape(-1, 2), np.array(targets, np.int32)


def split_utterances(cfg, split: str) -> List[Utterance]:
    """Every utterance of the split's manifests, in order (the zoo filters nothing), at most
    max_utterances / dataset.max_utterances of them."""
    from ds2exp.data.dataset import DatasetError, read_manifests, resolve_manifests

    manifests = resolve_manifests(cfg, progress=cfg.progress).get(split)
    if not manifests:
        raise DatasetError(f"dataset {cfg.dataset.name!r} has no {split!r} split configured")
    problems: List[dict] = []
    utts = read_manifests(manifests, problems)
    if problems:
        p = problems[0]
        raise DatasetError(f"{p['path']}: {p['reason']} (the zoo's eval.py reads every file of the manifest)")
    for limit in (cfg.get("max_utterances"), cfg.dataset.get("max_utterances")):
        if limit:
            utts = utts[: int(limit)]
    if not utts:
        raise DatasetError(f"the {split} split of {cfg.dataset.name!r} is empty")
    return utts


class ZooResult:
    def __init__(self):
        self.total_wer = self.total_cer = self.num_tokens = self.num_chars = 0
        self.records: List[Dict] = []
        self.decode_seconds = 0.0

    @property
    def wer(self) -> float:
        if not self.num_tokens:
            raise ZooEvalError("the references hold no words after the zoo's label filter")
        return 100.0 * self.total_wer / self.num_tokens

    @property
    def cer(self) -> float:
        if not self.num_chars:
            raise ZooEvalError("the references hold no characters after the zoo's label filter")
        return 100.0 * self.total_cer / self.num_chars


def evaluate_like_zoo(model, utts: List[Utterance]) -> ZooResult:
    """Run eval.py's loop with `model` (a DeepSpeech2 whose RNN layers are GraphRNN)."""
    model.set_train(False)
    res = ZooResult()
    for batch in zoo_batches(utts):
        inputs, input_length, target_indices, targets = batch_inputs(batch)
        rows = len(batch)
        # no masks: every row is declared EVAL_FRAMES long, as the zoo's network sees it
        logits, _ = model(ms.Tensor(inputs), ms.Tensor(np.full(rows, EVAL_FRAMES, np.int32)))
        probs = ops.softmax(logits, -1).asnumpy()
        sizes = (input_length.astype(np.int32) - 1) // 2 + 1
        t0 = time.perf_counter()
        best = np.argmax(probs, axis=-1)
        hyps = [labels_to_text(best[i], int(sizes[i]), True) for i in range(rows)]
        refs = [labels_to_text(t, len(t), False) for t in split_targets(target_indices, targets)]
        res.decode_seconds += time.perf_counter() - t0
        for u, hyp, ref in zip(batch, hyps, refs):
            w, c = word_distance(hyp, ref), char_distance(hyp, ref)
            words, chars = len(ref.split()), len(ref.replace(" ", ""))
            res.total_wer += w
            res.total_cer += c
            res.num_tokens += words
            res.num_chars += chars
            res.records.append({"id": u.id, "reference": ref, "hypothesis": hyp, "word_errors": w,
                                "ref_words": words, "char_errors": c, "ref_chars": chars})
    return res


def score_checkpoint_zoo(path: Path, cfg, utts: List[Utterance]):
    """A CheckpointScore of `path` by the zoo's evaluation."""
    from ds2exp.evaluation.scores import CheckpointScore
    from ds2exp.models.deepspeech2 import count_parameters
    from ds2exp.models.graph_rnn import use_graph_rnns
    from ds2exp.checkpoints.loading import load_model

    model, loaded, _ = load_model(path, cfg.model, impl="plain")
    model = use_graph_rnns(model)
    res = evaluate_like_zoo(model, utts)
    m = loaded.meta
    name = path.stem if path.parent.name != "checkpoints" else f"{path.parent.parent.name}/{path.stem}"
    return CheckpointScore(name, str(path), res.wer, res.cer, count_parameters(model), m.get("step"),
                           m.get("val_loss"), res.decode_seconds / max(1, len(res.records)), len(res.records),
                           res.records, m.get("mlflow_run_id"))
