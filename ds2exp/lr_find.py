"""Learning-rate range test: how large may the learning rate be for this model and data?

    python -m ds2exp.lr_find                                   # ds2_tiny on synth_tiny, 100 steps
    python -m ds2exp.lr_find trainer.max_steps=200 model=ds2_small dataset.batch_size=8
    python -m ds2exp.lr_find lr_find.min_lr=1e-6 lr_find.max_lr=1 optimizer=sgd

One short run (any train.py override applies) whose learning rate rises exponentially from
`lr_find.min_lr` to `lr_find.max_lr` over `trainer.max_steps` steps. Each step is the trainer's own
`Trainer.train_step` (forward, CTC loss, gradients, the finiteness checks, clipping, the optimizer).
The run stops at the explosion: a non-finite or skipped step, or a smoothed loss (exponential moving
average, `lr_find.smoothing`) above `lr_find.explode_factor` x the best smoothed loss so far.

The suggested maximum learning rate is the lr of the lowest loss divided by 10 (the rule of Smith's
range test as fastai applies it). The loss is smoothed for this by a centred running mean of the
log loss, which has no lag (the moving average used to stop the run trails the curve by ~1/(1-beta)
steps, which would move the minimum to a larger lr). Why not the steepest descent: CTC batch losses
vary with utterance length by several times from batch to batch, and the slope of a smoothed noisy
curve over ~100 points is itself noisy; the minimum is a robust feature, and one decade below it the
loss is still falling. The steepest-descent lr and the explosion lr are printed too.

Written to the run directory (outputs/lr_find/<date>/<time>): `lr_find.png` (loss against lr),
`lr_find.json` (every step and the results); logged to MLflow (run tagged `ds2exp.kind=lr_find`,
metrics `lr_find/*`, the plot under `plots/`, tag `lr_find.suggested_lr`).
"""
from __future__ import annotations

import json
import logging
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from ds2exp.config import TrainConfig, config_dir

log = logging.getLogger("ds2exp.lr_find")


@dataclass
class LrRangeConfig:
    min_lr: float = 1e-5
    max_lr: float = 10.0
    explode_factor: float = 4.0  # stop when the smoothed loss is over this x its best so far
    smoothing: float = 0.9  # beta of the moving average the stop rule watches
    window: int = 9  # points of the centred running mean the suggestion is read from


@dataclass
class LrFindConfig(TrainConfig):
    lr_find: LrRangeConfig = field(default_factory=LrRangeConfig)


ConfigStore.instance().store(name="lr_find_schema", node=LrFindConfig)


def check(cfg: DictConfig) -> None:
    """lr_find's own range checks (the preflight also runs the train config's); ConfigValueError names the key."""
    from ds2exp.config import ConfigValueError

    r = cfg.lr_find
    for key, ok, allowed in (
            ("lr_find.min_lr", math.isfinite(r.min_lr) and r.min_lr > 0, "a finite number > 0"),
            ("lr_find.max_lr", math.isfinite(r.max_lr) and r.max_lr > r.min_lr,
             f"a finite number > lr_find.min_lr ({r.min_lr})"),
            ("lr_find.explode_factor", math.isfinite(r.explode_factor) and r.explode_factor > 1, "a number > 1"),
            ("lr_find.smoothing", 0 <= r.smoothing < 1, "a number in [0, 1)"),
            ("lr_find.window", r.window >= 1, "an integer >= 1"),
            ("trainer.max_steps", cfg.trainer.max_steps >= 5, "an integer >= 5 (the steps of the range test)")):
        if not ok:
            raise ConfigValueError(key, OmegaConf.select(cfg, key), allowed)


# ---------------------------------------------------------------------------------------------- analysis

