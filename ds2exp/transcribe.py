"""Transcribe audio files with a checkpoint or with a model exported by export.py.

    python -m ds2exp.transcribe checkpoint=<run dir> audio=[a.wav,b.flac] [json=true] [chunk_seconds=20]
    python -m ds2exp.transcribe exported=model.mindir audio=[a.wav]
    python -m ds2exp.transcribe --help

The command line is composed by Hydra from conf/transcribe.yaml (checked like train.py's: a bad value
is one line and exit status 2) but starts no Hydra run: nothing is written, transcripts go to stdout.

Long files are streamed: the audio is read, resampled/mixed down, featurised, recognised and decoded
`chunk_seconds` at a time, so memory stays flat in the length of the file (bench/bench_transcribe.py).
Features are normalised per chunk, as the model saw them per utterance in training.

`exported=` runs the MindIR file alone - its graph through nn.GraphCell, the feature settings and
labels stored in it - without ds2exp's model code; `checkpoint=` builds the model from the checkpoint.
Both give the same text (tests/test_transcribe.py).
"""
from __future__ import annotations

import json
import math
import sys
from dataclasses import fields
from pathlib import Path
from typing import Iterator, List, Optional, Tuple

import numpy as np

from ds2exp.mindir import INFO_KEY, load_graph, read_export_info

CONFIG_NAME = "transcribe"
MIN_CHUNK_SECONDS = 1.0  # exclusive: shorter chunks hold too little speech to recognise
MAX_CHUNK_SECONDS = 300.0  # memory per chunk grows with it; the models train on utterances of <= 17 s


# --------------------------------------------------------------------------------------------
# the two recognisers: (features (bins, T)) -> log-probabilities (T', classes) of the valid frames
# --------------------------------------------------------------------------------------------
def feature_settings(feature: Optional[dict]):
    """FeatureSettings from a stored dataset.feature config (keys the settings do not know are ignored)."""
    from ds2exp.data.features import FeatureSettings

    known = {f.name for f in fields(FeatureSettings)}
    return FeatureSettings(**{k: v for k, v in (feature or {}).items() if k in known})


class CheckpointModel:
    """A checkpoint's model with the kernels it was trained with."""

    def __init__(self, ref: str):
        from ds2exp.checkpoints.loading import load_model

        self.model, loaded, why = load_model(ref)  # no fallback: a checkpoint without its config is refused
        if why:
            print(why, file=sys.stderr)
        self.settings = feature_settings(loaded.meta["config"]["dataset"]["feature"])
        self.max_frames = None

    def __call__(self, feats: np.ndarray) -> np.ndarray:
        import mindspore as ms

        logits, lengths = self.model(ms.Tensor(feats[None]), ms.Tensor(np.array([feats.shape[1]], np.int32)))
        return ms.ops.log_softmax(logits, -1).asnumpy()[0][: int(lengths.asnumpy()[0])]


class ExportedModel:
    """A MindIR written by export.py, run on its own: no ds2exp model code is imported."""

    def __init__(self, path: str):
        info = read_export_info(path)
        if not info:
            raise ValueError(f"{path}: not a ds2exp export (its MindIR user_info has no {INFO_KEY!r} entry); "
                             f"write it with export.py")
        self.settings = feature_settings(info.get("feature"))
        self.max_frames = info.get("frames")
        self.graph = load_graph(path, self.max_frames)

    def __call__(self, feats: np.ndarray) -> np.ndarray:
        import mindspore as ms

        n = feats.shape[1]
        x = feats[None]
        if self.max_frames:  # a fixed-length export: zero-pad, the lengths input says what is real
            x = np.zeros((1, feats.shape[0], self.max_frames), np.float32)
            x[0, :, :n] = feats
        log_probs, lengths = self.graph(ms.Tensor(x), ms.Tensor(np.array([n], np.int32)))
        return log_probs.asnumpy()[0][: int(lengths.asnumpy()[0])]


