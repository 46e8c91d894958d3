"""Transcribe audio files with a checkpoint.

    python -m ds2exp.transcribe checkpoint=PATH audio=[a.wav,b.flac] [json=true] [chunk_seconds=20]
       [decoder=greedy|beam] [beam_width=50]

Prints `<file>: <transcript>` per file, or with json=true one JSON object per file with the
transcript and per-character start times in seconds. Long files are cut into chunks of
`chunk_seconds` (features are normalised per chunk, as the model saw per utterance in training).
Audio that is not 16 kHz mono is resampled / mixed down with a warning; an unreadable file is
reported by name and the others are still transcribed (exit status 1 if any failed).
"""
from __future__ import annotations

import json
import sys
from typing import List

import numpy as np

import ds2exp  # noqa: F401

ALLOWED = {"checkpoint", "audio", "json", "chunk_seconds", "decoder", "beam_width"}


def parse_args(argv: List[str]):
    cfg = {}
    for arg in argv:
        if "=" not in arg:
            raise SystemExit(f"config error: expected key=value, got {arg!r}; "
                             f"allowed keys: {', '.join(sorted(ALLOWED))}")
        key, value = arg.split("=", 1)
        cfg[key.strip()] = value.strip()
    unknown = set(cfg.keys()) - ALLOWED
    if unknown:
        raise SystemExit(f"config error: unknown key(s) {', '.join(sorted(unknown))}; allowed: "
                         f"{', '.join(sorted(ALLOWED))}")
    if not cfg.get("checkpoint"):
        raise SystemExit("config error: checkpoint=PATH is required")
    audio = cfg.get("audio")
    if not audio:
        raise SystemExit("config error: audio=[file1,file2] is required")
    files = [a.strip() for a in audio.strip("[]").split(",") if a.strip()]
    try:
        chunk = float(cfg.get("chunk_seconds", 20.0))
        beam_width = int(cfg.get("beam_width", 50))
    except ValueError as exc:
        raise SystemExit(f"config error: {exc}") from None
    if cfg.get("decoder", "greedy") not in ("greedy", "beam"):
        raise SystemExit("config error: decoder must be greedy or beam")
    if chunk <= 1:
        raise SystemExit("config error: chunk_seconds must be > 1")
    return (cfg["checkpoint"], files, cfg.get("json", "false").lower() in ("1", "true", "yes"), chunk,
            cfg.get("decoder", "greedy"), beam_width)


def transcribe_file(model, path: str, chunk_seconds: float, settings, beam=None) -> dict:
    import mindspore as ms

    from ds2exp.data.audio import load_audio
    from ds2exp.data.features import compute_features
    from ds2exp.evaluation.decoding import greedy_decode_with_offsets

    y = load_audio(path, settings.sample_rate)
    step = int(chunk_seconds * settings.sample_rate)
    seconds_per_output_frame = 2 * settings.hop / settings.sample_rate  # conv1 halves time
    texts, times = [], []
    for start in range(0, len(y), step):
        piece = y[start:start + step]
        if len(piece) < settings.n_fft:
            continue
        feats = compute_features(piece, settings)
        logits, lengths = model(ms.Tensor(feats[None]), ms.Tensor(np.array([feats.shape[1]], np.int32)))
        lp = logits.asnumpy()[0][: int(lengths.asnumpy()[0])]
        if beam is not None:
            text, offsets = beam.decode(lp), []
        else:
            text, offsets = greedy_decode_with_offsets(lp)
        t0 = start / settings.sample_rate
        if texts and text and not texts[-1].endswith(" "):
            texts.append(" ")
            times.append(round(t0, 3))
        texts.append(text)
        times.extend(round(t0 + o * seconds_per_output_frame, 3) for o in offsets)
    transcript = " ".join("".join(texts).split())
    return {"file": path, "transcript": transcript, "duration": round(len(y) / settings.sample_rate, 3),
            "char_times": times if beam is None else None}


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    ckpt, files, as_json, chunk, decoder, beam_width = parse_args(argv)
    from ds2exp.data.audio import AudioError
    from ds2exp.data.features import FeatureSettings
    from ds2exp.evaluation.compare import resolve_checkpoint
    from ds2exp.export_model import build_from_checkpoint
    from ds2exp.training.checkpoint import CheckpointError, load_checkpoint

    try:
        loaded = load_checkpoint(resolve_checkpoint(ckpt, announce=lambda line: print(line, file=sys.stderr)))
    except CheckpointError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if not loaded.meta.get("config"):
        print("error: this checkpoint carries no model config; evaluate it with evaluate.py model=...",
              file=sys.stderr)
        return 2
    feat_cfg = loaded.meta["config"]["dataset"]["feature"]
    settings = FeatureSettings(**{k: feat_cfg[k] for k in ("sample_rate", "window_size", "window_stride", "window",
                                                           "pad_mode", "normalize")})
    model = build_from_checkpoint(loaded, None)
    beam = None
    if decoder == "beam":
        from ds2exp.evaluation.decoding import BeamSearchDecoder

        beam = BeamSearchDecoder(beam_width=beam_width)
    failed = 0
    for f in files:
        try:
            res = transcribe_file(model, f, chunk, settings, beam)
        except AudioError as exc:
            print(f"error: {exc}", file=sys.stderr)
            failed += 1
            continue
        print(json.dumps(res) if as_json else f"{f}: {res['transcript']}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
