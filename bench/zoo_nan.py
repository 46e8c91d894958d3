"""Why the model zoo's DeepSpeech2 recipe goes non-finite: experiment=zoo_recipe on the hazard corpus
(dataset=synth_long), with its causes switched off one at a time and together.

    .venv/bin/python -m bench.zoo_nan                          # every variant, ds2_tiny, 300 steps
    .venv/bin/python -m bench.zoo_nan --model ds2_reference --steps 120 --only zoo no_data_hazards

Each variant is `python train.py experiment=zoo_recipe dataset=synth_long model=<model> <overrides>`
with logger=none and no validation, run to --steps or to the first non-finite step (the zoo's
LossMonitor stops there). Prints one table: outcome, first bad step, ds2exp's cause tag and the
utterances of the bad batch with what the corpus audit knows of them; the shuffle is seeded, so the same
variant stops at the same step every time. Runs go under outputs/zoo_nan/<time>/<variant>.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

from ds2exp.config import project_root

GUARD = "dataset.feature.zero_std_guard=true"
KEEP_FEASIBLE = "dataset.drop_infeasible=true"
VARIANTS = {
    "zoo": [],  # every difference as the zoo has it
    "std_guard": [GUARD],  # silent audio normalised by 1 instead of 0
    "drop_infeasible": [KEEP_FEASIBLE],  # transcripts longer than their output frames dropped
    "no_data_hazards": [GUARD, KEEP_FEASIBLE],  # both: what is left is the optimisation
    "no_crop": [GUARD, KEEP_FEASIBLE, "dataset.crop_frames=null", "dataset.label_pad=null"],
    "clip_400": [GUARD, KEEP_FEASIBLE, "optimizer.grad_clip=400"],
    "ds2exp_defaults": None,  # dataset=synth_long with ds2exp's own defaults, no zoo_recipe
}


def run_variant(name: str, overrides, model: str, steps: int, out: Path) -> dict:
    run_dir = out / name
    head = ["dataset=synth_long"] if overrides is None else ["experiment=zoo_recipe", "dataset=synth_long",
                                                              *overrides]
    cmd = [sys.executable, str(Path(project_root()) / "train.py"), *head, f"model={model}", "logger=none",
           f"trainer.max_steps={steps}", "trainer.max_epochs=1000", "trainer.eval_every=1000000",
           "trainer.progress=false", f"hydra.run.dir={run_dir}"]
    t0 = time.time()
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=project_root())
    try:
        s = json.loads((run_dir / "summary.json").read_text())
    except (OSError, ValueError):
        s = {"status": f"exit {r.returncode}", "error": r.stderr.strip().splitlines()[-1:]}
    dropped = json.loads((run_dir / "dropped_train.json").read_text()) if (run_dir / "dropped_train.json").exists() \
        else {}
    batch = [u["id"] + (f" ({', '.join(u['hazards'])})" if u.get("hazards") else "") for u in s.get("batch") or []]
    return {"variant": name, "overrides": " ".join(overrides) if overrides is not None else "(no zoo_recipe)",
            "status": s.get("status"), "steps": s.get("step"), "first_bad_step": s.get("first_bad_step"),
            "cause": s.get("cause") or "-", "batch": ", ".join(batch) or "-",
            "dropped": sum(len(v) for v in dropped.values()), "seconds": round(time.time() - t0, 1),
            "exit": r.returncode}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="ds2_tiny")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--only", nargs="*", choices=sorted(VARIANTS))
    args = ap.parse_args(argv)
    out = Path(project_root()) / "outputs" / "zoo_nan" / datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
    print(f"host: {platform.node()} {platform.machine()}, {os.cpu_count()} cores; model {args.model}, "
          f"at most {args.steps} steps; runs in {out}", flush=True)
    rows = []
    for name in args.only or VARIANTS:
        row = run_variant(name, VARIANTS[name], args.model, args.steps, out)
        rows.append(row)
        print(f"{name}: {row['status']} at step {row['steps']} ({row['seconds']} s)", flush=True)
    print("\n| variant | overrides on top of zoo_recipe | outcome | steps | first bad step | cause | bad batch "
          "(audit) | dropped at load |\n|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['variant']} | {r['overrides']} | {r['status']} | {r['steps']} | {r['first_bad_step'] or '-'} "
              f"| {r['cause']} | {r['batch']} | {r['dropped']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
