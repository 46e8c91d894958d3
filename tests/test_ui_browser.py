"""The MLflow UI of a real sweep store, checked in headless Chromium (Selenium): `make test-ui`.

A 2-job Hydra sweep (lr 1e-4 trains, lr 1e8 diverges) writes `<tmp>/mlflow.db`; `mlflow server` serves
it on 127.0.0.1 and a fresh headless Chromium (a browser that never chose a view) opens the links ds2exp
prints (ds2exp/training/summary.py: `experiment_link`, `run_link`) and checks what the UI renders:
the experiment in MLflow 3's training view ("Model training": runs table, no GenAI sidebar), the sweep's
parent run (`sweep lr 02-24-02`) with its two child runs nested under it and named by their overrides
(`lr=1e-4`, `lr=1e8`), the parent's description with the verdict and its boundary metric and recommended
params, the diverged child's description (how it ended, and its diagnosis) and tags (`ds2exp.status`,
`divergence_cause`, `diverged_at_step`), and the healthy child's `train/grad_norm` metric (value in the
run overview, chart in "Model metrics").
Ids and expected values come from MlflowClient queries; every assertion is on the rendered page.
Screenshots are saved under the test's tmp dir (printed; `pytest -s` shows the paths), never in the checkout.

Skipped, with the reason, when selenium, chromium or chromedriver is missing (Debian:
`apt-get install chromium chromium-driver`; `make test-ui` installs all three).
"""
from __future__ import annotations

import contextlib
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import ROOT, stop_process_group
from bench.small_runs import MICRO_3_STEPS
from tests.helpers.processes import merged
from tests.helpers.tracking import free_port, wait_healthy

pytestmark = pytest.mark.slow

SWEEP = ["optimizer.lr=1e-4,1e8", "trainer.nonfinite_patience=1", "dataset.batch_size=4",
         *merged(*MICRO_3_STEPS, "dataset.max_utterances=24", "trainer.max_eval_utterances=4"), "trainer.log_every=1"]
SERVER_START_S = 90  # `mlflow server` imports a lot; on 2 busy cores it has taken ~30 s
WAIT_S = 60  # for each element the UI renders
SWEEP_TIME = "02-24-02"  # the sweep folder multirun/<date>/<time>, as Hydra names it by default
NO_TELEMETRY = {"MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true"}  # only 127.0.0.1 is talked to


def _executable(name: str, default: str) -> str | None:
    path = shutil.which(name) or default
    return path if os.path.isfile(path) and os.access(path, os.X_OK) else None


@pytest.fixture(scope="module")
def browser_tools():
    """(chromium, chromedriver), or skip the module before the sweep is trained."""
    # Under `make test-ui` (DS2EXP_REQUIRE_BROWSER=1) a missing tool is a failure, never a pass.
    give_up = pytest.fail if os.environ.get("DS2EXP_REQUIRE_BROWSER") == "1" else pytest.skip
    try:
        import selenium  # noqa: F401
    except ImportError:
        give_up("selenium is not installed (make test-ui installs it: pip install selenium)")
    chromium = _executable("chromium", "/usr/bin/chromium")
    driver = _executable("chromedriver", "/usr/bin/chromedriver")
    if chromium is None or driver is None:
        missing = " and ".join(n for n, p in (("chromium", chromium), ("chromedriver", driver)) if p is None)
        give_up(f"{missing} not found (Debian: apt-get install chromium chromium-driver; or make test-ui)")
    return chromium, driver


@pytest.fixture(scope="module")
def sweep_store(browser_tools, tmp_path_factory, shared_data_dir):
    """A real 2-job sweep in `<tmp>/mlflow.db` (experiment ds2exp): one parent, two child runs."""
    root = tmp_path_factory.mktemp("ui-store")
    env = {**os.environ, **NO_TELEMETRY, "DS2EXP_ROOT": str(root)}
    env.pop("DS2EXP_PARENT_RUN_ID", None)
    r = subprocess.run([sys.executable, str(ROOT / "train.py"), "-m", *SWEEP, f"paths.data_dir={shared_data_dir}",
                        f"hydra.sweep.dir={root / 'multirun' / '2026-12-06' / SWEEP_TIME}"],
                       capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]
    assert (root / "mlflow.db").is_file()
    return root


