"""Results as DICOM: the SR, the Grad-CAM overlay, the outbound queue and ``send retry``.

Real parts: the shared radiographs, a real tiny model bundle, SQLite and PostgreSQL, the
dicom3tools validator (``dciodvfy``) and dcmtk's ``dsrdump``; a destination that never
answers is a free loopback port nobody listens on.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pydicom
import pytest
from conftest import missing
from pipeline_support import (
    Bundles,
    add_instances,
    cli,
    drain_jobs,
    free_port,
    make_config,
    wait_for,
)
from pydicom.uid import generate_uid
from sqlalchemy import select

from pacs_classifier.commands.status import format_status, read_status
from pacs_classifier.config import config_from_mapping
from pacs_classifier.db.engine import Database
from pacs_classifier.db.models import (
    AuditEvent,
    JobState,
    Label,
    ReclassificationRun,
    ResultKind,
    ResultObject,
    RunTrigger,
    SendJob,
)
from pacs_classifier.model.registry import register_bundle
from pacs_classifier.record.predictions import ModelRef, label_for, record_prediction
from pacs_classifier.report import queries
from pacs_classifier.results.outbound import COMPREHENSIVE_3D_SR, PlanItem, plan_results
from pacs_classifier.results.role import ResultsWorker
from pacs_classifier.results.sr import (
    NotAssessedContent,
    ObjectUids,
    Predecessor,
    SrContent,
    build_not_assessed_sr,
    build_sr,
)

CHEST = "chest_cr_mono1_15bit_explicit_le.dcm"


@pytest.fixture
def dicom3tools() -> None:
    for tool in ("dciodvfy", "dsrdump"):
        if shutil.which(tool) is None:
            missing(f"{tool} (Debian dicom3tools / dcmtk) is not installed")


def dciodvfy_errors(path: Path) -> list[str]:
    """The error lines of dicom3tools' validator (it prints warnings and errors to stderr)."""
    done = subprocess.run(
        ["dciodvfy", str(path)], capture_output=True, text=True, timeout=60, check=False
    )
    return [line for line in (done.stdout + done.stderr).splitlines() if line.startswith("Error")]


def test_sr_is_valid_and_says_finding_probability_and_model(
    dicom_dir: Path, tmp_path: Path, dicom3tools: None
) -> None:
    for name in (CHEST, "chest_cr_mono1_10bit_no_file_meta.dcm"):
        source = pydicom.dcmread(dicom_dir / name, stop_before_pixels=True, force=True)
        old = Predecessor(
            COMPREHENSIVE_3D_SR, generate_uid(), generate_uid(), source.StudyInstanceUID
        )
        sr = build_sr(
            source,
            SrContent(Label.PNEUMONIA, 0.8125, 0.42, "site-v7", "ab" * 32),
            ObjectUids(generate_uid(), generate_uid(), 3),
            old,
        )
        out = tmp_path / f"{name}.sr.dcm"
        sr.save_as(out, enforce_file_format=True)
        assert dciodvfy_errors(out) == [], name
        dump = subprocess.run(
            ["dsrdump", str(out)], capture_output=True, text=True, timeout=60, check=True
        ).stdout
        assert '(233604007,SCT,"Pneumonia")' not in dump  # the concept is the item's name
        assert '"Pneumonia")=(52101004,SCT,"Present")' in dump
        assert '"Probability of pneumonia")="0.8125"' in dump
        assert '"Algorithm Version")="site-v7"' in dump
        back = pydicom.dcmread(out)
        assert back.StudyInstanceUID == source.StudyInstanceUID
        assert back.PatientID == source.get("PatientID", "")
        pre = back.PredecessorDocumentsSequence[0].ReferencedSeriesSequence[0]
        assert pre.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == old.sop_instance_uid


