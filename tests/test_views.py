"""The reporting view ``v_latest_predictions`` (SPEC §5) on SQLite and PostgreSQL."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import text

from pacs_classifier.db.engine import Database
from pacs_classifier.db.models import (
    Instance,
    Label,
    Model,
    Prediction,
    ReclassificationRun,
    RunState,
    RunTrigger,
)

SPEC_COLUMNS = {
    "sop_instance_uid",
    "study_instance_uid",
    "accession_number",
    "patient_id",
    "study_date",
    "received_at",
    "model_version",
    "probability",
    "label",
    "threshold",
    "classified_at",
}

T0 = datetime(2024, 3, 1, 8, 0, tzinfo=UTC)


def _instance(uid: str, sha: str) -> Instance:
    return Instance(
        sop_instance_uid=uid,
        study_instance_uid=f"{uid}.9",
        series_instance_uid=f"{uid}.8",
        sop_class_uid="1.2.840.10008.5.1.4.1.1.1",
        accession_number=f"ACC{uid[-1]}",
        patient_id=f"PID{uid[-1]}",
        study_date="20240301",
        modality="CR",
        received_at=T0,
        file_path=f"/data/{uid}.dcm",
        file_sha256=sha * 64,
        file_size=1000,
    )


def _model(version: str, threshold: float) -> Model:
    return Model(
        version=version,
        path=f"/models/{version}",
        sha256="c" * 64,
        threshold=threshold,
        image_size=299,
        metrics={"auc": 0.9},
        created_at=T0,
    )


def _latest(database: Database) -> dict[tuple[str, str], dict[str, Any]]:
    with database.session() as session:
        result = session.execute(text("SELECT * FROM v_latest_predictions"))
        columns = set(result.keys())
        rows = [dict(r._mapping) for r in result]
    assert columns >= SPEC_COLUMNS, f"missing: {SPEC_COLUMNS - columns}"
    by_key = {(r["sop_instance_uid"], r["model_version"]): r for r in rows}
    assert len(by_key) == len(rows)
    return by_key


def test_view_has_the_latest_prediction_per_instance_version(database: Database) -> None:
    with database.session() as session:
        a, b, a2, unclassified = (
            _instance("1.2.3.1", "a"),
            _instance("1.2.3.2", "b"),
            _instance("1.2.3.1", "d"),  # a second version of the same SOP Instance UID
            _instance("1.2.3.3", "e"),
        )
        v1, v2 = _model("v1", 0.5), _model("v2", 0.35)
        session.add_all([a, b, a2, unclassified, v1, v2])
        session.flush()
        run = ReclassificationRun(
            trigger=RunTrigger.SCHEDULE, model_id=v2.id, started_at=T0, state=RunState.DONE
        )
        session.add(run)
        session.flush()

        def predict(
            inst: Instance, model: Model, p: float, minutes: int, run_id: int | None
        ) -> None:
            session.add(
                Prediction(
                    instance_id=inst.id,
                    model_id=model.id,
                    probability=p,
                    label=Label.PNEUMONIA if p >= model.threshold else Label.NORMAL,
                    threshold=model.threshold,
                    run_id=run_id,
                    run_key=run_id or 0,
                    created_at=T0 + timedelta(minutes=minutes),
                )
            )
            session.flush()  # ids follow the order predictions are appended in

        predict(a, v1, 0.40, 1, None)  # NORMAL under v1 ...
        predict(b, v1, 0.90, 2, None)
        predict(a2, v1, 0.10, 3, None)
        predict(a, v2, 0.40, 60, run.id)  # ... PNEUMONIA under v2's lower threshold

    rows = _latest(database)
    # One row per classified instance version; the unclassified one is absent.
    assert sorted(rows) == [("1.2.3.1", "v1"), ("1.2.3.1", "v2"), ("1.2.3.2", "v1")]
    newest_a = rows[("1.2.3.1", "v2")]
    assert newest_a["label"] == "PNEUMONIA"
    assert newest_a["threshold"] == 0.35
    assert newest_a["probability"] == 0.40
    assert newest_a["accession_number"] == "ACC1"
    assert newest_a["classified_at"] is not None
    assert rows[("1.2.3.1", "v1")]["probability"] == 0.10  # the other version's own latest
    assert rows[("1.2.3.2", "v1")]["label"] == "PNEUMONIA"


def test_view_is_empty_without_predictions(database: Database) -> None:
    with database.session() as session:
        session.add(_instance("1.2.3.4", "f"))
    assert _latest(database) == {}
