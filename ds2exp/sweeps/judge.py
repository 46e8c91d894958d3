"""Did a job diverge, and what does the sweep say: the stability boundary and the recommended setting.

A job is diverged when the run says so (tag `ds2exp.status=diverged`, `diverged_at_step`, summary.json
`status`: non-finite steps or a loss explosion stopped it). Runs that do not say so (runs with
`trainer.divergence.enabled=false`, runs under `trainer.nonfinite=skip` whose loss stayed up) are judged
from how their logged train loss ENDED, so that a spike the run recovered from is no divergence. With
`end` the median of the last 5 logged losses and `best` the lowest median of 5 consecutive logged losses,
the first rule that fires:

1. the last logged loss is not finite;
2. `end` above `LOSS_CEILING` (1e5): a model that outputs the uniform distribution over the 29
   symbols scores ~3.4 per output frame, ~2,800 on the longest utterance `dataset.max_duration`
   (16.7 s) lets in, so 1e5 is far past anything a training model reaches;
3. `end` more than `EXPLOSION_FACTOR` (10) x `best` (the loss climbed back up and stayed; medians of 5,
   so one long or short batch does not decide);
4. `best` more than 10x the smallest first logged loss of the jobs with the same batch size (the job
   exploded before its first logged point and never came down; jobs of one sweep start from the same
   weights and batches).

The step named (`exploded@N`) is where the final stretch of losses over the rule's threshold began.
"""
from __future__ import annotations

import math
from collections import OrderedDict
from typing import Callable, Dict, List, Optional, Tuple

from ds2exp.sweeps.jobs import COLS, ROWS, Job, Sweep, _finite, _num, axis_sort

EXPLOSION_FACTOR = 10.0
LOSS_CEILING = 1e5
CER_UNTRAINED = 95.0  # best validation CER at or above this: the recommendation adds a note
TAIL = 5


def _points(job: Job) -> List[Tuple[int, float]]:
    """(step, loss) as logged; summary.json's last-step loss when nothing was logged."""
    if job.losses:
        return sorted(job.losses)
    return [(0, job.final_loss)] if job.final_loss is not None else []


def _median(xs: List[float]) -> float:
    ys = sorted(xs)
    n = len(ys)
    return ys[n // 2] if n % 2 else 0.5 * (ys[n // 2 - 1] + ys[n // 2])


def _onset(steps: List[int], values: List[float], bad: Callable[[float], bool]) -> int:
    i = len(values) - 1
    while i > 0 and bad(values[i - 1]):
        i -= 1
    return steps[i]


def explosion(job: Job, reference: Optional[float] = None) -> Optional[Tuple[int, float, str]]:
    """(step, loss, rule) when the job's losses ended diverged, else None."""
    pts = _points(job)
    if not pts:
        return None
    steps, values = [s for s, _ in pts], [v for _, v in pts]
    if not math.isfinite(values[-1]):
        return _onset(steps, values, lambda v: not math.isfinite(v)), values[-1], "the last logged loss is not finite"
    fin = [(s, v) for s, v in pts if math.isfinite(v)]
    steps, values = [s for s, _ in fin], [v for _, v in fin]
    medians = [_median(values[max(0, i - TAIL + 1):i + 1]) for i in range(len(values))]
    end, best = medians[-1], min(medians)
    if end > LOSS_CEILING:
        limit, rule = LOSS_CEILING, f"its losses ended at {end:.3g} (median of the last {TAIL}) > {LOSS_CEILING:g}"
    elif best > 0 and end > EXPLOSION_FACTOR * best:
        limit, rule = EXPLOSION_FACTOR * best, (f"its losses ended at {end:.3g} (median of the last {TAIL}), "
                                                f"> {EXPLOSION_FACTOR:g}x its best {best:.3g}")
    elif reference is not None and reference > 0 and best > EXPLOSION_FACTOR * reference:
        return steps[0], end, (f"its losses never came below {best:.3g}, > {EXPLOSION_FACTOR:g}x the first loss "
                               f"of the same batch size's other jobs ({reference:.3g})")
    else:
        return None
    return _onset(steps, values, lambda v: v > limit), end, rule


def judge(sweep: Sweep) -> None:
    """Mark finished jobs whose losses show a divergence as diverged (judged_by="losses")."""
    firsts: Dict[str, List[Tuple[str, float]]] = {}
    for j in sweep.jobs:
        pts = [(s, v) for s, v in _points(j) if v is not None and math.isfinite(v)]
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
        j.cause = f"loss_explosion, judged from the logged losses: {rule}; from step {step}"


def stable(j: Job) -> bool:
    return j.status == "finished"


def boundaries(jobs: List[Job]) -> "OrderedDict[str, Dict[str, object]]":
    """Per batch size: the largest lr that trained without divergence, the smallest that diverged, and the
    stable lrs above a diverged one (a boundary that is not a single step)."""
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
    return lines + [recommendation_line(jobs)]


def recommendation_line(jobs: List[Job], title: str = "Recommended") -> str:
    best = recommend(jobs)
    n_ok = sum(stable(j) for j in jobs)
    if best is None:
        return f"{title}: none (no job trained without diverging)"
    tied = [j for j in jobs if stable(j) and j.best_cer is not None and best.best_cer is not None
            and abs(j.best_cer - best.best_cer) < 1e-9]
    if best.best_cer is None:
        why = "lowest final train loss (no validation CER logged)"
    elif len(tied) > 1:
        why = (f"best validation CER {best.best_cer:.2f}%, shared by {len(tied)}: the lowest final train loss "
               f"{_finite(best.final_loss) or float('nan'):.4g} decides")
    else:
        why = f"best validation CER {best.best_cer:.2f}%"
    line = (f"{title}: {_setting(best)}  (among {n_ok} stable job{'s' if n_ok != 1 else ''}: {why}; job {best.name}"
            + (f" '{best.label}'" if best.label else "") + (f", MLflow run {best.run_id}" if best.run_id else "") + ")")
    if best.best_cer is not None and best.best_cer >= CER_UNTRAINED:
        by_loss = min((j for j in jobs if stable(j) and _finite(j.final_loss) is not None),
                      key=lambda j: j.final_loss, default=None)
        line += (f"\n  note: no stable job got below {CER_UNTRAINED:g}% validation CER: too few steps for the CER to "
                 f"tell them apart" + (f"; the lowest final train loss ({by_loss.final_loss:.4g}) was at "
                                       f"{_setting(by_loss)}" if by_loss is not None else ""))
    return line


def _setting(j: Job) -> str:
    extra = "".join(f" {k}={v}" for k, v in j.extra.items())
    return f"{ROWS}={_lr(_num(j.params[ROWS]))} {COLS}={j.params[COLS]}{extra}"