@pytest.fixture(scope="module")
def mlflow_server(sweep_store):
    """`mlflow server` on the sweep store at a free 127.0.0.1 port; always stopped afterwards."""
    mlflow_bin = Path(sys.executable).parent / "mlflow"
    assert mlflow_bin.is_file(), f"no mlflow console script next to {sys.executable}"
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log_path = sweep_store / "mlflow_server.log"
    cmd = [str(mlflow_bin), "server", "--backend-store-uri", f"sqlite:///{sweep_store}/mlflow.db",
           "--default-artifact-root", str(sweep_store / "mlartifacts"),
           "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    with open(log_path, "wb") as log:  # its own session, so that _stop reaches the uvicorn workers too
        proc = subprocess.Popen(cmd, cwd=sweep_store, env={**os.environ, **NO_TELEMETRY}, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_healthy(url, proc, SERVER_START_S, log_path)
        yield url
    finally:
        stop_process_group(proc)


@pytest.fixture
def driver(browser_tools, tmp_path):
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    chromium, chromedriver = browser_tools
    options = Options()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--no-first-run", "--no-proxy-server", "--window-size=1600,1000",
                f"--user-data-dir={tmp_path / 'chromium-profile'}"):
        options.add_argument(arg)
    drv = webdriver.Chrome(service=Service(chromedriver), options=options)
    try:
        yield drv
    finally:
        drv.quit()


def _close_assistant(drv) -> None:
    """The MLflow Assistant side panel takes a third of the window; close it if it is there."""
    from selenium.webdriver.common.by import By

    for button in drv.find_elements(By.CSS_SELECTOR, "button[data-component-id='mlflow.assistant.chat_panel.close']"):
        try:
            button.click()
        except Exception:  # cosmetic only
            pass


def _training_view(visible, driver) -> None:
    """The page is in MLflow 3's "Model training" view: its sidebar has the model registry and none of the
    GenAI view's entries (evaluation runs, judges), and a run's breadcrumb says Runs, not Evaluations."""
    from selenium.webdriver.common.by import By

    visible("//a[normalize-space()='Model registry']")
    genai = [x for x in ("Evaluation runs", "Judges", "Evaluations")
             if driver.find_elements(By.XPATH, f"//a[normalize-space()='{x}']")]
    assert not genai, f"GenAI view ({genai} shown) at {driver.current_url}"


def _description(visible) -> str:
    """The run's description (tag mlflow.note.content) as the UI rendered it (Markdown, here code blocks)."""
    return visible("//*[@data-testid='note-editor-preview-content']").get_attribute("textContent")


def test_ui_shows_sweep_parent_children_and_grad_norm(sweep_store, mlflow_server, driver, tmp_path):
    from mlflow.tracking import MlflowClient
    from ds2exp.training.summary import TRAINING_VIEW, experiment_link
    from ds2exp.training.summary import run_link as printed_link
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support import expected_conditions as EC
    from selenium.webdriver.support.ui import WebDriverWait

    client = MlflowClient(f"sqlite:///{sweep_store}/mlflow.db")
    exp = client.get_experiment_by_name("ds2exp")
    eid = exp.experiment_id
    runs = client.search_runs([eid])
    parents = [r for r in runs if r.data.tags.get("ds2exp.kind") == "sweep"]
    children = [r for r in runs if r.data.tags.get("ds2exp.kind") != "sweep"]
    assert len(parents) == 1 and len(children) == 2
    parent = parents[0]
    pid = parent.info.run_id
    assert all(c.data.tags.get("mlflow.parentRunId") == pid for c in children)
    by_name = {c.info.run_name: c for c in children}
    assert set(by_name) == {"lr=1e-4", "lr=1e8"}  # named by the sweep's overrides
    healthy, diverged = by_name["lr=1e-4"], by_name["lr=1e8"]
    assert diverged.data.tags.get("ds2exp.status") == "diverged" and "diverged_at_step" in diverged.data.tags
    assert exp.tags.get("mlflow.experimentKind") == "custom_model_development"
    assert parent.info.run_name == f"sweep lr {SWEEP_TIME}"  # the swept key and the sweep folder's time
    for r in runs:  # an absent value is no tag, never the text "None"
        assert "None" not in r.data.tags.values(), (r.info.run_name, r.data.tags)
    assert parent.data.params["recommended.optimizer.lr"] == "0.0001"
    assert parent.data.metrics["boundary/bs_4/largest_stable_lr"] == 1e-4
    assert parent.data.metrics["boundary/bs_4/smallest_diverged_lr"] == 1e8

    wait = WebDriverWait(driver, WAIT_S)
    shots = tmp_path / "screenshots"
    shots.mkdir()

    def visible(xpath: str):
        return wait.until(EC.visibility_of_element_located((By.XPATH, xpath)))

    def run_link(run_id: str) -> str:
        return f"//a[@href='#/experiments/{eid}/runs/{run_id}']"

    try:
        # ---- the link `make ui` prints: the experiment's runs table in the training view; the parent,
        # then its children nested under it
        driver.get(experiment_link(mlflow_server, eid))
        link = visible(run_link(pid))
        assert link.text.strip() == parent.info.run_name
        visible("//*[contains(normalize-space(), '3 matching runs')]")
        _close_assistant(driver)
        _training_view(visible, driver)
        child_links = [f"{run_link(c.info.run_id)}[normalize-space()='{c.info.run_name}']" for c in children]
        if not driver.find_elements(By.XPATH, child_links[0]):  # collapsed: expand the parent's row
            wait.until(EC.element_to_be_clickable((
                By.XPATH, f"//div[@role='row'][.{run_link(pid)}]"
                          "//button[contains(@data-component-id, 'runnamecellrenderer')]"))).click()
        for xpath in child_links:
            visible(xpath)
        # nested: the children's rows follow the parent's row
        def row_index(xpath: str) -> int:
            row = driver.find_element(By.XPATH, f"({xpath})/ancestor::div[@role='row'][1]")
            return int(row.get_attribute("row-index"))

        assert row_index(run_link(pid)) < min(row_index(x) for x in child_links)
        driver.save_screenshot(str(shots / "1_experiment_runs.png"))

        # ---- the parent run's page (the link the sweep prints): the verdict as its description, the
        # boundary as a metric, the recommended setting as params
        driver.get(printed_link(mlflow_server, eid, pid))
        visible(f"//*[normalize-space()='{pid}']")
        _close_assistant(driver)
        _training_view(visible, driver)
        text = _description(visible)
        for line in ("2 jobs: 1 finished, 1 diverged", "Stability boundary per dataset.batch_size",
                     "dataset.batch_size=4: largest stable lr 0.0001, smallest diverged lr 1e+08",
                     "Recommended: optimizer.lr=0.0001 dataset.batch_size=4", "job 1 (lr=1e8) diverged at step"):
            assert line in text, (line, text)
        visible("//a[normalize-space()='boundary/bs_4/largest_stable_lr']")  # "Metrics" table
        visible("//*[normalize-space()='recommended.optimizer.lr']")  # "Parameters" table
        driver.save_screenshot(str(shots / "2_parent_run_verdict.png"))

        # ---- the diverged child's overview: its description says how it ended and why, and the divergence
        # tags, as the UI shows them
        cause, at = diverged.data.tags["divergence_cause"], diverged.data.tags["diverged_at_step"]
        driver.get(printed_link(mlflow_server, eid, diverged.info.run_id))
        visible(f"//*[normalize-space()='{diverged.info.run_id}']")
        _close_assistant(driver)
        _training_view(visible, driver)
        visible("//*[normalize-space()='lr=1e8']")  # the run's name in the page header
        text = _description(visible)
        for line in ("==== ds2exp training: diverged", f"diverged at step {at}: {cause}",
                     "Diagnosis (diagnosis.txt)", f"cause: {cause}", "explanation:"):
            assert line in text, (line, text)
        for key in ("ds2exp.status", "divergence_cause", "diverged_at_step"):
            visible(f"//*[contains(normalize-space(), '{key}')]")
        visible(f"//*[contains(normalize-space(), '{cause}')]")
        driver.save_screenshot(str(shots / "3_diverged_child.png"))

        # ---- a child run's overview: the train/grad_norm row of the metrics table, with its value
        child = healthy
        expected = child.data.metrics["train/grad_norm"]
        driver.get(printed_link(mlflow_server, eid, child.info.run_id))
        visible(f"//*[normalize-space()='{child.info.run_id}']")  # "Run ID" in About this run
        _close_assistant(driver)
        assert "finished at step 3 (trainer.max_steps reached)" in _description(visible)
        visible(f"{run_link(pid)}[normalize-space()='{parent.info.run_name}']")  # "Parent run" in About
        row = visible("//div[@role='row'][.//a[normalize-space()='train/grad_norm']]")
        value = row.find_element(By.XPATH, ".//span[@title]").get_attribute("title")
        assert math.isclose(float(value), expected, rel_tol=1e-9), (value, expected)
        driver.execute_script("arguments[0].scrollIntoView({block: 'center'});", row)
        driver.save_screenshot(str(shots / "4_child_run_overview.png"))

        # ---- the child's "Model metrics" tab, filtered to train/grad_norm: its chart is drawn
        driver.get(f"{mlflow_server}/#/experiments/{eid}/runs/{child.info.run_id}/model-metrics?{TRAINING_VIEW}")
        search = visible("//input[@placeholder='Search metric charts']")
        _close_assistant(driver)
        search.send_keys("train/grad_norm", Keys.ENTER)
        visible(f"//*[normalize-space()='{child.info.run_name} (train/grad_norm)']")  # the chart's legend
        driver.save_screenshot(str(shots / "5_child_model_metrics.png"))
    except Exception:
        with contextlib.suppress(Exception):  # what the browser showed when it failed
            driver.save_screenshot(str(shots / "failure.png"))
            (shots / "failure.html").write_text(driver.page_source)
        print(f"UI screenshots (failure): {shots}")
        raise
    for png in sorted(shots.glob("*.png")):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000, png
    print(f"UI screenshots: {shots}")

