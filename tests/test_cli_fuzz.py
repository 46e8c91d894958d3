"""Every malformed command line is refused before any work: exit 2 (or 3 for an output location that
cannot be created), one line naming the key, no traceback, nothing created.

A table keeps each case found by probing train.py / evaluate.py / export.py; a property-based test
generates malformed values per key from the structured configs. Both go through `preflight`, the
function the commands call first, in-process; a sample of each command runs as a real subprocess.
`pytest tests/test_cli_fuzz.py -s` prints the counts.
"""
from __future__ import annotations

import contextlib
import dataclasses
import io
import os
import pickle
import subprocess
import sys
import typing
from collections import Counter
from enum import Enum
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ds2exp.cli import preflight
from ds2exp.config import EvaluateConfig, ExportConfig, TrainConfig
from tests.helpers import ROOT

COUNTS: Counter = Counter()


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """Checkpoint-shaped inputs: good, damaged in each way the probes found, and not checkpoints at all."""
    import ds2exp  # noqa: F401
    from ds2exp.models.deepspeech2 import DeepSpeech2
    from ds2exp.checkpoints.io import _fields, save_checkpoint

    d = tmp_path_factory.mktemp("ckpts")
    misfit = DeepSpeech2(conv_channels=2, rnn_layers=1, rnn_hidden=8, conv_impl="plain", rnn_impl="plain")
    good = save_checkpoint(d / "run" / "checkpoints" / "last.ckpt", misfit, meta={"step": 4, "config": {}})
    data = good.read_bytes()
    boundaries = [stop for _, _, stop in _fields(data, 0, len(data))]
    (d / "boundary.ckpt").write_bytes(data[:boundaries[len(boundaries) // 2]])  # loads in MindSpore; no 'step'
    (d / "truncated.ckpt").write_bytes(data[: len(data) // 2 + 3])
    (d / "text.ckpt").write_text("this is not a checkpoint\n")
    (d / "pickle.ckpt").write_bytes(pickle.dumps({"step": 1, "weights": [1.0, 2.0]}))
    (d / "empty_dir").mkdir()
    lm = d / "lm.arpa"
    lm.write_text("\\data\\\n")
    return {"good": str(good), "run": str(d / "run"), "boundary": str(d / "boundary.ckpt"),
            "truncated": str(d / "truncated.ckpt"), "text": str(d / "text.ckpt"), "pickle": str(d / "pickle.ckpt"),
            "empty_dir": str(d / "empty_dir"), "lm": str(lm)}


@pytest.fixture()
def workdir(tmp_path, monkeypatch):
    """An empty working folder that is also the project root for paths.* and the MLflow store."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DS2EXP_ROOT", str(tmp_path))
    return tmp_path


def _listing(folder: Path):
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def run_main(fn, *args, **kwargs):
    """(exit status, non-empty stderr lines) of an entry point's function, in-process."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            code = fn(*args, **kwargs) or 0
        except SystemExit as exc:
            code = exc.code
    return code, [ln for ln in err.getvalue().splitlines() if ln.strip()]


def run_preflight(argv, config_name):
    extra = None
    if config_name == "lr_find":
        from ds2exp.lr_find import check as extra
    return run_main(lambda: preflight(list(argv), config_name=config_name, extra_check=extra) and 0)


def assert_refused(code, lines, key, expected_code=2):
    assert code == expected_code, (code, lines)
    assert len(lines) == 1, lines
    prefix = "config error: " if expected_code == 2 else "output error: "
    assert lines[0].startswith(prefix) and "Traceback" not in lines[0], lines
    assert key in lines[0], (key, lines[0])


def _case(command, line, status=2):
    """(command, overrides, key named in the message, exit status) from "a=1 b=2" or "a=1 b=2 -> key";
    the key defaults to the one the last override sets."""
    line, _, key = line.partition("->")
    overrides = line.split()
    return command, overrides, key.strip() or overrides[-1].split("=")[0], status


# Files that are not usable checkpoints; {name} is a file from `ckpts`.
BAD_FILES = ["{boundary}", "{text}", "{truncated}", "{empty_dir}", "{pickle}"]
# Command lines found by probing, each refused with exit 2.
REFUSED = {
    "train": [
        "dataset.feature.window_size=0", "dataset.feature.window_stride=-0.01", "trainer.seed=-1",
        "trainer.seed=99999999999999999999", "optimizer.lr=inf", "optimizer.eps=inf", "dataset.name=",
        "dataset=manifest dataset.train_manifest=/nonexistent.jsonl",
        "pretrained={good}",  # ds2_tiny's shapes differ from the file's
        *[f"{key}={bad}" for key in ("resume", "pretrained") for bad in BAD_FILES],
        "optimizer.min_lr_ratio=-1", "optimizer.min_lr_ratio=5", "optimizer.min_lr_ratio=nan",
        "precision.loss_scale=inf", "precision.scale_factor=0", "precision.scale_window=0", "optimizer.anneal=inf",
        "dataset.spec_augment.freq_width=-3", "trainer.inject_nan_grad_steps=[-1]", "trainer.max_eval_utterances=0",
        "hydra.run.dir=", "hydra.run.dir=.", "-m hydra.sweep.dir= optimizer.lr=1e-4,1e-3 -> hydra.sweep.dir",
        "logger.tracking_uri=", "logger.tracking_uri=foo://bar", "logger.tracking_uri=mlruns", "optimizer.lr=1e-3,nan",
    ],
    "evaluate": [
        "checkpoint={good} decoder.lm_path=/nonexistent", "checkpoint={good} decoder.lm_path={empty_dir}",
        *[f"checkpoint={bad}" for bad in ["/nonexistent", *BAD_FILES]],
        "checkpoints=[{good},/nonexistent] -> checkpoints[1]",
        "checkpoint={good} max_utterances=0", "checkpoint={good} max_utterances=-3", "-> checkpoint",
    ],
    "export": [
        *[f"checkpoint={bad}" for bad in ["/nonexistent", *BAD_FILES]],
        "checkpoint={good} verify_utterances=-1", "checkpoint={good} tolerance=nan",
    ],
    "lr_find": ["optimizer.lr=nan", "hydra.run.dir=", "trainer.seed=-1", "logger.tracking_uri=foo://bar"],
    "transcribe": [
        "checkpoint=/nonexistent audio=[a.wav] -> checkpoint", "checkpoint={pickle} audio=[a.wav] -> checkpoint",
        "checkpoint={good} audio=[a.wav] chunk_seconds=nan",
    ],
}
CASES = [_case(command, line) for command, lines in REFUSED.items() for line in lines]
# an output location that cannot be created: exit 3
CASES += [_case("train", "hydra.run.dir=/proc/x", 3),
          _case("export", "checkpoint={good} output=/proc/nope/x.mindir", 3)]


@pytest.mark.parametrize("command, overrides, key, status", CASES,
                         ids=[f"{c}:{' '.join(o)}" for c, o, _, _ in CASES])
def test_probed_case_is_refused_before_any_work(command, overrides, key, status, ckpts, workdir):
    argv = [o.format(**ckpts) for o in overrides]
    code, lines = run_preflight(argv, command)
    COUNTS[f"table exit {code}"] += 1
    assert_refused(code, lines, key, status)
    assert _listing(workdir) == []


def test_good_inputs_pass(ckpts, workdir):
    """The same files where they are fine: a run directory and its intact checkpoint."""
    for argv, command in ((["resume=" + ckpts["run"]], "train"), (["checkpoint=" + ckpts["run"]], "evaluate"),
                          (["checkpoint=" + ckpts["good"], "decoder.lm_path=" + ckpts["lm"]], "evaluate"),
                          (["checkpoint=" + ckpts["good"], f"output={workdir}/m.mindir"], "export"),
                          (["logger.tracking_uri=file:///tmp/mlruns"], "train"),
                          (["logger.tracking_uri=http://127.0.0.1:5000"], "train")):
        code, lines = run_preflight(argv, command)
        assert (code, lines) == (0, []), (argv, lines)
    assert _listing(workdir) == []


def test_truncation_names_the_newest_intact_neighbour(ckpts, workdir, tmp_path_factory):
    import shutil

    run = tmp_path_factory.mktemp("neighbour") / "checkpoints"
    shutil.copytree(Path(ckpts["run"]) / "checkpoints", run)
    (run / "last.prev.ckpt").write_bytes(Path(ckpts["truncated"]).read_bytes())
    code, lines = run_preflight([f"resume={run / 'last.prev.ckpt'}"], "train")
    assert_refused(code, lines, "resume")
    assert "truncated" in lines[0] and "newest intact one beside it is last.ckpt (step 4)" in lines[0], lines


def test_argparse_commands_refuse_in_one_line(tmp_path, workdir):
    """python -m ds2exp.average / ds2exp.sweeps.report: the same contract through the shared helpers."""
    from ds2exp import average
    from ds2exp.sweeps import report

    sweep_dir = tmp_path / "sweep"
    sweep_dir.mkdir()
    for fn, argv, key, status in (
            (average.main, [str(sweep_dir), "--k", "0"], "--k", 2),
            (average.main, [str(tmp_path / "missing"), "--k", "2"], "run_dir", 2),
            (report.main, [str(sweep_dir), "--tracking-uri", "foo://bar"], "--tracking-uri", 2),
            (report.main, [str(sweep_dir), "--tracking-uri", ""], "--tracking-uri", 2),
            (report.main, [str(sweep_dir), "--out", "/proc/nope/x.png"], "--out", 3)):
        code, lines = run_main(fn, argv)
        COUNTS[f"argparse exit {code}"] += 1
        assert_refused(code, lines, key, status)
    assert _listing(workdir) == ["sweep"]  # (workdir is tmp_path) nothing beside it, nothing in it


SUBPROCESS_SAMPLE = [
    ("train.py", ["optimizer.min_lr_ratio=nan"], "optimizer.min_lr_ratio", 2),
    ("train.py", ["resume={boundary}"], "resume", 2),
    ("evaluate.py", ["checkpoint=/nonexistent"], "checkpoint", 2),
    ("export.py", ["checkpoint={good}", "output=/proc/nope/x.mindir"], "output", 3),
    ("train.py", ["pretrained={good}"], "pretrained", 2),
]


def test_real_commands_refuse_in_one_line_and_create_nothing(ckpts, tmp_path):
    """A sample of each command as a real process (run side by side), each in its own empty folder."""
    procs = []
    for i, (script, overrides, key, status) in enumerate(SUBPROCESS_SAMPLE):
        cwd = tmp_path / f"case{i}"
        cwd.mkdir()
        env = dict(os.environ, DS2EXP_ROOT=str(cwd))
        procs.append((key, status, cwd, subprocess.Popen(
            [sys.executable, str(ROOT / script), *[o.format(**ckpts) for o in overrides]], stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True, cwd=cwd, env=env)))
    for key, status, cwd, proc in procs:
        out, err = proc.communicate(timeout=300)
        lines = [ln for ln in err.splitlines() if ln.strip()]
        COUNTS[f"subprocess exit {proc.returncode}"] += 1
        assert_refused(proc.returncode, lines, key, status)
        assert out.strip() == ""
        assert _listing(cwd) == []


# ------------------------------------------------------------------ generated from the schema

def _schema_keys(cls, prefix=""):
    """(key, kind) for every scalar field of a structured config, kind in float/int/str/enum/bool."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name == "defaults":
            continue
        tp = hints[f.name]
        optional = typing.get_origin(tp) is typing.Union and type(None) in typing.get_args(tp)
        if optional:
            tp = next(a for a in typing.get_args(tp) if a is not type(None))
        key = prefix + f.name
        if dataclasses.is_dataclass(tp):
            yield from _schema_keys(tp, key + ".")
        elif isinstance(tp, type) and issubclass(tp, Enum):
            yield key, "enum"
        elif tp in (float, int, str, bool):
            yield key, tp.__name__
        elif typing.get_origin(tp) in (list, typing.List) and typing.get_args(tp)[0] in (int, float):
            yield key, "list"


KEYS = sorted({(name, key, kind) for name, cls in (("train", TrainConfig), ("evaluate", EvaluateConfig),
                                                     ("export", ExportConfig))
               for key, kind in _schema_keys(cls)})
# values that no key allows, and values that only some keys allow (negative, huge)
ALWAYS_BAD = {"float": ["nan", "inf", "-inf", "1e400"], "int": ["99999999999999999999", "1.5"], "str": [""],
              "enum": ["not_an_option"], "bool": ["maybe"], "list": ["[nan]", "[1e400]"]}
SOMETIMES_BAD = {"float": ["-1", "-1e300", "1e300", "0"], "int": ["-1", "-99999", "0", "2147483648"],
                 "str": ["/nonexistent/x"], "enum": [], "bool": [], "list": ["[-1]"]}


@st.composite
def malformed(draw):
    name, key, kind = draw(st.sampled_from(KEYS))
    always = draw(st.booleans()) or not SOMETIMES_BAD[kind]
    value = draw(st.sampled_from(ALWAYS_BAD[kind] if always else SOMETIMES_BAD[kind]))
    return name, key, value, always


@settings(max_examples=int(os.environ.get("DS2EXP_FUZZ_EXAMPLES", "30")), deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(case=malformed())
def test_generated_malformed_values_keep_the_contract(case, workdir, ckpts):
    name, key, value, always_bad = case
    base = {"train": [], "evaluate": [f"checkpoint={ckpts['good']}"], "export": [f"checkpoint={ckpts['good']}"]}
    code, lines = run_preflight(base[name] + [f"{key}={value}"], name)
    COUNTS[f"generated {'always-bad' if always_bad else 'maybe-bad'} exit {code}"] += 1
    if always_bad:
        assert code == 2, (name, key, value, lines)
    assert code in (0, 2, 3), (name, key, value, code, lines)
    if code:
        assert len(lines) == 1 and "Traceback" not in lines[0], lines
        assert key.split(".")[-1] in lines[0] or key in lines[0], (key, lines[0])
    else:
        assert lines == []
    assert _listing(workdir) == []


def test_print_counts(request):
    """Runs last in this file: the tally for the report (`-s` shows it), and what the tally stands for: every
    command line counted above ended in exit 2 or 3 (refused) or 0 (accepted), only the generated values that
    some keys allow were accepted, and every test of this file that ran counted its command lines."""
    if not COUNTS:
        pytest.skip("no command line of this file was checked in this session: nothing to tally")
    total = sum(COUNTS.values())
    refused = sum(v for k, v in COUNTS.items() if k.endswith(("exit 2", "exit 3")))
    accepted = sum(v for k, v in COUNTS.items() if k.endswith("exit 0"))
    print(f"\npreflight fuzz: {total} command lines, {refused} refused "
          f"({sum(v for k, v in COUNTS.items() if k.endswith('exit 2'))} exit 2, "
          f"{sum(v for k, v in COUNTS.items() if k.endswith('exit 3'))} exit 3), "
          f"{accepted} accepted (valid values)")
    for k in sorted(COUNTS):
        print(f"  {k}: {COUNTS[k]}")
    # no other exit status (1 would be a crash), and only values that some key allows were accepted
    refusing = ("table", "argparse", "subprocess", "generated always-bad")
    allowed = {f"{source} exit {code}" for source in refusing for code in (2, 3)} - {"generated always-bad exit 3"}
    allowed |= {f"generated maybe-bad exit {code}" for code in (0, 2, 3)}
    assert set(COUNTS) <= allowed, sorted(set(COUNTS) - allowed)
    if request.session.testsfailed == 0:  # each test above ran to its end: it counted all its command lines
        ran = Counter(item.originalname for item in request.session.items
                      if getattr(item, "module", None) is request.module)
        by_source = Counter()
        for k, v in COUNTS.items():
            by_source[k.rsplit(" exit ", 1)[0].replace(" always-bad", "").replace(" maybe-bad", "")] += v
        assert by_source["table"] == ran["test_probed_case_is_refused_before_any_work"], (by_source, ran)
        assert (by_source["subprocess"]
                == len(SUBPROCESS_SAMPLE) * ran["test_real_commands_refuse_in_one_line_and_create_nothing"])
        assert (by_source["argparse"] > 0) == (ran["test_argparse_commands_refuse_in_one_line"] > 0)
        assert (by_source["generated"] > 0) == (ran["test_generated_malformed_values_keep_the_contract"] > 0)
