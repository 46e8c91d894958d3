"""Every command in README.md runs as written.

Every train.py/evaluate.py/export.py command passes the checks its script makes before it runs (every
key, every sweep value, every file it names); the first of each also runs as a process with `--cfg job`
(Hydra composes and prints the config, nothing runs). `python -m ds2exp.*` commands must answer
`--help` and know every option the README gives them, and every `make` target must exist. A README
transcript (`$ command` followed by its output) must print exactly that output. The files a command
names (checkpoints, run directories, manifests) are created first, under a scratch project root.
"""
from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import ROOT

README = ROOT / "README.md"
ENTRY_POINTS = ("train.py", "evaluate.py", "export.py")
CHECKPOINT_KEYS = ("checkpoint", "resume")


def fenced_blocks(text: str):
    """(language, [(line number, line)]) of each fenced block."""
    blocks, current = [], None
    for no, line in enumerate(text.splitlines(), 1):
        if line.startswith("```"):
            if current is None:
                current = (line[3:].strip(), [])
            else:
                blocks.append(current)
                current = None
        elif current is not None:
            current[1].append((no, line))
    return blocks


def bash_commands(text: str):
    """(line number, argv) of each command in the ```bash blocks: continuation lines joined,
    comments dropped."""
    out = []
    for lang, lines in fenced_blocks(text):
        if lang != "bash":
            continue
        buf, start = "", 0
        for no, line in lines:
            if not buf:
                start = no
            if line.rstrip().endswith("\\"):
                buf += line.rstrip()[:-1] + " "
                continue
            argv = shlex.split(buf + line, comments=True)
            buf = ""
            if argv:
                out.append((start, argv))
    return out


def transcripts(text: str):
    """(line number, argv, expected output lines) of each `$ command` in a plain ``` block."""
    out = []
    for lang, lines in fenced_blocks(text):
        if lang:
            continue
        current = None
        for no, line in lines:
            if line.startswith("$ "):
                current = (no, shlex.split(line[2:]), [])
                out.append(current)
            elif current is not None and line.strip():
                current[2].append(line)
    return out


COMMANDS = bash_commands(README.read_text())
TRANSCRIPTS = transcripts(README.read_text())


def _make_checkpoint(path: Path, cfg_container) -> None:
    from ds2exp.models.deepspeech2 import DeepSpeech2
    from ds2exp.checkpoints.io import save_checkpoint

    model = DeepSpeech2(conv_channels=2, rnn_layers=1, rnn_hidden=8, conv_impl="plain", rnn_impl="plain")
    save_checkpoint(path, model, meta={"step": 1, "epoch": 0, "config": cfg_container})


# Absolute data paths in the README, and where the scratch project holds a tree of that layout.
LIBRISPEECH_ROOT = "/data/LibriSpeech"


def as_run(argv, project: Path):
    """The README command with its absolute data paths pointing into the scratch project."""
    tree = str(project / "data" / "librispeech" / "LibriSpeech")
    return [a.replace(f"={LIBRISPEECH_ROOT}", f"={tree}") for a in argv]


def device_refusal(argv) -> str:
    """The device a command asks for that the installed MindSpore cannot use ('' when it can)."""
    from ds2exp.runtime import device_problem

    if any("launcher=slurm" in a or "launcher=submitit" in a for a in argv):
        return ""  # composed here, trained on the cluster's nodes
    for a in argv:
        if a in ("hardware=gpu", "hardware=ascend"):
            target = {"gpu": "GPU", "ascend": "Ascend"}[a.split("=")[1]]
            return target if device_problem(target) else ""
    return ""


