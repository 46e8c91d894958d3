"""Tracking that survives an MLflow outage: nothing logged is lost, training never waits long.

`ResilientTracker` wraps `MlflowTracker`. Every call (run start, params, metrics, tags, text,
artifacts, end) is sent at once while the store answers. When a call fails for a reason that can
pass (connection refused or reset, timeout, HTTP 5xx, "database is locked", ...), the record and
every later one are appended, in order, to a JSON-lines spool in the run directory
(`tracking_spool.jsonl`), and training goes on. Every `retry` seconds (doubling up to `retry_max`)
the next call first tries to send the spool (for an HTTP store after a 2-second TCP probe, so a
dead host costs training at most that much); once the store answers again the spool is sent in
order (metrics in batches) and deleted. Metric records keep the time they were logged.

A record the store refuses for good (an invalid value, a run that does not exist on this store)
is not retried: it is appended to `tracking_rejected.jsonl` beside the spool with the error.

If the run could not be created at all (store down at start), the run is created when the store
comes back and its id is written to `tracking_state.json`, where `resume` finds it. If training
ends while the store is still down, `end()` keeps trying for `drain` seconds, then warns and
leaves the spool: a resumed run sends it first, or send it by hand:

    python -m ds2exp.tracking.resilient <run dir> [--tracking-uri URI]

Settings (environment): DS2EXP_TRACKING_RETRY_S (2), DS2EXP_TRACKING_RETRY_MAX_S (30),
DS2EXP_TRACKING_DRAIN_S (30). For an HTTP store, MLFLOW_HTTP_REQUEST_TIMEOUT defaults to 10 s and
MLFLOW_HTTP_REQUEST_MAX_RETRIES to 0 here (MLflow's own defaults, 120 s and 7 retries with
back-off, could hold a training step for many minutes; the spool does the retrying).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional
from urllib.parse import urlparse

from ds2exp.atomic import atomic_write_text
from ds2exp.tracking.mlflow_tracker import MlflowTracker, Tracker

log = logging.getLogger(__name__)

SPOOL_NAME = "tracking_spool.jsonl"
REJECTED_NAME = "tracking_rejected.jsonl"
STATE_NAME = "tracking_state.json"
METRICS_PER_BATCH = 1000  # MLflow's log_batch limit

# MLflow error codes that retrying cannot fix.
_PERMANENT_CODES = {"INVALID_PARAMETER_VALUE", "RESOURCE_ALREADY_EXISTS", "RESOURCE_DOES_NOT_EXIST",
                    "INVALID_STATE", "BAD_REQUEST", "MALFORMED_REQUEST"}


def _env_float(name: str, default: float) -> float:
    try:
        return float(os.environ.get(name, default))
    except ValueError:
        return default


def is_permanent(exc: BaseException) -> bool:
    """True when resending the same record cannot succeed."""
    from mlflow.exceptions import MlflowException

    if isinstance(exc, MlflowException):
        return str(getattr(exc, "error_code", "")) in _PERMANENT_CODES
    return isinstance(exc, (TypeError, ValueError, KeyError, FileNotFoundError))


def read_state(run_dir: str | Path) -> Dict[str, Any]:
    p = Path(run_dir) / STATE_NAME
    try:
        return json.loads(p.read_text())
    except (OSError, ValueError):
        return {}


def read_spool(path: str | Path) -> List[Dict[str, Any]]:
    """Records of a spool; a last line cut short by a crash is ignored."""
    out: List[Dict[str, Any]] = []
    try:
        lines = Path(path).read_bytes().splitlines()
    except OSError:
        return out
    for i, raw in enumerate(lines):
        try:
            out.append(json.loads(raw))
        except ValueError:
            if i != len(lines) - 1:
                log.warning("%s: line %d is damaged and was skipped", path, i + 1)
    return out


class ResilientTracker(Tracker):
    def __init__(self, tracking_uri: str, experiment_name: str, spool_dir: str | Path,
                 run_name: Optional[str] = None, run_id: Optional[str] = None,
                 parent_run_id: Optional[str] = None, tags: Optional[Mapping[str, Any]] = None,
                 adopt_spool: bool = False, retry_s: Optional[float] = None, retry_max_s: Optional[float] = None,
                 drain_s: Optional[float] = None, clock: Callable[[], float] = time.monotonic):
        self._setup(tracking_uri, experiment_name, spool_dir, run_id, clock,
                    retry_s if retry_s is not None else _env_float("DS2EXP_TRACKING_RETRY_S", 2.0),
                    retry_max_s if retry_max_s is not None else _env_float("DS2EXP_TRACKING_RETRY_MAX_S", 30.0),
                    drain_s if drain_s is not None else _env_float("DS2EXP_TRACKING_DRAIN_S", 30.0))
        self.dir.mkdir(parents=True, exist_ok=True)
        if self.spool_path.exists():
            if adopt_spool:
                self._pending = read_spool(self.spool_path)
                if self._pending:
                    log.info("tracking: %d records left by the previous process in %s are sent first",
                             len(self._pending), self.spool_path)
                    self._outage_started = self.clock()
                self._rewrite_spool()
            else:  # a new run in a folder with a spool of an older one: keep it, never mix the two
                aside = self.dir / f"tracking_spool.orphan-{time.strftime('%Y%m%d-%H%M%S')}.jsonl"
                os.replace(self.spool_path, aside)
                log.warning("tracking: unsent records of an earlier run in this folder were moved to %s "
                            "(send them with: python -m ds2exp.tracking.resilient %s)", aside, aside)
        self._write_state()
        self._submit({"op": "start", "run_id": run_id, "run_name": run_name, "parent_run_id": parent_run_id,
                      "tags": {k: str(v) for k, v in (tags or {}).items()}})

    def _setup(self, tracking_uri, experiment_name, spool_dir, run_id, clock, retry_s, retry_max_s,
               drain_s) -> None:
        self.tracking_uri = str(tracking_uri)
        self.experiment_name = str(experiment_name)
        self.dir = Path(spool_dir)
        self.spool_path = self.dir / SPOOL_NAME
        self.rejected_path = self.dir / REJECTED_NAME
        self.state_path = self.dir / STATE_NAME
        self.retry_s, self.retry_max_s, self.drain_s = float(retry_s), float(retry_max_s), float(drain_s)
        self.clock = clock
        self.run_id = run_id
        self._inner: Optional[MlflowTracker] = None
        self._pending: List[Dict[str, Any]] = []
        self._fh = None
        self._delay = self.retry_s
        self._next_try = 0.0
        self._outage_started: Optional[float] = None
        self.sent_from_spool = 0
        self.rejected = 0
        parsed = urlparse(self.tracking_uri)
        http = parsed.scheme in ("http", "https")
        self._probe_addr = (parsed.hostname or "127.0.0.1",
                            parsed.port or (443 if parsed.scheme == "https" else 80)) if http else None
        if http:
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")

    # ------------------------------------------------------------------ public API
    def log_params(self, params: Mapping[str, Any]) -> None:
        self._submit({"op": "params", "params": {k: str(v) for k, v in params.items()}})

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        clean = {k: float(v) for k, v in metrics.items() if v is not None}
        if clean:
            self._submit({"op": "metrics", "metrics": clean, "step": int(step), "ts": int(time.time() * 1000)})

    def set_tags(self, tags: Mapping[str, Any], run_id: Optional[str] = None) -> None:
        """Tags of this run, or of another run of the store (`run_id`: e.g. a sweep linking its jobs).
        A None value is left out: the UI would show the text `None`."""
        self._submit({"op": "tags", "tags": {k: str(v) for k, v in tags.items() if v is not None}, "run_id": run_id})

    def log_text(self, text: str, artifact_file: str) -> None:
        self._submit({"op": "text", "text": text, "file": artifact_file})

    def log_artifact(self, path: str | Path, artifact_path: Optional[str] = None) -> None:
        self._submit({"op": "artifact", "path": str(Path(path).resolve()), "artifact_path": artifact_path})

    def log_dict(self, obj: Any, artifact_file: str) -> None:
        self.log_text(json.dumps(obj, indent=1, default=str), artifact_file)

    def end(self, status: str = "FINISHED") -> None:
        self._submit({"op": "end", "status": status})
        self.drain(self.drain_s)
        if self._fh is not None:
            self._fh.close()
            self._fh = None

    def retry(self) -> bool:
        """Send the spool now if a retry is due (no waiting); True when nothing is left to send."""
        if self._pending and self.clock() >= self._next_try:
            self._flush(self.clock() + max(5.0, self.retry_s))
        return not self._pending

    @property
    def pending(self) -> int:
        return len(self._pending)

    def drain(self, budget_s: float) -> bool:
        """Keep trying to send the spool for up to `budget_s` seconds; True when it is empty."""
        deadline = self.clock() + max(0.0, budget_s)
        while self._pending:
            now = self.clock()
            if now >= self._next_try:
                self._flush(deadline)
                continue
            if now >= deadline:
                break
            time.sleep(max(0.0, min(self._next_try, deadline) - now))
        if self._pending:
            log.warning("tracking: %d records could not be sent to %s and are kept in %s; a resumed run sends "
                        "them first, or run: python -m ds2exp.tracking.resilient %s", len(self._pending),
                        self.tracking_uri, self.spool_path, self.dir)
            return False
        return True

    # ------------------------------------------------------------------ internals
    def _write_state(self) -> None:
        state = {"tracking_uri": self.tracking_uri, "experiment_name": self.experiment_name, "run_id": self.run_id}
        try:
            atomic_write_text(self.state_path, json.dumps(state, indent=1))
        except OSError as exc:
            log.warning("tracking: could not write %s: %s", self.state_path, exc)

    def _submit(self, op: Dict[str, Any]) -> None:
        if op["op"] != "start":
            op["run_id"] = op.get("run_id") or self.run_id  # None until the run exists: then it is this run
        if self._pending:
            self._spool(op)
            if self.clock() >= self._next_try:
                self._flush(self.clock() + max(5.0, self.retry_s))
            return
        if op["op"] == "start" and not self._reachable():  # a dead server at the start costs one TCP probe
            self._spool(op)
            self._failed(ConnectionRefusedError(f"no answer on {self._probe_addr[0]}:{self._probe_addr[1]}"))
            return
        try:
            self._apply(op)
        except Exception as exc:  # noqa: BLE001 - tracking must never stop training
            if is_permanent(exc):
                self._reject(op, exc)
            else:
                self._spool(op)
                self._failed(exc)

    def _spool(self, op: Dict[str, Any]) -> None:
        self._pending.append(op)
        try:
            if self._fh is None:
                self._fh = open(self.spool_path, "a", encoding="utf-8")
            self._fh.write(json.dumps(op, default=str) + "\n")
            self._fh.flush()
        except OSError as exc:  # the disk itself is failing: keep the record in memory
            log.warning("tracking: could not write %s: %s", self.spool_path, exc)

    def _rewrite_spool(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None
        try:
            if self._pending:
                atomic_write_text(self.spool_path,
                                  "".join(json.dumps(op, default=str) + "\n" for op in self._pending))
            else:
                self.spool_path.unlink(missing_ok=True)
        except OSError as exc:
            log.warning("tracking: could not rewrite %s: %s", self.spool_path, exc)

    def _reject(self, op: Dict[str, Any], exc: BaseException) -> None:
        self.rejected += 1
        log.warning("tracking: %s record refused by %s and kept in %s: %s", op.get("op"), self.tracking_uri,
                    self.rejected_path, str(exc).splitlines()[0][:300] if str(exc) else type(exc).__name__)
        try:
            with open(self.rejected_path, "a", encoding="utf-8") as fh:
                fh.write(json.dumps({**op, "error": str(exc)[:2000]}, default=str) + "\n")
        except OSError:
            pass

    def _failed(self, exc: BaseException) -> None:
        first = self._outage_started is None
        if first:
            self._outage_started = self.clock()
            self._delay = self.retry_s
        else:
            self._delay = min(self._delay * 2, self.retry_max_s)
        self._next_try = self.clock() + self._delay
        if first:
            why = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
            log.warning("tracking: MLflow at %s is unavailable (%s); training goes on, records are kept in %s "
                        "and sent when it answers again (next try in %.0f s)", self.tracking_uri, why,
                        self.spool_path, self._delay)

    def _reachable(self) -> bool:
        if self._probe_addr is None:
            return True
        try:
            with socket.create_connection(self._probe_addr, timeout=2.0):
                return True
        except OSError:
            return False

    def _flush(self, deadline: float) -> None:
        """Send pending records in order until done, a failure, or `deadline`."""
        if not self._reachable():
            self._failed(ConnectionRefusedError(f"no answer on {self._probe_addr[0]}:{self._probe_addr[1]}"))
            return
        sent = 0
        try:
            while self._pending:
                group = self._next_group()
                try:
                    self._apply_group(group)
                except Exception as exc:  # noqa: BLE001
                    if is_permanent(exc) and len(group) == 1:
                        self._reject(group[0], exc)
                    elif is_permanent(exc):  # a batch was refused: find the bad record one by one
                        for op in group:
                            try:
                                self._apply(op)
                            except Exception as one:  # noqa: BLE001
                                if not is_permanent(one):
                                    raise
                                self._reject(op, one)
                    else:
                        raise
                del self._pending[:len(group)]
                sent += len(group)
                if self.clock() > deadline and self._pending:
                    self._next_try = self.clock()  # more next time; the store answers
                    break
        except Exception as exc:  # noqa: BLE001
            self._failed(exc)
        finally:
            self.sent_from_spool += sent
            if sent:
                self._rewrite_spool()
        if not self._pending and self._outage_started is not None:
            log.warning("tracking: MLflow at %s answers again; %d spooled records sent after %.0f s",
                        self.tracking_uri, self.sent_from_spool, self.clock() - self._outage_started)
            self._outage_started = None
            self._delay = self.retry_s

    def _next_group(self) -> List[Dict[str, Any]]:
        """The first pending record, or a run of metric records for the same run (one log_batch)."""
        first = self._pending[0]
        if first["op"] != "metrics":
            return [first]
        group, count = [first], len(first["metrics"])
        for op in self._pending[1:]:
            if op["op"] != "metrics" or op.get("run_id") != first.get("run_id") \
                    or count + len(op["metrics"]) > METRICS_PER_BATCH:
                break
            group.append(op)
            count += len(op["metrics"])
        return group

    def _apply_group(self, group: List[Dict[str, Any]]) -> None:
        if len(group) == 1:
            self._apply(group[0])
            return
        from mlflow.entities import Metric

        inner = self._client_for(group[0])
        items = [Metric(k, v, op["ts"], op["step"]) for op in group for k, v in op["metrics"].items()]
        inner.client.log_batch(inner.run_id, metrics=items)

    def _connect(self) -> MlflowTracker:
        if self._inner is None:
            self._inner = MlflowTracker(self.tracking_uri, self.experiment_name, start=False)
        return self._inner

    def _client_for(self, op: Dict[str, Any]) -> MlflowTracker:
        inner = self._connect()
        rid = op.get("run_id") or self.run_id
        if rid is None:
            raise RuntimeError("the MLflow run has not been created yet")
        inner.run_id = rid
        return inner

    def _apply(self, op: Dict[str, Any]) -> None:
        kind = op["op"]
        if kind == "start":
            inner = self._connect()
            rid = op.get("run_id") or self.run_id
            new = inner.start_run(op.get("run_name"), rid, op.get("parent_run_id"), op.get("tags"))
            if new != self.run_id:
                self.run_id = new
                self._write_state()
            return
        inner = self._client_for(op)
        if kind == "params":
            inner.log_params(op["params"])
        elif kind == "metrics":
            inner.log_metrics(op["metrics"], op["step"], timestamp_ms=op.get("ts"))
        elif kind == "tags":
            inner.set_tags(op["tags"])
        elif kind == "text":
            inner.log_text(op["text"], op["file"])
        elif kind == "artifact":
            if not Path(op["path"]).exists():
                raise FileNotFoundError(f"artifact file no longer exists: {op['path']}")
            inner.log_artifact(op["path"], op.get("artifact_path"))
        elif kind == "end":
            inner.end(op["status"])
        else:
            raise ValueError(f"unknown tracking record {kind!r}")


def flush_main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m ds2exp.tracking.resilient",
                                 description="Send the tracking records a run kept while MLflow was unavailable.")
    ap.add_argument("path", help="run directory (holding tracking_spool.jsonl) or a spool file")
    ap.add_argument("--tracking-uri", help="store to send to (default: the run's own, from tracking_state.json)")
    ap.add_argument("--experiment", help="experiment name (default: the run's own)")
    ap.add_argument("--wait", type=float, default=30.0, help="seconds to keep trying (default 30)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    path = Path(args.path)
    run_dir = path if path.is_dir() else path.parent
    spool = path / SPOOL_NAME if path.is_dir() else path
    if not spool.is_file():
        print(f"nothing to send: {spool} does not exist")
        return 0
    state = read_state(run_dir)
    uri = args.tracking_uri or state.get("tracking_uri")
    experiment = args.experiment or state.get("experiment_name") or "ds2exp"
    if not uri:
        print(f"error: no tracking URI in {run_dir / STATE_NAME}; give --tracking-uri", file=sys.stderr)
        return 2
    if spool.name != SPOOL_NAME:  # an orphaned spool: adopt it under the standard name in a scratch folder
        scratch = Path(tempfile.mkdtemp(prefix="ds2exp-spool-"))
        (scratch / SPOOL_NAME).write_bytes(spool.read_bytes())
        run_dir = scratch
    records = read_spool(run_dir / SPOOL_NAME)
    t = _Replayer(uri, experiment, run_dir, state.get("run_id") if uri == state.get("tracking_uri") else None)
    ok = t.drain(args.wait)
    print(f"sent {t.sent_from_spool} of {len(records)} records to {uri} (run {t.run_id}); "
          f"{t.pending} left, {t.rejected} refused")
    if ok and spool.name != SPOOL_NAME:
        spool.unlink(missing_ok=True)
    return 0 if ok else 1


class _Replayer(ResilientTracker):
    """A tracker that only sends an existing spool (no new run is started)."""

    def __init__(self, uri: str, experiment: str, run_dir: Path, run_id: Optional[str]):
        self._setup(uri, experiment, run_dir, run_id, time.monotonic, 1.0, 10.0, 30.0)
        self._pending = read_spool(self.spool_path)

if __name__ == "__main__":

    sys.exit(flush_main())
