"""Audit a corpus before training, for what makes CTC training blow up.

    python -m ds2exp.audit dataset=synth_tiny
    python -m ds2exp.audit experiment=librispeech_100 dataset.root=/data/LibriSpeech --split all
    python -m ds2exp.audit --manifest data/train.jsonl dataset.crop_frames=1250

Takes train.py's overrides (the same dataset, feature and crop settings training would use) or a
manifest file (ds2exp JSON-lines, deepspeech.pytorch JSON or the model zoo's CSV). Prints one line per
hazard kind found, with a count and up to three examples, then a summary line naming the JSON report
(`--json`, else `<paths.cache_dir>/audit/report-<split>-<digest>.json`). The checks and their
thresholds are in ds2exp/data/audit.py; docs/reliability_inputs.md lists the kinds.

Exit status: 0 no fatal hazard (warnings only, or none); 1 a fatal hazard (training would see a
non-finite loss or features); 2 a bad command line or a source that cannot be read; 3 a report file
that cannot be written.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import List, Optional

from ds2exp.cli import ConfigError, check_argument_outputs, check_overrides, config_error, refuse
from ds2exp.data.audit import AuditError, audit_manifests, audit_split, default_report_path

SPLITS = ("train", "val", "test", "all")


def _hydra_quoted(value: str) -> str:
    """`value` as one quoted Hydra override value (a path may hold `,`, `=`, spaces or brackets)."""
    escaped = value.replace("\\", "\\\\").replace("'", "\\'")
    return f"'{escaped}'"


def parse_args(argv: Optional[List[str]]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="python -m ds2exp.audit", formatter_class=argparse.RawDescriptionHelpFormatter,
        description=__doc__.split("\n\n")[0], epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    ap.add_argument("overrides", nargs="*", help="train.py overrides, e.g. dataset=librispeech dataset.root=/data")
    ap.add_argument("--manifest", help="audit this manifest file instead of the config's dataset")
    ap.add_argument("--split", default="train", help="train, val, test or all (default train)")
    ap.add_argument("--json", metavar="OUT", help="write the JSON report here")
    ap.add_argument("--workers", type=int, default=2, help="worker processes decoding audio (default 2)")
    ap.error = lambda message: config_error(message)  # type: ignore[method-assign]  # one line, exit 2
    return ap.parse_args(argv)


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    if args.workers < 1:
        refuse("--workers", args.workers, "an integer >= 1")
    if args.split not in SPLITS:
        refuse("--split", args.split, ", ".join(SPLITS))
    check_argument_outputs(out_file=args.json, out_key="--json")
    overrides = list(args.overrides)
    manifest = None
    if args.manifest is not None:
        manifest = os.path.abspath(args.manifest)
        if not os.path.isfile(manifest):
            refuse("--manifest", args.manifest, "an existing manifest file (JSON-lines, deepspeech.pytorch JSON or "
                                                "zoo CSV)")
        # without a dataset= of the user's, the manifest dataset's limits apply, not synth_tiny's 8 s
        if not any(o.lstrip("+~").split("=", 1)[0] == "dataset" for o in overrides):
            overrides = ["dataset=manifest", f"dataset.train_manifest={_hydra_quoted(manifest)}"] + overrides
    try:
        cfg = check_overrides(overrides, config_name="train")
    except ConfigError as exc:
        config_error(str(exc))
    try:
        if manifest is not None:
            report = audit_manifests([manifest], cfg, "train" if args.split == "all" else args.split,
                                     progress=True, workers=args.workers)
        else:
            report = audit_split(cfg, args.split, progress=True, workers=args.workers)
    except AuditError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    report.write(args.json or default_report_path(cfg, report))
    for line in report.lines():
        print(line)
    return 1 if report.fatal else 0


if __name__ == "__main__":
    sys.exit(main())
