"""evaluate.py compat=zoo against a line-by-line reimplementation of the MindSpore model zoo's eval path.

The reimplementation below follows mindspore-ai/models official/audio/DeepSpeech2: eval.py (its loop),
src/dataset.py (ASRDataset in eval mode, DistributedSampler), src/deepspeech2.py (DeepSpeechModel,
PredictWithSoftmax), src/greedydecoder.py (MSGreedyDecoder) and the deepspeech.pytorch Decoder it
extends, labels.json. Where today's libraries differ from the zoo's (MindSpore 1.x, librosa < 0.10), the
zoo's behaviour is spelt out, each marked: eval_config's window "hanning" is spelt "hann" (scipy dropped
the alias of the same periodic Hann window) and librosa's old default pad_mode="reflect" is passed;
get_seq_lens divides with FloorDiv, what MindSpore 1.x's Div did to int32 tensors (2.8's returns 81.5).
One generalisation: the conv channel count is a parameter (the zoo hard-codes 32) so the model is tiny.
"""
import csv
import json
import os
import subprocess
import sys
from types import SimpleNamespace

import Levenshtein as Lev
import numpy as np
import pytest

from tests.helpers import ROOT, write_flac

CHANNELS, HIDDEN, LAYERS = 4, 16, 2
ZOO_LABELS = ["'"] + [chr(c) for c in range(ord("A"), ord("Z") + 1)] + [" ", "_"]  # labels.json
TRANSCRIPTS = ["DON'T STOP NOW", "it's a Small world", "OPEN THE DOOR", "hello there", "GO 42 HOME!",
               "THE CAT'S HAT", "A B C"]


# ------------------------------------------------------------------------------------------------
# the zoo's eval path, line by line
# ------------------------------------------------------------------------------------------------
TEST_INPUT_PAD_LENGTH = 3500


def zoo_parse_audio(audio_path):
    import librosa
    import soundfile as sf

    sound, _ = sf.read(audio_path, dtype='int16')
    sound = sound.astype('float32') / 32767
    if len(sound.shape) > 1:
        if sound.shape[1] == 1:
            sound = sound.squeeze()
        else:
            sound = sound.mean(axis=1)
    n_fft = int(16000 * 0.02)
    win_length = n_fft
    hop_length = int(16000 * 0.01)
    # window="hanning" then (see the module docstring); pad_mode: librosa < 0.10's default, the zoo's
    D = librosa.stft(y=sound, n_fft=n_fft, hop_length=hop_length, win_length=win_length, window="hann",
                     pad_mode="reflect")
    mag, _ = librosa.magphase(D)
    mag = np.log1p(mag)
    mean = mag.mean()
    std = mag.std()
    mag = (mag - mean) / std
    return mag


class ZooASRDataset:
    def __init__(self, manifest_filepath, labels, batch_size=20):
        with open(manifest_filepath) as f:
            ids = f.readlines()
        ids = [x.strip().split(',') for x in ids]
        self.ids = ids
        self.blank_id = int(labels.index('_'))
        self.bins = [ids[i:i + batch_size] for i in range(0, len(ids), batch_size)]
        if len(self.ids) % batch_size != 0:
            self.bins = self.bins[:-1]
            self.bins.append(ids[-batch_size:])
        self.size = len(self.bins)
        self.labels = {labels[i]: i for i in range(len(labels))}

    def parse_transcript(self, transcript_path):
        with open(transcript_path, 'r', encoding='utf8') as transcript_file:
            transcript = transcript_file.read().replace('\n', '')
        transcript = list(filter(None, [self.labels.get(x) for x in list(transcript)]))
        return transcript

    def __getitem__(self, index):
        batch_idx = self.bins[index]
        batch_size = len(batch_idx)
        batch_spect, batch_script, target_indices = [], [], []
        input_length = np.zeros(batch_size, np.float32)
        for data in batch_idx:
            audio_path, transcript_path = data[0], data[1]
            spect = zoo_parse_audio(audio_path)
            transcript = self.parse_transcript(transcript_path)
            batch_spect.append(spect)
            batch_script.append(transcript)
        freq_size = np.shape(batch_spect[-1])[0]
        inputs = np.zeros((batch_size, 1, freq_size, TEST_INPUT_PAD_LENGTH), dtype=np.float32)
        targets = []
        for k, spect_, scripts_ in zip(range(batch_size), batch_spect, batch_script):
            seq_length = np.shape(spect_)[1]
            input_length[k] = seq_length
            targets.extend(scripts_)
            for m in range(len(scripts_)):
                target_indices.append([k, m])
            inputs[k, 0, :, 0:seq_length] = spect_
        return inputs, input_length, np.array(target_indices, dtype=np.int64), np.array(targets, dtype=np.int32)

    def __len__(self):
        return self.size


