"""The daemon end to end: dcmtk's storescu → ``serve`` → queue → model → rows and reports.

Every part is real: a ``serve`` subprocess with its listener, worker and scheduler roles,
dcmtk as the sending PACS, the shared DICOM files, a real model bundle, SQLite and
PostgreSQL.
"""

from __future__ import annotations

import signal
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from pipeline_support import (
    Bundles,
    add_instances,
    all_jobs_ended,
    make_config,
    start_cli,
    subprocess_env,
    wait_for,
    write_config_file,
)
from pydicom.uid import generate_uid
from sqlalchemy import func, select, text

from pacs_classifier.config import Config
from pacs_classifier.db.engine import Database
from pacs_classifier.db.models import (
    AuditEvent,
    Instance,
    Job,
    JobState,
    Label,
    Model,
    Prediction,
    ResultObject,
)
from pacs_classifier.model.registry import register_bundle
from pacs_classifier.preprocess import reasons
from pacs_classifier.report import queries

pytestmark = [
    pytest.mark.slow,
    pytest.mark.dcmtk,
    # One shared file carries a SOP Instance UID with a leading zero (accepted, audited).
    pytest.mark.filterwarnings("ignore:Invalid value for VR UI"),
]

CHEST = {
    "chest_cr_mono1_10bit_no_file_meta.dcm",
    "chest_cr_mono1_15bit_explicit_le.dcm",
    "chest_cr_mono1_15bit_j2k_lossless.dcm",
    "chest_dx_mono2_8bit_implicit_le.dcm",
    "chest_sc_mono2_8bit_jpeg_baseline.dcm",
}
NOT_CHEST = {
    "dental_cr_mono1_jpeg_lossless_modality_lut.dcm",
    "leg_cr_mono1_10bit_j2k_lossless.dcm",
}


class Serve:
    """A ``pacs-classifier serve`` subprocess."""

    def __init__(self, config_path: Path, log: Path, roles: str | None = None) -> None:
        args = ["serve"] + ([] if roles is None else ["--roles", roles])
        self.log = log
        self.proc = start_cli(config_path, *args, log=log)

    def wait_listening(self, port: int, timeout_s: float = 60) -> None:
        def up() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(f"serve exited early:\n{self.log.read_text()[-3000:]}")
            with socket.socket() as s:
                return s.connect_ex(("127.0.0.1", port)) == 0

        wait_for(up, timeout_s, "the listener")

    def terminate(self, timeout_s: float = 60) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout_s)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()  # SIGKILL: no cleanup at all
            self.proc.wait(10)


@pytest.fixture
def serves() -> Iterator[list[Serve]]:
    started: list[Serve] = []
    yield started
    for s in started:
        s.kill()


#: storescu offers a compressed file only in a context that names its transfer syntax.
PROPOSE = {
    "1.2.840.10008.1.2.4.90": "--propose-j2k-lossless",
    "1.2.840.10008.1.2.4.70": "--propose-lossless",
    "1.2.840.10008.1.2.4.50": "--propose-jpeg8",
}


def _storescu(config: Config, files: list[Path]) -> None:
    """Send with dcmtk, one association per transfer syntax the files need."""
    groups: dict[str, list[Path]] = {}
    for f in files:
        meta = pydicom.dcmread(f, force=True, stop_before_pixels=True).get("file_meta")
        syntax = str(getattr(meta, "TransferSyntaxUID", "")) if meta is not None else ""
        groups.setdefault(PROPOSE.get(syntax, "--propose-uncompr"), []).append(f)
    env = subprocess_env()
    env["TCP_NODELAY"] = "1"
    for option, group in sorted(groups.items()):
        done = subprocess.run(
            [
                "storescu",
                option,
                "-aet",
                "TEST_PACS",
                "-aec",
                config.listener.ae_title,
                "127.0.0.1",
                str(config.listener.port),
                *map(str, group),
            ],
            capture_output=True,
            text=True,
            env=env,
            timeout=300,
            check=False,
        )
        assert done.returncode == 0 and "E:" not in done.stderr, done.stderr[-3000:]


def _setup(
    tmp_path: Path, db_url: str, bundles: Bundles, **sections: dict[str, object]
) -> tuple[Config, Path]:
    sections = {"scheduler": {"enabled": False}, **sections}
    sections["worker"] = {"batch_size": 4, **sections.get("worker", {})}
    config = make_config(tmp_path, db_url, **sections)
    db = Database(db_url)
    try:
        register_bundle(db, bundles.v1, config.model_dir, actor="test", activate=True)
    finally:
        db.dispose()
    return config, write_config_file(tmp_path / "config.toml", config)


