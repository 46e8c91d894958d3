"""What each recipe change buys `make train`: held-out test CER of variants of experiment=quickstart.

    .venv/bin/python -m bench.recipe_study                      # every variant, 900 steps each
    .venv/bin/python -m bench.recipe_study --steps 900 --only baseline specaugment
    .venv/bin/python -m bench.recipe_study --speed --only gru_192   # s/step side by side, no training runs

Each variant is `python -m ds2exp.quickstart experiment=quickstart <its overrides>` with a fixed step
budget instead of the 10-minute one (trainer.max_minutes=null, trainer.max_steps=--steps; the cosine
then runs over those steps), so its CER does not depend on how loaded the machine is while it runs.
Give --steps the number of steps `make train` reaches in 10 minutes on the machine in question (its
last line says it). Variants that change the cost of a step (model size, batch) also print their
measured seconds per step, so that their step budget in 10 minutes can be worked out; measure those
on a quiet machine, or side by side with --speed: the Trainer of each variant built in one process
and stepped in turn (A B B A) on the same synthetic batch of 240 frames (synth_tiny's mean length),
so that every variant sees the same load. Prints one table: steps, s/step, test CER greedy and with
the LM (when KenLM is installed), and the difference from the baseline. Runs go under
outputs/recipe_study/<time>/<variant>.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

from bench.host import where
from ds2exp.config import project_root

VARIANTS = {
    "baseline": [],
    # the same recipe from another seed (initial weights, data order): how far apart two runs land by chance
    "baseline_seed_2": ["trainer.seed=2"],
    "specaugment": ["dataset.spec_augment.enabled=true"],
    "lr_3e-3_warmup": ["optimizer.lr=3e-3", "optimizer.warmup_steps=100"],
    "lr_5e-3_warmup": ["optimizer.lr=5e-3", "optimizer.warmup_steps=150"],
    "lr_8e-4": ["optimizer.lr=8e-4"],
    "gru_192": ["model.rnn_hidden=192"],
    "batch_16": ["dataset.batch_size=16"],
    "batch_4": ["dataset.batch_size=4"],
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


def measure_speed(names, rounds: int = 4) -> dict:
    """Median s/step of each variant's Trainer (train.py's model, optimizer and step), stepped in turn
    in this process on one synthetic batch of the variant's batch size."""
    import numpy as np

    from bench.flops import FRAMES_PER_SECOND, synthetic_batch
    from ds2exp.cli import compose_config
    from ds2exp.data.dataset import Batch
    from ds2exp.models.deepspeech2 import build_model
    from ds2exp.tracking.mlflow_tracker import NullTracker
    from ds2exp.training.optim import build_optimizer
    from ds2exp.runtime import setup_mindspore
    from ds2exp.training.trainer import Trainer

    frames = 240
    trainers = {}
    for name in names:
        cfg = compose_config(["experiment=quickstart", "logger=none", "trainer.progress=false", *VARIANTS[name]])
        if not trainers:
            setup_mindspore(cfg.hardware, int(cfg.trainer.seed))
        model = build_model(cfg.model)
        model.set_train(True)
        trainer = Trainer(cfg, model, build_optimizer(model.trainable_params(), cfg.optimizer), None, None,
                          NullTracker(), Path(tempfile.mkdtemp(prefix="ds2exp-recipe-")), steps_per_epoch=1)
        b = int(cfg.dataset.batch_size)
        x, xl, y, yl = synthetic_batch(b, frames)
        batch = Batch(x, xl, y, yl, [f"u{i}" for i in range(b)], [frames / FRAMES_PER_SECOND] * b, [""] * b)
        trainers[name] = (trainer, batch)
    times = {n: [] for n in names}
    order = list(names) + list(reversed(names))
    for r in range(rounds + 1):
        for name in order:
            trainer, batch = trainers[name]
            t0 = time.perf_counter()
            trainer.train_step(batch)
            if r:  # the first round warms up (numba compiles, MindSpore builds its kernels)
                times[name].append(time.perf_counter() - t0)
    return {n: float(np.median(t)) for n, t in times.items()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=900, help="step budget of every variant")
    ap.add_argument("--only", nargs="*", choices=sorted(VARIANTS), help="variants to run (default: all)")
    ap.add_argument("--speed", action="store_true", help="only time each variant's step, side by side")
    args = ap.parse_args(argv)
    names = args.only or list(VARIANTS)
    if args.speed and "baseline" not in names:
        names = ["baseline", *names]
    if args.speed:
        print(f"[recipe] {where()}: s/step of each variant, stepped in turn", flush=True)
        speed = measure_speed(names)
        base = speed["baseline"]
        for name in names:
            print(f"{name:<20} {' '.join(VARIANTS[name]) or '(experiment=quickstart)':<52} {speed[name]:.3f} s/step "
                  f"({base / speed[name]:.2f}x the baseline's steps in the same time)")
        print(f"[recipe] load at the end {os.getloadavg()[0]:.1f}")
        return 0
    out_root = Path(project_root()) / "outputs" / "recipe_study" / datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
    out_root.mkdir(parents=True, exist_ok=True)
    print(f"[recipe] {where()}: {args.steps} steps per variant; runs under {out_root}", flush=True)
    rows = [run_variant(n, VARIANTS[n], args.steps, out_root) for n in names]
    (out_root / "results.json").write_text(json.dumps(rows, indent=1))
    base = next((r for r in rows if r["name"] == "baseline" and "error" not in r), None)  # when it ran
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
