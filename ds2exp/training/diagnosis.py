"""Why did a step go non-finite? Evidence gathered from the step, the batch and the recent past.

Causes, checked in this order (the first that fits is reported):
  bad_input_features   the batch's features contain NaN/Inf
  infeasible_ctc       an utterance's transcript needs more CTC frames than the model outputs
                       (its loss is +inf whatever the weights)
  fp16_overflow        half precision overflowed: fp16 logits at/over 65504, or a finite loss with
                       non-finite gradients while loss scaling is active
  lr_or_exploding_gradients  otherwise: the weights or activations blew up (look at the grad-norm trend)
"""
from __future__ import annotations

import math
from typing import Any, Deque, Dict, List, Tuple

import numpy as np

from ds2exp.data.dataset import ctc_min_frames, output_frames

FP16_MAX = 65504.0


def classify(batch, result, precision_dtype: str, loss_scale: float) -> Tuple[str, str]:
    """(cause, one-sentence explanation)."""
    if not np.isfinite(batch.features).all():
        bad = [uid for uid, f in zip(batch.ids, batch.features) if not np.isfinite(f).all()]
        return "bad_input_features", f"non-finite feature values in {', '.join(bad)}"
    infeasible = []
    for uid, labels, n_lab, frames in zip(batch.ids, batch.labels, batch.label_lengths, batch.feature_lengths):
        if ctc_min_frames(list(labels[: int(n_lab)])) > output_frames(int(frames)):
            infeasible.append(uid)
    if infeasible:
        return "infeasible_ctc", (f"transcript longer than the model's output frames for {', '.join(infeasible)} "
                                  "(CTC loss is infinite)")
    peers = getattr(result, "peer_flags", None) or {}
    if peers.get("bad_features", 0) > 0:
        return "bad_input_features", "non-finite feature values on another data-parallel rank (see its worker log)"
    if peers.get("infeasible_batch", 0) > 0:
        return "infeasible_ctc", "a transcript longer than the model's output frames on another data-parallel rank"
    if precision_dtype == "fp16":
        if not math.isfinite(result.logits_absmax) or result.logits_absmax >= FP16_MAX:
            return "fp16_overflow", f"fp16 logits reached {result.logits_absmax:g} (fp16 max {FP16_MAX:g})"
        if math.isfinite(result.loss) and not math.isfinite(result.grad_norm) and loss_scale > 1:
            return "fp16_overflow", f"finite loss but non-finite fp16 gradients at loss scale {loss_scale:g}"
    return "lr_or_exploding_gradients", "loss/gradients blew up with finite inputs and feasible targets"


def diagnosis(step: int, lr: float, loss_scale: float, batch, result, recent: Deque, policy: str,
              consecutive: int, precision_dtype: str) -> Dict[str, Any]:
    cause, why = classify(batch, result, precision_dtype, loss_scale)
    trend: List[Dict[str, Any]] = [{"step": s, "loss": l, "grad_norm": g} for s, l, g in recent]
    norms = [g for _, _, g in recent if math.isfinite(g)]
    growth = (norms[-1] / norms[0]) if len(norms) >= 2 and norms[0] > 0 else None
    utts = [{"id": uid, "duration_s": round(float(d), 3), "transcript_chars": int(n), "input_frames": int(f),
             "output_frames": output_frames(int(f)), "loss": float(lo)}
            for uid, d, n, f, lo in zip(batch.ids, batch.durations, batch.label_lengths, batch.feature_lengths,
                                        result.losses)]
    summary = (f"non-finite training at step {step} ({consecutive} in a row, policy {policy}): {cause} - {why}; "
               f"lr {lr:.3g}, loss scale {loss_scale:g}, first non-finite layer group: "
               f"{result.first_bad_group or 'none (loss only)'}")
    if growth is not None:
        summary += f"; grad norm x{growth:.3g} over the last {len(norms)} good steps"
    return {"summary": summary, "step": step, "cause": cause, "explanation": why, "lr": lr,
            "loss_scale": loss_scale, "first_nonfinite_group": result.first_bad_group,
            "group_grad_norms": result.group_norms, "logits_absmax": result.logits_absmax,
            "grad_norm_trend": trend, "grad_norm_growth": growth, "batch": utts}


def format_text(d: Dict[str, Any]) -> str:
    lines = [d["summary"], "", f"cause: {d['cause']}", f"explanation: {d['explanation']}",
             f"learning rate: {d['lr']:.6g}", f"loss scale: {d['loss_scale']:g}",
             f"first non-finite layer group: {d['first_nonfinite_group']}",
             f"logits |max|: {d['logits_absmax']:g}", "", "grad-norm trend (step, loss, grad_norm):"]
    lines += [f"  {t['step']:>7}  {t['loss']:>12.4g}  {t['grad_norm']:>12.4g}" for t in d["grad_norm_trend"]]
    lines += ["", "batch (id, duration s, transcript chars, input frames, output frames, loss):"]
    lines += [f"  {u['id']}  {u['duration_s']}  {u['transcript_chars']}  {u['input_frames']}  {u['output_frames']}"
              f"  {u['loss']:g}" for u in d["batch"]]
    return "\n".join(lines) + "\n"