def zoo_sampler_order(dataset_len, seed=0):
    seed = (seed + 1) & 0xffffffff  # DistributedSampler(shuffle=True), rank 0 of 1
    np.random.seed(seed)
    return np.random.permutation(dataset_len).tolist()


def zoo_network():
    """src/deepspeech2.py with CHANNELS conv channels."""
    from mindspore import nn
    from mindspore.common import dtype as mstype
    from mindspore.ops import operations as P

    class SequenceWise(nn.Cell):
        def __init__(self, module):
            super().__init__()
            self.module = module
            self.reshape_op = P.Reshape()
            self.shape_op = P.Shape()

        def construct(self, x):
            sizes = self.shape_op(x)
            t, n = sizes[0], sizes[1]
            x = self.reshape_op(x, (t * n, -1))
            x = self.module(x)
            x = self.reshape_op(x, (t, n, -1))
            return x

    class MaskConv(nn.Cell):
        def __init__(self):
            super().__init__()
            self.conv1 = nn.Conv2d(1, CHANNELS, kernel_size=(41, 11), stride=(2, 2), pad_mode='pad',
                                   padding=(20, 20, 5, 5))
            self.bn1 = nn.BatchNorm2d(num_features=CHANNELS)
            self.conv2 = nn.Conv2d(CHANNELS, CHANNELS, kernel_size=(21, 11), stride=(2, 1), pad_mode='pad',
                                   padding=(10, 10, 5, 5))
            self.bn2 = nn.BatchNorm2d(num_features=CHANNELS)
            self.tanh = nn.Tanh()
            self.module_list = nn.CellList([self.conv1, self.bn1, self.tanh, self.conv2, self.bn2, self.tanh])

        def construct(self, x, lengths):
            for module in self.module_list:
                x = module(x)
            return x

    class BatchRNN(nn.Cell):
        def __init__(self, input_size, hidden_size, num_layers, bidirectional=True):
            super().__init__()
            self.num_layers = num_layers
            self.bidirectional = bidirectional
            self.reshape_op = P.Reshape()
            self.shape_op = P.Shape()
            self.sum_op = P.ReduceSum()
            input_size_list = [input_size] + [hidden_size] * (num_layers - 1)
            self.lstms = nn.CellList([nn.LSTM(input_size=input_size_list[i], hidden_size=hidden_size,
                                              bidirectional=bidirectional, has_bias=True)
                                      for i in range(num_layers)])

        def construct(self, x):
            for i in range(self.num_layers):
                x, _ = self.lstms[i](x)
                if self.bidirectional:
                    size = self.shape_op(x)
                    x = self.reshape_op(x, (size[0], size[1], 2, -1))
                    x = self.sum_op(x, 2)
            return x

    class DeepSpeechModel(nn.Cell):
        def __init__(self):
            super().__init__()
            self.reshape_op = P.Reshape()
            self.shape_op = P.Shape()
            self.transpose_op = P.Transpose()
            self.add = P.Add()
            # MindSpore 1.x, which the zoo ran on, divided int32 tensors as integers; 2.8's Div divides
            # exactly (161 frames -> 81.5 output frames, and range() fails). Floor division is what 1.x
            # computed for these non-negative lengths.
            self.div = P.FloorDiv()
            self.conv = MaskConv()
            self.pre, self.stride = self.get_conv_num()
            rnn_input_size = int(np.floor((16000 * 0.02) / 2) + 1)
            rnn_input_size = int(np.floor(rnn_input_size + 2 * 20 - 41) / 2 + 1)
            rnn_input_size = int(np.floor(rnn_input_size + 2 * 10 - 21) / 2 + 1)
            rnn_input_size *= CHANNELS
            self.RNN = BatchRNN(rnn_input_size, HIDDEN, LAYERS)
            self.fc = SequenceWise(nn.Dense(HIDDEN, len(ZOO_LABELS), has_bias=False))

        def construct(self, x, lengths):
            output_lengths = self.get_seq_lens(lengths)
            x = self.conv(x, lengths)
            sizes = self.shape_op(x)
            x = self.reshape_op(x, (sizes[0], sizes[1] * sizes[2], sizes[3]))
            x = self.transpose_op(x, (2, 0, 1))
            x = self.RNN(x)
            x = self.fc(x)
            return x, output_lengths

        def get_seq_lens(self, seq_len):
            for i in range(len(self.stride)):
                seq_len = self.add(self.div(self.add(seq_len, self.pre[i]), self.stride[i]), 1)
            return seq_len

        def get_conv_num(self):
            p, s = [], []
            for _, cell in self.conv.cells_and_names():
                if isinstance(cell, nn.Conv2d):
                    kernel_size = cell.kernel_size
                    padding_1 = int((kernel_size[1] - 1) / 2)
                    temp = 2 * padding_1 - cell.dilation[1] * (cell.kernel_size[1] - 1) - 1
                    p.append(temp)
                    s.append(cell.stride[1])
            return p, s

    class PredictWithSoftmax(nn.Cell):
        def __init__(self, network):
            super().__init__(auto_prefix=False)
            self.network = network
            self.inference_softmax = P.Softmax(axis=-1)
            self.transpose_op = P.Transpose()
            self.cast_op = P.Cast()

        def construct(self, inputs, input_length):
            x, output_sizes = self.network(inputs, self.cast_op(input_length, mstype.int32))
            x = self.inference_softmax(x)
            x = self.transpose_op(x, (1, 0, 2))
            return x, output_sizes

    return PredictWithSoftmax(DeepSpeechModel())


