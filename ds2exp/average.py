"""Average the weights of several checkpoints of one run into a new checkpoint.

    python -m ds2exp.average RUN_DIR --mode best --k 3 [--out PATH]

`best`: the k best checkpoints by the run's trainer.monitor (lowest val/cer by default); `last`: the
k most recent by step.
Float parameters are averaged; integer state (BatchNorm counters, optimizer step) and the
metadata come from the newest checkpoint. The optimizer state is not carried over: an
averaged model is for evaluation and export, or to start a new run from (`pretrained=`).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import List

import numpy as np



def select(run_dir: Path, mode: str, k: int) -> List[Path]:
    from ds2exp.checkpoints.names import RunDir
    from ds2exp.checkpoints.best import ranked_best
    from ds2exp.checkpoints.io import load_checkpoint

    run = RunDir.of(run_dir)
    d = run.checkpoint_folder
    if mode == "best":
        found = [c["path"] for c in ranked_best(d)]
    else:
        found = sorted(run.training_checkpoints(), key=lambda p: load_checkpoint(p).meta.get("step", -1),
                       reverse=True)
        seen, unique = set(), []
        for p in found:  # last.ckpt and best-* of the same step hold the same weights
            step = load_checkpoint(p).meta.get("step")
            if step not in seen:
                seen.add(step)
                unique.append(p)
        found = unique
    if not found:
        raise FileNotFoundError(f"no {mode} checkpoints in {d}")
    return found[:k]


def average(paths: List[Path], out: Path) -> Path:
    import mindspore as ms

    from ds2exp.checkpoints.io import load_checkpoint

    loaded = [load_checkpoint(p) for p in paths]
    names = list(loaded[0].model_state)
    for c in loaded[1:]:
        if set(c.model_state) != set(names):
            raise ValueError(f"{c.path} has different parameters from {loaded[0].path}")
    newest = max(loaded, key=lambda c: c.meta.get("step", -1))
    entries = []
    for n in names:
        arrays = [c.model_state[n] for c in loaded]
        if np.issubdtype(arrays[0].dtype, np.floating):
            value = np.mean(np.stack(arrays).astype(np.float64), axis=0).astype(arrays[0].dtype)
        else:
            value = newest.model_state[n]
        entries.append({"name": n, "data": ms.Tensor(value)})
    from ds2exp.checkpoints.io import save_checkpoint

    meta = dict(newest.meta)
    meta["averaged_from"] = [str(p) for p in paths]

    class _State:  # the shape save_checkpoint expects: parameters_and_names()
        def parameters_and_names(self_inner):
            for e in entries:
                yield e["name"], ms.Parameter(e["data"], name=e["name"])

    return save_checkpoint(out, _State(), None, meta)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m ds2exp.average", description=__doc__.split("\n\n")[0])
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("--mode", choices=["best", "last"], default="best")
    ap.add_argument("--k", type=int, default=3)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    from ds2exp.checkpoints.names import AVERAGED_PREFIX, RunDir
    from ds2exp.cli import refuse
    from ds2exp.checkpoints.io import CheckpointError

    if args.k < 1:
        refuse("--k", args.k, "an integer >= 1")
    if not args.run_dir.is_dir():
        refuse("run_dir", str(args.run_dir), "an existing run directory (or its checkpoints/ folder)")
    try:
        paths = select(args.run_dir, args.mode, args.k)
        out = args.out or (RunDir.of(args.run_dir).checkpoints / f"{AVERAGED_PREFIX}{args.mode}{len(paths)}.ckpt")
        average(paths, out)
    except (FileNotFoundError, ValueError, CheckpointError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"averaged {len(paths)} checkpoints -> {out}")
    for p in paths:
        print(f"  {p}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
