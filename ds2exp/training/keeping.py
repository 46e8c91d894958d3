"""The Trainer's checkpoints: `last.ckpt` (the one before it kept as `last.prev.ckpt`) and the
`trainer.keep_best` best by `trainer.monitor`. A checkpoint holds the model, the optimizer and every field
of `TrainState` but the in-a-row counter, so a resumed run continues exactly where it stopped."""
from __future__ import annotations

import math
import os
from dataclasses import fields
from pathlib import Path
from typing import Any, Dict, Optional

from omegaconf import OmegaConf

from ds2exp.checkpoints.names import RunDir
from ds2exp.config import enum_value
from ds2exp.checkpoints.best import best_filename
from ds2exp.checkpoints.io import restore_optimizer, save_checkpoint
from ds2exp.training.state import TrainState

# consecutive_bad starts from 0 in every process: a resumed run has not seen the steps before it in a row
SAVED_FIELDS = tuple(f.name for f in fields(TrainState) if f.name != "consecutive_bad")


class CheckpointKeeping:
    """Mixed into the Trainer: it provides state, model, optimizer, cfg, tracker, detector, run_dir,
    ckpt_dir and is_primary."""

    def checkpoint_meta(self) -> Dict[str, Any]:
        s = self.state
        h = s.history
        return {**{name: getattr(s, name) for name in SAVED_FIELDS},
                "divergence_window": self.detector.state(), "mlflow_run_id": self.tracker.run_id,
                "run_dir": str(self.run_dir), "rng": {"numpy_seed": int(self.cfg.trainer.seed)},
                "config": OmegaConf.to_container(self.cfg, resolve=True, enum_to_str=True),
                **{f"val_{k}": (h[f"val_{k}"][-1] if h[f"val_{k}"] else None) for k in ("loss", "wer", "cer")}}

    def restore(self, loaded) -> None:
        from ds2exp.models.deepspeech2 import load_state

        load_state(self.model, loaded.model_state)
        restore_optimizer(self.optimizer, loaded.optimizer_state)
        m, s = loaded.meta, self.state
        for name in SAVED_FIELDS:
            if name in m:
                setattr(s, name, m[name])
        s.history = {**TrainState().history, **s.history}
        # best checkpoints ranked by another monitor than this run's stay on disk but out of the ranking
        s.best = [b for b in s.best if b.get("monitor") == str(self.cfg.trainer.monitor)]
        self.detector.load(m.get("divergence_window"))

    def save_last(self) -> Optional[Path]:
        if not self.is_primary:
            return None
        last = RunDir(self.run_dir).last
        self.ckpt_dir.mkdir(parents=True, exist_ok=True)
        if last.exists():
            os.replace(last, RunDir(self.run_dir).last_prev)  # kept until the new one is complete
        return save_checkpoint(last, self.model, self.optimizer, self.checkpoint_meta())

    def _rank_key(self, entry: Dict[str, Any]):
        """Best first: by the monitored value in its mode, the later step on a tie."""
        sign = 1.0 if enum_value(self.cfg.trainer.monitor_mode) == "min" else -1.0
        value = entry["value"]
        return (sign * value if math.isfinite(value) else math.inf, -entry["step"])

    def save_best(self, res) -> None:
        """Keep this step's weights when they rank among the `trainer.keep_best` best by `trainer.monitor`."""
        if not self.is_primary:
            return
        t = self.cfg.trainer
        monitor = str(t.monitor)
        value = {"val/cer": res.cer, "val/wer": res.wer, "val/loss": res.loss}[monitor]
        k = int(t.keep_best)
        best = self.state.best
        path = self.ckpt_dir / best_filename(self.state.step, monitor, value)
        entry = {"monitor": monitor, "value": value, "step": self.state.step, "path": str(path),
                 "val_cer": res.cer, "val_wer": res.wer, "val_loss": res.loss, "wer": res.wer}
        if len(best) >= k and self._rank_key(entry) >= max(self._rank_key(b) for b in best):
            return
        best.append(entry)
        best.sort(key=self._rank_key)
        meta = {**self.checkpoint_meta(), "monitor": monitor, "monitor_mode": enum_value(t.monitor_mode),
                "monitor_value": value}
        save_checkpoint(path, self.model, self.optimizer, meta)
        for b in best[k:]:
            Path(b["path"]).unlink(missing_ok=True)
        del best[k:]
