"""Loss and WER curves as PNG (matplotlib, no display needed)."""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Optional


def plot_curves(history: Dict[str, List], path: str | Path) -> Optional[Path]:
    if not history.get("step"):
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    axes[0].plot(history["step"], history["loss"], lw=0.8, label="train")
    if history.get("val_step"):
        axes[0].plot(history["val_step"], history["val_loss"], "o-", label="validation")
        axes[1].plot(history["val_step"], history["val_wer"], "o-", label="WER")
        axes[1].plot(history["val_step"], history["val_cer"], "s-", label="CER")
    axes[0].set(xlabel="step", ylabel="CTC loss", title="loss")
    axes[0].set_yscale("log")
    axes[1].set(xlabel="step", ylabel="%", title="validation error rates")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
