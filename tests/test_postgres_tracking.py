"""Shared tracking on a real database: PostgreSQL behind a real `mlflow server`, a real training run.

A throwaway PostgreSQL cluster (initdb) listens on 127.0.0.1 at a free port; `mlflow server` uses it
as its backend store; `python train.py logger.tracking_uri=http://127.0.0.1:PORT` logs to the server.
The metrics are read back through MLflow and straight from PostgreSQL's `metrics` table. Skipped
when the PostgreSQL server binaries are not installed (`make test-postgres` installs them).
"""
from __future__ import annotations

import glob
import os
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

import pytest

from tests.conftest import ROOT
from tests.helpers import wait_for
from tests.helpers.processes import SMALL
from tests.helpers.tracking import free_port

pytestmark = [pytest.mark.slow, pytest.mark.postgres]


def postgres_bin_dir() -> Optional[Path]:
    """The folder holding initdb and postgres: on PATH, or Debian's /usr/lib/postgresql/<version>/bin."""
    found = shutil.which("initdb")
    candidates = [Path(os.path.realpath(found)).parent] if found else []
    candidates += [Path(p) for p in sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True)]
    for d in candidates:
        if (d / "initdb").is_file() and (d / "postgres").is_file():
            return d
    return None


class PostgresCluster:
    """initdb + postgres on 127.0.0.1:port, the unix socket in the cluster's folder, trust auth.

    PostgreSQL refuses to run as root; as root, the cluster belongs to the `postgres` user (created by
    Debian's package) or `nobody`, in a folder of its own (pytest's tmp_path is root-only)."""

    def __init__(self, bin_dir: Path, base: Path, port: int):
        self.bin, self.port, self.proc = bin_dir, port, None
        self.user = None
        self.cleanup: Optional[Path] = None
        if os.geteuid() == 0:
            names = [u.pw_name for u in pwd.getpwall()]
            self.user = pwd.getpwnam("postgres" if "postgres" in names else "nobody")
            base = Path(tempfile.mkdtemp(prefix="ds2exp-pg-"))
            os.chown(base, self.user.pw_uid, self.user.pw_gid)
            self.cleanup = base
        self.base, self.data, self.sock = base, base / "data", base / "sock"
        self.log = base / "postgres.log"

    def _run(self, *cmd: str) -> None:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=120, **self._as_user())
        assert r.returncode == 0, f"{cmd[0]} failed:\n{r.stdout}\n{r.stderr}"

    def _as_user(self) -> dict:
        env = {**os.environ, "LC_ALL": "C", "LANG": "C"}
        if self.user is None:
            return {"env": env}
        env["HOME"] = str(self.base)
        return {"env": env, "user": self.user.pw_uid, "group": self.user.pw_gid, "extra_groups": []}

    def start(self) -> "PostgresCluster":
        self.sock.mkdir()
        if self.user is not None:
            os.chown(self.sock, self.user.pw_uid, self.user.pw_gid)
        self._run(str(self.bin / "initdb"), "-D", str(self.data), "-U", "ds2exp", "--auth=trust", "-E", "UTF8",
                  "--locale=C", "--no-sync")
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [str(self.bin / "postgres"), "-D", str(self.data), "-h", "127.0.0.1", "-p", str(self.port),
                 "-k", str(self.sock), "-F"], stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                **self._as_user())
        wait_for(self.ready, 60, self.proc, f"postgres on 127.0.0.1:{self.port} (log: {self.log})")
        return self

    def connect(self, db: str = "postgres"):
        import psycopg

        return psycopg.connect(host="127.0.0.1", port=self.port, user="ds2exp", dbname=db, connect_timeout=3,
                               autocommit=True)

    def ready(self) -> bool:
        import psycopg

        try:
            self.connect().close()
            return True
        except psycopg.OperationalError:
            return False

    def createdb(self, name: str) -> str:
        with self.connect() as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return f"postgresql://ds2exp@127.0.0.1:{self.port}/{name}"

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)  # "fast" shutdown
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=30)
        self.proc = None
        if self.cleanup is not None:
            shutil.rmtree(self.cleanup, ignore_errors=True)


