"""Evaluate one or more checkpoints on the same data and compare them side by side."""
from __future__ import annotations

import csv
import json
import logging
import time
from pathlib import Path
from typing import Dict, List


from ds2exp.evaluation.scores import CheckpointScore
from ds2exp.checkpoints.io import CheckpointError
from ds2exp.checkpoints.loading import load_model, resolve_checkpoint
from ds2exp.config import enum_value

log = logging.getLogger("ds2exp.evaluate")



def build_eval_loader(cfg, split: str):
    from ds2exp.data.dataset import (BatchLoader, BucketBatchSampler, DatasetError, load_split,
                                     resolve_manifests)
    from ds2exp.data.features import FeatureCache, FeatureSettings

    d = cfg.dataset
    settings = FeatureSettings.from_config(d.feature)
    cache = FeatureCache(cfg.paths.cache_dir, settings, enabled=d.feature.cache,
                         max_gb=d.feature.cache_max_gb)
    manifests = resolve_manifests(cfg, progress=cfg.progress)
    if not manifests.get(split):
        raise DatasetError(f"dataset {d.name!r} has no {split!r} split configured")
    data = load_split(split, manifests[split], cfg, settings)
    if not data.examples:
        raise DatasetError(f"the {split} split of {d.name!r} is empty after filtering (dropped: {data.drop_counts()})")
    sampler = BucketBatchSampler(data.examples, d.batch_size, d.num_buckets, seed=0)
    return BatchLoader(data, sampler, cache, d.num_workers)


def make_decoder(dec_cfg):
    if enum_value(dec_cfg.name) == "greedy":
        return None
    from ds2exp.evaluation.decoding import BeamSearchDecoder

    beam = BeamSearchDecoder(beam_width=dec_cfg.beam_width, alpha=dec_cfg.alpha, beta=dec_cfg.beta,
                             lm_path=dec_cfg.lm_path, unk_score_offset=dec_cfg.unk_score_offset)
    return lambda log_probs, lengths: [beam.decode(lp, int(n)) for lp, n in zip(log_probs, lengths)]


def score_checkpoint(path: Path, cfg, loader) -> CheckpointScore:
    from ds2exp.training.eval_pass import evaluate_model
    from ds2exp.models.deepspeech2 import count_parameters

    model, loaded, _ = load_model(path, cfg.model)
    res = evaluate_model(model, loader, enum_value(cfg.metric), cfg.max_utterances, make_decoder(cfg.decoder),
                         progress=bool(cfg.progress), desc=f"evaluate {path.name} ({enum_value(cfg.decoder.name)})",
                         leave=True)
    m = loaded.meta
    return CheckpointScore(path.stem if path.parent.name != "checkpoints" else f"{path.parent.parent.name}/{path.stem}",
                           str(path), res.wer, res.cer, count_parameters(model), m.get("step"), m.get("val_loss"),
                           res.decode_seconds_per_utt, res.num_utterances, res.records, m.get("mlflow_run_id"))


def format_table(scores: List[CheckpointScore]) -> str:
    head = ["checkpoint", "WER %", "CER %", "params", "step", "val loss", "decode ms/utt", "utts"]
    rows = [[s.name, f"{s.wer:.2f}", f"{s.cer:.2f}", f"{s.parameters:,}", str(s.step if s.step is not None else "-"),
             f"{s.val_loss:.3f}" if s.val_loss is not None else "-", f"{1000 * s.decode_s_per_utt:.2f}",
             str(s.utterances)] for s in scores]
    widths = [max(len(r[i]) for r in [head] + rows) for i in range(len(head))]
    line = lambda r: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))  # noqa: E731
    return "\n".join([line(head), "  ".join("-" * w for w in widths)] + [line(r) for r in rows])


def write_records(score: CheckpointScore, out_dir: Path) -> Dict[str, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = score.name.replace("/", "__")
    jl = out_dir / f"{stem}.utterances.jsonl"
    jl.write_text("".join(json.dumps(r) + "\n" for r in score.records))
    cp = out_dir / f"{stem}.utterances.csv"
    with cp.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=["id", "reference", "hypothesis", "word_errors", "ref_words",
                                           "char_errors", "ref_chars"])
        w.writeheader()
        w.writerows(score.records)
    return {"jsonl": jl, "csv": cp}


def bar_chart(scores: List[CheckpointScore], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    x = np.arange(len(scores))
    fig, ax = plt.subplots(figsize=(max(4, 1.6 * len(scores)), 3.4))
    ax.bar(x - 0.2, [s.wer for s in scores], 0.4, label="WER")
    ax.bar(x + 0.2, [s.cer for s in scores], 0.4, label="CER")
    ax.set_xticks(x, [s.name for s in scores], rotation=20, ha="right", fontsize=8)
    ax.set_ylabel("%")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def run_evaluation(cfg, out_dir: Path) -> List[CheckpointScore]:
    from ds2exp.tracking import make_tracker

    refs = list(cfg.checkpoints) or ([cfg.checkpoint] if cfg.checkpoint else [])
    if not refs:
        raise CheckpointError("give checkpoint=PATH or checkpoints='[a,b]'")
    uri = cfg.logger.tracking_uri if enum_value(cfg.logger.backend) == "mlflow" else None
    paths = [resolve_checkpoint(r, uri, announce=log.info) for r in refs]
    zoo = enum_value(cfg.get("compat", "none")) == "zoo"  # the model zoo's eval.py: zoo_compat.py
    if zoo:
        from ds2exp.evaluation.zoo_compat import score_checkpoint_zoo, split_utterances

        utts = split_utterances(cfg, cfg.split)
    else:
        loader = build_eval_loader(cfg, cfg.split)
    scores = []
    for p in paths:
        t0 = time.time()
        s = score_checkpoint_zoo(p, cfg, utts) if zoo else score_checkpoint(p, cfg, loader)
        log.info("%s: WER %.2f CER %.2f (%.1f s)", s.name, s.wer, s.cer, time.time() - t0)
        scores.append(s)
    table = format_table(scores)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "comparison.txt").write_text(table + "\n")
    files = [write_records(s, out_dir) for s in scores]
    chart = bar_chart(scores, out_dir / "comparison.png")
    tags = {"ds2exp.kind": "evaluation", "ds2exp.split": cfg.split, "ds2exp.dataset": cfg.dataset.name,
            "ds2exp.decoder": enum_value(cfg.decoder.name), "ds2exp.compat": "zoo" if zoo else "none"}
    if len(scores) == 1 and scores[0].training_run_id:
        tags["ds2exp.training_run_id"] = scores[0].training_run_id
    tracker = make_tracker(cfg.logger, run_name=f"eval-{cfg.dataset.name}-{cfg.split}", tags=tags)
    for i, s in enumerate(scores):
        prefix = "eval" if len(scores) == 1 else f"eval/{i}"
        tracker.log_metrics({f"{prefix}/wer": s.wer, f"{prefix}/cer": s.cer}, step=s.step or 0)
        for f in files[i].values():
            tracker.log_artifact(f, "utterances")
    tracker.log_params({"checkpoints": json.dumps([s.path for s in scores]), "metric": enum_value(cfg.metric),
                        "decoder": enum_value(cfg.decoder.name)})
    tracker.log_text(table + "\n", "comparison.txt")
    tracker.log_artifact(chart, "plots")
    tracker.end()
    return scores