class ZooGreedyDecoder:
    """deepspeech.pytorch Decoder/GreedyDecoder with MSGreedyDecoder's overrides."""

    def __init__(self, labels, blank_index=0):
        self.labels = labels
        self.int_to_char = dict([(i, c) for (i, c) in enumerate(labels)])
        self.blank_index = blank_index
        space_index = len(labels)
        if ' ' in labels:
            space_index = labels.index(' ')
        self.space_index = space_index

    def wer(self, s1, s2):
        b = set(s1.split() + s2.split())
        word2char = dict(zip(b, range(len(b))))
        w1 = [chr(word2char[w]) for w in s1.split()]
        w2 = [chr(word2char[w]) for w in s2.split()]
        return Lev.distance(''.join(w1), ''.join(w2))

    def cer(self, s1, s2):
        s1, s2, = s1.replace(' ', ''), s2.replace(' ', '')
        return Lev.distance(s1, s2)

    def convert_to_strings(self, sequences, sizes=None, remove_repetitions=False, return_offsets=False):
        strings = []
        offsets = [] if return_offsets else None
        for x in range(len(sequences)):
            seq_len = sizes[x] if sizes is not None else len(sequences[x])
            string, string_offsets = self.process_string(sequences[x], seq_len, remove_repetitions)
            strings.append([string])
            if return_offsets:
                offsets.append([string_offsets])
        if return_offsets:
            return strings, offsets
        return strings

    def process_string(self, sequence, size, remove_repetitions=False):
        string = ''
        offsets = []
        for i in range(size):
            char = self.int_to_char[sequence[i].item()]
            if char != self.int_to_char[self.blank_index]:
                if remove_repetitions and i != 0 and char == self.int_to_char[sequence[i - 1].item()]:
                    pass
                elif char == self.labels[self.space_index]:
                    string += ' '
                    offsets.append(i)
                else:
                    string = string + char
                    offsets.append(i)
        return string, offsets

    def decode(self, probs, sizes=None):
        probs = probs.asnumpy()
        sizes = sizes.asnumpy()
        max_probs = np.argmax(probs, axis=-1)
        strings, offsets = self.convert_to_strings(max_probs, sizes, remove_repetitions=True, return_offsets=True)
        return strings, offsets