def test_not_assessed_sr_is_valid_and_says_why(
    dicom_dir: Path, tmp_path: Path, dicom3tools: None
) -> None:
    source = pydicom.dcmread(dicom_dir / CHEST, stop_before_pixels=True, force=True)
    for reason in ("body_part", "out_of_distribution"):  # the second is a Long Code Value
        sr = build_not_assessed_sr(
            source,
            NotAssessedContent(reason, "site-v7", "ab" * 32),
            ObjectUids(generate_uid(), generate_uid(), 1),
        )
        out = tmp_path / f"{reason}.sr.dcm"
        sr.save_as(out, enforce_file_format=True)
        assert dciodvfy_errors(out) == [], reason
        dump = subprocess.run(
            ["dsrdump", str(out)], capture_output=True, text=True, timeout=60, check=True
        ).stdout
        assert '"Pneumonia")=(373068000,SCT,"Undetermined")' in dump
        assert f'"Reason not assessed")=({reason},99PACSCLS,' in dump
        assert "Probability of pneumonia" not in dump
        assert '"Algorithm Version")="site-v7"' in dump
        assert pydicom.dcmread(out).StudyInstanceUID == source.StudyInstanceUID


def test_prediction_to_sr_and_overlay_then_an_unreachable_destination_fails(
    db_url: str, tmp_path: Path, dicom_dir: Path, tiny_bundles: Bundles, dicom3tools: None
) -> None:
    dead = {"ae_title": "NOWHERE", "host": "127.0.0.1", "port": free_port(), "send": ["sr"]}
    raw = {
        "database": {"url": db_url},
        "storage": {"root": str(tmp_path / "dicom"), "min_free_mb": 1},
        "model": {"dir": str(tmp_path / "models")},
        "worker": {"batch_size": 8, "max_batch_wait_ms": 50, "poll_interval_ms": 50},
        "results": {"sc_overlay": "all", "max_attempts": 2, "retry_backoff_s": 0, "timeout_s": 2},
        "destinations": [dead],
    }
    config = config_from_mapping(raw, base_dir=tmp_path)
    db = Database(db_url)
    try:
        register_bundle(db, tiny_bundles.v2, config.model_dir, actor="test", activate=True)
        (instance_id,) = add_instances(db, [dicom_dir / CHEST])
        drain_jobs(config)
        results = ResultsWorker(db, config)
        results.drain(timeout_s=120)
        with db.session() as s:
            objects = {o.kind: o for o in s.execute(select(ResultObject)).scalars()}
            sends = list(s.execute(select(SendJob)).scalars())
            failed_events = (
                s.execute(
                    select(AuditEvent).where(
                        AuditEvent.action == "result.send", AuditEvent.outcome == "failed"
                    )
                )
                .scalars()
                .all()
            )
            status = format_status(read_status(s), config)
            sends_report = queries.run(s, queries.get("sends"))
        assert set(objects) == {ResultKind.SR, ResultKind.SC}
        assert all(
            o.state == JobState.DONE and o.instance_id == instance_id for o in objects.values()
        )
        sc_file = config.storage_root / str(objects[ResultKind.SC].file_path)
        assert sc_file.with_suffix(".png").stat().st_size > 1000
        sc = pydicom.dcmread(sc_file)
        assert sc.BurnedInAnnotation == "YES" and sc.PhotometricInterpretation == "RGB"
        assert sc.SeriesInstanceUID != objects[ResultKind.SR].series_instance_uid
        assert dciodvfy_errors(sc_file) == []
        # Only the SR goes to NOWHERE (send = ["sr"]); refused connections end it failed.
        assert [(j.object_id, j.state, j.attempts) for j in sends] == [
            (objects[ResultKind.SR].id, JobState.FAILED, 2)
        ]
        assert "no association" in str(sends[0].reason)
        assert len(failed_events) == 1
        assert "NOWHERE" in status and "failed" in status
        row = dict(zip(sends_report.columns, sends_report.rows[0], strict=True))
        assert (row["destination"], row["state"], row["kind"]) == ("NOWHERE", "failed", "sr")
        # The command line: a typo is one line; --failed starts the failed send over.
        cfg = tmp_path / "config.toml"
        cfg.write_text(
            f'[database]\nurl = "{db_url}"\n[storage]\nroot = "{config.storage.root}"\n'
            f'[[destinations]]\nae_title = "NOWHERE"\nhost = "127.0.0.1"\nport = {dead["port"]}\n',
            encoding="utf-8",
        )
        typo = cli(cfg, "send", "retry", "--destination", "NOWHER")
        assert typo.returncode == 2 and "'NOWHER' is not in [[destinations]]" in typo.stderr
        assert len(typo.stderr.strip().splitlines()) == 1
        waiting = cli(cfg, "send", "retry")
        assert (waiting.returncode, waiting.stdout) == (0, "requeued 0 send(s)\n")
        again = cli(cfg, "send", "retry", "--failed", "--destination", "NOWHERE")
        assert (again.returncode, again.stdout) == (0, "requeued 1 send(s)\n"), again.stderr
        with db.session() as s:
            job = s.execute(select(SendJob)).scalar_one()
            assert (job.state, job.attempts) == (JobState.QUEUED, 0)
            retried = s.execute(
                select(AuditEvent).where(AuditEvent.action == "result.send_retry")
            ).scalar_one()
            assert retried.detail["send_jobs"] == [job.id]
    finally:
        db.dispose()


