"""``classify``: one row per file, and ``--record`` storing files as if received."""

from __future__ import annotations

import json
import re
from pathlib import Path

from pipeline_support import Bundles, cli, make_config, write_config_file
from sqlalchemy import select

from pacs_classifier.db.engine import Database
from pacs_classifier.db.models import AuditEvent, Instance, Job, JobState, Prediction
from pacs_classifier.model.registry import register_bundle

CHEST = "chest_sc_mono2_8bit_jpeg_baseline.dcm"
LEG = "leg_cr_mono1_10bit_j2k_lossless.dcm"
#: SOP Instance UID 999.999.01.23.45.6789: a component with a leading zero.
ODD_UID = "dental_cr_mono1_jpeg_lossless_modality_lut.dcm"
#: Our log lines (pacs_classifier.logs); anything else on stderr is chatter.
LOG_LINE = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3}Z (DEBUG|INFO|WARNING|ERROR) ")


def chatter(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if not LOG_LINE.match(line)]


def test_classify_prints_one_row_per_file(
    sqlite_url: str, tmp_path: Path, dicom_dir: Path, cxr_dir: Path, tiny_bundles: Bundles
) -> None:
    cfg = write_config_file(tmp_path / "config.toml", make_config(tmp_path, sqlite_url))
    jpeg = sorted((cxr_dir / "NORMAL").iterdir())[0]
    out = cli(
        cfg,
        "classify",
        str(dicom_dir / CHEST),
        str(dicom_dir / LEG),
        str(jpeg),
        "--model",
        str(tiny_bundles.v2),
        "--format",
        "json",
    )
    assert out.returncode == 0, out.stderr
    assert chatter(out.stderr) == []  # TensorFlow ran: none of its native lines show
    rows = json.loads(out.stdout)
    assert [Path(r["file"]).name for r in rows] == [CHEST, LEG, jpeg.name]
    assert [r["label"] for r in rows] == ["PNEUMONIA", "not_assessed", "PNEUMONIA"]
    assert rows[1]["reason"] == "body_part" and rows[1]["probability"] is None
    assert all(0 <= r["probability"] <= 1 for r in (rows[0], rows[2]))

    no_model = cli(cfg, "classify", str(dicom_dir / CHEST))
    assert no_model.returncode == 2
    assert "no active model" in no_model.stderr and "Traceback" not in no_model.stderr


def test_classify_record_stores_and_classifies_through_the_queue(
    sqlite_url: str, tmp_path: Path, dicom_dir: Path, tiny_bundles: Bundles
) -> None:
    config = make_config(tmp_path, sqlite_url)
    db = Database(sqlite_url)
    try:
        register_bundle(db, tiny_bundles.v1, config.model_dir, actor="test", activate=True)
    finally:
        db.dispose()
    cfg = write_config_file(tmp_path / "config.toml", config)
    # A transfer a running listener has in flight in the same storage root must survive.
    in_flight = config.storage_root / ".tmp" / "rx-in-flight.part"
    in_flight.parent.mkdir(parents=True)
    in_flight.write_bytes(b"half a data set")
    out = cli(cfg, "classify", "--record", str(dicom_dir / CHEST), str(dicom_dir / LEG))
    assert out.returncode == 0, out.stderr
    assert in_flight.read_bytes() == b"half a data set"
    lines = out.stdout.splitlines()
    assert lines[0].split() == ["file", "label", "probability", "reason"]
    assert lines[2].split()[1] == "NORMAL"
    assert lines[3].split()[1:] == ["not_assessed", "body_part"]

    db = Database(sqlite_url)
    try:
        with db.session() as s:
            instances = list(s.execute(select(Instance).order_by(Instance.id)).scalars())
            jobs = list(s.execute(select(Job).order_by(Job.id)).scalars())
            preds = list(s.execute(select(Prediction)).scalars())
            actions = {(a, o) for a, o in s.execute(select(AuditEvent.action, AuditEvent.outcome))}
    finally:
        db.dispose()
    assert [i.body_part for i in instances] == ["CHEST", "EXTREMITY"]
    assert all((config.storage_root / i.file_path).is_file() for i in instances)
    assert [j.state for j in jobs] == [JobState.DONE, JobState.NOT_ASSESSED]
    assert [p.instance_id for p in preds] == [instances[0].id]
    assert {("job.classify", "done"), ("job.classify", "not_assessed")} <= actions
    assert ("store", "stored") in actions


def test_classify_record_warns_once_for_a_non_conformant_uid(
    sqlite_url: str, tmp_path: Path, dicom_dir: Path, tiny_bundles: Bundles
) -> None:
    config = make_config(tmp_path, sqlite_url)
    db = Database(sqlite_url)
    try:
        register_bundle(db, tiny_bundles.v1, config.model_dir, actor="test", activate=True)
    finally:
        db.dispose()
    cfg = write_config_file(tmp_path / "config.toml", config)
    out = cli(cfg, "classify", "--record", str(dicom_dir / ODD_UID))
    assert out.returncode == 0, out.stderr
    assert chatter(out.stderr) == []  # no raw UserWarning, no pydicom lines
    warnings = [line for line in out.stderr.splitlines() if " WARNING " in line]
    assert len(warnings) == 1, out.stderr
    assert "999.999.01.23.45.6789: SOPInstanceUID not conformant" in warnings[0]
    # The worker logs each result at INFO, with identifiers only.
    (result,) = [line for line in out.stderr.splitlines() if "): not assessed, " in line]
    assert "not_a_chest_radiograph" in result
