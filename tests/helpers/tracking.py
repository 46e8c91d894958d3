"""MLflow helpers: read a store while a trainer writes it, and a real `mlflow server` to kill."""
from __future__ import annotations

import os
import signal
import socket
import sqlite3
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

from tests.helpers import wait_for


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def max_logged_step(db: Path, key: str = "train/loss") -> int:
    """Highest step of `key` in an MLflow SQLite store, read directly (the trainer may be writing)."""
    if not db.exists():
        return -1
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5) as con:
            row = con.execute("SELECT max(step) FROM metrics WHERE key=?", (key,)).fetchone()
        return -1 if row is None or row[0] is None else int(row[0])
    except sqlite3.Error:
        return -1


def mlflow_client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(uri)


def runs_of(client):
    exp = client.get_experiment_by_name("ds2exp")
    return client.search_runs([exp.experiment_id]) if exp else []


def mlflow_runs(tmp_root: Path):
    """(client, runs of the ds2exp experiment) in <tmp_root>/mlflow.db, the store of a train.py run with
    DS2EXP_ROOT=<tmp_root>."""
    client = mlflow_client(f"sqlite:///{tmp_root}/mlflow.db")
    exp = client.get_experiment_by_name("ds2exp")
    return client, client.search_runs([exp.experiment_id])


def sweep_runs(tmp_root: Path):
    """(client, sweep parent runs, job runs) in <tmp_root>/mlflow.db."""
    client, all_runs = mlflow_runs(tmp_root)
    parents = [r for r in all_runs if r.data.tags.get("ds2exp.kind") == "sweep"]
    children = [r for r in all_runs if r.data.tags.get("ds2exp.kind") != "sweep"]
    return client, parents, children


def history(client, run_id: str, key: str):
    by_step = defaultdict(list)
    for m in client.get_metric_history(run_id, key):
        by_step[m.step].append(m.value)
    return by_step


class MlflowServer:
    """A real `mlflow server` on 127.0.0.1:<port> over a SQLite store; killable and restartable."""

    def __init__(self, store: Path, port: int):
        self.store, self.port, self.proc = store, port, None
        self.url = f"http://127.0.0.1:{port}"
        store.mkdir(parents=True, exist_ok=True)

    def start(self) -> "MlflowServer":
        log = open(self.store / "server.log", "ab")
        self.proc = subprocess.Popen(
            [str(Path(sys.executable).parent / "mlflow"), "server", "--backend-store-uri",
             f"sqlite:///{self.store / 'mlflow.db'}", "--artifacts-destination", str(self.store / "artifacts"),
             "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1"],
            cwd=self.store, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        return self

    def healthy(self) -> bool:
        import urllib.request

        try:
            with urllib.request.urlopen(f"{self.url}/health", timeout=2) as resp:
                return resp.status == 200
        except OSError:
            return False

    def wait_healthy(self, timeout: float = 180) -> None:
        wait_for(self.healthy, timeout, self.proc, f"mlflow server on {self.url}")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=60)
        self.proc = None


def wait_healthy(url: str, proc: subprocess.Popen, timeout: float = 180, log_path: Path | None = None) -> None:
    """Wait until the MLflow server at `url` answers /health (straight to 127.0.0.1, never through a
    proxy); fail with its log's tail if it exits or does not answer within `timeout` seconds."""
    import time
    import urllib.request

    import pytest

    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    tail = (lambda: ":\n" + log_path.read_text()[-4000:]) if log_path is not None else (lambda: "")
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            pytest.fail(f"mlflow server exited with {proc.returncode}{tail()}")
        try:
            with opener.open(f"{url}/health", timeout=5) as resp:
                if resp.status == 200:
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            pytest.fail(f"mlflow server did not answer on {url} in {timeout} s{tail()}")
        time.sleep(0.5)
