"""`make train`: train the named experiment (conf/experiment/quickstart.yaml: ds2_tiny_gru on synth_tiny,
built if needed, for 10 minutes), then evaluate its best checkpoint on the held-out synthetic test split
- greedy, and beam search with a word 2-gram LM of the training transcripts when KenLM is installed -
and say where everything is.

    python -m ds2exp.quickstart experiment=quickstart [overrides...]

Extra arguments are passed to train.py as overrides, e.g. `trainer.max_minutes=20`.
"""
from __future__ import annotations

import importlib
import json
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Optional

from ds2exp.config import PACKAGE_DIR, project_root

SCRIPTS = PACKAGE_DIR.parent  # train.py / evaluate.py sit next to the package in a checkout

# The training settings live in conf/experiment/quickstart.yaml (chosen by measurement, see there);
# an `experiment=...` argument replaces them.
DEFAULT_OVERRIDES = ["experiment=quickstart"]


def _train_language_model(data_overrides) -> Optional[Path]:
    """The word 2-gram of the training transcripts that the beam decoder uses, built next to the
    corpus's manifests (again when a manifest is newer); None, with the reason, without KenLM."""
    try:
        importlib.import_module("kenlm")
    except ImportError:
        print("[ds2exp] kenlm is not installed (pip install 'ds2exp[lm]'): greedy decoding only", file=sys.stderr)
        return None
    from ds2exp.cli import compose_config
    from ds2exp.data.dataset import resolve_manifests
    from ds2exp.evaluation.ngram import write_lm

    cfg = compose_config(["dataset=synth_tiny", *[a for a in data_overrides if not a.startswith("logger")]])
    manifests = resolve_manifests(cfg, progress=False)["train"]
    out = Path(str(cfg.dataset.root)) / "lm" / "train-2gram.arpa"
    if not out.exists() or any(m.stat().st_mtime > out.stat().st_mtime for m in manifests):
        write_lm(manifests, out, order=2)
    return out


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    root = Path(project_root())
    given = [a.split("=", 1)[1] for a in argv if a.startswith("hydra.run.dir=")]
    if given:
        run_dir = Path(given[-1]).resolve()
        argv = [a for a in argv if not a.startswith("hydra.run.dir=")]
    else:
        run_dir = root / "outputs" / "quickstart" / datetime.now().strftime("%Y-%m-%d/%H-%M-%S")
    defaults = [] if any(a.startswith("experiment=") for a in argv) else DEFAULT_OVERRIDES
    overrides = defaults + argv + [f"hydra.run.dir={run_dir}"]
    print(f"[ds2exp] training: python train.py {' '.join(overrides)}", flush=True)
    t0 = time.time()
    r = subprocess.run([sys.executable, str(SCRIPTS / "train.py"), *overrides], cwd=root)
    minutes = (time.time() - t0) / 60
    if r.returncode != 0:
        print(f"[ds2exp] training failed (exit {r.returncode}); see {run_dir}", file=sys.stderr)
        return r.returncode
    data_overrides = [a for a in argv if a.startswith(("dataset", "paths", "logger"))]
    eval_dir = run_dir / "evaluation"
    decoders = [("greedy (acoustic model alone)", [], eval_dir / "greedy")]
    lm = _train_language_model(data_overrides)
    if lm is not None:
        decoders.append((f"beam search with a word 2-gram LM of the training transcripts ({lm})",
                         ["decoder=beam", f"decoder.lm_path={lm}"], eval_dir / "beam_lm"))
    for title, decoder, out in decoders:
        ev = subprocess.run([sys.executable, str(SCRIPTS / "evaluate.py"), f"checkpoint={run_dir}", "split=test",
                             "dataset=synth_tiny", *data_overrides, *decoder, f"hydra.run.dir={out}"], cwd=root,
                            capture_output=True, text=True)
        sys.stderr.write(ev.stderr[-3000:] if ev.returncode else "")
        if ev.returncode != 0:
            print(f"[ds2exp] evaluation failed (exit {ev.returncode})", file=sys.stderr)
            return ev.returncode
        print(f"[ds2exp] held-out synthetic test split, {title}:")
        print(ev.stdout)
    summary = json.loads((run_dir / "summary.json").read_text())
    print(f"[ds2exp] trained {summary['step']} steps in {minutes:.1f} min (wall, including data build)")
    print("[ds2exp] held-out synthetic test split: see the tables above (WER/CER, %)")
    print(f"[ds2exp] run directory: {run_dir}")
    print(f"[ds2exp] per-utterance results: {eval_dir}")
    print(f"[ds2exp] MLflow run {summary.get('mlflow_run_id')}; open the UI with `make ui` "
          f"(store sqlite:///{root}/mlflow.db)")
    if summary.get("mlflow_url"):
        print(f"[ds2exp] the run in the UI: {summary['mlflow_url']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
