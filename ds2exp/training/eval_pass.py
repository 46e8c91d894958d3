"""The evaluation pass: run a model over a data split for its CTC loss, transcripts and WER/CER.

Used by the trainer at every validation and by `evaluate.py` (with a beam decoder) alike.
"""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

import mindspore as ms
import numpy as np
from tqdm import tqdm

from ds2exp.data.dataset import BatchLoader
from ds2exp.models.ctc import batch_greedy_decode, ctc_losses, infeasible_rows
from ds2exp.training.metrics import ErrorRateAccumulator


@dataclass
class EvalResult:
    loss: float
    wer: float
    cer: float
    num_utterances: int
    records: List[dict] = field(default_factory=list)
    decode_seconds: float = 0.0
    summary: Dict = field(default_factory=dict)

    @property
    def decode_seconds_per_utt(self) -> float:
        return self.decode_seconds / max(1, self.num_utterances)


def evaluate_model(model, loader: BatchLoader, definition: str = "reference", max_utterances: Optional[int] = None,
                   decode: Optional[Callable[[np.ndarray, np.ndarray], List[str]]] = None,
                   progress: Optional[bool] = None, desc: str = "validate", leave: bool = False) -> EvalResult:
    """Evaluate in inference mode (BatchNorm uses its moving statistics).

    A progress bar over utterances on stderr: `progress` None shows it when stderr is a terminal;
    `leave=False` (validation during training) removes it when done. With `decode` (a beam search)
    utterances are decoded, and counted, one at a time."""
    model.set_train(False)
    acc = ErrorRateAccumulator(definition=definition)
    losses: List[float] = []
    seen = 0
    decode_time = 0.0
    total = len(loader.split.examples)
    bar = tqdm(total=min(total, max_utterances) if max_utterances else total, desc=desc, unit="utt", leave=leave,
               disable=None if progress is None else not progress, file=sys.stderr, dynamic_ncols=True)
    try:
        for batch in loader.iterate(epoch=0):
            logits, out_lengths = model(ms.Tensor(batch.features), ms.Tensor(batch.feature_lengths))
            bad = infeasible_rows(batch)
            label_lengths = np.where(bad, 1, batch.label_lengths).astype(np.int32)  # kernel refuses them
            loss = ctc_losses(logits, out_lengths, ms.Tensor(batch.labels), ms.Tensor(label_lengths)).asnumpy()
            # max_utterances counts utterances, not batches: the last batch is cut to what is left
            take = batch.size if not max_utterances else min(batch.size, max_utterances - seen)
            losses.extend(np.where(bad, np.inf, loss)[:take].tolist())
            t0 = time.perf_counter()
            log_probs = logits.astype(ms.float32).asnumpy()[:take]
            lengths = out_lengths.asnumpy()[:take]
            if decode is None:
                hyps = batch_greedy_decode(log_probs, lengths)
                bar.update(min(take, max(0, bar.total - bar.n)))
            else:
                hyps = []
                for i in range(take):
                    hyps += decode(log_probs[i:i + 1], lengths[i:i + 1])
                    bar.update(1)
            decode_time += time.perf_counter() - t0
            for uid, ref, hyp in zip(batch.ids[:take], batch.transcripts[:take], hyps):
                acc.add(ref, hyp, uid)
            seen += take
            if max_utterances and seen >= max_utterances:
                break
    finally:
        bar.close()
        model.set_train(True)
    if seen == 0:
        raise ValueError("evaluation data set is empty: no utterance could be loaded")
    finite = [x for x in losses if np.isfinite(x)]
    return EvalResult(float(np.mean(finite)) if finite else float("inf"), acc.wer, acc.cer, seen,
                      acc.per_utterance, decode_time, acc.summary())