def test_storescu_to_serve_to_rows_and_reports(
    db_url: str,
    tmp_path: Path,
    dicom_dir: Path,
    dcmtk: dict[str, str],
    tiny_bundles: Bundles,
    serves: list[Serve],
) -> None:
    config, cfg = _setup(tmp_path, db_url, tiny_bundles)
    serve = Serve(cfg, tmp_path / "serve.log")
    serves.append(serve)
    serve.wait_listening(config.listener.port)
    _storescu(config, sorted(dicom_dir.glob("*.dcm")))
    db = Database(db_url)
    try:
        wait_for(lambda: _count(db, Job) == 7 and all_jobs_ended(db), 180, "all seven results")
        assert serve.terminate() == 0
        _check_rows(db, dicom_dir)
    finally:
        db.dispose()


def _count(db: Database, model: type) -> int:
    with db.session() as s:
        return int(s.scalar(select(func.count()).select_from(model)) or 0)


def _check_rows(db: Database, dicom_dir: Path) -> None:
    uid_of = {
        f.name: str(pydicom.dcmread(f, force=True, stop_before_pixels=True).SOPInstanceUID)
        for f in dicom_dir.glob("*.dcm")
    }
    with db.session() as s:
        rows = s.execute(
            select(Instance.sop_instance_uid, Job.state, Job.reason, func.count(Prediction.id))
            .join(Job, Job.instance_id == Instance.id)
            .outerjoin(Prediction, Prediction.instance_id == Instance.id)
            .group_by(Instance.sop_instance_uid, Job.state, Job.reason)
        ).all()
        by_uid = {r[0]: (r[1], r[2], r[3]) for r in rows}
        latest = s.execute(
            text("SELECT sop_instance_uid, model_version, label FROM v_latest_predictions")
        ).all()
        study = s.scalar(
            select(Instance.study_instance_uid).where(
                Instance.sop_instance_uid == uid_of["chest_sc_mono2_8bit_jpeg_baseline.dcm"]
            )
        )
        volume = queries.run(s, queries.get("daily_volume"))
        unclassified = queries.run(s, queries.get("unclassified"))
        turnaround = queries.run(s, queries.get("turnaround"))
        trail = queries.run(s, queries.get("audit_trail"), study=study)
        changes = queries.run(s, queries.get("label_changes"))
    # Two of the shared files carry the same SOP Instance UID (the same image, two
    # encodings): two versions of one instance, each classified.
    for name in CHEST:
        state, reason, n = by_uid[uid_of[name]]
        assert (state, reason) == (JobState.DONE, None), name
        assert n >= 1
    with db.session() as s:
        per_instance = s.execute(
            select(Prediction.instance_id, func.count()).group_by(Prediction.instance_id)
        ).all()
    assert len(per_instance) == 5 and {n for _, n in per_instance} == {1}
    for name in NOT_CHEST:
        state, reason, n = by_uid[uid_of[name]]
        assert state == JobState.NOT_ASSESSED and reason in reasons.ALL and n == 0, name
    assert by_uid[uid_of["leg_cr_mono1_10bit_j2k_lossless.dcm"]][1] == reasons.BODY_PART
    assert len(latest) == 5
    assert {(v, lab) for _, v, lab in latest} == {("tiny-v1", "NORMAL")}
    (day,) = volume.rows
    assert day[1:] == (7, 5, 2, 0, 0, 0.0)
    assert sorted(r[:3] for r in unclassified.rows) == sorted(
        ("not_assessed", by_uid[uid_of[n]][1], 1) for n in NOT_CHEST
    )
    assert turnaround.rows[0][1] == 5
    # The prediction plans its SR in the same transaction (SPEC §11): the job's event
    # names the queued object.
    assert [r[3:5] for r in trail.rows] == [("store", "stored"), ("job.classify", "done")]
    with db.session() as s:
        done = s.execute(
            select(AuditEvent).where(
                AuditEvent.action == "job.classify", AuditEvent.outcome == "done"
            )
        ).scalars()
        planned = [o for e in done for o in e.detail["result_objects"]]
        objects = {o.sop_instance_uid: o for o in s.execute(select(ResultObject)).scalars()}
    assert len(planned) == len(objects) == 5  # one SR per prediction, none for the rest
    assert {o["sop_instance_uid"] for o in planned} == set(objects)
    assert changes.rows == []