def centred_mean_log(losses: List[float], window: int) -> List[float]:
    """exp of the running mean of log(loss) over `window` points centred on each point (shorter at the ends)."""
    logs = [math.log(max(v, 1e-30)) for v in losses]
    half = max(0, window // 2)
    out = []
    for i in range(len(logs)):
        part = logs[max(0, i - half):i + half + 1]
        out.append(math.exp(sum(part) / len(part)))
    return out


def analyse(lrs: List[float], losses: List[float], window: int, explosion: Optional[Dict[str, Any]]) -> Dict[str, Any]:
    """Suggested maximum lr (lr at the lowest centred-smoothed loss / 10), with the steepest-descent lr
    and the explosion lr for comparison."""
    good = [(lr, v) for lr, v in zip(lrs, losses) if math.isfinite(v)]
    if explosion is not None:  # the curve up to the explosion
        good = [(lr, v) for lr, v in good if lr < explosion["lr"]] or good[:1]
    if len(good) < 3:
        return {"suggested_lr": None, "rule": "too few steps before the explosion: lower lr_find.min_lr"}
    xs, ys = [lr for lr, _ in good], [v for _, v in good]
    smooth = centred_mean_log(ys, window)
    i_min = min(range(len(smooth)), key=smooth.__getitem__)
    slopes = [(math.log(smooth[i + 1]) - math.log(smooth[i - 1])) / (math.log(xs[i + 1]) - math.log(xs[i - 1]))
              for i in range(1, len(smooth) - 1)]
    i_steep = 1 + min(range(len(slopes)), key=slopes.__getitem__) if slopes else i_min
    out = {"suggested_lr": xs[i_min] / 10, "rule": "lr of the lowest smoothed loss / 10",
           "min_loss_lr": xs[i_min], "min_smoothed_loss": smooth[i_min], "steepest_lr": xs[i_steep],
           "smoothed": smooth, "curve_lrs": xs}
    if explosion is not None:
        out["explosion_lr"] = explosion["lr"]
        out["explosion_lr_div10"] = explosion["lr"] / 10
    return out


def plot(lrs: List[float], losses: List[float], result: Dict[str, Any], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    fin = [(lr, v) for lr, v in zip(lrs, losses) if math.isfinite(v) and v > 0]
    ax.plot([a for a, _ in fin], [b for _, b in fin], ".", ms=4, alpha=0.5, label="batch loss")
    if result.get("smoothed"):
        ax.plot(result["curve_lrs"], result["smoothed"], "-", lw=2, label="smoothed (centred mean of log loss)")
    marks = [("suggested_lr", "suggested max lr", "g"), ("min_loss_lr", "lowest smoothed loss", "k"),
             ("steepest_lr", "steepest descent", "b"), ("explosion_lr", "explosion (stop)", "r")]
    for key, label, color in marks:
        if result.get(key):
            ax.axvline(result[key], color=color, ls="--", lw=1, label=f"{label}: {result[key]:.3g}")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set(xlabel="learning rate (log)", ylabel="train CTC loss (log)", title="learning-rate range test")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------------------------- the run

def run_range_test(cfg: DictConfig, run_dir: Path) -> Dict[str, Any]:
    from tqdm import tqdm

    from ds2exp.tracking import make_tracker
    from ds2exp.tracking.mlflow_tracker import flatten
    from ds2exp.training.optim import build_optimizer, range_test_lr, set_learning_rate
    from ds2exp.data.loaders import build_data
    from ds2exp.models.deepspeech2 import build_model_for_precision
    from ds2exp.runtime import setup_mindspore
    from ds2exp.training.trainer import Trainer

    r, total = cfg.lr_find, int(cfg.trainer.max_steps)
    run_dir.mkdir(parents=True, exist_ok=True)
    setup_mindspore(cfg.hardware, cfg.trainer.seed)
    data = build_data(cfg, run_dir)
    model = build_model_for_precision(cfg)
    optimizer = build_optimizer(model.trainable_params(), cfg.optimizer)
    tracker = make_tracker(cfg.logger, run_name=cfg.logger.run_name or f"lr_find {run_dir.name}",
                           tags={"ds2exp.kind": "lr_find", "ds2exp.run_dir": str(run_dir)}, spool_dir=run_dir)
    status = "FAILED"
    try:
        tracker.log_params({**flatten(OmegaConf.to_container(cfg, resolve=True, enum_to_str=True))})
        loader = data["train"]
        trainer = Trainer(cfg, model, optimizer, loader, None, tracker, run_dir, len(loader.sampler))
        model.set_train(True)
        lrs: List[float] = []
        losses: List[float] = []
        best, avg, explosion = math.inf, 0.0, None
        bar = tqdm(total=total, desc="lr_find", unit="step", disable=not cfg.trainer.progress, file=sys.stderr)
        epoch = 0
        while explosion is None and len(lrs) < total:
            for batch in loader.iterate(epoch, 0):
                step = len(lrs)
                lr = range_test_lr(step, total, r.min_lr, r.max_lr)
                set_learning_rate(optimizer, lr)
                res = trainer.train_step(batch)
                trainer.state.step += 1
                lrs.append(lr)
                losses.append(res.loss if res.finite else float("nan"))
                bar.update(1)
                metrics = {"lr_find/lr": lr}
                if res.finite and math.isfinite(res.loss):
                    avg = r.smoothing * avg + (1 - r.smoothing) * res.loss
                    smoothed = avg / (1 - r.smoothing ** (step + 1))
                    best = min(best, smoothed)
                    metrics.update({"lr_find/loss": res.loss, "lr_find/smoothed_loss": smoothed})
                    bar.set_postfix(lr=f"{lr:.2e}", loss=f"{res.loss:.3g}")
                    if step >= 3 and smoothed > r.explode_factor * best:
                        explosion = {"step": step, "lr": lr, "why": f"smoothed loss {smoothed:.4g} > "
                                     f"{r.explode_factor:g} x the best {best:.4g}"}
                else:
                    explosion = {"step": step, "lr": lr, "why": f"non-finite step (loss {res.loss:.4g}, grad norm "
                                 f"{res.grad_norm:.4g}): skipped by the trainer"}
                tracker.log_metrics(metrics, step)
                if explosion is not None or len(lrs) >= total:
                    break
            epoch += 1
        bar.close()
        result = analyse(lrs, losses, int(r.window), explosion)
        result.update({"steps": len(lrs), "max_steps": total, "min_lr": r.min_lr, "max_lr": r.max_lr,
                       "explosion": explosion, "run_dir": str(run_dir), "mlflow_run_id": tracker.run_id})
        png = plot(lrs, losses, result, run_dir / "lr_find.png")
        record = {k: v for k, v in result.items() if k not in ("smoothed", "curve_lrs")}
        record["curve"] = [{"step": i, "lr": lr, "loss": v} for i, (lr, v) in enumerate(zip(lrs, losses))]
        (run_dir / "lr_find.json").write_text(json.dumps(record, indent=1, default=str))
        tracker.log_artifact(png, "plots")
        tracker.log_artifact(run_dir / "lr_find.json")
        if result.get("suggested_lr"):
            tracker.log_metrics({"lr_find/suggested_lr": result["suggested_lr"]}, len(lrs))
            tracker.set_tags({"lr_find.suggested_lr": f"{result['suggested_lr']:.3g}",
                              "lr_find.rule": result["rule"]})
        status = "FINISHED"
        return {**result, "plot": png}
    finally:
        tracker.end(status)


def summary_lines(res: Dict[str, Any]) -> List[str]:
    ex = res.get("explosion")
    lines = [f"lr range test: {res['steps']} of {res['max_steps']} steps, lr {res['min_lr']:g} -> {res['max_lr']:g} "
             f"(exponential)"]
    if ex:
        lines.append(f"  stopped at step {ex['step']} (lr {ex['lr']:.3g}): {ex['why']}")
    else:
        lines.append(f"  no explosion up to lr {res['max_lr']:g} (raise lr_find.max_lr or trainer.max_steps "
                     "to find it)")
    if res.get("suggested_lr") is None:
        lines.append(f"no suggestion: {res['rule']}")
        return lines
    lines.append(f"  lowest smoothed loss {res['min_smoothed_loss']:.4g} at lr {res['min_loss_lr']:.3g}; "
                 f"steepest descent at lr {res['steepest_lr']:.3g}"
                 + (f"; explosion lr / 10 = {res['explosion_lr_div10']:.3g}" if ex else ""))
    lines.append(f"suggested maximum lr: {res['suggested_lr']:.3g}  ({res['rule']})")
    lines.append(f"  train with: python train.py optimizer.lr={res['suggested_lr']:.2g}  (and the same overrides)")
    lines.append(f"plot: {res['plot']}")
    lines.append(f"run directory: {res['run_dir']}" + (f"  (MLflow run {res['mlflow_run_id']}, plots/lr_find.png)"
                                                       if res.get("mlflow_run_id") else ""))
    return lines


def _main(cfg: DictConfig) -> None:
    from ds2exp.training.run import run_dir_from_hydra

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    res = run_range_test(cfg, run_dir_from_hydra())
    print("\n".join(summary_lines(res)), flush=True)


def main() -> None:
    import hydra

    from ds2exp.cli import preflight

    preflight(sys.argv[1:], config_name="lr_find", extra_check=check)
    hydra.main(config_path=config_dir(), config_name="lr_find", version_base=None)(_main)()


if __name__ == "__main__":
    main()
