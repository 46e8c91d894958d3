"""The one place that decides what an anomalous (non-finite or exploded) step leads to, by
`trainer.nonfinite`: skip it, stop the run (TrainingStopped, with the diagnosis) or roll back to the
last checkpoint with a smaller learning rate (RolledBack: the loop restarts its epoch)."""
from __future__ import annotations

import logging
from typing import Any, Dict

from ds2exp.config import enum_value
from ds2exp.training.state import RolledBack, StepResult, TrainingStopped

log = logging.getLogger("ds2exp.training.trainer")


class AnomalyPolicy:
    """Mixed into the Trainer: it provides state, cfg, recent, diagnoses, tracker, ckpt_dir and restore."""

    def _patience(self, res: StepResult) -> int:
        """Anomalous steps in a row after which the policy acts: `stop` acts on the first non-finite
        step and on `divergence.patience` exploded ones (one spike may be one odd batch); `skip` and
        `rollback` after `nonfinite_patience` (and never before an explosion counts as one)."""
        t = self.cfg.trainer
        base = 1 if enum_value(t.nonfinite) == "stop" else int(t.nonfinite_patience)
        return max(base, int(t.divergence.patience)) if res.finite else base

    def _on_anomaly(self, batch, res: StepResult, lr: float) -> None:
        """The one place that decides what a non-finite or exploded step leads to (`trainer.nonfinite`)."""
        from ds2exp.training.diagnosis import diagnosis, format_text

        s = self.state
        t = self.cfg.trainer
        policy = enum_value(t.nonfinite)
        d = diagnosis(s.step, lr, res.loss_scale, batch, res, self.recent, policy, s.consecutive_bad,
                      enum_value(self.cfg.precision.dtype), s.first_bad_step)
        d.update(nonfinite_steps=s.nonfinite_steps, exploded_steps=s.exploded_steps,
                 anomalous_steps=s.anomalous_steps)
        log.warning("step %d skipped: %s", s.step, d["summary"])
        if len(self.diagnoses) < 50:
            self.diagnoses.append(d)
        if s.anomalous_steps <= 5 or s.consecutive_bad == 1:  # first events in full, then only the count
            self.tracker.log_text(format_text(d), f"anomalies/step_{s.step:07d}.txt")
        if s.consecutive_bad < self._patience(res):
            return
        d["diverged_at_step"] = s.step
        if policy == "rollback" and s.rollbacks < int(t.max_rollbacks):
            self._rollback(d)
        raise TrainingStopped(d)

    def _rollback(self, d: Dict[str, Any]) -> None:
        from ds2exp.checkpoints.io import find_latest_checkpoint, load_checkpoint

        s = self.state
        path = find_latest_checkpoint(self.ckpt_dir)
        if path is None:
            raise TrainingStopped({**d, "summary": d["summary"] + "; no checkpoint to roll back to"})
        # run-level counts survive the restore; the divergence window comes back with the checkpoint
        counters = (s.nonfinite_steps, s.exploded_steps, s.anomalous_steps, s.first_bad_step, s.rollbacks + 1,
                    s.lr_factor * float(self.cfg.trainer.rollback_lr_factor))
        self.restore(load_checkpoint(path))
        s.nonfinite_steps, s.exploded_steps, s.anomalous_steps, s.first_bad_step, s.rollbacks, s.lr_factor = counters
        s.consecutive_bad = 0
        self.recent.clear()
        log.warning("rollback %d: restored %s (step %d); learning rate x%g", s.rollbacks, path.name, s.step,
                    s.lr_factor)
        self.tracker.log_metrics({"train/rollbacks": s.rollbacks, "train/lr_factor": s.lr_factor}, s.step)
        self.tracker.set_tags({"rollbacks": s.rollbacks})
        raise RolledBack()
