"""``serve --roles ...,web`` as real processes: readiness follows PostgreSQL, metrics count.

The readiness test runs a PostgreSQL cluster of its own (initdb/pg_ctl on a free port),
stops it under the running daemon and starts it again. The metrics test runs the listener
and the web role as two processes that share only the database, sends with dcmtk's
storescu, and checks that counters rise by exactly one per stored instance.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import missing
from pipeline_support import REPO, free_port, make_config, subprocess_env, write_config_file
from sqlalchemy import create_engine, select
from web_support import (
    http_get,
    promtool,
    promtool_check,
    register_reference,
    samples,
    wait_http,
)

from pacs_classifier.db import migrate
from pacs_classifier.db.engine import Database
from pacs_classifier.db.models import Instance

CHEST = "chest_dx_mono2_8bit_implicit_le.dcm"


@dataclass
class Cluster:
    """A throw-away PostgreSQL cluster on a free loopback port."""

    bindir: Path
    folder: Path
    port: int
    as_postgres: bool

    def _run(self, *args: str) -> None:
        cmd = [str(self.bindir / args[0]), *args[1:]]
        if self.as_postgres:  # the server refuses to run as root
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        subprocess.run(cmd, check=True, capture_output=True, timeout=120)

    def start(self) -> None:
        options = f"-p {self.port} -k {self.folder} -c listen_addresses=127.0.0.1 -c fsync=off"
        self._run(
            "pg_ctl",
            "-D",
            str(self.folder / "data"),
            "-l",
            str(self.folder / "log"),
            "-o",
            options,
            "-w",
            "start",
        )

    def stop(self) -> None:
        self._run("pg_ctl", "-D", str(self.folder / "data"), "-m", "fast", "-w", "stop")

    @property
    def url(self) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"


def _bindir() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: p.split("/")[4])
    if found:
        return Path(found[-1]).parent
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


@pytest.fixture
def own_postgres() -> Iterator[Cluster]:
    bindir = _bindir()
    if bindir is None:
        missing("PostgreSQL server binaries (initdb, pg_ctl) are not installed")
    assert bindir is not None
    as_postgres = os.geteuid() == 0
    folder = Path(tempfile.mkdtemp(prefix="pacs-pg-"))
    if as_postgres:
        shutil.chown(folder, "postgres")
    cluster = Cluster(bindir, folder, free_port(), as_postgres)
    try:
        cluster._run(
            "initdb", "-D", str(folder / "data"), "-A", "trust", "-U", "postgres", "--no-sync"
        )
        cluster.start()
        yield cluster
    finally:
        with contextlib.suppress(subprocess.CalledProcessError):  # a test may have stopped it
            cluster.stop()
        shutil.rmtree(folder, ignore_errors=True)


def _serve(cfg: Path, roles: str, log: Path) -> subprocess.Popen[bytes]:
    env = subprocess_env()
    env["PACS_CLASSIFIER_WEB_SECRET"] = "test secret"  # noqa: S105
    return subprocess.Popen(
        [sys.executable, "-m", "pacs_classifier", "--config", str(cfg), "serve", "--roles", roles],
        cwd=REPO,
        env=env,
        stdout=log.open("ab"),
        stderr=subprocess.STDOUT,
    )


def _stop(proc: subprocess.Popen[bytes]) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait(30)


def test_ready_goes_503_when_postgresql_stops_and_200_when_it_returns(
    own_postgres: Cluster, tmp_path: Path
) -> None:
    migrate.upgrade(own_postgres.url)
    config = make_config(tmp_path, own_postgres.url)
    db = Database(own_postgres.url)
    try:
        register_reference(db, config.model_dir)
    finally:
        db.dispose()
    cfg = write_config_file(tmp_path / "config.toml", config)
    base = f"http://127.0.0.1:{config.web.port}"
    proc = _serve(cfg, "listener,web", tmp_path / "serve.log")
    try:
        ready = json.loads(wait_http(f"{base}/health/ready", 200, 90))
        assert ready["status"] == "ready"
        assert [c["name"] for c in ready["components"]] == [
            "database",
            "storage",
            "model",
            "listener",
        ]
        assert all(c["ok"] for c in ready["components"])

        own_postgres.stop()
        down = json.loads(wait_http(f"{base}/health/ready", 503, 30))
        state = {c["name"]: c["ok"] for c in down["components"]}
        assert state == {"database": False, "storage": True, "model": False, "listener": True}
        assert http_get(f"{base}/health/live")[0] == 200
        code, metrics = http_get(f"{base}/metrics")
        assert code == 200 and samples(metrics)["pacs_classifier_database_up"] == 0

        own_postgres.start()
        back = json.loads(wait_http(f"{base}/health/ready", 200, 60))
        assert back["status"] == "ready"
        assert samples(http_get(f"{base}/metrics")[1])["pacs_classifier_database_up"] == 1
    finally:
        code = _stop(proc)
    assert code == 0, (tmp_path / "serve.log").read_text()


def _storescu(port: int, file: Path) -> None:
    env = subprocess_env()
    env["TCP_NODELAY"] = "1"
    subprocess.run(
        [
            "storescu",
            "-aet",
            "TEST_PACS",
            "-aec",
            "PNEUMONIA_AI",
            "127.0.0.1",
            str(port),
            str(file),
        ],
        check=True,
        capture_output=True,
        timeout=60,
        env=env,
    )


def test_metrics_rise_by_one_per_stored_instance_across_processes(
    sqlite_url: str, tmp_path: Path, dicom_dir: Path, dcmtk: dict[str, str]
) -> None:
    promtool()
    config = make_config(tmp_path, sqlite_url)
    cfg = write_config_file(tmp_path / "config.toml", config)
    listener = _serve(cfg, "listener", tmp_path / "listener.log")
    web = _serve(cfg, "web", tmp_path / "web.log")
    url = f"http://127.0.0.1:{config.web.port}/metrics"
    try:
        wait_http(url, 200, 60)
        before_text = http_get(url)[1]
        promtool_check(before_text)
        before = samples(before_text)

        _storescu(config.listener.port, dicom_dir / CHEST)
        # The web process finds the listener of the other process through its port.
        ready = json.loads(http_get(f"http://127.0.0.1:{config.web.port}/health/ready")[1])
        after_text = http_get(url)[1]
        promtool_check(after_text)
        after = samples(after_text)
        engine = create_engine(sqlite_url)
        with engine.connect() as conn:
            size = conn.execute(select(Instance.file_size)).scalar_one()
        engine.dispose()

        def delta(key: str, a: dict[str, float], b: dict[str, float]) -> float:
            return a.get(key, 0.0) - b.get(key, 0.0)

        stored = 'pacs_classifier_cstores_total{outcome="stored",status="success"}'
        dup = 'pacs_classifier_cstores_total{outcome="duplicate",status="success"}'
        accepted = 'pacs_classifier_associations_total{outcome="accepted"}'
        queued = 'pacs_classifier_jobs{kind="classify",state="queued"}'
        assert delta(stored, after, before) == 1
        assert delta(accepted, after, before) == 1
        assert delta(queued, after, before) == 1
        assert delta("pacs_classifier_received_bytes_total", after, before) == size > 0

        # The same instance again: acknowledged as a duplicate, nothing new stored.
        _storescu(config.listener.port, dicom_dir / CHEST)
        again = samples(http_get(url)[1])
        assert delta(stored, again, after) == 0
        assert delta(dup, again, after) == 1
        assert delta(accepted, again, after) == 1
        assert delta("pacs_classifier_received_bytes_total", again, after) == 0
        listener_line = [c for c in ready["components"] if c["name"] == "listener"]
        assert listener_line and listener_line[0]["ok"], ready
    finally:
        codes = [_stop(web), _stop(listener)]
    assert codes == [0, 0], (tmp_path / "web.log").read_text()
    assert "Traceback" not in (tmp_path / "web.log").read_text()


def test_a_taken_web_port_is_one_line_and_exit_2(sqlite_url: str, tmp_path: Path) -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        config = make_config(tmp_path, sqlite_url, web={"port": taken.getsockname()[1]})
        cfg = write_config_file(tmp_path / "config.toml", config)
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "pacs_classifier",
                "--config",
                str(cfg),
                "serve",
                "--roles",
                "web",
            ],
            cwd=REPO,
            env=subprocess_env(),
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    assert result.returncode == 2
    assert (
        result.stderr.strip()
        .splitlines()[-1]
        .startswith("pacs-classifier: error: web: cannot serve on 127.0.0.1:")
    )
    assert "Traceback" not in result.stderr
