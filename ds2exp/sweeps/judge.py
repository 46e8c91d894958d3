"""Did a job diverge, and what does the sweep say: the stability boundary and the recommended setting.

A job is diverged when the run says so (tag `ds2exp.status=diverged`, `diverged_at_step`, summary.json
`status`/`stop_reason`: non-finite steps or a loss explosion stopped it). Runs that do not say so (sweeps
made before the trainer detected finite explosions, runs under `trainer.nonfinite=skip` whose loss
stayed up) are judged from their logged train losses; the first rule that fires names the step:

1. a non-finite logged loss;
2. a loss more than `EXPLOSION_FACTOR` (10) times the lowest loss the job logged before it (a loss
   that climbed back up; healthy CTC runs on the synthetic and LibriSpeech data move by less than 3x
   between logged points, sortagrad's lengthening batches included);
3. every loss the job logged more than `EXPLOSION_FACTOR` times the smallest first logged loss of the
   jobs with the same batch size (the job exploded before its first logged point; jobs of one sweep
   start from the same weights and batches);
4. a loss above `LOSS_CEILING` (1e5): a model that outputs the uniform distribution over the 29
   symbols scores ~3.4 per output frame, ~2,800 on the longest utterance `dataset.max_duration`
   (16.7 s) lets in, so 1e5 is far past anything a training model reaches.
"""
from __future__ import annotations

import math
from collections import OrderedDict
from typing import Dict, List, Optional, Tuple

from ds2exp.sweeps.jobs import COLS, ROWS, Job, Sweep, _finite, _num

EXPLOSION_FACTOR = 10.0
LOSS_CEILING = 1e5


def _points(job: Job) -> List[Tuple[int, float]]:
    pts = dict(job.losses)
    for step, v in job.loss_maxima:  # the window's largest batch loss counts as a logged loss
        if step not in pts or not math.isfinite(v) or v > pts[step]:
            pts[step] = v
    out = sorted(pts.items())
    if job.final_loss is not None and (not out or not math.isfinite(job.final_loss) or job.final_loss > out[-1][1]):
        last = out[-1][0] if out else 0
        out.append((last if out else 0, job.final_loss))  # summary.json's last step loss
    return out


def explosion(job: Job, reference: Optional[float] = None) -> Optional[Tuple[int, float, str]]:
    """(step, loss, rule) of the first sign of divergence in the job's logged losses, else None."""
    pts = _points(job)
    lowest = math.inf
    for step, v in pts:
        if not math.isfinite(v):
            return step, v, "non-finite train loss"
        if v > LOSS_CEILING:
            return step, v, f"train loss {v:.3g} > {LOSS_CEILING:g}"
        if math.isfinite(lowest) and lowest > 0 and v > EXPLOSION_FACTOR * lowest:
            return step, v, f"train loss {v:.3g} > {EXPLOSION_FACTOR:g}x the lowest before it ({lowest:.3g})"
        lowest = min(lowest, v)
    if reference is not None and reference > 0 and pts and all(v > EXPLOSION_FACTOR * reference for _, v in pts):
        step, v = pts[0]
        return step, v, (f"every train loss > {EXPLOSION_FACTOR:g}x the first loss of the same batch size's other "
                         f"jobs ({reference:.3g})")
    return None


def judge(sweep: Sweep) -> None:
    """Mark finished jobs whose losses show a divergence as diverged (judged_by="losses")."""
    firsts: Dict[str, List[Tuple[str, float]]] = {}
    for j in sweep.jobs:
        pts = [(s, v) for s, v in _points(j) if math.isfinite(v)]
        if pts:
            firsts.setdefault(j.params.get(COLS, "?"), []).append((j.name, pts[0][1]))
    for j in sweep.jobs:
        if j.status != "finished":
            continue
        others = [v for name, v in firsts.get(j.params.get(COLS, "?"), []) if name != j.name]
        found = explosion(j, min(others) if others else None)
        if found is None:
            continue
        step, value, rule = found
        j.status, j.judged_by = "diverged", "losses"
        if j.first_bad_step is None:
            j.first_bad_step = step
        j.cause = f"loss_explosion, judged from the logged losses: {rule} at step {step}"