@pytest.fixture(scope="module")
def project(tmp_path_factory, say):
    """A scratch project root holding every file the README's commands name; `dataset=librispeech`'s
    default root and the README's LibriSpeech root are a tiny tree in LibriSpeech's exact layout."""
    from omegaconf import OmegaConf

    from ds2exp.cli import check_overrides
    from tests.helpers.libri_tree import make_libri_tree

    root = tmp_path_factory.mktemp("readme-project")
    cfg = OmegaConf.to_container(check_overrides([f"paths.root_dir={root}"]), resolve=True, enum_to_str=True)
    make_libri_tree(root / "data" / "librispeech", say, sentences=("HELLO WORLD",))
    template = root / "template.ckpt"
    _make_checkpoint(template, cfg)
    for _, argv in COMMANDS:
        for arg in argv:
            key, _, value = arg.partition("=")
            values = []
            if key in CHECKPOINT_KEYS:
                values = [value]
            elif key == "checkpoints":
                values = [v.strip() for v in value.strip("[]").split(",")]
            for v in values:
                target = root / v
                if target.suffix == ".ckpt":
                    target.parent.mkdir(parents=True, exist_ok=True)
                    target.write_bytes(template.read_bytes())
                else:
                    (target / "checkpoints").mkdir(parents=True, exist_ok=True)
                    (target / "checkpoints" / "last.ckpt").write_bytes(template.read_bytes())
            if key.endswith("_manifest"):
                (root / value).parent.mkdir(parents=True, exist_ok=True)
                (root / value).write_text(json.dumps({"id": "a", "audio_path": "a.flac", "transcript": "A",
                                                      "duration": 1.0}) + "\n")
    template.unlink()
    return root


def _listing(root: Path):
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def _preflight(argv, capsys):
    """What the entry point checks before it runs: every key, every sweep value, every named file
    (in this process: the same code the script calls first, without starting an interpreter)."""
    from ds2exp.cli import preflight

    try:
        preflight([*argv[2:], "--cfg", "job"], config_name=Path(argv[1]).stem)
    except SystemExit as exc:
        return exc.code, capsys.readouterr().err.strip()
    return 0, ""


def test_readme_has_commands_and_no_placeholders():
    assert len(COMMANDS) >= 20 and TRANSCRIPTS
    for no, argv in COMMANDS:
        assert not any("<" in a or ">" in a for a in argv), f"README.md:{no}: a placeholder is not runnable: {argv}"
        assert argv[0] in ("python", "make"), f"README.md:{no}: not a python or make command: {argv}"
        if argv[0] == "python":
            assert argv[1] in ENTRY_POINTS or (argv[1] == "-m" and argv[2].startswith("ds2exp.")), (no, argv)


def test_every_make_target_in_the_readme_exists():
    targets = set(re.findall(r"^([a-z][\w-]*):", (ROOT / "Makefile").read_text(), re.M))
    named = {argv[1] for _, argv in COMMANDS if argv[0] == "make"}
    named |= set(re.findall(r"`make ([a-z][\w-]*)", README.read_text()))
    assert named and named <= targets, named - targets


def test_every_entry_point_command_in_the_readme_composes(project, monkeypatch, capsys):
    """Each train.py/evaluate.py/export.py command of the README passes the script's own checks (keys,
    values, every sweep value, the files it names) and creates nothing."""
    monkeypatch.chdir(project)
    monkeypatch.setenv("DS2EXP_ROOT", str(project))
    before = _listing(project)
    failures = []
    for no, argv in COMMANDS:
        if argv[0] == "python" and argv[1] in ENTRY_POINTS:
            code, err = _preflight(as_run(argv, project), capsys)
            device = device_refusal(argv)
            if device:  # a GPU/Ascend line on a machine without that device: refused in one line, exit 2
                if code != 2 or f"cannot use {device} here" not in err or len(err.splitlines()) != 1:
                    failures.append(f"README.md:{no}: {' '.join(argv)}\n  expected the {device} refusal, got "
                                    f"exit {code}: {err[-800:]}")
            elif code:
                failures.append(f"README.md:{no}: {' '.join(argv)}\n  exit {code}: {err[-800:]}")
    assert not failures, "\n".join(failures)
    assert _listing(project) == before


