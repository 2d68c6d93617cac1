"""``serve --roles listener`` as a real process: schema check, roles, kill -9, SIGTERM."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from pydicom.dataset import Dataset
from pynetdicom import AE
from sqlalchemy import select
from test_listener import (
    CALLED,
    assert_all_stored,
    audit_outcomes,
    free_port,
    running,
    send,
    small_instance,
)

from pacs_classifier.commands import _roles, serve
from pacs_classifier.config import load_config
from pacs_classifier.db.engine import Database
from pacs_classifier.db.models import Instance
from pacs_classifier.receive import statuses
from pacs_classifier.store.ingest import ACTION_RECOVER, CRASH_AFTER_RENAME, CRASH_AT_ENV

pytestmark = pytest.mark.filterwarnings("ignore:Invalid value for VR UI")

REPO = Path(__file__).resolve().parents[1]


def write_config(tmp_path: Path, db_url: str, port: int) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(
        f'[database]\nurl = "{db_url}"\n'
        f'[storage]\nroot = "dicom"\nmin_free_mb = 0\n'
        f'[listener]\nae_title = "{CALLED}"\nport = {port}\n'
    )
    return path


def serve_cmd(config: Path, *roles: str) -> list[str]:
    cmd = [sys.executable, "-m", "pacs_classifier", "--config", str(config), "serve"]
    return [*cmd, "--roles", ",".join(roles)] if roles else cmd


class Server:
    """A ``serve`` subprocess whose stderr is read in the background."""

    def __init__(self, cmd: list[str], env: dict[str, str] | None = None) -> None:
        self.proc = subprocess.Popen(
            cmd, cwd=REPO, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=env
        )
        self.lines: list[str] = []
        self.listening = threading.Event()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append(line)
            if "listening on" in line:
                self.listening.set()

    def wait_listening(self) -> None:
        assert self.listening.wait(60), "".join(self.lines)

    def finish(self, timeout: float = 60) -> int:
        code = self.proc.wait(timeout)
        self._reader.join(10)
        return code


@contextmanager
def server(cmd: list[str], env: dict[str, str] | None = None) -> Iterator[Server]:
    s = Server(cmd, env)
    try:
        yield s
    finally:
        if s.proc.poll() is None:
            s.proc.kill()
            s.proc.wait(30)


def stream(
    port: int, datasets: list[Dataset], acked: list[str], after: int, go: threading.Event
) -> None:
    """Send ``datasets`` on one association, recording what was acknowledged."""
    ae = AE(ae_title="STREAMER")
    # A killed peer is noticed from the closed socket; the timeouts only bound a hang.
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
    ae.add_requested_context(datasets[0].SOPClassUID, datasets[0].file_meta.TransferSyntaxUID)
    assoc = ae.associate("127.0.0.1", port, ae_title=CALLED)
    try:
        for ds in datasets:
            if not assoc.is_established:
                break
            status = assoc.send_c_store(ds)
            if "Status" in status and status.Status == statuses.SUCCESS:
                acked.append(str(ds.SOPInstanceUID))
                if len(acked) == after:
                    go.set()
    finally:
        go.set()
        if assoc.is_established:
            assoc.release()


def sized_instance(i: int) -> Dataset:
    ds = small_instance(seed=i)
    ds.Rows = ds.Columns = 256  # 64 KB: a kill can land mid-transfer, not only between
    ds.PixelData = bytes([i % 256]) * (256 * 256)
    return ds


def test_serve_refuses_an_old_schema(tmp_path: Path) -> None:
    config = write_config(tmp_path, f"sqlite:///{tmp_path / 'empty.sqlite3'}", free_port())
    result = subprocess.run(
        serve_cmd(config, "listener"),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2
    assert "db upgrade" in result.stderr
    assert "Traceback" not in result.stderr


def test_serve_refuses_an_unknown_role(tmp_path: Path, sqlite_url: str) -> None:
    config = write_config(tmp_path, sqlite_url, free_port())
    result = subprocess.run(
        serve_cmd(config, "listener,bogus"),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2
    assert "'bogus' is unknown" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_a_role_not_built_yet_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(serve, "ROLES", {"listener": _roles.start_listener})
    with pytest.raises(serve.RoleError, match="'worker' is not available"):
        serve.parse_roles("listener,worker")
    assert serve.parse_roles(" listener,listener ") == ["listener"]


def test_kill_9_loses_nothing_acknowledged_and_sigterm_drains(
    tmp_path: Path, sqlite_url: str
) -> None:
    port = free_port()
    config = write_config(tmp_path, sqlite_url, port)
    root = tmp_path / "dicom"
    datasets = [sized_instance(i) for i in range(200)]
    acked: list[str] = []
    go = threading.Event()

    with server(serve_cmd(config, "listener")) as first:
        first.wait_listening()
        sender = threading.Thread(target=stream, args=(port, datasets, acked, 40, go))
        sender.start()
        assert go.wait(60)
        os.kill(first.proc.pid, signal.SIGKILL)
        sender.join(60)
        assert first.finish() == -signal.SIGKILL
    assert 40 <= len(acked) < 200

    db = Database(sqlite_url)
    try:
        with server(serve_cmd(config, "listener")) as second:
            second.wait_listening()
            assert list((root / ".tmp").iterdir()) == []  # orphans removed at start
            with db.session() as s:
                stored = set(s.execute(select(Instance.sop_instance_uid)).scalars())
            # Everything acknowledged survived; at most the one in flight is extra.
            assert set(acked) <= stored
            assert len(stored - set(acked)) <= 1
            # The sender re-sends what it did not see acknowledged; then SIGTERM while a
            # second stream is in flight.
            pending = [d for d in datasets if str(d.SOPInstanceUID) not in set(acked)]
            resent: list[str] = []
            stream(port, pending, resent, 0, threading.Event())
            assert len(resent) == len(pending)
            more = [sized_instance(1000 + i) for i in range(100)]
            acked2: list[str] = []
            go2 = threading.Event()
            sender = threading.Thread(target=stream, args=(port, more, acked2, 10, go2))
            sender.start()
            assert go2.wait(60)
            second.proc.send_signal(signal.SIGTERM)
            sender.join(60)
            assert second.finish() == 0, "".join(second.lines)
        uids = {str(d.SOPInstanceUID) for d in datasets} | set(acked2)
        stored_now = _stored_uids(db)
        assert uids <= stored_now
        # One row, one file, one job each; no temporaries left by the drained shutdown.
        assert_all_stored(db, root, stored_now)
    finally:
        db.dispose()


def _stored_uids(db: Database) -> set[str]:
    with db.session() as s:
        return set(s.execute(select(Instance.sop_instance_uid)).scalars())


def test_kill_9_between_rename_and_commit_leaves_no_orphan(tmp_path: Path, sqlite_url: str) -> None:
    """A listener killed right after the rename; the next start removes what it left."""
    port = free_port()
    config_path = write_config(tmp_path, sqlite_url, port)
    config = load_config(config_path, environ={})
    root = config.storage_root
    acked, lost = small_instance(seed=1), small_instance(seed=2)
    with running(config) as (app, _):
        assert send(port, [acked]) == [statuses.SUCCESS]
        with app.db.session() as s:
            kept_path = root / s.execute(select(Instance.file_path)).scalar_one()
    kept_before = kept_path.stat()
    kept_bytes = kept_path.read_bytes()

    # The test hook kills the process (SIGKILL) once the file has its final name.
    env = {**os.environ, CRASH_AT_ENV: CRASH_AFTER_RENAME}
    with server(serve_cmd(config_path, "listener"), env) as crashing:
        crashing.wait_listening()
        answered = send(port, [lost])
        assert crashing.finish() == -signal.SIGKILL
    assert answered == [-1]  # no status: the sender still holds the instance
    orphans = [p for p in root.rglob("*.dcm") if p.parent.name != ".tmp" and p != kept_path]
    assert len(orphans) == 1  # the crash window really was hit
    orphan = orphans[0]
    assert [m.name for m in (root / ".pending").iterdir()] == [
        orphan.relative_to(root).as_posix().replace("/", "_") + ".intent"
    ]

    with running(config) as (app, _):
        assert not orphan.exists()
        assert list((root / ".pending").iterdir()) == []
        recovered = audit_outcomes(app.db, ACTION_RECOVER)
        assert [(a, o, d["file_path"]) for a, o, d in recovered] == [
            ("listener", "removed", orphan.relative_to(root).as_posix())
        ]
        kept_after = kept_path.stat()
        assert (kept_after.st_ino, kept_after.st_mtime_ns) == (
            kept_before.st_ino,
            kept_before.st_mtime_ns,
        )
        assert kept_path.read_bytes() == kept_bytes
        # The sender retries what was never acknowledged; now it is stored once.
        assert send(port, [lost]) == [statuses.SUCCESS]
        assert_all_stored(app.db, root, {str(acked.SOPInstanceUID), str(lost.SOPInstanceUID)})
