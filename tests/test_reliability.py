"""Reliability: faults inflicted on real processes and real files.

SIGKILL mid-run then resume (explicit and `trainer.auto_resume`), bitwise equality with an
uninterrupted run, an MLflow server that is down at start and killed mid-run, an unusable run
directory, a fuzzed corpus, bad command lines, and a scan for unsafe deserialisation.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import ROOT

SMALL = ["model.conv_channels=4", "model.rnn_hidden=32", "model.rnn_layers=1", "dataset.batch_size=4",
         "dataset.max_utterances=48", "trainer.max_eval_utterances=8", "trainer.progress=false",
         "dataset.num_buckets=2"]


# ---------------------------------------------------------------------------- helpers
def _cmd(data_dir: Path, run_dir: Path, *overrides: str):
    return [sys.executable, str(ROOT / "train.py"), f"paths.data_dir={data_dir}", f"hydra.run.dir={run_dir}",
            *overrides]


def _env(tmp_root: Path, **extra: str):
    return {**os.environ, "DS2EXP_ROOT": str(tmp_root), **extra}


def start(tmp_root: Path, data_dir: Path, run_dir: Path, *overrides: str, env=None) -> subprocess.Popen:
    tmp_root.mkdir(parents=True, exist_ok=True)
    log_path = tmp_root / f"train-{time.monotonic_ns()}.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(_cmd(data_dir, run_dir, *overrides), stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
                                env=env or _env(tmp_root))
    proc.log_path = log_path  # type: ignore[attr-defined]
    return proc


def run(tmp_root: Path, data_dir: Path, run_dir: Path, *overrides: str, env=None, check=True, timeout=600):
    r = subprocess.run(_cmd(data_dir, run_dir, *overrides), capture_output=True, text=True, cwd=ROOT,
                       env=env or _env(tmp_root), timeout=timeout)
    if check:
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-4000:]
    return r


def wait_for(pred, timeout: float, proc: subprocess.Popen | None = None, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = pred()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"process exited ({proc.returncode}) before {what}")
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


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


def history(client, run_id: str, key: str):
    by_step = defaultdict(list)
    for m in client.get_metric_history(run_id, key):
        by_step[m.step].append(m.value)
    return by_step


def load_params(run_dir: Path):
    from ds2exp.training.checkpoint import load_checkpoint

    c = load_checkpoint(run_dir / "checkpoints" / "last.ckpt")
    return c.model_state, c.optimizer_state, c.meta


def assert_same_parameters(a_dir: Path, b_dir: Path):
    ma, oa, meta_a = load_params(a_dir)
    mb, ob, meta_b = load_params(b_dir)
    assert meta_a["step"] == meta_b["step"]
    assert set(ma) == set(mb) and set(oa) == set(ob)
    for k in ma:  # fixed seed, CPU kernels: bitwise equal, not merely close
        np.testing.assert_array_equal(ma[k], mb[k], err_msg=k)
    for k in oa:
        np.testing.assert_array_equal(oa[k], ob[k], err_msg=k)


def sigkill_after_checkpoint(proc: subprocess.Popen, run_dir: Path, db: Path, past_step: int) -> int:
    """SIGKILL `proc` once a checkpoint exists and a train/loss beyond `past_step` is in the store."""
    wait_for(lambda: (run_dir / "checkpoints" / "last.ckpt").exists(), 300, proc, "the first checkpoint")
    wait_for(lambda: max_logged_step(db) > past_step, 300, proc, f"a step beyond {past_step}")
    assert proc.poll() is None, "training finished before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait(timeout=60) == -signal.SIGKILL
    return max_logged_step(db)


# ---------------------------------------------------------------------------- 1 + 2: SIGKILL and resume
STEPS = 16
KILL_RUN = SMALL + [f"trainer.max_steps={STEPS}", "trainer.checkpoint_every=4", "trainer.log_every=1",
                    "trainer.eval_every=8"]


def test_sigkill_then_resume_continues_the_same_run_bitwise(tmp_path, shared_data_dir):
    """Kill -9 after the first checkpoint, resume: same MLflow run, every step logged, the weights
    bitwise equal to an uninterrupted run with the same seed."""
    ref_root, root = tmp_path / "ref", tmp_path / "killed"
    ref_dir, run_dir = ref_root / "outputs" / "run", root / "outputs" / "run"
    reference = start(ref_root, shared_data_dir, ref_dir, *KILL_RUN, "logger=none")  # in parallel
    victim = start(root, shared_data_dir, run_dir, *KILL_RUN)
    db = root / "mlflow.db"
    killed_at = sigkill_after_checkpoint(victim, run_dir, db, past_step=4)
    run_id = json.loads((run_dir / "tracking_state.json").read_text())["run_id"]
    assert json.loads((run_dir / "run_state.json").read_text())["status"] == "running"  # what SIGKILL leaves

    run(root, shared_data_dir, run_dir, *KILL_RUN, f"resume={run_dir}")
    assert reference.wait(timeout=600) == 0

    client = mlflow_client(f"sqlite:///{db}")
    runs = runs_of(client)
    assert [r.info.run_id for r in runs] == [run_id]  # the same run, reopened
    run_info = client.get_run(run_id)
    assert run_info.info.status == "FINISHED"
    resumed_from = int(run_info.data.tags["ds2exp.resumed_from_step"])
    assert 4 <= resumed_from < killed_at < STEPS
    loss = history(client, run_id, "train/loss")
    assert sorted(loss) == list(range(1, STEPS + 1))  # no gap
    replayed = {s for s, v in loss.items() if len(v) > 1}
    # Steps the killed process logged after its last checkpoint are logged again by the replay;
    # nothing else is duplicated, and the replayed values are the same numbers.
    assert replayed <= set(range(resumed_from + 1, killed_at + 1))
    assert all(len(v) <= 2 and v[0] == v[-1] for v in loss.values())
    assert sorted(history(client, run_id, "val/wer")) == [8, 16]
    state = json.loads((run_dir / "run_state.json").read_text())
    assert state["status"] == "finished" and state["resumes"] == 1
    assert_same_parameters(ref_dir, run_dir)


def test_auto_resume_finds_the_killed_run_of_the_same_config(tmp_path, shared_data_dir):
    root = tmp_path
    first, second = root / "outputs" / "first", root / "outputs" / "second"
    overrides = [*KILL_RUN, "trainer.auto_resume=true"]
    victim = start(root, shared_data_dir, first, *overrides)
    sigkill_after_checkpoint(victim, first, root / "mlflow.db", past_step=4)
    run(root, shared_data_dir, second, *overrides)  # a new invocation, a new Hydra run dir
    assert "continued" in (second / "continued_in.txt").read_text() and str(first) in (
        second / "continued_in.txt").read_text()
    assert not (second / "checkpoints").exists()
    _, _, meta = load_params(first)
    assert meta["step"] == STEPS
    client = mlflow_client(f"sqlite:///{root / 'mlflow.db'}")
    runs = runs_of(client)
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    assert sorted(history(client, runs[0].info.run_id, "train/loss")) == list(range(1, STEPS + 1))


def test_claim_resumable_run_rules(tmp_path):
    """Only an interrupted run (status running/interrupted, lock free, readable checkpoint) with the
    same config fingerprint is claimed; a live one (lock held) never is."""
    import mindspore as ms  # noqa: F401

    from ds2exp.cli import check_overrides
    from ds2exp.training import recovery
    from ds2exp.training.checkpoint import save_checkpoint
    from tests.test_checkpoint import tiny_model

    cfg = check_overrides(["trainer.max_steps=10", f"paths.root_dir={tmp_path}"])
    other = check_overrides(["trainer.max_steps=10", "optimizer.lr=1e-3", f"paths.root_dir={tmp_path}"])
    launch = check_overrides(["trainer.max_steps=10", f"paths.root_dir={tmp_path}", "trainer.progress=false",
                              f"paths.cache_dir={tmp_path / 'elsewhere'}", "trainer.auto_resume=true"])
    assert recovery.config_fingerprint(cfg) == recovery.config_fingerprint(launch)  # paths/launch fields ignored
    assert recovery.config_fingerprint(cfg) != recovery.config_fingerprint(other)

    from omegaconf import OmegaConf

    def make(name, c, status):
        d = tmp_path / "outputs" / name
        meta = {"step": 3, "config": OmegaConf.to_container(c, resolve=True, enum_to_str=True)}
        save_checkpoint(d / "checkpoints" / "last.ckpt", tiny_model(), meta=meta)
        recovery.write_run_state(d, status=status, config_fingerprint=recovery.config_fingerprint(c))
        return d

    make("finished", cfg, "finished")
    make("other-config", other, "running")
    roots = [tmp_path / "outputs"]
    assert recovery.claim_resumable_run(cfg, roots) is None
    live = make("live", cfg, "running")
    held = recovery.RunLock(live).acquire()
    assert recovery.claim_resumable_run(cfg, roots) is None  # a live process owns it
    held.release()
    claim = recovery.claim_resumable_run(cfg, roots)
    assert claim is not None and claim[0] == live.resolve() and claim[1].meta["step"] == 3
    with pytest.raises(recovery.RunDirBusy, match="in use by another training process"):
        recovery.RunLock(live).acquire()  # the claim holds the lock
    claim[2].release()
    recovery.write_run_state(live, status="finished")
    # killed before its first checkpoint: claimed without one (restarted from step 0 in the same run dir)
    early = tmp_path / "outputs" / "early"
    recovery.write_run_state(early, status="running", config_fingerprint=recovery.config_fingerprint(cfg))
    claim = recovery.claim_resumable_run(cfg, roots)
    assert claim is not None and claim[0] == early.resolve() and claim[1] is None
    claim[2].release()
    # a half-written temporary checkpoint left by a kill is removed on resume
    (live / "checkpoints" / ".last.abc.tmp.ckpt").write_bytes(b"partial")
    assert [p.name for p in recovery.remove_partial_files(live)] == [".last.abc.tmp.ckpt"]


# ---------------------------------------------------------------------------- 3: tracking outage
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_tracking_store_unreachable_training_goes_on_and_the_spool_is_sent_later(tmp_path, shared_data_dir):
    """Nothing listens at the tracking URI for the whole run: training finishes normally, every record
    waits in the run's spool, and `python -m ds2exp.tracking.resilient` sends it once a store is there."""
    run_dir = tmp_path / "outputs" / "run"
    uri = f"http://127.0.0.1:{free_port()}"
    env = _env(tmp_path, DS2EXP_TRACKING_RETRY_S="0.5", DS2EXP_TRACKING_DRAIN_S="1")
    t0 = time.monotonic()
    r = run(tmp_path, shared_data_dir, run_dir, *SMALL, "trainer.max_steps=6", "trainer.log_every=1",
            "trainer.eval_every=3", f"logger.tracking_uri={uri}", env=env)
    elapsed = time.monotonic() - t0
    out = r.stdout + r.stderr
    assert f"MLflow at {uri} is unavailable" in out and "training goes on" in out
    assert "records could not be sent" in out and "python -m ds2exp.tracking.resilient" in out
    assert elapsed < 120
    assert json.loads((run_dir / "run_state.json").read_text())["status"] == "finished"
    from ds2exp.tracking.resilient import read_spool

    spool = read_spool(run_dir / "tracking_spool.jsonl")
    ops = [op["op"] for op in spool]
    assert ops[0] == "start" and ops[-1] == "end" and "params" in ops
    assert sorted(op["step"] for op in spool if op["op"] == "metrics" and "train/loss" in op["metrics"]) == \
        [1, 2, 3, 4, 5, 6]

    late = f"sqlite:///{tmp_path / 'late.db'}"
    f = subprocess.run([sys.executable, "-m", "ds2exp.tracking.resilient", str(run_dir), "--tracking-uri", late],
                       capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert f.returncode == 0, f.stdout + f.stderr
    assert f"sent {len(spool)} of {len(spool)} records" in f.stdout
    assert not (run_dir / "tracking_spool.jsonl").exists()
    client = mlflow_client(late)
    [found] = runs_of(client)
    assert found.info.status == "FINISHED" and found.data.params["optimizer.lr"] == "0.0003"
    assert sorted(history(client, found.info.run_id, "train/loss")) == [1, 2, 3, 4, 5, 6]
    assert sorted(history(client, found.info.run_id, "val/wer")) == [3, 6]
    assert "config" in {a.path for a in client.list_artifacts(found.info.run_id)}


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


@pytest.mark.slow
def test_mlflow_server_down_at_start_and_killed_mid_run_nothing_is_lost(tmp_path, shared_data_dir):
    """The training starts before its MLflow server answers; the server is then SIGKILLed mid-run and
    restarted on the same port and store. Every logged step is on the server afterwards."""
    server = MlflowServer(tmp_path / "server", free_port())
    run_dir = tmp_path / "outputs" / "run"
    env = _env(tmp_path, DS2EXP_TRACKING_RETRY_S="1", DS2EXP_TRACKING_RETRY_MAX_S="2",
               DS2EXP_TRACKING_DRAIN_S="300")
    trainer = start(tmp_path, shared_data_dir, run_dir, *SMALL, "trainer.max_steps=100000", "trainer.max_minutes=1.5",
                    "trainer.log_every=1", "trainer.eval_every=40", "trainer.checkpoint_every=20",
                    f"logger.tracking_uri={server.url}", env=env)
    try:
        # down at start: the trainer runs, spooling, before the server is even launched
        wait_for(lambda: (run_dir / "tracking_spool.jsonl").exists(), 240, trainer, "the spool (server down)")
        server.start()
        server.wait_healthy()
        client = mlflow_client(server.url)
        wait_for(lambda: not (run_dir / "tracking_spool.jsonl").exists(), 120, trainer, "the spool sent")
        assert client.get_metric_history(runs_of(client)[0].info.run_id, "train/loss")
        server.kill()  # mid-run, with the trainer logging straight to it again
        wait_for(lambda: (run_dir / "tracking_spool.jsonl").exists(), 120, trainer, "the spool (server killed)")
        assert trainer.poll() is None, "training must still be running while the server is down"
        server.start()
        server.wait_healthy()
        assert trainer.wait(timeout=600) == 0
        log = trainer.log_path.read_text()
        assert log.count("is unavailable") == 2 and log.count("answers again;") == 2, log[-5000:]
        summary = json.loads((run_dir / "summary.json").read_text())
        final = int(summary["step"])
        assert summary["stop_reason"] == "max_minutes" and final > 20
        [found] = runs_of(client)
        assert found.info.status == "FINISHED"
        assert sorted(history(client, found.info.run_id, "train/loss")) == list(range(1, final + 1))
        assert not (run_dir / "tracking_spool.jsonl").exists()
        assert not (run_dir / "tracking_rejected.jsonl").exists()
    finally:
        if trainer.poll() is None:
            trainer.kill()
        server.kill()


# ---------------------------------------------------------------------------- 5: corpus fuzzing
from hypothesis import HealthCheck, given, settings, strategies as st  # noqa: E402

CLIP_TEXTS = ["HELLO WORLD", "OPEN THE DOOR", "GOOD MORNING"]
KINDS = ["good", "truncated", "zero_length", "wrong_rate", "non_utf8", "missing", "duplicate"]
# what each kind of entry must be reported as (None: kept without comment)
PREPARE_REASON = {"truncated": r"truncated|corrupt|unreadable", "zero_length": r"unreadable|empty",
                  "non_utf8": r"not UTF-8", "missing": r"missing file", "duplicate": r"duplicate id",
                  "wrong_rate": r"sample rate 8000 Hz"}
entries_strategy = st.lists(st.tuples(st.sampled_from(KINDS), st.integers(0, len(CLIP_TEXTS) - 1),
                                      st.floats(0.15, 0.85)), min_size=1, max_size=7)


@pytest.fixture(scope="module")
def clips(say):
    return [say(t.lower()) for t in CLIP_TEXTS]


def _write_entries(folder: Path, entries, clips):
    """Real files for each fuzzed entry: (uid, kind) rows, transcript lines (bytes), 16 kHz FLACs."""
    import soundfile as sf
    import soxr

    folder.mkdir(parents=True, exist_ok=True)
    rows, lines = [], []
    entries = [("good", 0, 0.5)] + list(entries)  # at least one usable utterance
    duplicates = []
    for i, (kind, clip, frac) in enumerate(entries):
        uid = f"19-198-{i:04d}"
        path = folder / f"{uid}.flac"
        text = CLIP_TEXTS[clip].encode()
        if kind == "duplicate":
            duplicates.append(("duplicate", rows[0][0]))  # the id of the first (good) entry again
            continue
        if kind == "wrong_rate":
            sf.write(str(path), soxr.resample(clips[clip], 16000, 8000), 8000, format="FLAC", subtype="PCM_16")
        elif kind != "missing":
            sf.write(str(path), clips[clip], 16000, format="FLAC", subtype="PCM_16")
        if kind == "truncated":
            data = path.read_bytes()
            path.write_bytes(data[: max(64, int(len(data) * frac))])
        elif kind == "zero_length":
            path.write_bytes(b"")
        elif kind == "non_utf8":
            text = text[:3] + b"\xff\xfe" + text[3:]
        rows.append((uid, kind))
        lines.append(uid.encode() + b" " + text)
    for kind, uid in duplicates:
        rows.append((uid, kind))
        lines.append(uid.encode() + b" " + CLIP_TEXTS[1].encode())
    (folder / "19-198.trans.txt").write_bytes(b"\n".join(lines) + b"\n")
    return rows


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(entries=entries_strategy)
def test_fuzzed_librispeech_subset_prepares_and_reports_every_bad_entry(clips, entries):
    """Preparation never stops on bad input; its report lists each bad entry with its reason, and the
    manifest it writes loads as a training split."""
    import re
    import tempfile

    from ds2exp.cli import check_overrides
    from ds2exp.data.dataset import load_split
    from ds2exp.data.features import FeatureSettings
    from ds2exp.data.librispeech import prepare_subset

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        folder = tmp / "LibriSpeech" / "dev-fuzz"
        rows = _write_entries(folder / "19" / "198", entries, clips)
        manifest, report = prepare_subset("dev-fuzz", folder, tmp / "manifests", workers=1, progress=False)
        kept = {json.loads(x)["id"] for x in manifest.read_text().splitlines()}
        reported = [(e["id"], e["reason"], e["action"]) for e in report.entries]
        for uid, kind in rows:
            if kind == "good":
                assert uid in kept
                continue
            hits = [(r, a) for i, r, a in reported if i == uid and re.search(PREPARE_REASON[kind], r)]
            assert hits, (uid, kind, reported)
            assert (uid in kept) == (kind in ("wrong_rate", "duplicate"))  # repaired / first copy kept
            assert hits[0][1] == ("repaired" if kind == "wrong_rate" else "skipped")
        assert len([e for e in report.entries if e["action"] == "skipped"]) == sum(
            1 for _, k in rows if k not in ("good", "wrong_rate"))
        assert report.kept == len(kept)
        cfg = check_overrides(["dataset=manifest", f"dataset.train_manifest={manifest}", f"paths.root_dir={tmp}"])
        split = load_split("train", [manifest], cfg, FeatureSettings())
        assert {e.utt.id for e in split.examples} == kept and not split.dropped


@pytest.mark.filterwarnings("ignore:.*resampled from")
@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(entries=entries_strategy)
def test_fuzzed_manifest_loads_and_every_bad_entry_is_dropped_or_skipped_with_its_reason(clips, entries):
    """A JSON-lines manifest whose files went bad after it was written: `load_split` drops what it can
    see (missing file, non-UTF-8 line, duplicate id), the batch loader skips what only decoding shows
    (truncated, zero-length), each with its reason; 8 kHz audio is resampled and trains."""
    import tempfile

    import soundfile as sf

    from ds2exp.cli import check_overrides
    from ds2exp.data.dataset import BatchLoader, BucketBatchSampler, load_split
    from ds2exp.data.features import FeatureCache, FeatureSettings

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        rows = _write_entries(tmp / "audio", entries, clips)
        lines = (tmp / "audio" / "19-198.trans.txt").read_bytes().splitlines()
        manifest = tmp / "m.jsonl"
        out = []
        for (uid, kind), line in zip(rows, lines):
            text = line.split(b" ", 1)[1]
            duration = len(clips[0]) / 16000 if kind == "missing" else None
            path = tmp / "audio" / f"{uid}.flac"
            if duration is None:
                duration = sf.info(str(path)).duration if kind in ("good", "wrong_rate", "duplicate") else 1.0
            obj = {"id": uid, "audio_path": str(path), "transcript": "@@", "duration": duration,
                   "sample_rate": 8000 if kind == "wrong_rate" else 16000}
            out.append(json.dumps(obj).encode().replace(b"@@", text))  # raw bytes: non-UTF-8 stays so
        manifest.write_bytes(b"\n".join(out) + b"\n")
        cfg = check_overrides(["dataset=manifest", f"dataset.train_manifest={manifest}", f"paths.root_dir={tmp}"])
        settings_ = FeatureSettings()
        split = load_split("train", [manifest], cfg, settings_, report_dir=tmp)
        loader = BatchLoader(split, BucketBatchSampler(split.examples, 2, 1, seed=0),
                             FeatureCache(tmp / "cache", settings_, enabled=False), num_workers=1)
        trained = {uid for b in loader.iterate(0) for uid in b.ids}
        dropped = {(uid, reason) for reason, ids in split.dropped.items() for uid in ids}
        failures = loader.failures
        for uid, kind in rows:
            if kind in ("good", "wrong_rate"):
                assert uid in trained, (uid, kind, dropped, failures)
            elif kind == "missing":
                assert (uid, "missing file") in dropped
            elif kind == "non_utf8":
                assert (uid, "transcript is not UTF-8") in dropped
            elif kind == "duplicate":
                assert (uid, "duplicate id") in dropped
            else:  # truncated / zero-length: only decoding finds out
                assert uid not in trained
                assert uid in failures and any(w in failures[uid] for w in ("truncated", "corrupt", "unreadable",
                                                                           "empty")), (uid, failures)
        if split.dropped:
            assert json.loads((tmp / "dropped_train.json").read_text()) == split.dropped


# ---------------------------------------------------------------------------- 4: unusable output paths
def _bare_run(cwd: Path, *args: str, env=None, timeout=120):
    """train.py from `cwd`, with DS2EXP_ROOT=cwd: Hydra's relative outputs/ and the store land in cwd."""
    return subprocess.run([sys.executable, str(ROOT / "train.py"), *args], capture_output=True, text=True, cwd=cwd,
                          env=env or _env(cwd), timeout=timeout)


@pytest.mark.parametrize("override, key, what", [
    ("hydra.run.dir={blocker}/run", "hydra.run.dir", "run directory"),
    ("paths.root_dir={blocker}/root", "logger.tracking_uri", "MLflow store folder"),
])
def test_unusable_run_directory_is_one_line_and_creates_nothing(tmp_path, override, key, what):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    r = _bare_run(tmp_path, override.format(blocker=blocker))
    assert r.returncode == 3
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith(f"output error: cannot create the {what} {blocker}/")
    assert f"{blocker} is a file, not a directory" in lines[0] and f"set {key} to a writable folder" in lines[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file"]


def test_sweep_directory_under_a_file_is_refused(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    r = _bare_run(tmp_path, "-m", f"hydra.sweep.dir={blocker}/sweep", "optimizer.lr=1e-4,1e-3")
    assert r.returncode == 3 and "cannot create the run directory" in r.stderr and "hydra.sweep.dir" in r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file"]


def test_disk_full_mid_run_fails_with_the_checkpoint_path(tmp_path, shared_data_dir):
    """A file-size limit (as a full disk) in the training process: the checkpoint write fails, the run
    stops with one error line naming the file, and the run is marked failed, not resumable."""
    import resource

    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of death, as ENOSPC would be
        resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))

    run_dir = tmp_path / "outputs" / "run"
    r = subprocess.run(_cmd(shared_data_dir, run_dir, *SMALL, "trainer.max_steps=4", "trainer.checkpoint_every=2",
                            "logger=none", "dataset.feature.cache=false"),
                       capture_output=True, text=True, cwd=ROOT, env=_env(tmp_path), timeout=300, preexec_fn=limit)
    assert r.returncode == 1, r.stderr[-3000:]
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: could not write checkpoint {run_dir}/checkpoints/last.ckpt"), r.stderr[-3000:]
    assert "Traceback" not in r.stderr
    state = json.loads((run_dir / "run_state.json").read_text())
    assert state["status"] == "failed" and "could not write checkpoint" in state["error"]
    assert not list((run_dir / "checkpoints").glob(".*tmp*"))


# ---------------------------------------------------------------------------- 6: configuration errors
BAD_COMMAND_LINES = [
    (["optimizer.lrr=1"], ["unknown config key 'optimizer.lrr'", "allowed keys under 'optimizer': name, lr,"]),
    (["+trainer.bar=2"], ["unknown config key 'trainer.bar'", "allowed keys under 'trainer':"]),
    (["++foo=1"], ["unknown config key 'foo'", "allowed keys: paths, dataset, model"]),
    (["trainer.max_steps=abc"], ["'trainer.max_steps'", "could not be converted to Integer"]),
    (["trainer.auto_resume=maybe"], ["'trainer.auto_resume'", "is not a valid bool"]),
    (["optimizer.lr=0"], ["optimizer.lr=0.0 is not allowed", "expected a number > 0"]),
    (["optimizer.lr=-0.001"], ["optimizer.lr=-0.001 is not allowed", "expected a number > 0"]),
    (["dataset.batch_size=0"], ["dataset.batch_size=0 is not allowed", "expected an integer >= 1"]),
    (["precision=fp64"], ["precision=fp64 is not an option", "allowed: bf16, fp16, fp32"]),
    (["model=ds2_huge"], ["model=ds2_huge is not an option", "allowed: ds2_reference, ds2_small, ds2_tiny"]),
    (["model.rnn_type=rnn"], ["'model.rnn_type'", "expected one of [lstm, gru]"]),
    (["resume=/no/such/checkpoint"], ["resume='/no/such/checkpoint' is not allowed",
                                      "an existing checkpoint file or run directory"]),
    (["pretrained=/no/such.ckpt"], ["pretrained='/no/such.ckpt' is not allowed", "an existing checkpoint file"]),
    (["-m", "optimizer.lr=1e-3,-1"], ["optimizer.lr=-1.0 is not allowed", "expected a number > 0"]),
]


def test_every_bad_command_line_exits_2_with_one_line_and_leaves_nothing(tmp_path):
    """Each bad override: status 2, one stderr line naming the key and what is allowed, and no run
    directory, sweep directory, MLflow store or data folder created (all run in parallel)."""
    procs = []
    for i, (args, expected) in enumerate(BAD_COMMAND_LINES):
        cwd = tmp_path / f"case{i}"
        cwd.mkdir()
        procs.append((args, expected, cwd, subprocess.Popen(
            [sys.executable, str(ROOT / "train.py"), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True, cwd=cwd, env=_env(cwd))))
    for args, expected, cwd, proc in procs:
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 2, (args, err)
        lines = [ln for ln in err.splitlines() if ln.strip()]
        assert len(lines) == 1 and lines[0].startswith("config error: "), (args, err)
        for text in expected:
            assert text in lines[0], (args, lines[0])
        assert list(cwd.iterdir()) == [], (args, list(cwd.iterdir()))  # no outputs/, multirun/, mlflow.db, data/


# ---------------------------------------------------------------------------- 7: security
UNSAFE = [r"\bpickle\.loads?\(", r"\bcPickle\b", r"\bcloudpickle\b", r"\bdill\b", r"\bjoblib\.load\(",
          r"allow_pickle\s*=\s*True", r"\btorch\.load\(", r"\byaml\.load\((?![^)]*SafeLoader)", r"\bmarshal\.loads?\(",
          r"\bshelve\.open\(", r"\beval\(", r"\bexec\("]


def _sources():
    files = sorted((ROOT / "ds2exp").rglob("*.py")) + sorted((ROOT / "bench").rglob("*.py"))
    return files + [ROOT / "train.py", ROOT / "evaluate.py", ROOT / "export.py"]


def test_nothing_deserialises_user_files_unsafely():
    """No pickle/torch.load/unsafe YAML/eval anywhere in the package, the scripts or the bench; every
    np.load says allow_pickle=False. Checkpoints are MindSpore protobuf, loaded by name and shape."""
    import re

    hits = []
    for path in _sources():
        text = path.read_text()
        for pattern in UNSAFE:
            for m in re.finditer(pattern, text):
                line = text[: m.start()].count("\n") + 1
                hits.append(f"{path.relative_to(ROOT)}:{line}: {pattern}")
        for m in re.finditer(r"\bnp\.load\(([^)]*)\)", text):
            if "allow_pickle=False" not in m.group(1):
                hits.append(f"{path.relative_to(ROOT)}: np.load without allow_pickle=False")
    assert not hits, "\n".join(hits)


def test_servers_bind_localhost_only():
    makefile = (ROOT / "Makefile").read_text()
    ui = [ln for ln in makefile.splitlines() if "mlflow ui" in ln or "mlflow server" in ln]
    assert ui and all("--host 127.0.0.1" in ln for ln in ui), ui
    for path in _sources():
        assert "0.0.0.0" not in path.read_text(), path


def test_checkpoint_with_foreign_names_or_shapes_is_refused(tmp_path):
    """A checkpoint is only ever applied by matching names and shapes: anything else is an error."""
    import mindspore as ms

    from ds2exp.models.deepspeech2 import load_state
    from ds2exp.training.checkpoint import CheckpointError, load_checkpoint
    from tests.test_checkpoint import tiny_model

    model = tiny_model()
    before = {n: p.asnumpy().copy() for n, p in model.parameters_and_names()}
    state = {n: np.ones_like(v) for n, v in before.items()}
    state["conv.conv1.weight"] = np.ones((3, 3), np.float32)
    state["fc.payload"] = np.ones(3, np.float32)
    bogus = tmp_path / "bogus.ckpt"
    ms.save_checkpoint([{"name": n, "data": ms.Tensor(v)} for n, v in state.items()], str(bogus))
    with pytest.raises(ValueError) as err:
        load_state(model, load_checkpoint(bogus).model_state)
    assert "shape mismatches: conv.conv1.weight" in str(err.value) and "not in model: fc.payload" in str(err.value)
    for n, p in model.parameters_and_names():  # refused as a whole: nothing was applied
        np.testing.assert_array_equal(p.asnumpy(), before[n])
    junk = tmp_path / "junk.ckpt"
    junk.write_bytes(b"\x80\x04\x95" + b"cos\nsystem\n(S'echo pwned'\ntR." * 10)  # a pickle, not a checkpoint
    with pytest.raises(CheckpointError, match="unreadable or truncated"):
        load_checkpoint(junk)


def test_spool_left_by_a_dead_process_is_sent_first_by_the_next_one(tmp_path):
    """Process 1 logs while the store is down and dies without `end()`; process 2 (a resume) adopts
    its spool: one run, steps in order, nothing lost. A record the store refuses for good is kept in
    tracking_rejected.jsonl and does not hold back the others."""
    from ds2exp.tracking.resilient import ResilientTracker, read_spool

    down = f"http://127.0.0.1:{free_port()}"
    first = ResilientTracker(down, "ds2exp", tmp_path, run_name="r", retry_s=60)
    first.log_params({"optimizer.lr": 0.1})
    for step in (1, 2, 3):
        first.log_metrics({"train/loss": 10.0 - step}, step)
    assert first.run_id is None and [op["op"] for op in read_spool(tmp_path / "tracking_spool.jsonl")] == [
        "start", "params", "metrics", "metrics", "metrics"]
    del first  # killed: no end(), the spool stays

    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    second = ResilientTracker(store, "ds2exp", tmp_path, run_name="r", adopt_spool=True)
    assert second.pending == 0 and second.run_id is not None  # sent at once, its own start included
    for step in (4, 5):
        second.log_metrics({"train/loss": 10.0 - step}, step)
    second.log_artifact(tmp_path / "gone.json")  # refused for good: the file does not exist
    second.log_metrics({"train/loss": 4.0}, 6)
    second.end()
    client = mlflow_client(store)
    [found] = runs_of(client)
    assert found.info.status == "FINISHED" and found.data.params["optimizer.lr"] == "0.1"
    assert {s: v for s, v in history(client, found.info.run_id, "train/loss").items()} == {
        s: [10.0 - s] for s in range(1, 7)}
    rejected = read_spool(tmp_path / "tracking_rejected.jsonl")
    assert [r["op"] for r in rejected] == ["artifact"] and "no longer exists" in rejected[0]["error"]
    assert not (tmp_path / "tracking_spool.jsonl").exists()
    assert json.loads((tmp_path / "tracking_state.json").read_text())["run_id"] == found.info.run_id


# ---------------------------------------------------------------------------- 2: what makes resume bitwise
def _tiny_training():
    import mindspore as ms

    from ds2exp.evaluation.runner import ctc_losses
    from ds2exp.models.deepspeech2 import DeepSpeech2
    from ds2exp.training.optim import build_optimizer
    from omegaconf import OmegaConf

    ms.set_seed(0)
    model = DeepSpeech2(conv_channels=2, rnn_layers=1, rnn_hidden=8)
    model.set_train(True)
    opt = build_optimizer(model.trainable_params(), OmegaConf.create(
        {"name": "adam", "lr": 1e-2, "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 0.0}))
    rng = np.random.default_rng(0)
    x = ms.Tensor(rng.standard_normal((2, 161, 64)).astype(np.float32))
    xl, y, yl = (ms.Tensor(np.array(v, np.int32)) for v in ([64, 60], [[1, 2, 3], [4, 5, 0]], [3, 2]))

    def loss(*args):
        logits, out_len = model(args[0], args[1])
        return ctc_losses(logits, out_len, args[2], args[3]).mean()

    grad_fn = ms.value_and_grad(loss, None, opt.parameters)

    def step():
        _, grads = grad_fn(x, xl, y, yl)
        opt(grads)

    return model, opt, step


def _state(model, opt):
    own = {n for n, _ in model.parameters_and_names()}
    return ({n: p.asnumpy().copy() for n, p in model.parameters_and_names()},
            {n: p.asnumpy().copy() for n, p in opt.parameters_and_names() if n not in own})


def test_learning_rate_and_restored_weights_take_effect_after_the_first_step():
    """MindSpore 2.8: after an optimizer has run, Parameter.set_data detaches the parameter from it
    (found while checking resume). The learning rate and restored weights are assigned in place."""
    from ds2exp.models.deepspeech2 import load_state
    from ds2exp.training.optim import set_learning_rate

    model, opt, step = _tiny_training()
    step()
    snapshot, _ = _state(model, opt)
    set_learning_rate(opt, 0.0)
    before, _ = _state(model, opt)
    step()
    after, _ = _state(model, opt)
    assert all(np.array_equal(before[k], after[k]) for k in before if "moving_" not in k)  # lr 0: nothing moves
    set_learning_rate(opt, 1e-2)
    load_state(model, snapshot)  # a rollback after steps
    step()
    moved, _ = _state(model, opt)
    assert not np.array_equal(moved["fc.module.weight"], snapshot["fc.module.weight"])  # still trained


def test_restore_is_bitwise_with_denormal_optimizer_state():
    """Adam's beta1_power is denormal after ~840 steps (beta1=0.9). A resumed optimizer is primed with
    one zero-gradient call before its state is assigned, so its next steps equal the uninterrupted ones."""
    import mindspore as ms

    from ds2exp.models.deepspeech2 import load_state
    from ds2exp.training.checkpoint import prime_optimizer, restore_optimizer

    model, opt, step = _tiny_training()
    step()
    ms.ops.assign(dict(opt.parameters_and_names())["beta1_power"], ms.Tensor(np.float32(1.2e-38)))
    step()
    saved_model, saved_opt = _state(model, opt)
    assert 0 < saved_opt["beta1_power"] < 1.17e-38  # denormal now
    for _ in range(3):
        step()
    final_model, final_opt = _state(model, opt)

    model2, opt2, step2 = _tiny_training()  # "the resumed process"
    prime_optimizer(opt2)
    load_state(model2, saved_model)
    restore_optimizer(opt2, saved_opt)
    for _ in range(3):
        step2()
    got_model, got_opt = _state(model2, opt2)
    for k in final_model:
        np.testing.assert_array_equal(got_model[k], final_model[k], err_msg=k)
    for k in final_opt:
        np.testing.assert_array_equal(got_opt[k], final_opt[k], err_msg=k)
