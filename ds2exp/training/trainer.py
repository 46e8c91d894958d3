"""The training loop: plain and explicit, one method per job.

Each step: forward + CTC loss + gradients (MindSpore `value_and_grad`), then the checks that
decide whether the step may touch the weights: loss and every gradient finite (after undoing
loss scaling), loss and gradient norm not exploded (ds2exp.training.divergence), then global-norm
clipping and the optimizer update. An anomalous step (non-finite or exploded) never updates the
weights; it is counted, and `trainer.nonfinite` decides in one place (`_on_anomaly`) what happens
after enough of them in a row (ESPnet-style skipping, or stop, or rollback).
"""
from __future__ import annotations

import collections
import logging
import math
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import mindspore as ms
import numpy as np
from mindspore import ops

from ds2exp.data.dataset import Batch, BatchLoader
from ds2exp.models.ctc import ctc_losses, infeasible_rows
from ds2exp.training.eval_pass import EvalResult, evaluate_model
from ds2exp.models.deepspeech2 import parameter_groups
from ds2exp.tracking import trial_hook
from ds2exp.training.anomaly import AnomalyPolicy
from ds2exp.training.divergence import ExplosionDetector
from ds2exp.training.keeping import CheckpointKeeping
from ds2exp.training.state import RolledBack, StepResult, TrainState
from ds2exp.training.faults import FaultInjector
from ds2exp.training.optim import learning_rate, set_learning_rate
from ds2exp.training.progress import estimated_total, progress_bar
from ds2exp.tracking.mlflow_tracker import Tracker
from ds2exp.config import enum_value
from ds2exp.checkpoints.names import RunDir

log = logging.getLogger(__name__)



def compiled_step(hw_cfg) -> bool:
    """hardware.mode=graph: the training step's forward and backward run as one compiled MindSpore graph
    (mindspore.jit, the fast layers' Custom ops inside it); everything else stays in PYNATIVE mode."""
    return enum_value(hw_cfg.mode) == "graph"


