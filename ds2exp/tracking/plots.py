"""Loss and error-rate curves as PNG (matplotlib, no display needed).

Short runs show their points as markers; a panel with nothing to show says so instead of
staying empty, and the step where the run first went wrong / stopped is marked.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Dict, List, Optional

_FEW = 60  # up to this many points, draw markers as well as lines


def _finite(xs: List, ys: List):
    pairs = [(x, y) for x, y in zip(xs, ys) if y is not None and math.isfinite(y)]
    return [p[0] for p in pairs], [p[1] for p in pairs]


def _style(n: int) -> Dict:
    return {"marker": "o", "ms": 4} if n <= _FEW else {}


def plot_curves(history: Dict[str, List], path: str | Path, first_bad_step: Optional[int] = None,
                diverged_at_step: Optional[int] = None) -> Optional[Path]:
    """curves.png of a run's history (None when it has no step at all)."""
    if not history.get("step"):
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    loss_ax, err_ax = axes
    xs, ys = _finite(history["step"], history.get("loss", []))
    if xs:
        loss_ax.plot(xs, ys, lw=0.8, label="train (batch)", **_style(len(xs)))
        if min(ys) > 0:
            loss_ax.set_yscale("log")
    else:
        loss_ax.text(0.5, 0.5, "no finite training loss", ha="center", va="center", transform=loss_ax.transAxes)
    vx, vy = _finite(history.get("val_step", []), history.get("val_loss", []))
    if vx:
        loss_ax.plot(vx, vy, "o-", label="validation")
    for step, label, color in ((first_bad_step, "first bad step", "tab:orange"),
                               (diverged_at_step, "diverged", "tab:red")):
        if step is not None:
            loss_ax.axvline(step, color=color, ls="--", lw=1, label=f"{label} ({step})")
    loss_ax.set(xlabel="step", ylabel="CTC loss", title="loss")
    if history.get("val_step"):
        for key, marker, label in (("val_wer", "o-", "WER"), ("val_cer", "s-", "CER")):
            ex, ey = _finite(history["val_step"], history.get(key, []))
            if ex:
                err_ax.plot(ex, ey, marker, label=label)
    if not err_ax.lines:
        err_ax.text(0.5, 0.5, "no validation yet", ha="center", va="center", transform=err_ax.transAxes)
    err_ax.set(xlabel="step", ylabel="%", title="validation error rates")
    for ax in axes:
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:  # a legend without labelled artists is a UserWarning
            ax.legend()
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
