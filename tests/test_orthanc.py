"""Interop with a real PACS: Orthanc sends a radiograph, our SR and overlay come back to it.

One Orthanc (Debian's ``orthanc``) per module, run as a plain process on free loopback
ports with its own configuration and storage in a temporary folder. Its own DICOM client
sends the radiograph to our listener (REST ``/modalities/ours/store``); our listener,
worker and sender run in this process on a SQLite database; Orthanc's REST API shows what
arrived. dicom3tools' ``dciodvfy`` validates both objects as Orthanc stored them, and
dcmtk's ``dsrdump`` reads the SR.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest
from conftest import missing
from pipeline_support import Bundles, add_instances, all_jobs_ended, free_port, wait_for
from sqlalchemy import select
from test_results import dciodvfy_errors

from pacs_classifier.config import Config, config_from_mapping
from pacs_classifier.db import migrate
from pacs_classifier.db.models import AuditEvent, Job, JobState, ResultKind, ResultObject, SendJob
from pacs_classifier.model.registry import register_bundle
from pacs_classifier.preprocess import reasons
from pacs_classifier.wiring import App

pytestmark = [pytest.mark.slow]

CHEST = "chest_cr_mono1_15bit_explicit_le.dcm"
OUR_AE = "PNEUMONIA_AI"


class Orthanc:
    """An Orthanc process; ``stop()`` and ``start()`` keep its storage."""

    def __init__(self, folder: Path, our_port: int) -> None:
        self.folder = folder
        self.dicom_port = free_port()
        self.http_port = free_port()
        self.config = folder / "orthanc.json"
        settings = {
            "Name": "TEST_PACS",
            "DicomAet": "ORTHANC",
            "DicomPort": self.dicom_port,
            "HttpPort": self.http_port,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "StorageDirectory": str(folder / "storage"),
            "IndexDirectory": str(folder / "index"),
            "DicomModalities": {"ours": [OUR_AE, "127.0.0.1", our_port]},
            "DicomScuTimeout": 30,
            "Plugins": [],
        }
        self.config.write_text(json.dumps(settings), encoding="utf-8")
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        log = (self.folder / "orthanc.log").open("ab")
        self.proc = subprocess.Popen(
            ["Orthanc", str(self.config)], stdout=log, stderr=subprocess.STDOUT
        )
        wait_for(self._up, 60, "Orthanc's REST API")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(30)
        self.proc = None

    def _up(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise AssertionError((self.folder / "orthanc.log").read_text()[-3000:])
        try:
            self.get("/system")
        except (urllib.error.URLError, ConnectionError):
            return False
        return True

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.http_port}{path}"

    def get(self, path: str) -> Any:
        with urllib.request.urlopen(self.url(path), timeout=30) as r:  # noqa: S310 - loopback
            return json.loads(r.read())

    def get_bytes(self, path: str) -> bytes:
        with urllib.request.urlopen(self.url(path), timeout=30) as r:  # noqa: S310 - loopback
            return bytes(r.read())

    def post(self, path: str, body: bytes) -> Any:
        req = urllib.request.Request(self.url(path), data=body, method="POST")  # noqa: S310
        with urllib.request.urlopen(req, timeout=60) as r:  # noqa: S310 - loopback
            return json.loads(r.read())

    def instance_of(self, sop_instance_uid: str) -> str | None:
        found = self.post(
            "/tools/find",
            json.dumps(
                {"Level": "Instance", "Query": {"SOPInstanceUID": sop_instance_uid}}
            ).encode(),
        )
        return str(found[0]) if found else None

    def new_instance_changes(self) -> list[str]:
        """Orthanc ids of every NewInstance change so far (one per instance stored)."""
        changes = self.get("/changes?limit=10000")["Changes"]
        return [c["ID"] for c in changes if c["ChangeType"] == "NewInstance"]


@pytest.fixture(scope="module")
def our_port() -> int:
    return free_port()


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory: pytest.TempPathFactory, our_port: int) -> Iterator[Orthanc]:
    if shutil.which("Orthanc") is None:
        missing("Orthanc (Debian orthanc) is not installed")
    for tool in ("dciodvfy", "dsrdump"):
        if shutil.which(tool) is None:
            missing(f"{tool} (Debian dicom3tools / dcmtk) is not installed")
    server = Orthanc(tmp_path_factory.mktemp("orthanc"), our_port)
    server.start()
    try:
        yield server
    finally:
        server.stop()


def _config(tmp_path: Path, our_port: int, orthanc: Orthanc, overlay: str = "all") -> Config:
    url = f"sqlite:///{tmp_path / 'db.sqlite3'}"
    migrate.upgrade(url)
    return config_from_mapping(
        {
            "database": {"url": url},
            "storage": {"root": str(tmp_path / "dicom"), "min_free_mb": 1},
            "model": {"dir": str(tmp_path / "models")},
            "listener": {"ae_title": OUR_AE, "port": our_port},
            "worker": {"batch_size": 4, "max_batch_wait_ms": 50, "poll_interval_ms": 50},
            "results": {
                "sc_overlay": overlay,
                "retry_backoff_s": 0.2,
                "retry_backoff_max_s": 1,
                "max_attempts": 30,
                "timeout_s": 10,
            },
            "destinations": [
                {"ae_title": "ORTHANC", "host": "127.0.0.1", "port": orthanc.dicom_port}
            ],
        },
        base_dir=tmp_path,
    )


def _sop_uid(path: Path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True, force=True).SOPInstanceUID)


def test_orthanc_sends_a_radiograph_and_gets_our_sr_and_overlay(
    orthanc: Orthanc, our_port: int, tmp_path: Path, dicom_dir: Path, tiny_bundles: Bundles
) -> None:
    config = _config(tmp_path, our_port, orthanc)
    app = App(config)
    db = app.db
    register_bundle(db, tiny_bundles.v2, config.model_dir, actor="test", activate=True)
    listener = app.listener()
    listener.start()
    try:
        source = orthanc.post("/instances", (dicom_dir / CHEST).read_bytes())
        orthanc.post("/modalities/ours/store", source["ID"].encode())
        app.worker().drain(until=lambda: all_jobs_ended(db), timeout_s=120)
        app.results_worker().drain(timeout_s=120)
        with db.session() as s:
            objects = {o.kind: o for o in s.execute(select(ResultObject)).scalars()}
            sends = s.execute(select(SendJob.state)).scalars().all()
        assert sorted(sends) == [JobState.DONE, JobState.DONE]

        study = orthanc.get(f"/instances/{source['ID']}/study")
        ids = {kind: orthanc.instance_of(o.sop_instance_uid) for kind, o in objects.items()}
        assert all(ids.values())
        in_study = {i["ID"] for i in orthanc.get(f"/studies/{study['ID']}/instances")}
        assert {source["ID"], *ids.values()} <= in_study  # same study, as Orthanc sees it
        series = {orthanc.get(f"/instances/{i}")["ParentSeries"] for i in in_study}
        assert len(series) == 3  # the radiograph's, the SR's, the overlay's

        for kind, orthanc_id in ids.items():
            stored = tmp_path / f"{kind}.dcm"
            stored.write_bytes(orthanc.get_bytes(f"/instances/{orthanc_id}/file"))
            assert dciodvfy_errors(stored) == [], kind
        dump = subprocess.run(
            ["dsrdump", str(tmp_path / "sr.dcm")],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        ).stdout
        assert '"Pneumonia")=(52101004,SCT,"Present")' in dump
        assert '"Probability of pneumonia")="' in dump
        assert '"Algorithm Version")="tiny-v2"' in dump

        # Orthanc forwards our overlay back: stored, never classified.
        orthanc.post("/modalities/ours/store", str(ids[ResultKind.SC]).encode())
        with db.session() as s:
            job = s.execute(select(Job).order_by(Job.id.desc()).limit(1)).scalar_one()
            assert (job.state, job.reason) == (JobState.NOT_ASSESSED, reasons.OWN_OUTPUT)
    finally:
        listener.stop()
        app.close()


def test_sends_wait_for_a_stopped_pacs_and_arrive_exactly_once(
    orthanc: Orthanc, our_port: int, tmp_path: Path, dicom_dir: Path, tiny_bundles: Bundles
) -> None:
    config = _config(tmp_path, our_port, orthanc, overlay="off")
    app = App(config)
    db = app.db
    register_bundle(db, tiny_bundles.v1, config.model_dir, actor="test", activate=True)
    add_instances(db, [dicom_dir / CHEST])
    app.worker().drain(until=lambda: all_jobs_ended(db), timeout_s=120)
    results = app.results_worker()
    while results.render_once():
        pass
    before = len(orthanc.new_instance_changes())
    orthanc.stop()
    try:
        for _ in range(3):
            assert results.send_once() == 1
            time.sleep(0.5)  # past the (capped) backoff
        with db.session() as s:
            job = s.execute(select(SendJob)).scalar_one()
            assert (job.state, job.attempts) == (JobState.QUEUED, 3)
            assert "no association" in str(job.reason)
    finally:
        orthanc.start()
    # The fourth attempt waits out its backoff: drain until it has gone, not just once
    # (a fast restart can find nothing due yet).
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        results.drain(timeout_s=5)
        with db.session() as s:
            if s.execute(select(SendJob.state)).scalar_one() == JobState.DONE:
                break
        time.sleep(0.2)
    with db.session() as s:
        job = s.execute(select(SendJob)).scalar_one()
        sr = s.execute(select(ResultObject)).scalar_one()
        events = (
            s.execute(select(AuditEvent.outcome).where(AuditEvent.action == "result.send"))
            .scalars()
            .all()
        )
    assert (job.state, job.attempts) == (JobState.DONE, 4)
    assert sorted(events) == ["done", "retry", "retry", "retry"]
    orthanc_id = orthanc.instance_of(sr.sop_instance_uid)
    assert orthanc_id is not None
    assert orthanc.new_instance_changes()[before:] == [orthanc_id]  # exactly once
    app.close()