def stable(j: Job) -> bool:
    return j.status == "finished"


def boundaries(jobs: List[Job]) -> "OrderedDict[str, Dict[str, object]]":
    """Per batch size: the largest lr that trained without divergence, the smallest that diverged, and the
    stable lrs above a diverged one (a boundary that is not a single step)."""
    from ds2exp.sweeps.render import axis_sort

    out: "OrderedDict[str, Dict[str, object]]" = OrderedDict()
    for bs in axis_sort([j.params[COLS] for j in jobs]):
        at = [j for j in jobs if j.params[COLS] == bs]
        ok = sorted({_num(j.params[ROWS]) for j in at if stable(j)} - {None})
        bad = sorted({_num(j.params[ROWS]) for j in at if j.status == "diverged"} - {None})
        out[bs] = {"largest_stable": ok[-1] if ok else None, "smallest_diverged": bad[0] if bad else None,
                   "stable_above_diverged": [x for x in ok if bad and x > bad[0]],
                   "tried": sorted({_num(j.params[ROWS]) for j in at} - {None})}
    return out


def recommend(jobs: List[Job]) -> Optional[Job]:
    """The stable job with the best validation CER (ties and jobs without a CER: lower final loss)."""
    ok = [j for j in jobs if stable(j)]
    if not ok:
        return None
    return min(ok, key=lambda j: (j.best_cer is None, j.best_cer if j.best_cer is not None else 0.0,
                                  _finite(j.final_loss) if _finite(j.final_loss) is not None else math.inf))


def _lr(x: Optional[float]) -> str:
    return "-" if x is None else f"{x:g}"


def verdict_lines(jobs: List[Job]) -> List[str]:
    lines = [f"Stability boundary per {COLS} (diverged: non-finite steps, a loss explosion, or stopped by "
             f"the divergence policy):"]
    for bs, b in boundaries(jobs).items():
        ok, bad = b["largest_stable"], b["smallest_diverged"]
        if ok is None and bad is None:
            text = "no job finished or diverged (crashed or still running)"
        elif bad is None:
            text = f"no lr diverged; largest stable lr {_lr(ok)} (the boundary is above it)"
        elif ok is None:
            text = f"every lr diverged, the smallest tried ({_lr(bad)}) too (the boundary is below it)"
        else:
            text = f"largest stable lr {_lr(ok)}, smallest diverged lr {_lr(bad)}"
            if b["stable_above_diverged"]:
                text += (f" (lr {', '.join(_lr(x) for x in b['stable_above_diverged'])} trained although "
                         f"{_lr(bad)} diverged: the boundary is not sharp; rerun with other seeds)")
            else:
                text += f" -> boundary between {_lr(ok)} and {_lr(bad)}"
        lines.append(f"  {COLS}={bs}: {text}")
    best = recommend(jobs)
    n_ok = sum(stable(j) for j in jobs)
    if best is None:
        lines.append("Recommended: none (no job trained without diverging)")
    else:
        why = (f"best validation CER {best.best_cer:.2f}%" if best.best_cer is not None
               else "lowest final train loss (no validation CER logged)")
        lines.append(f"Recommended: {ROWS}={_lr(_num(best.params[ROWS]))} {COLS}={best.params[COLS]}"
                     + "".join(f" {k}={v}" for k, v in best.extra.items())
                     + f"  ({why} among {n_ok} stable job{'s' if n_ok != 1 else ''}; job {best.name}"
                     + (f" '{best.label}'" if best.label else "")
                     + (f", MLflow run {best.run_id}" if best.run_id else "") + ")")
    return lines
