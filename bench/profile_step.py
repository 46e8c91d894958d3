"""Where a ds2exp training step's time goes, op by op: MindSpore's profiler around a few steps.

    .venv/bin/python -m bench.profile_step                       # ds2_tiny, batch 16 x 300 frames, 2 steps
    .venv/bin/python -m bench.profile_step --model ds2_reference --batch 4 --frames 400

The Trainer is built as the step bench builds it (bench/step_harness.py) and fed one synthetic batch;
after two warm-up steps, MindSpore's profiler records `--steps` steps. Prints each op type's time per
step (ms), its calls per step and its share, largest first; "Custom" is the host kernels of the fast
layers (ds2exp.kernels) together with the cost of crossing into them. The profiler itself adds some
time to every op: compare shares within one run.
"""
from __future__ import annotations

import argparse
import csv
import glob
import os
import sys
import tempfile

from bench.host import where


def profile(model: str, batch: int, frames: int, steps: int, out_dir: str):
    from bench.flops import FRAMES_PER_SECOND, synthetic_batch
    from bench.step_harness import _ds2exp_trainer
    from ds2exp.data.dataset import Batch

    _, _, trainer = _ds2exp_trainer(model, batch)
    x, xl, y, yl = synthetic_batch(batch, frames)
    data = Batch(x, xl, y, yl, [f"u{i}" for i in range(batch)], [frames / FRAMES_PER_SECOND] * batch, [""] * batch)
    for _ in range(2):  # numba compiles, MindSpore builds its kernels
        trainer.train_step(data)
    from mindspore import Profiler

    prof = Profiler(output_path=out_dir, profile_memory=False)
    for _ in range(steps):
        trainer.train_step(data)
    prof.stop()
    # the profiler's parser (a child process among them) reports its progress on standard output:
    # send that to standard error, so that standard output is the table alone
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    try:
        prof.analyse()
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)
    found = glob.glob(os.path.join(out_dir, "**", "cpu_op_type_info_*.csv"), recursive=True)
    if not found:
        raise RuntimeError(f"MindSpore's profiler wrote no cpu_op_type_info_*.csv under {out_dir}")
    rows = []
    with open(found[0], newline="") as fh:
        for rec in csv.DictReader(fh):
            rows.append((rec["op_type"], float(rec["total_compute_time"]) / steps,
                         int(rec["type_occurrences"]) / steps))
    return sorted(rows, key=lambda r: -r[1])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="ds2_tiny")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--frames", type=int, default=300)
    ap.add_argument("--steps", type=int, default=2)
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="ds2exp-profile-") as out_dir:
        rows = profile(args.model, args.batch, args.frames, args.steps, out_dir)
    total = sum(r[1] for r in rows)
    print(f"{args.model}, batch {args.batch}x{args.frames}, {args.steps} profiled steps {where()}")
    print(f"{'op type':<20} {'ms/step':>9} {'calls/step':>10} {'share':>6}")
    for op, ms, calls in rows:  # every op type, however small: which ops run does not depend on the load
        print(f"{op:<20} {ms:9.1f} {calls:10.1f} {100 * ms / total:5.1f}%")
    print(f"{'all ops':<20} {total:9.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