# --------------------------------------------------------------------------------------------
# streaming audio
# --------------------------------------------------------------------------------------------
def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


def audio_chunks(path: str, sample_rate: int, chunk_samples: int) -> Iterator[Tuple[int, np.ndarray]]:
    """(first sample, mono float32 samples at `sample_rate`) pieces of `chunk_samples` (the last one
    shorter), read from the file a block at a time. Samples are scaled as `ds2exp.data.audio.load_audio`
    scales them; resampling (soxr, streaming) and mixing down are announced with a warning."""
    import soundfile as sf

    from ds2exp.data.audio import AudioError, probe

    info = probe(path)
    if info.frames == 0:
        raise AudioError(path, "empty audio (0 samples)")
    if info.channels > 1:
        _warn(f"{path}: {info.channels} channels mixed down to mono")
    resampler = None
    if info.sample_rate != sample_rate:
        import soxr

        _warn(f"{path}: resampled from {info.sample_rate} Hz to {sample_rate} Hz")
        resampler = soxr.ResampleStream(info.sample_rate, sample_rate, 1, dtype="float32")
    block = max(1024, int(chunk_samples * info.sample_rate / sample_rate))
    pending: List[np.ndarray] = []
    held = 0
    emitted = 0
    decoded = 0
    try:
        fh = sf.SoundFile(path)
    except Exception as exc:  # libsndfile's errors for unreadable files
        raise AudioError(path, f"unreadable audio ({str(exc).strip()[:200]})") from exc
    with fh:
        int16 = fh.subtype == "PCM_16"
        while True:
            try:
                data = fh.read(block, dtype="int16" if int16 else "float32", always_2d=True)
            except Exception as exc:
                raise AudioError(path, f"corrupt or truncated audio ({str(exc).strip()[:200]})") from exc
            last = data.shape[0] < block
            decoded += data.shape[0]
            x = data.astype(np.float32) / 32767.0 if int16 else data
            x = x.mean(axis=1, dtype=np.float32) if x.shape[1] > 1 else x[:, 0]
            if resampler is not None:
                x = resampler.resample_chunk(np.ascontiguousarray(x, np.float32), last=last)
            if not np.all(np.isfinite(x)):
                raise AudioError(path, "audio contains NaN or Inf samples")
            if x.size:
                pending.append(x)
                held += x.size
            while held >= chunk_samples or (last and held):
                buf = np.concatenate(pending)
                piece, rest = buf[:chunk_samples], buf[chunk_samples:]
                pending, held = ([rest] if rest.size else []), rest.size
                yield emitted, piece
                emitted += piece.size
            if last:
                break
    if decoded < info.frames * 0.99:
        raise AudioError(path, f"truncated audio ({decoded} of {info.frames} samples decoded)")


# --------------------------------------------------------------------------------------------
# transcription
# --------------------------------------------------------------------------------------------
def transcribe_file(model, path: str, chunk_seconds: float, beam=None, progress: bool = False) -> dict:
    from ds2exp.data.features import compute_features
    from ds2exp.evaluation.decoding import greedy_decode_with_offsets

    settings = model.settings
    rate = settings.sample_rate
    chunk = int(chunk_seconds * rate)
    seconds_per_output_frame = 2 * settings.hop / rate  # conv1 halves time
    texts: List[str] = []
    times: List[float] = []
    samples = 0
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(desc=Path(path).name, unit="s", file=sys.stderr, disable=None, leave=False)
    for start, piece in audio_chunks(path, rate, chunk):
        samples = start + piece.size
        if bar is not None:
            bar.update(round(piece.size / rate, 2))
        if piece.size < settings.n_fft:
            continue
        log_probs = model(compute_features(piece, settings))
        if beam is not None:
            text, offsets = beam.decode(log_probs), []
        else:
            text, offsets = greedy_decode_with_offsets(log_probs)
        t0 = start / rate
        if texts and text and not texts[-1].endswith(" "):
            texts.append(" ")
            times.append(round(t0, 3))
        texts.append(text)
        times.extend(round(t0 + o * seconds_per_output_frame, 3) for o in offsets)
    if bar is not None:
        bar.close()
    transcript = " ".join("".join(texts).split())
    return {"file": path, "transcript": transcript, "duration": round(samples / rate, 3),
            "char_times": times if beam is None else None}


