"""Shared tracking on a real database: PostgreSQL behind a real `mlflow server`, a real training run.

A throwaway PostgreSQL cluster (initdb) listens on 127.0.0.1 at a free port; `mlflow server` uses it
as its backend store; `python train.py logger.tracking_uri=http://127.0.0.1:PORT` logs to the server.
The metrics are read back through MLflow and straight from PostgreSQL's `metrics` table. Skipped
when the PostgreSQL server binaries are not installed (`make test-postgres` installs them).
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import ROOT, wait_for
from tests.helpers.postgres import PostgresCluster, postgres_bin_dir
from bench.small_runs import SMALL
from tests.helpers.tracking import free_port

pytestmark = [pytest.mark.slow, pytest.mark.postgres]


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