def _copies(src: Path, out: Path, n: int) -> list[Path]:
    """``n`` distinct instances (new UIDs) of one real file, pixel data untouched."""
    out.mkdir()
    ds = pydicom.dcmread(src)
    files = []
    for i in range(n):
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.StudyInstanceUID = generate_uid()
        ds.SeriesInstanceUID = generate_uid()
        path = out / f"{i:03d}.dcm"
        ds.save_as(path)
        files.append(path)
    return files


def test_kill_9_while_classifying_then_restart_gives_exactly_one_each(
    sqlite_url: str,
    tmp_path: Path,
    dicom_dir: Path,
    dcmtk: dict[str, str],
    tiny_bundles: Bundles,
    serves: list[Serve],
) -> None:
    config, cfg = _setup(tmp_path, sqlite_url, tiny_bundles, worker={"batch_size": 2})
    files = _copies(dicom_dir / "chest_sc_mono2_8bit_jpeg_baseline.dcm", tmp_path / "out", 100)
    first = Serve(cfg, tmp_path / "serve1.log", roles="listener")
    serves.append(first)
    first.wait_listening(config.listener.port)
    _storescu(config, files)
    assert first.terminate() == 0
    db = Database(sqlite_url)
    try:
        assert _count(db, Job) == 100
        crashing = Serve(cfg, tmp_path / "serve2.log")
        serves.append(crashing)
        wait_for(lambda: _count(db, Prediction) >= 10, 120, "classification under way")
        crashing.kill()
        with db.session() as s:
            done_at_kill = _count(db, Prediction)
            running = s.scalar(
                select(func.count()).select_from(Job).where(Job.state == JobState.RUNNING)
            )
        assert done_at_kill < 100, "all done before the kill: the test proves nothing"
        assert running, "nothing held by the killed worker"

        again = Serve(cfg, tmp_path / "serve3.log")
        serves.append(again)
        wait_for(lambda: all_jobs_ended(db), 180, "every job after the restart")
        assert again.terminate() == 0
        with db.session() as s:
            active = s.scalar(select(Model.id).where(Model.active.is_(True)))
            counts = s.execute(
                select(Prediction.instance_id, Prediction.model_id, func.count()).group_by(
                    Prediction.instance_id, Prediction.model_id
                )
            ).all()
            states = set(s.execute(select(Job.state)).scalars())
    finally:
        db.dispose()
    assert len(counts) == 100
    assert {(m, n) for _, m, n in counts} == {(active, 1)}
    assert states == {JobState.DONE}


@pytest.mark.postgres
def test_two_worker_processes_share_200_jobs_on_postgresql(
    pg_url: str, tmp_path: Path, dicom_dir: Path, tiny_bundles: Bundles, serves: list[Serve]
) -> None:
    _, cfg = _setup(tmp_path, pg_url, tiny_bundles)
    db = Database(pg_url)
    try:
        add_instances(db, [dicom_dir / "chest_sc_mono2_8bit_jpeg_baseline.dcm"] * 200)
        for n in range(2):
            serves.append(Serve(cfg, tmp_path / f"worker{n}.log", roles="worker"))
        wait_for(lambda: all_jobs_ended(db), 300, "200 jobs")
        assert [s.terminate() for s in serves] == [0, 0]
        with db.session() as s:
            per_instance = s.execute(
                select(Prediction.instance_id, func.count()).group_by(Prediction.instance_id)
            ).all()
            events = s.execute(
                select(AuditEvent.entity_id, func.count())
                .where(AuditEvent.action == "job.classify", AuditEvent.entity_type == "instance")
                .group_by(AuditEvent.entity_id)
            ).all()
            by_worker = s.execute(select(Job.worker_id, func.count()).group_by(Job.worker_id)).all()
            labels = set(s.execute(select(Prediction.label)).scalars())
    finally:
        db.dispose()
    assert len(per_instance) == 200 and {n for _, n in per_instance} == {1}
    assert len(events) == 200 and {n for _, n in events} == {1}  # no job done twice
    assert len(by_worker) == 2, f"one worker did everything: {by_worker}"
    assert all(n > 0 for _, n in by_worker)
    assert labels == {Label.NORMAL}


def test_serve_refuses_unknown_role(tmp_path: Path, sqlite_url: str) -> None:
    from pipeline_support import cli

    cfg = write_config_file(tmp_path / "config.toml", make_config(tmp_path, sqlite_url))
    out = cli(cfg, "serve", "--roles", "worker,juggler", timeout_s=60)
    assert out.returncode == 2 and "juggler" in out.stderr