def test_readme_commands_run_as_written_with_cfg_job(project):
    """The first README command of each entry point, run as a process with `--cfg job` (Hydra composes
    and prints the config, nothing runs), and every `python -m ds2exp...` command's `--help`, which
    must name each option the README gives it. All at once, each in its own process."""
    env = {**os.environ, "DS2EXP_ROOT": str(project)}
    before = _listing(project)
    chosen, seen = [], set()
    for no, argv in COMMANDS:
        if argv[0] != "python":
            continue
        if argv[1] in ENTRY_POINTS and argv[1] not in seen and "-m" not in argv:
            seen.add(argv[1])
            chosen.append((no, argv, [sys.executable, str(ROOT / argv[1]), *argv[2:], "--cfg", "job"]))
        elif argv[1] == "-m":
            chosen.append((no, argv, [sys.executable, "-m", argv[2], "--help"]))
    assert seen == set(ENTRY_POINTS)
    procs = [(no, argv, subprocess.Popen(cmd, cwd=project, env=env, stdout=subprocess.PIPE,
                                         stderr=subprocess.PIPE, text=True)) for no, argv, cmd in chosen]
    failures = []
    for no, argv, proc in procs:
        out, err = proc.communicate(timeout=600)
        if proc.returncode != 0:
            failures.append(f"README.md:{no}: {' '.join(argv)}\n  exit {proc.returncode}: {err.strip()[-800:]}")
        elif argv[1] == "-m":
            unknown = [a.split("=")[0] for a in argv[3:] if a.startswith("--") and a.split("=")[0] not in out]
            if unknown:
                failures.append(f"README.md:{no}: {' '.join(argv)}\n  not in its --help: {unknown}")
        else:
            assert "model:" in out and "dataset:" in out, out[:500]
    assert not failures, "\n".join(failures)
    assert _listing(project) == before


@pytest.mark.parametrize("no, argv, expected", TRANSCRIPTS, ids=[str(t[0]) for t in TRANSCRIPTS])
def test_readme_transcripts_print_what_the_readme_shows(tmp_path, no, argv, expected):
    assert argv[0] == "python" and argv[1] in ENTRY_POINTS, (no, argv)
    r = subprocess.run([sys.executable, str(ROOT / argv[1]), *argv[2:]], cwd=tmp_path, capture_output=True,
                       text=True, env={**os.environ, "DS2EXP_ROOT": str(tmp_path)}, timeout=300)
    assert (r.stdout + r.stderr).strip().splitlines() == expected, f"README.md:{no}"


def _help(script: str, config_dir=None) -> str:
    env = {**os.environ, "DS2EXP_CONFIG_DIR": str(config_dir)} if config_dir else None
    r = subprocess.run([sys.executable, str(ROOT / script), "--help"], capture_output=True, text=True, cwd=ROOT,
                       env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    return r.stdout


def _listed_groups(help_text: str):
    """{group: [options]} of the help's `Config groups` lines, in the order shown."""
    lines = re.findall(r"^  (\w+):\s+(.*)$", help_text.split("Config groups", 1)[1], re.M)
    return {group: re.findall(r"\w+", options.split("(")[0]) for group, options in lines}


@pytest.mark.parametrize("script, groups", [
    ("train.py", ["dataset", "model", "optimizer", "hardware", "precision", "logger", "trainer", "experiment",
                  "sweep"]),
    ("evaluate.py", ["dataset", "model", "hardware", "logger", "decoder"]),
    ("export.py", ["dataset", "model", "hardware"]),
])
def test_help_starts_with_examples_and_lists_exactly_the_groups_the_command_uses(script, groups):
    text = _help(script)
    head = text.split("Config groups", 1)[0]
    assert "Examples:" in head and f"python {script} " in head, text[:1000]
    listed = _listed_groups(text)
    assert list(listed) == groups, listed
    for group in groups:
        assert listed[group] == sorted(f[:-5] for f in os.listdir(ROOT / "conf" / group) if f.endswith(".yaml"))
    default = re.search(r"^  dataset:.*\(default: (\w+)\)$", text, re.M)
    assert default and default.group(1) == "synth_tiny", text


def test_help_lists_a_config_file_added_to_a_group(tmp_path):
    """The groups and their options in --help are read from conf/ on disk: a yaml added to a group
    folder, or to a group the command line adds (+sweep=), is listed without touching the help text."""
    conf = tmp_path / "conf"
    shutil.copytree(ROOT / "conf", conf)
    shutil.copy(conf / "dataset" / "synth_tiny.yaml", conf / "dataset" / "zz_added.yaml")
    shutil.copy(conf / "sweep" / "nan_lr_batch.yaml", conf / "sweep" / "zz_added.yaml")
    listed = _listed_groups(_help("train.py", conf))
    for group in ("dataset", "sweep"):
        assert "zz_added" in listed[group], listed
        assert listed[group] == sorted(f[:-5] for f in os.listdir(conf / group) if f.endswith(".yaml"))
    assert "zz_added" not in _listed_groups(_help("train.py"))["dataset"]
