"""Best checkpoints: how they are named, and which one of a run is "the best" and why.

The trainer keeps `trainer.keep_best` checkpoints ranked by `trainer.monitor` (val/cer, val/wer or
val/loss; `trainer.monitor_mode` min or max), named by step and monitored value, e.g.
`best-step0000200-cer58.12.ckpt`. Each records the monitor and its value in its meta, which
`choose_best` reads; run directories written before the monitor existed have `...-wer97.10.ckpt`
names and are ranked by that WER.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional

SHORT_NAMES = {"val/cer": "cer", "val/wer": "wer", "val/loss": "loss"}
_NAME = re.compile(r"^best-step(\d+)-(cer|wer|loss)(-?[0-9.]+(?:e[+-]?\d+)?|nan|inf)$")


def best_filename(step: int, monitor: str, value: float) -> str:
    return f"best-step{step:07d}-{SHORT_NAMES[monitor]}{value:.2f}.ckpt"


def format_value(monitor: str, value: float) -> str:
    return f"{value:.2f}%" if monitor in ("val/cer", "val/wer") else f"{value:.4g}"


@dataclass
class BestChoice:
    path: Path
    monitor: str
    mode: str
    value: float
    step: Optional[int]
    candidates: int

    @property
    def reason(self) -> str:
        word = "lowest" if self.mode == "min" else "highest"
        n = self.candidates
        return (f"{word} {self.monitor} {format_value(self.monitor, self.value)} of {n} best checkpoint"
                f"{'s' if n != 1 else ''}")

    def describe(self) -> str:
        return f"using {self.path.name} ({self.reason})"


def read_meta(path: Path) -> Dict[str, Any]:
    """The ds2exp meta of a checkpoint, without building its tensors ({} when it has none)."""
    import mindspore as ms

    from ds2exp.checkpoints.io import META_KEY

    try:
        raw = ms.load_checkpoint(str(path), choice_func=lambda name: name == META_KEY)
    except Exception:  # MindSpore raises ValueError/RuntimeError on damaged files: not a candidate
        return {}
    value = raw.get(META_KEY)
    if value is None:
        return {}
    # ds2exp writes its meta as UTF-8 bytes in a uint8 tensor (io.py)
    text = value.asnumpy().tobytes().decode("utf-8", "replace")
    try:
        return json.loads(text)
    except ValueError:
        return {}


def _candidate(path: Path) -> Optional[Dict[str, Any]]:
    meta = read_meta(path)
    if meta.get("monitor") in SHORT_NAMES and meta.get("monitor_value") is not None:
        return {"path": path, "monitor": meta["monitor"], "mode": meta.get("monitor_mode", "min"),
                "value": float(meta["monitor_value"]), "step": meta.get("step")}
    m = _NAME.match(path.stem)
    if m is None:
        return None
    # a run from before the monitor: its name carries the metric (WER) it was ranked by
    monitor = {v: k for k, v in SHORT_NAMES.items()}[m.group(2)]
    return {"path": path, "monitor": monitor, "mode": "min", "value": float(m.group(3)),
            "step": int(m.group(1))}


def ranked_best(run_or_ckpt_dir: str | Path) -> List[Dict[str, Any]]:
    """The best checkpoints of a run directory (or its checkpoints/ folder), best first by the newest
    one's monitor and mode ({path, monitor, mode, value, step}). Checkpoints ranked by another monitor
    (a run resumed with a different trainer.monitor) are left out."""
    d = Path(run_or_ckpt_dir)
    d = d / "checkpoints" if (d / "checkpoints").is_dir() else d
    found: List[Dict[str, Any]] = [c for c in map(_candidate, sorted(d.glob("best-*.ckpt"))) if c is not None]
    if not found:
        return []
    newest = max(found, key=lambda c: (c["step"] or 0, c["path"].stat().st_mtime))
    same = [{**c, "mode": newest["mode"]} for c in found if c["monitor"] == newest["monitor"]]
    sign = 1.0 if newest["mode"] == "min" else -1.0
    return sorted(same, key=lambda c: (sign * c["value"], -(c["step"] or 0)))


def choose_best(run_or_ckpt_dir: str | Path) -> Optional[BestChoice]:
    """The best checkpoint of a run (see ranked_best), with the reason; None when it has none."""
    ranked = ranked_best(run_or_ckpt_dir)
    if not ranked:
        return None
    pick = ranked[0]
    return BestChoice(pick["path"], pick["monitor"], pick["mode"], pick["value"], pick["step"], len(ranked))
