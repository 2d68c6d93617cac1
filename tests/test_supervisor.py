"""``serve`` with one process per role: a worker that dies leaves the listener answering.

Real parts: a ``serve --roles listener,worker`` subprocess (the supervisor and its two
role processes), dcmtk's ``storescu`` sending real files, SQLite. The worker is killed
from outside with SIGKILL, or kills itself in the decoder (a test hook that aborts on one
marked file, as a crashing codec would).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
from pathlib import Path

import pydicom
import pytest
from pipeline_support import (
    Bundles,
    all_jobs_ended,
    make_config,
    start_cli,
    subprocess_env,
    wait_for,
    write_config_file,
)
from pydicom.uid import generate_uid
from sqlalchemy import func, select

from pacs_classifier.db.engine import Database
from pacs_classifier.db.models import AuditEvent, Instance, Job, JobState, Prediction
from pacs_classifier.model.registry import register_bundle
from pacs_classifier.worker import ABORT_ON_UID_ENV

pytestmark = [pytest.mark.slow, pytest.mark.dcmtk]

CHEST = "chest_sc_mono2_8bit_jpeg_baseline.dcm"
STARTED = re.compile(r"role (\w+) (?:started|restarted) \(pid (\d+)\)")


def _copies(src: Path, out: Path, n: int, first: int = 0) -> list[Path]:
    """``n`` distinct instances (new UIDs) of one real file, pixel data untouched."""
    out.mkdir(exist_ok=True)
    ds = pydicom.dcmread(src)
    files = []
    for i in range(first, first + n):
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.StudyInstanceUID = generate_uid()
        ds.SeriesInstanceUID = generate_uid()
        path = out / f"{i:03d}.dcm"
        ds.save_as(path)
        files.append(path)
    return files


def _storescu(port: int, files: list[Path]) -> None:
    """One association; every C-STORE must come back Success."""
    done = subprocess.run(
        [
            "storescu",
            "--propose-jpeg8",
            "-aet",
            "TEST_PACS",
            "-aec",
            "PNEUMONIA_AI",
            "127.0.0.1",
            str(port),
        ]
        + [str(f) for f in files],
        capture_output=True,
        text=True,
        env={**subprocess_env(), "TCP_NODELAY": "1"},
        timeout=120,
        check=False,
    )
    assert done.returncode == 0 and "E:" not in done.stderr, done.stderr[-2000:]


class Served:
    """A supervised ``serve --roles listener,worker`` and the pids its log names."""

    def __init__(self, cfg: Path, log: Path) -> None:
        self.log = log
        self.proc = start_cli(cfg, "serve", "--roles", "listener,worker", log=log)

    def pids(self, role: str) -> list[int]:
        text = self.log.read_text(errors="replace")
        return [int(pid) for name, pid in STARTED.findall(text) if name == role]

    def wait_started(self, role: str, count: int = 1, timeout_s: float = 90) -> int:
        def up() -> bool:
            assert self.proc.poll() is None, self.log.read_text()[-3000:]
            return len(self.pids(role)) >= count

        wait_for(up, timeout_s, f"{role} started {count} time(s)")
        return self.pids(role)[-1]

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(60)


@pytest.fixture
def setup(tmp_path: Path, sqlite_url: str, tiny_bundles: Bundles) -> tuple[Path, Database, int]:
    config = make_config(
        tmp_path,
        sqlite_url,
        scheduler={"enabled": False},
        worker={"batch_size": 4, "max_attempts": 2, "retry_backoff_s": 0.0},
    )
    db = Database(sqlite_url)
    register_bundle(db, tiny_bundles.v1, config.model_dir, actor="test", activate=True)
    return write_config_file(tmp_path / "config.toml", config), db, config.listener.port


def _crashes(db: Database) -> list[tuple[str, str, dict[str, object]]]:
    with db.session() as s:
        rows = s.execute(
            select(AuditEvent.entity_id, AuditEvent.outcome, AuditEvent.detail)
            .where(AuditEvent.action == "role.crash")
            .order_by(AuditEvent.id)
        ).all()
    return [(str(e), str(o), dict(d or {})) for e, o, d in rows]


def _check_everything_kept(db: Database, sent: list[Path]) -> dict[str, JobState]:
    """Every file sent is stored once with one ended job; the states by SOP Instance UID."""
    uids = {str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in sent}
    with db.session() as s:
        rows = s.execute(
            select(Instance.sop_instance_uid, Job.state, func.count(Prediction.id))
            .join(Job, Job.instance_id == Instance.id)
            .outerjoin(Prediction, Prediction.instance_id == Instance.id)
            .group_by(Instance.sop_instance_uid, Job.state)
        ).all()
    assert {u for u, _, _ in rows} == uids and len(rows) == len(uids)
    for uid, state, predictions in rows:
        assert predictions == (1 if state == JobState.DONE else 0), uid
    return {u: st for u, st, _ in rows}


def test_sigkill_of_the_worker_process_loses_nothing(
    setup: tuple[Path, Database, int], tmp_path: Path, dicom_dir: Path, dcmtk: dict[str, str]
) -> None:
    cfg, db, port = setup
    served = Served(cfg, tmp_path / "serve.log")
    try:
        served.wait_started("listener")
        worker = served.wait_started("worker")
        first = _copies(dicom_dir / CHEST, tmp_path / "out", 12)
        _storescu(port, first)
        wait_for(lambda: _running(db) > 0, 60, "jobs in the worker's hands")
        os.kill(worker, signal.SIGKILL)
        # The listener is another process: it keeps answering Success meanwhile.
        second = _copies(dicom_dir / CHEST, tmp_path / "out", 12, first=12)
        _storescu(port, second)
        restarted = served.wait_started("worker", count=2)
        assert restarted != worker
        wait_for(lambda: all_jobs_ended(db), 90, "the queue finished by the new worker")
        assert served.proc.poll() is None
        assert served.pids("listener") == served.pids("listener")[:1]  # never restarted
    finally:
        code = served.stop()
    assert code == 0, served.log.read_text()[-3000:]
    states = _check_everything_kept(db, first + second)
    assert set(states.values()) == {JobState.DONE}
    ((role, outcome, detail),) = _crashes(db)
    assert (role, outcome) == ("worker", "restart")
    assert (detail["exit_status"], detail["reason"]) == (-9, "killed by SIGKILL")
    log = served.log.read_text()
    assert "role worker killed by SIGKILL" in log
    db.dispose()


def test_a_decoder_crash_takes_only_its_own_file_down(
    setup: tuple[Path, Database, int],
    tmp_path: Path,
    dicom_dir: Path,
    dcmtk: dict[str, str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    cfg, db, port = setup
    files = _copies(dicom_dir / CHEST, tmp_path / "out", 10)
    # The first file: the worker aborts while preparing the first batch, then again when
    # it claims that file alone, each time before its model is loaded (a slow step).
    poison = str(pydicom.dcmread(files[0], stop_before_pixels=True).SOPInstanceUID)
    monkeypatch.setenv(ABORT_ON_UID_ENV, poison)  # the worker process inherits it
    served = Served(cfg, tmp_path / "serve.log")
    try:
        served.wait_started("worker")
        _storescu(port, files[:6])
        # Two claims of the poisoned file (worker.max_attempts = 2): two aborts.
        served.wait_started("worker", count=3)
        _storescu(port, files[6:])  # answered while the worker crashes and restarts
        wait_for(lambda: all_jobs_ended(db), 90, "the queue finished")
        assert served.pids("listener") == served.pids("listener")[:1]
    finally:
        code = served.stop()
    assert code == 0, served.log.read_text()[-3000:]
    states = _check_everything_kept(db, files)
    assert states.pop(poison) == JobState.FAILED
    # Its batch-mates were claimed again one at a time, and done.
    assert set(states.values()) == {JobState.DONE}
    crashes = _crashes(db)
    assert [(r, o) for r, o, _ in crashes] == [("worker", "restart")] * 2
    assert {d["reason"] for _, _, d in crashes} == {"killed by SIGABRT"}
    with db.session() as s:
        reason = s.scalar(
            select(Job.reason)
            .join(Instance, Instance.id == Job.instance_id)
            .where(Instance.sop_instance_uid == poison)
        )
    assert reason is not None and reason.startswith("lease_lost")
    assert "Fatal Python error: Aborted" in served.log.read_text()  # the stack is in the log
    db.dispose()


def test_a_role_that_cannot_start_stops_serve(tmp_path: Path, sqlite_url: str) -> None:
    """A listener whose port is taken: one error line, exit 2, no role left running."""
    import socket

    from pipeline_support import cli

    config = make_config(tmp_path, sqlite_url, scheduler={"enabled": False})
    cfg = write_config_file(tmp_path / "config.toml", config)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", config.listener.port))
        taken.listen()
        out = cli(cfg, "serve", "--roles", "listener,worker", timeout_s=120)
        threads = cli(cfg, "serve", "--roles", "listener,worker", "--single-process")
    assert out.returncode == 2, out.stderr
    assert "role listener exited with status 2 while starting" in out.stderr
    assert "role worker" not in out.stderr  # never started
    # --single-process: the roles are threads of serve itself, no supervisor between.
    assert threads.returncode == 2, threads.stderr
    last = threads.stderr.strip().splitlines()[-1]
    assert last.startswith("pacs-classifier: error: listener.host/port: cannot listen"), last
    assert "_supervisor" not in threads.stderr


def _running(db: Database) -> int:
    with db.session() as s:
        query = select(func.count()).select_from(Job).where(Job.state == JobState.RUNNING)
        return int(s.scalar(query) or 0)