def mlflow_server(store_uri: str, artifacts: Path, port: int, log_path: Path) -> subprocess.Popen:
    with open(log_path, "ab") as log:
        return subprocess.Popen(
            [str(Path(sys.executable).parent / "mlflow"), "server", "--backend-store-uri", store_uri,
             "--artifacts-destination", str(artifacts), "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
            cwd=artifacts.parent, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def http_ok(url: str) -> bool:
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=2) as resp:
            return resp.status == 200
    except OSError:
        return False


def test_training_logs_through_an_mlflow_server_into_postgresql(tmp_path, shared_data_dir):
    bin_dir = postgres_bin_dir()
    if bin_dir is None:
        pytest.skip("PostgreSQL server binaries (initdb, postgres) not found on PATH or under "
                    "/usr/lib/postgresql/*/bin; `make test-postgres` installs them")
    pytest.importorskip("psycopg", reason="psycopg (MLflow's PostgreSQL driver: pip install -e '.[postgres]') "
                                          "is not installed")
    from mlflow.tracking import MlflowClient

    cluster = PostgresCluster(bin_dir, tmp_path / "pg", free_port())
    server = None
    try:
        cluster.start()
        store = cluster.createdb("mlflow")
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        (tmp_path / "server").mkdir()
        server = mlflow_server(store, tmp_path / "server" / "artifacts", port, tmp_path / "server" / "server.log")
        wait_for(lambda: http_ok(f"{url}/health"), 240, server, f"mlflow server on {url} (log: {tmp_path}/server)")

        run_dir = tmp_path / "outputs" / "run"
        t0 = time.time()
        r = subprocess.run([sys.executable, str(ROOT / "train.py"), f"paths.data_dir={shared_data_dir}",
                            f"hydra.run.dir={run_dir}", *SMALL, "trainer.max_steps=4", "trainer.log_every=1",
                            f"logger.tracking_uri={url}", "logger.experiment_name=pg"],
                           capture_output=True, text=True, cwd=ROOT, timeout=600,
                           env={**os.environ, "DS2EXP_ROOT": str(tmp_path)})
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-4000:]
        assert not (run_dir / "tracking_spool.jsonl").exists()  # everything reached the server

        client = MlflowClient(url)
        exp = client.get_experiment_by_name("pg")
        [run] = client.search_runs([exp.experiment_id])
        assert run.info.status == "FINISHED" and run.data.tags["ds2exp.run_dir"] == str(run_dir)
        history = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, "train/loss"))
        assert [s for s, _ in history] == [1, 2, 3, 4]
        assert run.data.params["logger.tracking_uri"] == url

        # The same rows, straight from PostgreSQL: the store really is this database.
        with cluster.connect("mlflow") as conn, conn.cursor() as cur:
            cur.execute("SELECT version()")
            assert cur.fetchone()[0].startswith("PostgreSQL")
            cur.execute("SELECT step, value FROM metrics WHERE run_uuid = %s AND key = 'train/loss' ORDER BY step",
                        (run.info.run_id,))
            rows = cur.fetchall()
            cur.execute("SELECT status, start_time FROM runs WHERE run_uuid = %s", (run.info.run_id,))
            status, start_ms = cur.fetchone()
            cur.execute("SELECT count(*) FROM metrics WHERE run_uuid = %s", (run.info.run_id,))
            n_metrics = cur.fetchone()[0]
        assert rows == history
        assert status == "FINISHED" and start_ms >= int(t0 * 1000)
        assert n_metrics > len(rows)  # lr, grad norms, throughput, validation... are there too
    finally:
        if server is not None and server.poll() is None:
            os.killpg(server.pid, signal.SIGKILL)  # the server and its job consumers; the data is in PostgreSQL
            server.wait(timeout=30)
        cluster.stop()