def test_a_changed_label_supersedes_the_sr(
    database: Database, tmp_path: Path, dicom_dir: Path, tiny_bundles: Bundles
) -> None:
    db = database
    config = make_config(tmp_path, db.engine.url.render_as_string(hide_password=False))
    v1 = register_bundle(db, tiny_bundles.v1, config.model_dir, actor="test", activate=True)
    v2 = register_bundle(db, tiny_bundles.v2, config.model_dir, actor="test")
    (instance_id,) = add_instances(db, [dicom_dir / CHEST], with_jobs=False)
    with db.session() as s:
        new_run = ReclassificationRun(trigger=RunTrigger.CLI, model_id=v2.id)
        s.add(new_run)
        s.flush()
        run_id = new_run.id
    planned: list[list[int]] = []
    # NORMAL (first SR), NORMAL again (no new SR), PNEUMONIA (a new SR superseding it).
    steps = ((v1, 1.0, None, 0.2), (v2, 1.0, None, 0.3), (v2, 0.5, run_id, 0.9))
    for model, threshold, run, p in steps:
        with db.session() as s:
            ref = ModelRef(model.id, model.version, threshold, model.image_size)
            pred = record_prediction(
                s, instance_id=instance_id, model=ref, probability=p, run_id=run
            )
            assert pred is not None
            item = PlanItem(instance_id, prediction_id=pred, label=label_for(p, threshold))
            (objects,) = plan_results(s, config.results, [item])
            planned.append([o.id for o in objects])
    assert [len(p) for p in planned] == [1, 0, 2]  # the PNEUMONIA one also gets an overlay
    results = ResultsWorker(db, config)
    assert not results.defer(results.renders)  # no classification backlog
    add_instances(db, [dicom_dir / CHEST])  # a classify job waits: results wait too
    assert results.defer(results.renders)
    never = ResultsWorker(
        db, make_config(tmp_path, config.database.url, results={"max_defer_s": 0})
    )
    assert not never.defer(never.renders)
    results.drain(timeout_s=120)
    with db.session() as s:
        srs = list(
            s.execute(
                select(ResultObject)
                .where(ResultObject.kind == ResultKind.SR)
                .order_by(ResultObject.id)
            ).scalars()
        )
    first, second = srs
    assert second.predecessor_id == first.id
    assert first.series_instance_uid == second.series_instance_uid  # one series per study
    new = pydicom.dcmread(config.storage_root / str(second.file_path))
    series = new.PredecessorDocumentsSequence[0].ReferencedSeriesSequence[0]
    assert series.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == first.sop_instance_uid
    assert new.SOPInstanceUID == second.sop_instance_uid