def zoo_eval(manifest, ckpt):
    """eval.py's main block (GRAPH_MODE as the zoo sets it; greedy decoder)."""
    import mindspore as ms
    from mindspore.train.serialization import load_checkpoint, load_param_into_net

    from ds2exp.evaluation.zoo_compat import split_targets as split_targets_like_eval_py

    ms.set_context(mode=ms.GRAPH_MODE)
    labels = ZOO_LABELS
    model = zoo_network()
    ds_eval = ZooASRDataset(manifest, labels, batch_size=20)
    param_dict = load_checkpoint(ckpt)
    param_dict_new = {}
    for k, v in param_dict.items():
        if 'rnn' in k:
            new_k = k.replace('rnn', 'RNN')
            param_dict_new[new_k] = param_dict[k]
        else:
            param_dict_new[k] = param_dict[k]
    not_loaded, _ = load_param_into_net(model, param_dict_new)
    assert not not_loaded, not_loaded
    decoder = ZooGreedyDecoder(labels=labels, blank_index=labels.index('_'))
    target_decoder = ZooGreedyDecoder(labels, blank_index=labels.index('_'))
    model.set_train(False)
    total_cer, total_wer, num_tokens, num_chars = 0, 0, 0, 0
    pairs = []
    try:
        for index in zoo_sampler_order(len(ds_eval)):
            inputs, input_length, target_indices, targets = ds_eval[index]
            # eval.py's inline split of the flat targets, which zoo_compat.split_targets reproduces line for
            # line (test_split_targets_shifts_like_the_zoo pins it on a batch with a dropped row)
            split_targets = split_targets_like_eval_py(target_indices, targets)
            out, output_sizes = model(ms.Tensor(inputs), ms.Tensor(input_length))
            decoded_output, _ = decoder.decode(out, output_sizes)
            target_strings = target_decoder.convert_to_strings(split_targets)
            for doutput, toutput in zip(decoded_output, target_strings):
                transcript, reference = doutput[0], toutput[0]
                wer_inst = decoder.wer(transcript, reference)
                cer_inst = decoder.cer(transcript, reference)
                total_wer += wer_inst
                total_cer += cer_inst
                num_tokens += len(reference.split())
                num_chars += len(reference.replace(' ', ''))
                pairs.append((reference, transcript))
    finally:
        ms.set_context(mode=ms.PYNATIVE_MODE)
    wer = float(total_wer) / num_tokens
    cer = float(total_cer) / num_chars
    return SimpleNamespace(wer=wer * 100, cer=cer * 100, total_wer=total_wer, total_cer=total_cer,
                           num_tokens=num_tokens, num_chars=num_chars, pairs=pairs)


