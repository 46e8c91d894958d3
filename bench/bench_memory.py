"""Memory of a ds2_reference training step at LibriSpeech lengths: peak resident memory of the whole
process (ru_maxrss from wait4, bench/step_harness.py), ds2exp against PyTorch at batch 8 x 1200 frames,
and ds2exp alone at the zoo recipe's batch 20 x 1250 frames against a 16 GiB machine (the reference
recipe's user trains on 8 vCPUs and 16 GiB).

    .venv/bin/python -m bench.bench_memory

Each row is one process running one training step (no warm-up: the first step allocates what every
later one reuses; the step time printed is that first step's).
"""
from __future__ import annotations

import sys
from typing import Any, Callable, Dict, List

from bench.host import cores, where
from bench.step_harness import run_child

MODEL = "ds2_reference"
COMPARED = (8, 1200)          # batch x frames, ds2exp and PyTorch
RECIPE = (20, 1250)           # the zoo recipe's batch, ds2exp alone
MACHINE_GIB = 16.0


def rows(threads: int) -> List[Dict[str, Any]]:
    plan = [("ds2exp", COMPARED), ("torch", COMPARED), ("ds2exp", RECIPE)]
    out = []
    for child, (b, t) in plan:
        res = run_child(child, timeout=900, model=MODEL, batch=b, frames=t, steps=1, warmup=0, threads=threads)
        out.append({"child": child, "batch": b, "frames": t, "res": res})
    return out


def run(threads: int, where: str, out: Callable[[str], None] = print) -> Dict[str, Any]:
    out(f"\nMemory of one {MODEL} training step {where} (peak resident memory of the row's process, "
        "ru_maxrss; one step, no warm-up):")
    out(f"  {'path':10s} {'batch':>10s} {'peak RSS MiB':>13s} {'s/step':>8s}")
    measured = rows(threads)
    for r in measured:
        res = r["res"]
        shape = f"{r['batch']}x{r['frames']}"
        if "error" in res or not res.get("max_rss_mib"):
            out(f"  {r['child']:10s} {shape:>10s}  failed: {res.get('error', 'no figure')}")
            continue
        out(f"  {r['child']:10s} {shape:>10s} {res['max_rss_mib']:13.0f} {res.get('s', float('nan')):8.1f}")
    mine, theirs, recipe = (r["res"].get("max_rss_mib") for r in measured)
    ratio = mine / theirs if mine and theirs else None
    return {"rows": measured, "ratio": ratio, "recipe_gib": recipe / 1024 if recipe else None}


def main() -> int:
    res = run(cores(), where())
    print(f"  ds2exp / PyTorch peak RSS at {COMPARED[0]}x{COMPARED[1]}: "
          + (f"{res['ratio']:.2f}" if res["ratio"] else "n/a"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
