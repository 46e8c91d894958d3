"""A throwaway PostgreSQL cluster (initdb + postgres on 127.0.0.1) for the tests of shared stores."""
from __future__ import annotations

import glob
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path
from typing import Optional

from tests.helpers import wait_for


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
