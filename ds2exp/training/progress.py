"""The training progress bar: redrawn in place on a terminal, whole lines in a log file or pipe, and its
total under a time budget."""
from __future__ import annotations

import sys

from tqdm import tqdm


# Without a terminal (a log file, a pipe) the bar is a whole line this often, not a redraw per step.
PLAIN_PROGRESS_SECONDS = 30.0


class _WholeLines:
    """tqdm's output as whole lines: in a file, a bar redrawn with carriage returns is one line that
    grows with every step, interleaved with the warnings."""

    def __init__(self, stream):
        self.stream = stream

    def write(self, text: str) -> None:
        text = text.replace("\r", "").strip()
        if text:
            self.stream.write(text + "\n")

    def flush(self) -> None:
        self.stream.flush()


def progress_bar(total: int, initial: int, enabled: bool):
    """The training progress bar on stderr: redrawn in place on a terminal, else a plain line every
    PLAIN_PROGRESS_SECONDS."""
    if sys.stderr.isatty():
        return tqdm(total=total, initial=initial, desc="train", unit="step", disable=not enabled, file=sys.stderr,
                    dynamic_ncols=True)
    return tqdm(total=total, initial=initial, desc="train", unit="step", disable=not enabled,
                file=_WholeLines(sys.stderr), mininterval=PLAIN_PROGRESS_SECONDS, maxinterval=PLAIN_PROGRESS_SECONDS,
                ascii=True, ncols=100)


def estimated_total(step: int, max_steps: int, origin_step: int, elapsed_s: float, left_s: float) -> int:
    """The progress bar's total under a time budget: the step the run will end at, whichever limit
    (trainer.max_steps/epochs or trainer.max_minutes) comes first, at the step rate measured since
    `origin_step`. No rate yet: the step limit."""
    if elapsed_s <= 0 or step <= origin_step:
        return max_steps
    rate = (step - origin_step) / elapsed_s
    return max(step, min(max_steps, step + int(rate * max(0.0, left_s))))
