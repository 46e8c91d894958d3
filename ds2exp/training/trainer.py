"""The training loop: plain and explicit, one method per job.

Each step: forward + CTC loss + gradients (MindSpore `value_and_grad`), then the checks that
decide whether the step may touch the weights: loss and every gradient finite (after undoing
loss scaling), then global-norm clipping and the optimizer update. A non-finite step never
updates the weights; it is counted, and `trainer.nonfinite` decides what happens after
`trainer.nonfinite_patience` of them in a row (ESPnet-style skipping, or stop, or rollback).
"""
from __future__ import annotations

import collections
import logging
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

import mindspore as ms
import numpy as np
from mindspore import ops
from omegaconf import OmegaConf
from tqdm import tqdm

from ds2exp.data.dataset import Batch, BatchLoader
from ds2exp.models.ctc import ctc_losses, infeasible_rows
from ds2exp.training.validate import EvalResult, evaluate_model
from ds2exp.models.deepspeech2 import parameter_groups
from ds2exp.training.checkpoint import restore_optimizer, save_checkpoint
from ds2exp.training.optim import learning_rate, set_learning_rate
from ds2exp.tracking.mlflow_tracker import Tracker
from ds2exp.config import enum_value

log = logging.getLogger(__name__)



class _RolledBack(Exception):
    """Internal: the state was restored from a checkpoint; restart the epoch iteration."""


class TrainingStopped(Exception):
    """Raised when the non-finite policy gives up; carries the diagnosis."""

    def __init__(self, diagnosis: Dict[str, Any]):
        super().__init__(diagnosis.get("summary", "training stopped"))
        self.diagnosis = diagnosis


@dataclass
class StepResult:
    loss: float
    grad_norm: float
    finite: bool
    group_norms: Dict[str, float]
    logits_absmax: float
    losses: np.ndarray
    first_bad_group: Optional[str] = None
    loss_scale: float = 1.0  # the scale this step ran with
    peer_flags: Optional[Dict[str, float]] = None  # data parallel: ranks that raised each flag


@dataclass
class TrainState:
    step: int = 0  # optimizer steps attempted (good + skipped)
    epoch: int = 0
    batch_in_epoch: int = 0
    nonfinite_steps: int = 0
    consecutive_nonfinite: int = 0
    rollbacks: int = 0
    loss_scale: float = 1.0
    good_since_scale: int = 0
    best: List[Dict[str, Any]] = field(default_factory=list)  # [{"wer", "step", "path"}]
    history: Dict[str, List] = field(default_factory=lambda: {"step": [], "loss": [], "val_step": [],
                                                              "val_wer": [], "val_cer": [], "val_loss": []})
    lr_factor: float = 1.0


