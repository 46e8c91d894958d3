"""What each recipe change buys `make train`: held-out test CER of variants of experiment=quickstart.

    .venv/bin/python -m bench.recipe_study                      # every variant, 900 steps each
    .venv/bin/python -m bench.recipe_study --steps 900 --only baseline specaugment

Each variant is `python -m ds2exp.quickstart experiment=quickstart <its overrides>` with a fixed step
budget instead of the 10-minute one (trainer.max_minutes=null, trainer.max_steps=--steps; the cosine
then runs over those steps), so its CER does not depend on how loaded the machine is while it runs.
Give --steps the number of steps `make train` reaches in 10 minutes on the machine in question (its
last line says it). Variants that change the cost of a step (model size, batch) also print their
measured seconds per step, so that their step budget in 10 minutes can be worked out; measure those
on a quiet machine. Prints one table: steps, s/step, test CER greedy and with the LM (when KenLM is
installed), and the difference from the baseline. Runs go under outputs/recipe_study/<time>/<variant>.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

from ds2exp.config import project_root

VARIANTS = {
    "baseline": [],
    "specaugment": ["dataset.spec_augment.enabled=true"],
    "lr_3e-3_warmup": ["optimizer.lr=3e-3", "optimizer.warmup_steps=100"],
    "lr_8e-4": ["optimizer.lr=8e-4"],
    "gru_192": ["model.rnn_hidden=192"],
    "batch_16": ["dataset.batch_size=16"],
    "one_gru_layer_320": ["model.rnn_layers=1", "model.rnn_hidden=320"],
}


def corpus_cer(directory: Path) -> float:
    """CER in % over the per-utterance records evaluate.py wrote into `directory`."""
    errors = chars = 0
    for path in directory.glob("*.utterances.jsonl"):
        for line in path.read_text().splitlines():
            rec = json.loads(line)
            errors += int(rec["char_errors"])
            chars += int(rec["ref_chars"])
    if chars == 0:
        raise RuntimeError(f"no scored utterances under {directory}")
    return 100.0 * errors / chars


def run_variant(name: str, overrides, steps: int, out_root: Path) -> dict:
    run_dir = out_root / name
    cmd = [sys.executable, "-m", "ds2exp.quickstart", "experiment=quickstart", "trainer.max_minutes=null",
           f"trainer.max_steps={steps}", "logger=none", *overrides, f"hydra.run.dir={run_dir}"]
    print(f"[recipe] {name}: {' '.join(cmd[2:])}", flush=True)
    t0 = time.time()
    with (out_root / f"{name}.log").open("w") as log:
        rc = subprocess.run(cmd, cwd=project_root(), stdout=log, stderr=subprocess.STDOUT).returncode
    if rc != 0:
        return {"name": name, "error": f"exit {rc}, see {out_root / (name + '.log')}"}
    summary = json.loads((run_dir / "summary.json").read_text())
    # quickstart's own line: "trained N steps in M min (wall, including data build)"
    found = re.search(r"trained \d+ steps in ([0-9.]+) min", (out_root / f"{name}.log").read_text())
    train_s = 60 * float(found.group(1)) if found else time.time() - t0
    row = {"name": name, "overrides": overrides, "steps": summary["step"], "s_per_step": train_s / summary["step"],
           "cer_greedy": corpus_cer(run_dir / "evaluation" / "greedy")}
    lm_dir = run_dir / "evaluation" / "beam_lm"
    row["cer_lm"] = corpus_cer(lm_dir) if lm_dir.exists() else None
    print(f"[recipe] {name}: {json.dumps(row)}", flush=True)
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=900, help="step budget of every variant")
    ap.add_argument("--only", nargs="*", choices=sorted(VARIANTS), help="variants to run (default: all)")
    args = ap.parse_args(argv)
    names = args.only or list(VARIANTS)
    if "baseline" not in names:
        names = ["baseline", *names]
    out_root = Path(project_root()) / "outputs" / "recipe_study" / datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
    out_root.mkdir(parents=True, exist_ok=True)
    print(f"[recipe] machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"load {os.getloadavg()[0]:.1f}; {args.steps} steps per variant; runs under {out_root}", flush=True)
    rows = [run_variant(n, VARIANTS[n], args.steps, out_root) for n in names]
    (out_root / "results.json").write_text(json.dumps(rows, indent=1))
    base = next((r for r in rows if r["name"] == "baseline" and "error" not in r), None)
    print(f"\n{'variant':<20} {'overrides':<52} {'steps':>5} {'s/step':>7} {'CER greedy':>10} {'vs base':>8} "
          f"{'CER LM':>7}")
    for r in rows:
        if "error" in r:
            print(f"{r['name']:<20} failed: {r['error']}")
            continue
        delta = f"{r['cer_greedy'] - base['cer_greedy']:+.2f}" if base else "-"
        lm = f"{r['cer_lm']:.2f}" if r["cer_lm"] is not None else "-"
        print(f"{r['name']:<20} {' '.join(r['overrides']) or '(experiment=quickstart)':<52} {r['steps']:>5} "
              f"{r['s_per_step']:>7.3f} {r['cer_greedy']:>10.2f} {delta:>8} {lm:>7}")
    print(f"[recipe] load at the end {os.getloadavg()[0]:.1f}; results: {out_root / 'results.json'}")
    return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
