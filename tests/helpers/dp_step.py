"""One ds2exp training step, data parallel under msrun or in one process (tests/test_data_parallel.py).

    python tests/helpers/dp_step.py OUT.npz ROWS_PER_RANK [WORLD]

Builds ds2_tiny (no BatchNorm: per-rank batch statistics would differ from one batch of 2B by
design), SGD with lr 1, no momentum, no clipping, so the parameter change of one step is minus the
gradient the optimizer received. The batch is 2 x ROWS_PER_RANK random utterances of different
lengths; under msrun rank r trains on rows [r*B, (r+1)*B), padded to its own longest row. Rank 0
(or the single process) writes the parameter change and the loss to OUT.npz.
"""
from __future__ import annotations

import sys
from pathlib import Path

import ds2exp  # noqa: F401
from ds2exp.training import distributed


def main() -> int:
    if distributed.role() == "MS_SCHED":
        distributed.run_scheduler()
        return 0
    import numpy as np

    from ds2exp.cli import check_overrides
    from ds2exp.data.dataset import Batch
    from ds2exp.models.deepspeech2 import build_model
    from ds2exp.training.optim import build_optimizer
    from ds2exp.runtime import setup_mindspore
    from ds2exp.training.trainer import Trainer
    from ds2exp.tracking.mlflow_tracker import NullTracker

    out, rows, world = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]) if len(sys.argv) > 3 else 1
    cfg = check_overrides(["model=ds2_tiny", "model.batch_norm=false", "model.rnn_hidden=64", "optimizer=sgd",
                           "optimizer.lr=1.0", "optimizer.momentum=0.0", "optimizer.nesterov=false",
                           "optimizer.weight_decay=0", "optimizer.schedule=constant", "optimizer.grad_clip=0",
                           "logger=none",
                           f"hardware.num_devices={world}", "trainer.progress=false"])
    setup_mindspore(cfg.hardware, 0, threads=1 if world > 1 else None)
    rank = 0
    if world > 1:
        rank, world = distributed.init_data_parallel(world)
    model = build_model(cfg.model)
    optimizer = build_optimizer(model.trainable_params(), cfg.optimizer)
    parallel = {}
    if world > 1:
        reducer = distributed.GradientAverager(world)
        reducer.broadcast_from_rank0(list(model.get_parameters()))
        parallel = {"reducer": reducer, "rank": rank, "is_primary": rank == 0}
    trainer = Trainer(cfg, model, optimizer, None, None, NullTracker(), out.parent, 1, **parallel)
    model.set_train(True)

    rng = np.random.default_rng(7)
    total = 2 * rows
    frames = rng.integers(120, 240, total)
    feats = [rng.standard_normal((161, int(f))).astype(np.float32) for f in frames]
    labels = [rng.integers(0, 28, int(f) // 8).astype(np.int32) for f in frames]
    mine = range(total) if world == 1 else range(rank * rows, (rank + 1) * rows)
    T = max(int(frames[i]) for i in mine)
    L = max(len(labels[i]) for i in mine)
    x = np.zeros((len(mine), 161, T), np.float32)
    y = np.zeros((len(mine), L), np.int32)
    for j, i in enumerate(mine):
        x[j, :, :frames[i]] = feats[i]
        y[j, :len(labels[i])] = labels[i]
    batch = Batch(x, np.array([frames[i] for i in mine], np.int32), y,
                  np.array([len(labels[i]) for i in mine], np.int32), [f"u{i}" for i in mine],
                  [float(frames[i]) / 100 for i in mine], [""] * len(mine))
    before = {p.name: p.asnumpy().copy() for p in model.trainable_params()}
    res = trainer.train_step(batch)
    assert res.finite, res
    if rank == 0:
        delta = {n: before[n] - p.asnumpy() for n, p in ((p.name, p) for p in model.trainable_params())}
        np.savez(out, loss=np.float64(res.loss), grad_norm=np.float64(res.grad_norm), **delta)
    print(f"rank {rank}/{world}: loss {res.loss:.6f} grad_norm {res.grad_norm:.6f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