class Trainer:
    def __init__(self, cfg, model, optimizer, train_loader: BatchLoader, val_loader: Optional[BatchLoader],
                 tracker: Tracker, run_dir: Path, steps_per_epoch: int):
        self.cfg = cfg
        self.model = model
        self.optimizer = optimizer
        self.train_loader = train_loader
        self.val_loader = val_loader
        self.tracker = tracker
        self.run_dir = Path(run_dir)
        self.ckpt_dir = self.run_dir / "checkpoints"
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
        # Fault injection for tests and drills: 0-based steps whose gradients are replaced by NaN.
        self.inject_nan_at: set = set(int(x) for x in (cfg.trainer.get("inject_nan_grad_steps") or []))
        self.started = time.time()
        self.recent: collections.deque = collections.deque(maxlen=20)  # (step, loss, grad_norm) of good steps
        self.diagnoses: List[Dict[str, Any]] = []
        # Data parallel (ds2exp.training.distributed): the gradient averager, and whether this is
        # rank 0, the one that validates, checkpoints and logs.
        self.reducer = None
        self.is_primary = True
        self.rank = 0
        self.deadline: Optional[float] = None

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
        if self.state.step in self.inject_nan_at:  # fault injection (trainer.inject_nan_grad_steps), once per step
            self.inject_nan_at.discard(self.state.step)
            only = self.cfg.trainer.get("inject_nan_grad_rank")
            if only is None or int(only) == self.rank:
                grads = tuple(ops.full_like(g, float("nan")) for g in grads)
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
        if not finite:
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

    # ------------------------------------------------------------------ checkpoints
    def checkpoint_meta(self) -> Dict[str, Any]:
        s = self.state
        return {"step": s.step, "epoch": s.epoch, "batch_in_epoch": s.batch_in_epoch,
                "nonfinite_steps": s.nonfinite_steps, "loss_scale": s.loss_scale,
                "good_since_scale": s.good_since_scale, "best": s.best, "history": s.history,
                "rollbacks": s.rollbacks, "lr_factor": s.lr_factor,
                "mlflow_run_id": self.tracker.run_id, "run_dir": str(self.run_dir),
                "rng": {"numpy_seed": int(self.cfg.trainer.seed)},
                "config": OmegaConf.to_container(self.cfg, resolve=True, enum_to_str=True),
                "val_loss": s.history["val_loss"][-1] if s.history["val_loss"] else None,
                "val_wer": s.history["val_wer"][-1] if s.history["val_wer"] else None}

    def save_last(self) -> Optional[Path]:
        if not self.is_primary:
            return None
        last = self.ckpt_dir / "last.ckpt"
        self.ckpt_dir.mkdir(parents=True, exist_ok=True)
        if last.exists():
            os.replace(last, self.ckpt_dir / "last.prev.ckpt")  # kept until the new one is complete
        return save_checkpoint(last, self.model, self.optimizer, self.checkpoint_meta())

    def save_best(self, wer: float) -> None:
        if not self.is_primary:
            return
        k = int(self.cfg.trainer.keep_best)
        best = self.state.best
        if len(best) >= k and wer >= max(b["wer"] for b in best):
            return
        path = self.ckpt_dir / f"best-step{self.state.step:07d}-wer{wer:.2f}.ckpt"
        best.append({"wer": wer, "step": self.state.step, "path": str(path)})
        best.sort(key=lambda b: (b["wer"], b["step"]))
        save_checkpoint(path, self.model, self.optimizer, self.checkpoint_meta())
        for b in best[k:]:
            Path(b["path"]).unlink(missing_ok=True)
        del best[k:]

    def restore(self, loaded) -> None:
        from ds2exp.models.deepspeech2 import load_state

        load_state(self.model, loaded.model_state)
        restore_optimizer(self.optimizer, loaded.optimizer_state)
        m = loaded.meta
        s = self.state
        s.step, s.epoch, s.batch_in_epoch = int(m["step"]), int(m["epoch"]), int(m["batch_in_epoch"])
        s.nonfinite_steps = int(m.get("nonfinite_steps", 0))
        s.loss_scale = float(m.get("loss_scale", s.loss_scale))
        s.good_since_scale = int(m.get("good_since_scale", 0))
        s.best = list(m.get("best", []))
        s.history = m.get("history", s.history)
        s.rollbacks = int(m.get("rollbacks", 0))
        s.lr_factor = float(m.get("lr_factor", 1.0))

    # ------------------------------------------------------------------ evaluation
    def validate(self) -> Optional[EvalResult]:
        if self.val_loader is None or not self.is_primary:
            return None
        res = evaluate_model(self.model, self.val_loader, enum_value(self.cfg.trainer.metric),
                             self.cfg.trainer.max_eval_utterances)
        h = self.state.history
        h["val_step"].append(self.state.step)
        h["val_wer"].append(res.wer)
        h["val_cer"].append(res.cer)
        h["val_loss"].append(res.loss)
        self.tracker.log_metrics({"val/loss": res.loss, "val/wer": res.wer, "val/cer": res.cer}, self.state.step)
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
        bar = tqdm(total=self.max_steps, initial=s.step, desc="train", unit="step", disable=not t.progress,
                   file=sys.stderr, dynamic_ncols=True)
        last_result: Optional[StepResult] = None
        stop_reason = "max_steps"
        # MindSpore cells start in inference mode; BatchNorm must use batch statistics here.
        self.model.set_train(True)
        done = s.step >= self.max_steps
        if enum_value(t.nonfinite) == "rollback" and not (self.ckpt_dir / "last.ckpt").exists():
            self.save_last()  # a good state to roll back to, even before the first interval
        while not done:
            try:
                done, stop_reason, last_result = self._run_epoch(bar, deadline, last_result)
            except _RolledBack:
                bar.reset(total=self.max_steps)
                bar.update(s.step)
                continue
        bar.close()
        if s.step % t.eval_every != 0 or not s.history["val_step"] or s.history["val_step"][-1] != s.step:
            self._evaluate_and_checkpoint(None)
        return {"stop_reason": stop_reason, "step": s.step, "epoch": s.epoch,
                "last_loss": last_result.loss if last_result else float("nan"),
                "nonfinite_steps": s.nonfinite_steps, "rollbacks": s.rollbacks}

    def _time_progress(self) -> Optional[float]:
        """Share of this process's trainer.max_minutes used so far (None without a time budget, and
        under data parallelism, where every rank must compute the same lr from the step alone)."""
        minutes = self.cfg.trainer.max_minutes
        if not minutes or self.reducer is not None:
            return None
        return (time.time() - self.started) / (60.0 * float(minutes))

    def _run_epoch(self, bar, deadline, last_result):
        """Train from the current position to the end of the epoch or a stop condition.

        Returns (done, stop_reason, last step result)."""
        cfg, t, s = self.cfg, self.cfg.trainer, self.state
        window = {"loss": [], "utts": 0, "audio": 0.0, "time": 0.0, "wait": 0.0}
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
            if res.finite:
                s.consecutive_nonfinite = 0
                self.recent.append((s.step, res.loss, res.grad_norm))
                window["loss"].append(res.loss)
                s.history["step"].append(s.step)
                s.history["loss"].append(res.loss)
            else:
                s.nonfinite_steps += 1
                s.consecutive_nonfinite += 1
            flags = res.peer_flags or {}  # data parallel: what all ranks trained on in this step
            window["utts"] += flags.get("utterances", batch.size)
            window["audio"] += flags.get("audio_seconds", batch.audio_seconds)
            window["time"] += dt + wait
            window["wait"] += wait
            if s.step % t.log_every == 0 or not res.finite:
                self._log_train(res, lr, window)  # an anomaly is recorded before any decision on it
                window = {"loss": [], "utts": 0, "audio": 0.0, "time": 0.0, "wait": 0.0}
            if not res.finite:
                self._on_nonfinite(batch, res, lr)
            bar.update(1)
            bar.set_postfix(loss=f"{res.loss:.3f}", lr=f"{lr:.2e}", bad=s.nonfinite_steps)
            if s.step % t.eval_every == 0:
                self._evaluate_and_checkpoint(bar)
            elif s.step % t.checkpoint_every == 0:
                self.save_last()
            if s.step >= self.max_steps:
                done = True
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
        res = self.validate()
        if res is not None:
            msg = f"step {self.state.step}: val loss {res.loss:.3f}  WER {res.wer:.2f}%  CER {res.cer:.2f}%"
            (bar.write if bar is not None else log.info)(msg)
            self.save_best(res.wer)
        self.save_last()

    def _log_train(self, res: StepResult, lr: float, window: Dict[str, Any]) -> None:
        s = self.state
        m = {"train/lr": lr, "train/loss_scale": s.loss_scale, "train/nonfinite_steps": s.nonfinite_steps,
             "train/logits_absmax": res.logits_absmax}
        if window["loss"]:
            m["train/loss"] = float(np.mean(window["loss"]))
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

    def _on_nonfinite(self, batch: Batch, res: StepResult, lr: float) -> None:
        from ds2exp.training.diagnosis import diagnosis, format_text

        s = self.state
        t = self.cfg.trainer
        policy = enum_value(t.nonfinite)
        d = diagnosis(s.step, lr, res.loss_scale, batch, res, self.recent, policy, s.consecutive_nonfinite,
                      enum_value(self.cfg.precision.dtype))
        d["nonfinite_steps"] = s.nonfinite_steps
        log.warning("step %d skipped: %s", s.step, d["summary"])
        if len(self.diagnoses) < 50:
            self.diagnoses.append(d)
        if s.nonfinite_steps <= 5 or s.consecutive_nonfinite == 1:  # first events in full, then only the count
            self.tracker.log_text(format_text(d), f"nonfinite/step_{s.step:07d}.txt")
        limit = 1 if policy == "stop" else int(t.nonfinite_patience)
        if s.consecutive_nonfinite < limit:
            return
        if policy == "rollback" and s.rollbacks < int(t.max_rollbacks):
            self._rollback(d)
        raise TrainingStopped(d)

    def _rollback(self, d: Dict[str, Any]) -> None:
        from ds2exp.training.checkpoint import find_latest_checkpoint, load_checkpoint

        s = self.state
        path = find_latest_checkpoint(self.ckpt_dir)
        if path is None:
            raise TrainingStopped({**d, "summary": d["summary"] + "; no checkpoint to roll back to"})
        counters = (s.nonfinite_steps, s.rollbacks + 1, s.lr_factor * float(self.cfg.trainer.rollback_lr_factor))
        self.restore(load_checkpoint(path))
        s.nonfinite_steps, s.rollbacks, s.lr_factor = counters
        s.consecutive_nonfinite = 0
        self.recent.clear()
        log.warning("rollback %d: restored %s (step %d); learning rate x%g", s.rollbacks, path.name, s.step,
                    s.lr_factor)
        self.tracker.log_metrics({"train/rollbacks": s.rollbacks, "train/lr_factor": s.lr_factor}, s.step)
        self.tracker.set_tags({"rollbacks": s.rollbacks})
        raise _RolledBack()
