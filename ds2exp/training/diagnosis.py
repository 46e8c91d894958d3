"""Why did a step go wrong? Evidence gathered from the step, the batch and the recent past.

A finite step that the explosion detector flagged (ds2exp.training.divergence) is reported as
  loss_explosion       loss or grad norm far above the recent median, or over trainer.divergence.max_loss

For a non-finite step the causes are checked in this order (the first that fits is reported):
  bad_input_features   the batch's features contain NaN/Inf
  infeasible_ctc       an utterance's transcript needs more CTC frames than the model outputs
                       (its loss is +inf whatever the weights)
  fp16_overflow        half precision overflowed: fp16 logits at/over 65504, or a finite loss with
                       non-finite gradients while loss scaling is active
  lr_or_exploding_gradients  otherwise: the weights or activations blew up (look at the grad-norm trend)
"""
from __future__ import annotations

import math
from typing import Any, Deque, Dict, List, Optional, Tuple

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
              consecutive: int, precision_dtype: str, first_bad_step: Optional[int] = None) -> Dict[str, Any]:
    """The evidence for anomalous step `step`: `first_bad_step` is the run's first anomalous step; the
    trainer adds `diverged_at_step` when its policy stops or rolls back here."""
    explosion = getattr(result, "explosion", None)
    if explosion is not None:
        cause, why = "loss_explosion", explosion["why"]
    else:
        cause, why = classify(batch, result, precision_dtype, loss_scale)
    trend: List[Dict[str, Any]] = [{"step": s, "loss": l, "grad_norm": g} for s, l, g in recent]
    norms = [g for _, _, g in recent if math.isfinite(g)]
    growth = (norms[-1] / norms[0]) if len(norms) >= 2 and norms[0] > 0 else None
    utts = [{"id": uid, "duration_s": round(float(d), 3), "transcript_chars": int(n), "input_frames": int(f),
             "output_frames": output_frames(int(f)), "loss": float(lo)}
            for uid, d, n, f, lo in zip(batch.ids, batch.durations, batch.label_lengths, batch.feature_lengths,
                                        result.losses)]
    kind = "exploded" if explosion is not None else "non-finite"
    summary = f"{kind} training at step {step} ({consecutive} in a row, policy {policy}): {cause} - {why}; lr {lr:.3g}"
    if explosion is None:
        summary += (f", loss scale {loss_scale:g}, first non-finite layer group: "
                    f"{result.first_bad_group or 'none (loss only)'}")
    if growth is not None:
        summary += f"; grad norm x{growth:.3g} over the last {len(norms)} good steps"
    if first_bad_step is not None and first_bad_step != step:
        summary += f"; first anomalous step {first_bad_step}"
    return {"summary": summary, "step": step, "first_bad_step": first_bad_step if first_bad_step is not None else step,
            "cause": cause, "explanation": why, "lr": lr, "loss": result.loss, "grad_norm": result.grad_norm,
            "explosion": explosion, "loss_scale": loss_scale, "first_nonfinite_group": result.first_bad_group,
            "group_grad_norms": result.group_norms, "logits_absmax": result.logits_absmax,
            "grad_norm_trend": trend, "grad_norm_growth": growth, "batch": utts}


def format_text(d: Dict[str, Any]) -> str:
    lines = [d["summary"], "", f"cause: {d['cause']}", f"explanation: {d['explanation']}",
             f"first anomalous step: {d.get('first_bad_step', d['step'])}",
             f"diverged at step: {d.get('diverged_at_step', 'not stopped (the step was skipped)')}",
             f"step loss: {d.get('loss', float('nan')):.6g}   grad norm: {d.get('grad_norm', float('nan')):.6g}",
             f"learning rate: {d['lr']:.6g}", f"loss scale: {d['loss_scale']:g}",
             f"first non-finite layer group: {d['first_nonfinite_group']}",
             f"logits |max|: {d['logits_absmax']:g}"]
    e = d.get("explosion")
    if e:
        fmt = lambda v: "n/a" if v is None else f"{v:.6g}"  # noqa: E731
        lines += [f"explosion signal: {e['signal']}  (median loss {fmt(e['median_loss'])}, median grad norm "
                  f"{fmt(e['median_grad_norm'])} over {e['window_steps']} good steps; factor {e['factor']:g}, "
                  f"max_loss {e['max_loss']:g})"]
    lines += ["", "grad-norm trend (step, loss, grad_norm):"]
    lines += [f"  {t['step']:>7}  {t['loss']:>12.4g}  {t['grad_norm']:>12.4g}" for t in d["grad_norm_trend"]]
    lines += ["", "batch (id, duration s, transcript chars, input frames, output frames, loss):"]
    lines += [f"  {u['id']}  {u['duration_s']}  {u['transcript_chars']}  {u['input_frames']}  {u['output_frames']}"
              f"  {u['loss']:g}" + (f"  audit: {', '.join(u['hazards'])}" if u.get("hazards") else "")
              for u in d["batch"]]
    return "\n".join(lines) + "\n"