class Trainer(CheckpointKeeping, AnomalyPolicy):
    def __init__(self, cfg, model, optimizer, train_loader: BatchLoader, val_loader: Optional[BatchLoader],
                 tracker: Tracker, run_dir: Path, steps_per_epoch: int, reducer=None, rank: int = 0,
                 is_primary: bool = True, faults: Optional[FaultInjector] = None):
        """Data parallel (ds2exp.training.distributed): `reducer` averages gradients across ranks,
        `rank` is this process's, and only the primary rank validates, checkpoints and logs.
        `faults`: test fault injection (default: from trainer.inject_nan_grad_*)."""
        self.cfg = cfg
        self.model = model
        self.optimizer = optimizer
        self.train_loader = train_loader
        self.val_loader = val_loader
        self.tracker = tracker
        self.run_dir = Path(run_dir)
        self.ckpt_dir = RunDir(self.run_dir).checkpoints
        self.steps_per_epoch = max(1, steps_per_epoch)
        t = cfg.trainer
        self.max_steps = t.max_steps if t.max_steps > 0 else t.max_epochs * self.steps_per_epoch
        self.state = TrainState(loss_scale=float(cfg.precision.loss_scale))
        self.params = optimizer.parameters
        self.param_names = [p.name for p in self.params]
        groups = parameter_groups(model)
        name_to_group = {n: g for g, names in groups.items() for n in names}
        own_names = {p.name: n for n, p in model.parameters_and_names()}
        self.param_groups = [name_to_group.get(own_names.get(p.name, p.name), "other") for p in self.params]
        self.group_names = list(dict.fromkeys(self.param_groups))
        self.running_stats = [p for n, p in model.parameters_and_names() if "moving_" in n]
        self.grad_fn = ms.value_and_grad(self._forward, None, self.params, has_aux=True)
        if compiled_step(cfg.hardware):
            # One graph per input shape (compiled on its first batch, 1-3 s on 2 cores): the loader pads
            # frames to the bucket lengths and labels to each bucket's longest transcript. Same losses and
            # gradients; value_and_grad alone runs 20-37% faster on ds2_tiny, the whole step does not
            # (docs/performance.md), so it is not the default.
            self.grad_fn = ms.jit(self.grad_fn)
        self.faults = faults if faults is not None else FaultInjector.from_config(cfg.trainer)
        self.started = time.time()
        self.recent: collections.deque = collections.deque(maxlen=20)  # (step, loss, grad_norm) of good steps
        self.detector = ExplosionDetector(t.divergence)
        self.diagnoses: List[Dict[str, Any]] = []
        self.reducer = reducer
        self.rank = int(rank)
        self.is_primary = bool(is_primary)
        self.deadline: Optional[float] = None
        self.interrupt = None  # ds2exp.training.signals.StopOnSignal: checked after every step
        self.pruned = False  # a hyperparameter search stopped this trial (ds2exp/tracking/trial_hook.py)

    # ------------------------------------------------------------------ one step
    def _forward(self, x, x_len, y, y_len, scale):
        logits, out_len = self.model(x, x_len)
        losses = ctc_losses(logits, out_len, y, y_len)
        loss = losses.mean()
        return loss * scale, (losses, ops.abs(logits).max())

    def train_step(self, batch: Batch) -> StepResult:
        scale = self.state.loss_scale
        infeasible = infeasible_rows(batch)
        if infeasible.any() and self.reducer is None:
            # MindSpore's CTC kernel fails outright when a transcript needs more frames than the
            # model emits; the loss is +inf by definition, so the step is non-finite and skipped.
            losses = np.where(infeasible, np.inf, np.nan)
            return StepResult(float("inf"), float("nan"), False, {g: float("nan") for g in self.group_names},
                              float("nan"), losses, None, scale)
        # BatchNorm moving statistics change in the forward pass; keep them so that a skipped
        # step leaves the model exactly as it was.
        stats = [(p, p.asnumpy().copy()) for p in self.running_stats]
        if infeasible.any():  # data parallel: still take part in the collective, with NaN gradients
            grads = tuple(ops.full(p.shape, float("nan"), dtype=p.dtype) for p in self.params)
            loss, losses, absmax = float("inf"), ms.Tensor(np.where(infeasible, np.inf, np.nan)), ms.Tensor(np.nan)
        else:
            (scaled_loss, (losses, absmax)), grads = self.grad_fn(
                ms.Tensor(batch.features), ms.Tensor(batch.feature_lengths), ms.Tensor(batch.labels),
                ms.Tensor(batch.label_lengths), ms.Tensor(scale, ms.float32))
            loss = float(scaled_loss.asnumpy()) / scale
        grads = self.faults.after_backward(self.state.step, self.rank, grads)
        peer_flags = None
        if self.reducer is not None:
            # Data parallel: every rank gets the mean gradient and loss, so a NaN on any rank is a
            # NaN on all of them and every rank takes the same skip/stop decision.
            flags = (float(self.deadline is not None and time.time() > self.deadline), float(infeasible.any()),
                     float(not np.isfinite(batch.features).all()), float(batch.size), float(batch.audio_seconds))
            reduced = self.reducer.reduce(grads, loss * scale, flags)
            grads, loss, peer_flags = reduced.grads, reduced.loss / scale, reduced.flags
        # Float32 views of the gradients as MindSpore hands them out: no float64 copies (they
        # cost 0.4-0.9 s per ds2_reference step, bench/bench_step.py).
        group_sq, first_bad = self._group_squares(grads, scale)
        total = sum(group_sq.values())
        grad_norm = math.sqrt(total) if math.isfinite(total) else float("inf") if not np.isnan(total) else float("nan")
        finite = math.isfinite(loss) and math.isfinite(grad_norm)
        result = StepResult(loss, grad_norm, finite, {k: math.sqrt(v) if math.isfinite(v) else v
                                                      for k, v in group_sq.items()},
                            float(absmax.asnumpy()), losses.asnumpy(), first_bad, scale, peer_flags)
        if finite:
            # An exploded step is skipped like a non-finite one. Clipping would bound its update, but
            # its direction comes from weights that already produce a loss far off the recent median
            # (measured at lr 1e3: 1e4-1e9 against ~300); applying it moves the weights further from
            # the last good state, and a rollback or a lower lr can only start from what is left.
            # Skipping keeps the weights at the last good step, as ESPnet does for non-finite steps.
            # Data parallel: loss and grad norm are the reduced ones, so every rank decides alike.
            result.explosion = self.detector.check(loss, grad_norm)
        if not result.good:
            for p, value in stats:
                ops.assign(p, ms.Tensor(value))
            return result
        clip = float(self.cfg.optimizer.grad_clip)
        factor = min(1.0, clip / (grad_norm + 1e-6)) if clip > 0 else 1.0
        if factor < 1.0 or scale != 1.0:  # otherwise the gradients go to the optimizer untouched
            grads = tuple(g * ms.Tensor(factor / scale, ms.float32) for g in grads)
        self.optimizer(grads)
        if self.reducer is not None and self.running_stats:
            self.reducer.average_in_place(self.running_stats)  # each rank saw only its own batch
        return result

    def _group_squares(self, grads, scale: float):
        """Sum of squared (unscaled) gradients per parameter group, and the first group that is not finite."""
        group_sq: Dict[str, float] = {g: 0.0 for g in self.group_names}
        first_bad = None
        for g, name in zip(grads, self.param_groups):
            a = g.asnumpy().reshape(-1)
            sq = float(np.dot(a, a))
            if not math.isfinite(sq) and np.isfinite(a).all():
                sq = float(np.dot(a.astype(np.float64), a))  # finite values whose squares overflow float32
            sq /= scale * scale
            group_sq[name] += sq
            if first_bad is None and not math.isfinite(sq):
                first_bad = name
        return group_sq, first_bad

    # ------------------------------------------------------------------ loss scale
    def _update_loss_scale(self, finite: bool) -> None:
        p = self.cfg.precision
        if not p.dynamic_loss_scale:
            return
        if not finite:
            self.state.loss_scale = max(1.0, self.state.loss_scale / float(p.scale_factor))
            self.state.good_since_scale = 0
        else:
            self.state.good_since_scale += 1
            if self.state.good_since_scale >= int(p.scale_window):
                self.state.loss_scale *= float(p.scale_factor)
                self.state.good_since_scale = 0

    # ------------------------------------------------------------------ evaluation
    def evaluate_val_split(self) -> Optional[EvalResult]:
        if self.val_loader is None or not self.is_primary:
            return None
        res = evaluate_model(self.model, self.val_loader, enum_value(self.cfg.trainer.metric),
                             self.cfg.trainer.max_eval_utterances)
        h = self.state.history
        h["val_step"].append(self.state.step)
        h["val_wer"].append(res.wer)
        h["val_cer"].append(res.cer)
        h["val_loss"].append(res.loss)
        metrics = {"val/loss": res.loss, "val/wer": res.wer, "val/cer": res.cer}
        self.tracker.log_metrics(metrics, self.state.step)
        self.pruned = trial_hook.report(self.state.step, metrics[str(self.cfg.trainer.monitor)], self.tracker)
        table = ["| id | reference | hypothesis |", "|---|---|---|"]
        table += [f"| {r['id']} | {r['reference']} | {r['hypothesis']} |" for r in res.records[:20]]
        self.tracker.log_text("\n".join(table) + "\n", f"samples/step_{self.state.step:07d}.md")
        return res

    # ------------------------------------------------------------------ the loop
    def fit(self) -> Dict[str, Any]:
        cfg = self.cfg
        t = cfg.trainer
        s = self.state
        deadline = self.started + 60 * float(t.max_minutes) if t.max_minutes else None
        self.deadline = deadline
        bar = progress_bar(self.max_steps, s.step, enabled=bool(t.progress))
        self._bar_origin = (s.step, time.time())
        self._window = _new_window()
        last_result: Optional[StepResult] = None
        stop_reason = "max_steps"
        # MindSpore cells start in inference mode; BatchNorm must use batch statistics here.
        self.model.set_train(True)
        done = s.step >= self.max_steps
        if enum_value(t.nonfinite) == "rollback" and not RunDir(self.run_dir).last.exists():
            self.save_last()  # a good state to roll back to, even before the first interval
        while not done:
            try:
                done, stop_reason, last_result = self._run_epoch(bar, deadline, last_result)
            except RolledBack:
                bar.reset(total=self.max_steps)
                bar.update(s.step)
                self._bar_origin = (s.step, time.time())
                continue
        bar.close()
        if s.step % t.eval_every != 0 or not s.history["val_step"] or s.history["val_step"][-1] != s.step:
            self._evaluate_and_checkpoint(None)
        return {"stop_reason": stop_reason, "step": s.step, "epoch": s.epoch,
                "last_loss": last_result.loss if last_result else float("nan"),
                "nonfinite_steps": s.nonfinite_steps, "exploded_steps": s.exploded_steps,
                "anomalous_steps": s.anomalous_steps, "first_bad_step": s.first_bad_step,
                "rollbacks": s.rollbacks}

    def _time_progress(self) -> Optional[float]:
        """Share of this process's trainer.max_minutes used so far (None without a time budget, and
        under data parallelism, where every rank must compute the same lr from the step alone)."""
        minutes = self.cfg.trainer.max_minutes
        if not minutes or self.reducer is not None:
            return None
        return (time.time() - self.started) / (60.0 * float(minutes))

    def _update_bar(self, bar, res: StepResult, lr: float, deadline: Optional[float]) -> None:
        s = self.state
        post = {"loss": f"{res.loss:.4g}", "lr": f"{lr:.2e}", "bad": s.anomalous_steps}
        if deadline is not None:
            now = time.time()
            step0, t0 = self._bar_origin
            total = estimated_total(s.step, self.max_steps, step0, now - t0, deadline - now)
            if total != bar.total:
                bar.total = total
            post["time"] = f"{(now - self.started) / 60:.1f}/{float(self.cfg.trainer.max_minutes):g}min"
        bar.set_postfix(post, refresh=False)  # shown by update(), as often as the bar redraws
        bar.update(1)

    def _run_epoch(self, bar, deadline, last_result):
        """Train from the current position to the end of the epoch or a stop condition.

        Returns (done, stop_reason, last step result)."""
        cfg, t, s = self.cfg, self.cfg.trainer, self.state
        window = self._window  # since the last logged step, across epoch boundaries
        done, stop_reason = False, "max_steps"
        batches = self.train_loader.iterate(s.epoch, s.batch_in_epoch)
        t_wait = time.perf_counter()
        for batch in batches:
            wait = time.perf_counter() - t_wait
            lr = learning_rate(cfg.optimizer, s.step, s.epoch, self.max_steps, self._time_progress()) * s.lr_factor
            set_learning_rate(self.optimizer, lr)
            t0 = time.perf_counter()
            res = self.train_step(batch)
            dt = time.perf_counter() - t0
            last_result = res
            s.step += 1
            s.batch_in_epoch += 1
            self._update_loss_scale(res.finite)
            s.history["step"].append(s.step)
            s.history["loss"].append(res.loss)
            s.history["grad_norm"].append(res.grad_norm)
            if math.isfinite(res.loss):
                window["loss"].append(res.loss)
            if res.good:
                s.consecutive_bad = 0
                self.recent.append((s.step, res.loss, res.grad_norm))
                self.detector.accept(res.loss, res.grad_norm)
            else:
                s.nonfinite_steps += not res.finite
                s.exploded_steps += res.explosion is not None
                s.anomalous_steps += 1
                s.consecutive_bad += 1
                if s.first_bad_step is None:
                    s.first_bad_step = s.step
                    self.tracker.set_tags({"first_bad_step": s.step})
            flags = res.peer_flags or {}  # data parallel: what all ranks trained on in this step
            window["utts"] += flags.get("utterances", batch.size)
            window["audio"] += flags.get("audio_seconds", batch.audio_seconds)
            window["time"] += dt + wait
            window["wait"] += wait
            if s.step % t.log_every == 0 or not res.good:
                self._log_train(res, lr, window)  # an anomaly is recorded before any decision on it
                window = self._window = _new_window()
            if not res.good:
                self._on_anomaly(batch, res, lr)
            self._update_bar(bar, res, lr, deadline)
            if s.step % t.eval_every == 0:
                self._evaluate_and_checkpoint(bar)
            elif s.step % t.checkpoint_every == 0:
                self.save_last()
            if self.interrupt is not None:
                self.interrupt.check(self)  # SIGINT/SIGTERM: checkpoint this step and end the run
            if s.step >= self.max_steps:
                done = True
                break
            if self.pruned:
                done, stop_reason = True, "pruned"
                break
            # Data parallel: ranks stop together, when any of them has run out of time.
            out_of_time = (res.peer_flags["stop_requested"] > 0 if res.peer_flags is not None
                           else deadline is not None and time.time() > deadline)
            if out_of_time:
                done, stop_reason = True, "max_minutes"
                break
            t_wait = time.perf_counter()
        else:
            s.epoch += 1
            s.batch_in_epoch = 0
            if t.max_steps <= 0 and s.epoch >= t.max_epochs:
                done, stop_reason = True, "max_epochs"
        return done, stop_reason, last_result

    def _evaluate_and_checkpoint(self, bar) -> None:
        res = self.evaluate_val_split()
        if res is not None:
            msg = f"step {self.state.step}: val loss {res.loss:.3f}  WER {res.wer:.2f}%  CER {res.cer:.2f}%"
            (bar.write if bar is not None else log.info)(msg)
            self.save_best(res)
        self.save_last()

    def _log_train(self, res: StepResult, lr: float, window: Dict[str, Any]) -> None:
        """train/loss is this step's own batch loss (an explosion shows on the chart as it happened);
        train/loss_mean and train/loss_max summarise the finite losses since the last logged step."""
        s = self.state
        m = {"train/lr": lr, "train/loss_scale": s.loss_scale, "train/nonfinite_steps": s.nonfinite_steps,
             "train/exploded_steps": s.exploded_steps, "train/anomalous_steps": s.anomalous_steps,
             "train/logits_absmax": res.logits_absmax}
        if math.isfinite(res.loss):
            m["train/loss"] = res.loss
        if window["loss"]:
            m["train/loss_mean"] = float(np.mean(window["loss"]))
            m["train/loss_max"] = float(np.max(window["loss"]))
        if math.isfinite(res.grad_norm):
            m["train/grad_norm"] = res.grad_norm
        for g, v in res.group_norms.items():
            if math.isfinite(v):
                m[f"grad_norm/{g}"] = v
        if window["time"] > 0:
            m["train/utt_per_s"] = window["utts"] / window["time"]
            m["train/audio_s_per_s"] = window["audio"] / window["time"]
            m["train/data_wait_share"] = window["wait"] / window["time"]
        self.tracker.log_metrics(m, s.step)

def _new_window() -> Dict[str, Any]:
    """What _log_train summarises: finite losses, utterances, audio seconds, step and data-wait time."""
    return {"loss": [], "utts": 0, "audio": 0.0, "time": 0.0, "wait": 0.0}

