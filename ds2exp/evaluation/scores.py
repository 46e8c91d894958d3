"""One checkpoint's score on a split: what evaluate.py tabulates, whichever way it was scored
(ds2exp's own masked evaluation or the model zoo's, ds2exp/evaluation/zoo_compat.py)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional


@dataclass
class CheckpointScore:
    name: str
    path: str
    wer: float
    cer: float
    parameters: int
    step: Optional[int]
    val_loss: Optional[float]
    decode_s_per_utt: float
    utterances: int
    records: List[dict]
    training_run_id: Optional[str]