def test_not_assessed_sr_when_configured_is_sent_then_superseded(
    db_url: str,
    tmp_path: Path,
    dicom_dir: Path,
    tiny_bundles: Bundles,
    dicom3tools: None,
    dcmtk: dict[str, str],
) -> None:
    port = free_port()
    received = tmp_path / "scp"
    received.mkdir()
    scp = subprocess.Popen(
        [dcmtk["storescp"], "-aet", "SCP", "-od", str(received), str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    dest = {"ae_title": "SCP", "host": "127.0.0.1", "port": port, "send": ["sr"]}
    raw = {
        "database": {"url": db_url},
        "storage": {"root": str(tmp_path / "dicom"), "min_free_mb": 1},
        "model": {"dir": str(tmp_path / "models")},
        "worker": {"batch_size": 8, "max_batch_wait_ms": 50, "poll_interval_ms": 50},
        "results": {
            "sr_not_assessed": True,
            "sc_overlay": "off",
            "timeout_s": 5,
            "retry_backoff_s": 0,
        },
        "destinations": [dest],
    }
    config = config_from_mapping(raw, base_dir=tmp_path)
    db = Database(db_url)
    try:
        v1 = register_bundle(db, tiny_bundles.v1, config.model_dir, actor="test", activate=True)
        (leg,) = add_instances(db, [dicom_dir / "leg_cr_mono1_10bit_j2k_lossless.dcm"])
        drain_jobs(config)
        with db.session() as s:
            (first,) = s.execute(select(ResultObject)).scalars()
            event = s.execute(
                select(AuditEvent).where(AuditEvent.outcome == "not_assessed")
            ).scalar_one()
        # Planned with its UIDs in the transaction that ended the job, and named by its event.
        assert (first.instance_id, first.prediction_id, first.model_id) == (leg, None, v1.id)
        assert event.detail["reason"] == "body_part"
        assert [o["sop_instance_uid"] for o in event.detail["result_objects"]] == [
            first.sop_instance_uid
        ]
        ResultsWorker(db, config).drain(timeout_s=60)
        wait_for(
            lambda: _at_scp(received, first.sop_instance_uid) is not None, 30, "the SR at the SCP"
        )
        arrived = _at_scp(received, first.sop_instance_uid)
        assert arrived is not None
        assert dciodvfy_errors(arrived) == []
        dump = subprocess.run(
            ["dsrdump", str(arrived)], capture_output=True, text=True, timeout=60, check=True
        ).stdout
        assert '"Pneumonia")=(373068000,SCT,"Undetermined")' in dump
        assert '"Reason not assessed")=(body_part,99PACSCLS,' in dump
        with db.session() as s:
            (send,) = s.execute(select(SendJob)).scalars()
            assert (send.object_id, send.state) == (first.id, JobState.DONE)
            # Not assessed again (another run): nothing new. Assessed later: a new SR
            # supersedes it, like a changed label.
            again = PlanItem(leg, job_id=first.job_id, model_id=v1.id)
            ref = ModelRef(v1.id, v1.version, 0.5, v1.image_size)
            pred = record_prediction(s, instance_id=leg, model=ref, probability=0.9, run_id=None)
            later = PlanItem(leg, prediction_id=pred, label=Label.PNEUMONIA)
            none, (second,) = plan_results(s, config.results, [again, later])
            assert none == [] and second.supersedes == first.id
        ResultsWorker(db, config).drain(timeout_s=60)
        wait_for(
            lambda: _at_scp(received, second.sop_instance_uid) is not None,
            30,
            "the new SR at the SCP",
        )
        replaced = _at_scp(received, second.sop_instance_uid)
        assert replaced is not None
        new = pydicom.dcmread(replaced)
        series = new.PredecessorDocumentsSequence[0].ReferencedSeriesSequence[0]
        assert series.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == first.sop_instance_uid
    finally:
        scp.terminate()
        scp.wait(timeout=10)
        db.dispose()


def _at_scp(folder: Path, sop_instance_uid: str) -> Path | None:
    """The file storescp wrote for an instance (it names files ``<modality>.<uid>``)."""
    return next(iter(folder.glob(f"*{sop_instance_uid}")), None)
