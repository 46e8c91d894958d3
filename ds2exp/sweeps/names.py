"""Names a person can read: a sweep job is called by the values of the swept keys (`lr=1e-3 bs=8`).

The sweep callback finds the swept keys when the sweep starts (command-line values with a comma or a
sweep function, and the sweeper's params) and hands them to the jobs in `$DS2EXP_SWEPT_KEYS` and in
`<sweep dir>/swept_keys.json` (for launchers whose jobs run in processes that did not inherit the
environment). Each job's MLflow run is named `run_name(overrides, swept)`, and `jobs.csv` beside the
numbered job folders maps number -> name -> overrides -> status -> MLflow run id.
"""
from __future__ import annotations

import csv
import io
import json
import os
import re
from pathlib import Path
from typing import Dict, Iterable, List, Mapping, Optional, Sequence

ENV_SWEPT = "DS2EXP_SWEPT_KEYS"
SWEPT_FILE = "swept_keys.json"
JOBS_CSV = "jobs.csv"
JOBS_COLUMNS = ("num", "name", "overrides", "status", "mlflow_run_id", "dir")

# Short names of the keys people sweep most; any other key is shown by its last part.
SHORT = {"optimizer.lr": "lr", "dataset.batch_size": "bs", "optimizer.name": "opt", "optimizer.schedule": "sched",
         "optimizer.weight_decay": "wd", "optimizer.grad_clip": "clip", "trainer.seed": "seed"}
# Keys that never name a job (paths and where things are written).
_NOT_NAMES = ("paths.", "hydra.", "logger.", "trainer.progress")


def parse_overrides(overrides: Iterable[str]) -> Dict[str, str]:
    out: Dict[str, str] = {}
    for o in overrides:
        key, _, value = str(o).partition("=")
        out[key.lstrip("+~")] = value
    return out


def short_key(key: str, keys: Sequence[str] = ()) -> str:
    """`optimizer.lr` -> `lr`; the last part of other keys unless two keys would share it."""
    if key in SHORT:
        return SHORT[key]
    last = key.rsplit(".", 1)[-1]
    clash = [k for k in keys if k != key and k.rsplit(".", 1)[-1] == last]
    return key if clash else last


def short_value(value: str) -> str:
    """Numbers short and readable (Hydra hands a job `optimizer.lr=0.0001` for `1e-4`): `1e-4`, `0.003`,
    `1e3`, `8`; a long float from a search sampler gets 4 significant digits; other values as given."""
    text = str(value)
    try:
        x = float(text)
    except ValueError:
        return text
    if re.fullmatch(r"[+-]?\d+", text.strip()) and abs(x) < 1e4:
        return str(int(text))
    if x == 0 or not (x == x and abs(x) != float("inf")):
        return text
    if 1e-2 <= abs(x) < 1e3:
        return f"{x:.4g}"
    mantissa, _, exponent = f"{x:.3e}".partition("e")
    mantissa = mantissa.rstrip("0").rstrip(".")
    return f"{mantissa}e{int(exponent)}"


def run_name(overrides: Mapping[str, str], swept: Optional[Sequence[str]] = None) -> str:
    """`lr=1e-3 bs=8` from a job's overrides: the swept keys, or every override that is not a path."""
    keys = [k for k in swept or () if k in overrides]
    if not keys:
        keys = [k for k in overrides if not k.startswith(_NOT_NAMES)]
    return " ".join(f"{short_key(k, keys)}={short_value(overrides[k])}" for k in keys)


def sweep_name(swept: Sequence[str], sweep_dir: Path | str) -> str:
    """`sweep lr x bs 02-24-02`: the swept keys' short names and the sweep folder's name (Hydra's default
    folder, multirun/<date>/<time>, is named by the time the sweep started). The sweep's parent run and
    its heatmap carry this name rather than the folder's absolute path, which the UI and the plot cut."""
    keys = [k for k in swept if not k.startswith(_NOT_NAMES)]
    what = " x ".join(short_key(k, keys) for k in keys)
    return " ".join(part for part in ("sweep", what, Path(sweep_dir).name) if part)


def publish_swept(keys: Sequence[str], sweep_dir: Path) -> None:
    """Sweep process: tell the jobs which keys are swept (environment and sweep dir)."""
    os.environ[ENV_SWEPT] = json.dumps(list(keys))
    sweep_dir.mkdir(parents=True, exist_ok=True)
    (sweep_dir / SWEPT_FILE).write_text(json.dumps(list(keys)) + "\n")


def swept_keys(sweep_dir: Optional[Path] = None) -> List[str]:
    """Job process: the swept keys ($DS2EXP_SWEPT_KEYS, else <sweep dir>/swept_keys.json, else none)."""
    for text in (os.environ.get(ENV_SWEPT),
                 (sweep_dir / SWEPT_FILE).read_text() if sweep_dir and (sweep_dir / SWEPT_FILE).is_file() else None):
        if text:
            try:
                return [str(k) for k in json.loads(text)]
            except ValueError:
                continue
    return []


def write_jobs_csv(sweep_dir: Path, rows: Iterable[Mapping[str, object]]) -> Path:
    """`<sweep dir>/jobs.csv`: one row per job folder, written whole (readers never see half a file)."""
    from ds2exp.atomic import atomic_write_text

    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=JOBS_COLUMNS, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for row in rows:
        w.writerow({k: "" if row.get(k) is None else row.get(k) for k in JOBS_COLUMNS})
    path = Path(sweep_dir) / JOBS_CSV
    atomic_write_text(path, buf.getvalue())
    return path


def read_jobs_csv(sweep_dir: Path) -> List[Dict[str, str]]:
    path = Path(sweep_dir) / JOBS_CSV
    if not path.is_file():
        return []
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))
