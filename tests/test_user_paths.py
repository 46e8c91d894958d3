"""The paths a new user takes first, as real processes: the LibriSpeech recipe from either root, a device
the installed MindSpore cannot use, a run that fails, a resumed run's log, an MLflow run id without the
store. Every failure ends with one `error:` or `config error:` line and no traceback on the console."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import ROOT
from tests.helpers.libri_tree import make_libri_tree
from bench.small_runs import SMALL
from tests.helpers.processes import merged, train_env

RECIPE_SMALL = ["model=ds2_tiny", "dataset.batch_size=4", "trainer.progress=false", "logger=none"]


def run_py(script: str, args, tmp_root: Path, cwd: Path, timeout: int = 600):
    return subprocess.run([sys.executable, str(ROOT / script), *args], capture_output=True, text=True, cwd=cwd,
                          env=train_env(tmp_root), timeout=timeout)


def listing(folder: Path):
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def assert_one_error_line(r, prefix: str = "error:"):
    console = r.stdout + r.stderr
    assert console.count("Traceback") == 0, console[-3000:]
    errors = [x for x in r.stderr.splitlines() if x.startswith(prefix)]
    assert len(errors) == 1, r.stderr[-3000:]
    return errors[0]


@pytest.fixture(scope="module")
def libri(tmp_path_factory, say):
    return make_libri_tree(tmp_path_factory.mktemp("libri-tree"), say)


@pytest.mark.parametrize("root_of", [lambda t: t / "LibriSpeech", lambda t: t], ids=["LibriSpeech", "parent"])
def test_librispeech_recipe_trains_from_either_root(libri, tmp_path, root_of):
    tree = tmp_path / "corpus"
    shutil.copytree(libri, tree)
    root = root_of(tree)
    r = run_py("train.py", ["experiment=librispeech_100", f"dataset.root={root}", "trainer.max_steps=2",
                            f"hydra.run.dir={tmp_path / 'run'}", *RECIPE_SMALL], tmp_path, tmp_path)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert "finished at step 2" in r.stdout
    taken = tree / "LibriSpeech" / "train-clean-100"
    log = (tmp_path / "run" / "train.log").read_text()
    assert f"train-clean-100: preparing {taken} into {root / 'manifests'}" in log
    assert (root / "manifests" / "train-clean-100.jsonl").is_file()


@pytest.mark.slow
def test_librispeech_recipe_as_written_trains_two_steps(libri, tmp_path):
    """The acceptance line itself: the 86.6 M-parameter recipe model, two steps on the tiny tree."""
    r = run_py("train.py", ["experiment=librispeech_100", f"dataset.root={libri}/LibriSpeech", "trainer.max_steps=2",
                            f"hydra.run.dir={tmp_path / 'run'}", "logger=none"], tmp_path, tmp_path, timeout=1200)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "finished at step 2" in r.stdout


def test_missing_librispeech_subset_is_refused_before_anything_is_created(tmp_path, say):
    tree = make_libri_tree(tmp_path / "corpus", say, subsets=("dev-clean",), sentences=("HELLO WORLD",))
    before = listing(tmp_path)
    r = run_py("train.py", ["experiment=librispeech_100", f"dataset.root={tree}"], tmp_path, tmp_path)
    assert r.returncode == 2
    line = assert_one_error_line(r, "config error:")
    assert "train-clean-100, test-clean not found" in line and "subsets found there: dev-clean" in line, line
    assert listing(tmp_path) == before


@pytest.mark.parametrize("extra", [[], ["hardware.num_devices=2"]], ids=["one", "two-devices"])
def test_gpu_on_a_machine_without_one_is_refused_in_one_line(tmp_path, extra):
    from ds2exp.runtime import device_problem

    if device_problem("GPU") is None:
        pytest.skip("this machine's MindSpore can use a GPU")
    r = run_py("train.py", ["hardware=gpu", "trainer.max_steps=3", *extra], tmp_path, tmp_path, timeout=60)
    assert r.returncode == 2
    line = assert_one_error_line(r, "config error:")
    assert "cannot use GPU here" in line and "CUDA" in line, line
    assert r.stdout.strip() == "" and listing(tmp_path) == []


def test_a_failing_run_prints_its_summary_and_one_error_line(tmp_path):
    """Every utterance of the manifest is missing: the run fails after it started. The console gets the
    summary and one `error:` line; the traceback goes to train.log."""
    manifest = tmp_path / "m.jsonl"
    manifest.write_text('{"id": "a", "audio_path": "/nowhere/a.flac", "transcript": "A B", "duration": 1.0}\n')
    run_dir = tmp_path / "run"
    r = run_py("train.py", ["dataset=manifest", f"dataset.train_manifest={manifest}", f"hydra.run.dir={run_dir}",
                            "logger=none"], tmp_path, tmp_path)
    assert r.returncode == 1
    line = assert_one_error_line(r)
    assert "none of its 1 entries is usable" in line
    assert "==== ds2exp training: failed" in r.stdout and f"run directory:   {run_dir}" in r.stdout
    assert "Traceback" in (run_dir / "train.log").read_text()


def test_resume_logs_into_the_run_it_continues(tmp_path, synth_data_dir):
    run_dir = tmp_path / "run"
    common = [f"paths.data_dir={synth_data_dir}", *merged(*SMALL, "logger=none", "trainer.progress=true")]
    r = run_py("train.py", [*common, "trainer.max_steps=2", "trainer.checkpoint_every=2", f"hydra.run.dir={run_dir}"],
               tmp_path, tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    # stderr is a pipe here: the progress bar is whole lines, not a redraw per step with carriage returns
    assert "\r" not in r.stderr
    bar = [x for x in r.stderr.splitlines() if x.startswith("train:")]
    assert bar and "2/2" in bar[-1], r.stderr[-2000:]
    first_log = (run_dir / "train.log").read_text()
    r = run_py("train.py", [f"resume={run_dir}", "trainer.max_steps=4"], tmp_path, tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "finished at step 4" in r.stdout
    log = (run_dir / "train.log").read_text()
    assert log.startswith(first_log) and "resuming from" in log[len(first_log):]
    assert not (tmp_path / "outputs").exists() and not (tmp_path / "multirun").exists()
    assert (run_dir / ".hydra" / "resumed" / "overrides.yaml").is_file()


def test_evaluate_run_id_without_the_store_is_a_config_error(tmp_path):
    run_id = "0123456789abcdef0123456789abcdef"
    for extra in (["logger=none"], [f"logger.tracking_uri=sqlite:///{tmp_path}/absent.db"]):
        r = run_py("evaluate.py", [f"checkpoint={run_id}", *extra], tmp_path, tmp_path, timeout=120)
        assert r.returncode == 2
        line = assert_one_error_line(r, "config error:")
        assert run_id in line and ("logger=none" in line or "no MLflow store" in line), line
        assert listing(tmp_path) == []


def test_make_test_ui_fails_rather_than_skips_without_its_browser_tools(tmp_path):
    """What `make test-ui` runs, on a machine lacking selenium, chromium or chromedriver: a failure."""
    import importlib.util
    import os

    tools = [shutil.which("chromium") or Path("/usr/bin/chromium").exists(),
             shutil.which("chromedriver") or Path("/usr/bin/chromedriver").exists()]
    if importlib.util.find_spec("selenium") is not None and all(tools):
        pytest.skip("selenium, chromium and chromedriver are all here: make test-ui runs the real check")
    r = subprocess.run([sys.executable, "-m", "pytest", "-m", "slow", "-q", "-p", "no:cacheprovider",
                        str(ROOT / "tests" / "test_ui_browser.py")],
                       env={**os.environ, "DS2EXP_REQUIRE_BROWSER": "1"}, capture_output=True, text=True,
                       cwd=ROOT, timeout=300)
    assert r.returncode != 0 and "skipped" not in r.stdout.splitlines()[-1], r.stdout[-2000:]
    assert "not installed" in r.stdout or "not found" in r.stdout, r.stdout[-2000:]