# ------------------------------------------------------------------------------------------------
# data and checkpoint
# ------------------------------------------------------------------------------------------------
def zoo_checkpoint(path, seed=0):
    """A tiny model saved as the zoo saves it: its parameter names (`rnn.` as older checkpoints spell
    it), no ds2exp metadata; weights drawn so that the output is not one class everywhere."""
    import mindspore as ms

    rng = np.random.default_rng(seed)
    shapes = {"conv.conv1.weight": (CHANNELS, 1, 41, 11), "conv.conv2.weight": (CHANNELS, CHANNELS, 21, 11),
              "fc.module.weight": (len(ZOO_LABELS), HIDDEN)}
    for bn in ("bn1", "bn2"):
        for k in ("gamma", "beta", "moving_mean", "moving_variance"):
            shapes[f"conv.{bn}.{k}"] = (CHANNELS,)
    for i in range(LAYERS):
        inp = CHANNELS * 41 if i == 0 else HIDDEN
        for sfx in ("", "_reverse"):
            shapes[f"rnn.lstms.{i}.weight_ih_l0{sfx}"] = (4 * HIDDEN, inp)
            shapes[f"rnn.lstms.{i}.weight_hh_l0{sfx}"] = (4 * HIDDEN, HIDDEN)
            shapes[f"rnn.lstms.{i}.bias_ih_l0{sfx}"] = (4 * HIDDEN,)
            shapes[f"rnn.lstms.{i}.bias_hh_l0{sfx}"] = (4 * HIDDEN,)
    entries = []
    for name, shape in shapes.items():
        if name.endswith("gamma"):
            v = rng.uniform(0.5, 1.5, shape)
        elif name.endswith("moving_variance"):
            v = rng.uniform(0.5, 2.0, shape)
        elif name.endswith(("beta", "moving_mean")):
            v = rng.normal(0, 0.2, shape)
        elif name.startswith("conv."):
            v = rng.normal(0, np.sqrt(2.0 / (shape[2] * shape[3] * shape[0])), shape)
        elif name.startswith("fc."):
            v = rng.normal(0, 3.0, shape)
        else:
            v = rng.uniform(-1, 1, shape) / np.sqrt(HIDDEN)
        entries.append({"name": name, "data": ms.Tensor(v.astype(np.float32))})
    ms.save_checkpoint(entries, str(path))
    return path


@pytest.fixture(scope="module")
def zoo_split(tmp_path_factory, say):
    """23 utterances (two zoo batches of 20 that share 17) in the zoo's CSV manifest layout; transcripts
    with apostrophes, lower case, digits, punctuation, and one that the zoo's filter empties."""
    tmp = tmp_path_factory.mktemp("zoo")
    rows = []
    for i in range(23):
        text = TRANSCRIPTS[i % len(TRANSCRIPTS)]
        audio = write_flac(tmp / "wav" / f"u{i:02d}.flac", say(text.lower(), "en-us", 150 + 5 * (i % 7), 50))
        txt = tmp / "txt" / f"u{i:02d}.txt"
        txt.parent.mkdir(exist_ok=True)
        txt.write_text(text + "\n", encoding="utf-8")
        rows.append(f"{audio},{txt}\n")
    manifest = tmp / "test.csv"
    manifest.write_text("".join(rows))
    return tmp, manifest, zoo_checkpoint(tmp / "zoo.ckpt")


# ------------------------------------------------------------------------------------------------
# tests
# ------------------------------------------------------------------------------------------------
def test_split_targets_shifts_like_the_zoo():
    # utterance 2's transcript filtered to nothing, so it has no row in target_indices: eval.py (and so
    # compat=zoo) gives utterance 3's targets to the third slot instead of an empty list
    target_indices = np.array([[0, 0], [0, 1], [1, 0], [1, 1], [1, 2], [3, 0]])
    targets = np.array([5, 6, 7, 8, 9, 10])
    from ds2exp.evaluation import zoo_compat

    assert zoo_compat.split_targets(target_indices, targets) == [[5, 6], [7, 8, 9], [10]]


def test_reference_filter_drops_apostrophe_and_lower_case():
    from ds2exp.evaluation.zoo_compat import labels_to_text, reference_labels

    ids = reference_labels("DON'T stop NOW 42!\n_")
    assert ids == [4, 15, 14, 20, 27, 27, 14, 15, 23, 27, 28]  # D O N T, spaces, N O W, space, the blank
    assert labels_to_text(ids, len(ids), False) == "DONT  NOW "