# --------------------------------------------------------------------------------------------
# command line
# --------------------------------------------------------------------------------------------
def check_config(cfg) -> None:
    """Values conf/transcribe.yaml's types cannot check; raises ConfigValueError naming the key."""
    from ds2exp.config import ConfigValueError

    if (cfg.checkpoint is None) == (cfg.exported is None):
        raise ConfigValueError("checkpoint" if cfg.checkpoint is None else "exported", None,
                               "one of checkpoint=<.ckpt or run directory> or exported=<.mindir from export.py>")
    if not cfg.audio:
        raise ConfigValueError("audio", list(cfg.audio), "a list of audio files, e.g. audio=[a.wav,b.flac]")
    c = cfg.chunk_seconds
    if not (math.isfinite(c) and MIN_CHUNK_SECONDS < c <= MAX_CHUNK_SECONDS):
        raise ConfigValueError("chunk_seconds", c, f"a number of seconds in ({MIN_CHUNK_SECONDS:g}, "
                                                   f"{MAX_CHUNK_SECONDS:g}]")
    if cfg.beam_width is not None and not 1 <= cfg.beam_width <= 100000:
        raise ConfigValueError("beam_width", cfg.beam_width, "an integer in [1, 100000]")
    if cfg.exported is not None:
        p = Path(str(cfg.exported)).expanduser()
        if not p.is_file():
            raise ConfigValueError("exported", cfg.exported, "an existing .mindir file written by export.py")


def print_help() -> None:
    from omegaconf import OmegaConf

    from ds2exp.config import config_dir

    print(OmegaConf.load(Path(config_dir()) / f"{CONFIG_NAME}.yaml").hydra.help.template)


def make_beam(cfg):
    from ds2exp.evaluation.decoding import BeamSearchDecoder

    d = cfg.decoder
    width = cfg.beam_width if cfg.beam_width is not None else d.beam_width
    return BeamSearchDecoder(beam_width=width, alpha=d.alpha, beta=d.beta, lm_path=d.lm_path,
                             unk_score_offset=d.unk_score_offset)


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("--help", "-h") for a in argv):
        print_help()
        return 0
    from omegaconf import OmegaConf

    from ds2exp.cli import preflight
    from ds2exp.config import enum_value

    cfg = preflight(argv, config_name=CONFIG_NAME, extra_check=check_config)  # bad values: one line, exit 2
    if any(a.split("=", 1)[0] in ("--cfg", "-c") for a in argv):
        print(OmegaConf.to_yaml(cfg))
        return 0
    from ds2exp.data.audio import AudioError
    from ds2exp.checkpoints.io import CheckpointError
    from ds2exp.runtime import setup_mindspore

    setup_mindspore(cfg.hardware, 0)
    try:
        model = ExportedModel(cfg.exported) if cfg.exported else CheckpointModel(cfg.checkpoint)
    except (CheckpointError, ValueError, RuntimeError, OSError) as exc:  # MindSpore: ValueError/RuntimeError
        from ds2exp.cli import config_error

        key = "exported" if cfg.exported else "checkpoint"
        config_error(f"{key}={cfg.exported or cfg.checkpoint}: {str(exc).strip().splitlines()[0][:300]}")
    beam = make_beam(cfg) if enum_value(cfg.decoder.name) == "beam" else None
    failed = 0
    for f in cfg.audio:
        try:
            res = transcribe_file(model, str(f), float(cfg.chunk_seconds), beam, progress=True)
        except AudioError as exc:
            print(f"error: {exc}", file=sys.stderr)
            failed += 1
            continue
        print(json.dumps(res) if cfg.json else f"{f}: {res['transcript']}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
