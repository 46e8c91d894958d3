"""ds2exp.atomic: the target holds the old content or the new, never part of one, and no temporary
file is left behind, whether the write succeeds, raises, or the writing process is killed."""
from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

from ds2exp.atomic import atomic_open, atomic_path, atomic_write_bytes, atomic_write_text


def test_write_replaces_and_leaves_no_temporary_file(tmp_path):
    target = tmp_path / "sub" / "state.json"
    atomic_write_text(target, "one")
    atomic_write_text(target, "two")
    assert target.read_text() == "two"
    atomic_write_bytes(target, b"\x00\x01")
    assert target.read_bytes() == b"\x00\x01"
    assert sorted(p.name for p in target.parent.iterdir()) == ["state.json"]


def test_an_error_mid_write_keeps_the_old_file(tmp_path):
    target = tmp_path / "manifest.jsonl"
    atomic_write_text(target, "complete\n")
    with pytest.raises(RuntimeError):
        with atomic_open(target, "w") as fh:
            fh.write("half of the new")
            raise RuntimeError("disk went away")
    assert target.read_text() == "complete\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["manifest.jsonl"]


def test_a_writer_that_wants_a_path_gets_one_beside_the_target(tmp_path):
    target = tmp_path / "last.ckpt"
    with atomic_path(target, suffix=".tmp.ckpt") as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".last.ckpt.") and tmp.name.endswith(".tmp.ckpt")
        tmp.write_bytes(b"weights")
    assert target.read_bytes() == b"weights" and not tmp.exists()


def test_only_whole_file_modes():
    with pytest.raises(ValueError, match="mode"):
        with atomic_open("x", "a"):
            pass


def test_a_killed_writer_leaves_the_old_file_and_a_recognisable_temporary(tmp_path):
    """SIGKILL while the new content is half written: the target is untouched; the leftover is a
    dot-file with `.tmp` in its name, which run-directory recovery removes."""
    target = tmp_path / "run_state.json"
    atomic_write_text(target, "old")
    code = ("import sys, time; from ds2exp.atomic import atomic_open\n"
            "with atomic_open(sys.argv[1], 'w') as fh:\n"
            "    fh.write('partial'); fh.flush(); print('writing', flush=True); time.sleep(600)\n")
    proc = subprocess.Popen([sys.executable, "-c", code, str(target)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "writing"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    assert target.read_text() == "old"
    leftovers = [p.name for p in tmp_path.iterdir() if p != target]
    assert len(leftovers) == 1 and leftovers[0].startswith(".run_state.json.") and ".tmp" in leftovers[0]