def test_batches_repeat_the_overlap_as_the_zoo_does():
    from ds2exp.evaluation.zoo_compat import zoo_batches

    assert zoo_batches(list(range(23))) == [list(range(20)), list(range(3, 23))]
    assert zoo_batches(list(range(7))) == [list(range(7))]
    assert zoo_batches(list(range(40))) == [list(range(20)), list(range(20, 40))]


def test_evaluate_compat_zoo_equals_the_zoo_eval_path(zoo_split, tmp_path):
    tmp, manifest, ckpt = zoo_split
    model = [f"model.conv_channels={CHANNELS}", f"model.rnn_hidden={HIDDEN}", f"model.rnn_layers={LAYERS}",
             "model.activation=tanh", "model.rnn_type=lstm", "model.bidirectional=true", "model.merge=sum"]
    out = tmp_path / "eval"
    r = subprocess.run([sys.executable, str(ROOT / "evaluate.py"), f"checkpoint={ckpt}", "compat=zoo",
                        "dataset=manifest", f"dataset.train_manifest={manifest}", f"dataset.test_manifest={manifest}",
                        "logger=none", "progress=false", f"hydra.run.dir={out}", *model],
                       capture_output=True, text=True, cwd=ROOT, timeout=900,
                       env={**os.environ, "DS2EXP_ROOT": str(tmp)})
    assert r.returncode == 0, r.stderr[-3000:]
    records = [json.loads(line) for line in next(out.glob("*.utterances.jsonl")).read_text().splitlines()]

    zoo = zoo_eval(str(manifest), str(ckpt))
    print(f"zoo eval.py path: WER {zoo.wer:.4f} CER {zoo.cer:.4f} over {len(zoo.pairs)} scored utterances; "
          f"ds2exp compat=zoo: {len(records)} records")
    assert len(records) == len(zoo.pairs) == 40  # 23 utterances in two batches of 20: 17 scored twice
    assert sorted((x["reference"], x["hypothesis"]) for x in records) == sorted(zoo.pairs)
    assert sum(x["word_errors"] for x in records) == zoo.total_wer
    assert sum(x["char_errors"] for x in records) == zoo.total_cer
    assert sum(x["ref_words"] for x in records) == zoo.num_tokens
    assert sum(x["ref_chars"] for x in records) == zoo.num_chars
    wer = 100.0 * float(zoo.total_wer) / zoo.num_tokens
    assert wer == zoo.wer
    row = next(line for line in r.stdout.splitlines() if line.startswith("zoo"))
    assert row.split()[1:3] == [f"{zoo.wer:.2f}", f"{zoo.cer:.2f}"], r.stdout
    # the transcripts carry what the zoo's filter does to them: no apostrophe, no lower-case words
    refs = {x["reference"] for x in records}
    assert "DONT STOP NOW" in refs and "THE CATS HAT" in refs and not any("'" in x for x in refs)
    hyps = " ".join(x["hypothesis"] for x in records)
    assert len(set(hyps) - {" "}) >= 5, hyps  # the model emits a variety of characters


def test_compat_zoo_refuses_beam_search(zoo_split, tmp_path):
    tmp, manifest, ckpt = zoo_split
    r = subprocess.run([sys.executable, str(ROOT / "evaluate.py"), f"checkpoint={ckpt}", "compat=zoo",
                        "decoder=beam", "dataset=manifest", f"dataset.train_manifest={manifest}",
                        f"dataset.test_manifest={manifest}", "logger=none", f"hydra.run.dir={tmp_path / 'x'}"],
                       capture_output=True, text=True, cwd=ROOT, timeout=300,
                       env={**os.environ, "DS2EXP_ROOT": str(tmp)})
    assert r.returncode == 2 and "compat=zoo" in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not (tmp_path / "x").exists()


def test_manifest_is_the_zoo_csv(zoo_split):
    _, manifest, _ = zoo_split
    rows = list(csv.reader(manifest.open()))
    assert len(rows) == 23 and all(len(r) == 2 for r in rows)
