"""Drift in sight: live traffic against the bundle's validation scores (report/drift.py).

Synthetic traffic written to a real database (SQLite and PostgreSQL) for the committed
reference model, registered as ``model register`` does it: one week drawn from the
model's own validation scores (stable), last week with the scores squeezed towards 0.5
and many images not assessed (shifted).
"""

from __future__ import annotations

import json
import logging
import uuid
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np
import pytest
from pipeline_support import REPO, cli, make_config, write_config_file
from sqlalchemy import func, select

from pacs_classifier.db.audit import verify_chain
from pacs_classifier.db.engine import Database
from pacs_classifier.db.models import (
    AuditEvent,
    Instance,
    Job,
    JobKind,
    JobState,
    Label,
    Model,
    Prediction,
    utcnow,
)
from pacs_classifier.model.registry import register_bundle
from pacs_classifier.model.validation_scores import FILE, read_validation_scores
from pacs_classifier.report import drift
from pacs_classifier.wiring import App

REFERENCE = REPO / "models" / "reference"


def add_traffic(
    db: Database,
    model: Model,
    probabilities: np.ndarray,
    when: datetime,
    not_assessed: dict[str, int] | None = None,
) -> None:
    """Live predictions (and their ended jobs) at ``when``, plus not-assessed jobs."""

    def instance(n: int) -> Instance:
        return Instance(
            sop_instance_uid=f"2.25.{uuid.uuid4().int}",
            study_instance_uid=f"2.25.{uuid.uuid4().int}",
            sop_class_uid="1.2.840.10008.5.1.4.1.1.1",
            received_at=when,
            file_path=f"synthetic/{n}.dcm",
            file_sha256=uuid.uuid4().hex * 2,
            file_size=1,
        )

    with db.session() as session:
        for n, p in enumerate(probabilities):
            row = instance(n)
            session.add(row)
            session.flush()
            job = Job(
                instance_id=row.id,
                kind=JobKind.CLASSIFY,
                state=JobState.DONE,
                attempts=1,
                created_at=when,
                updated_at=when,
            )
            session.add(job)
            session.flush()
            session.add(
                Prediction(
                    instance_id=row.id,
                    model_id=model.id,
                    probability=float(p),
                    label=Label.PNEUMONIA if p >= model.threshold else Label.NORMAL,
                    threshold=model.threshold,
                    run_key=0,
                    job_id=job.id,
                    created_at=when,
                )
            )
        for reason, count in (not_assessed or {}).items():
            for n in range(count):
                row = instance(n)
                session.add(row)
                session.flush()
                session.add(
                    Job(
                        instance_id=row.id,
                        kind=JobKind.CLASSIFY,
                        state=JobState.NOT_ASSESSED,
                        reason=reason,
                        attempts=1,
                        created_at=when,
                        updated_at=when,
                    )
                )


def alert_events(db: Database) -> list[AuditEvent]:
    with db.read_session() as s:
        return list(
            s.execute(select(AuditEvent).where(AuditEvent.action == drift.ACTION_ALERT)).scalars()
        )


def test_shifted_week_alerts_once_and_a_stable_week_does_not(
    db_url: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    config = make_config(tmp_path, db_url)
    db = Database(db_url)
    try:
        model = register_bundle(db, REFERENCE, config.model_dir, actor="test", activate=True)
        validation = read_validation_scores(REFERENCE)
        assert validation is not None
        rng = np.random.default_rng(5)
        now = utcnow()
        stable_at = drift.week_start(now) - timedelta(days=19)  # three ISO weeks ago
        shifted_at = drift.week_start(now) - timedelta(days=5)  # last ISO week
        stable = rng.choice(validation.probabilities, 200)
        shifted = 0.5 + (rng.choice(validation.probabilities, 200) - 0.5) * 0.3
        add_traffic(db, model, stable, stable_at, {"not_chest": 5})
        add_traffic(db, model, shifted, shifted_at, {"not_chest": 30, "unusable_pixels": 10})

        # The nightly scheduler's daily check: this week and the last.
        app = App(config)
        scheduler = app.scheduler()
        with caplog.at_level(logging.WARNING, logger="pacs_classifier.report.drift"):
            scheduler.run_daily()
            scheduler.run_daily()  # once per day
        app.close()
        last_week = drift.iso_week(shifted_at)
        events = alert_events(db)
        keys = sorted(str(e.entity_id) for e in events)
        assert f"{model.version} {last_week} psi" in keys
        assert f"* {last_week} not_assessed_rate" in keys
        assert all(last_week in k for k in keys), keys  # the stable week is out of its window
        assert len(keys) == len(set(keys))
        warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warned) == len(events)
        assert any("psi" in w and last_week in w for w in warned)

        # The report over everything: the stable week is shown, and does not alert.
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="pacs_classifier.report.drift"):
            report = drift.evaluate(db, config, actor="test")
        weeks = {v.week: v for v in report.versions}
        old = weeks[drift.iso_week(stable_at)]
        new = weeks[last_week]
        assert old.reference == new.reference == FILE
        assert old.predictions == new.predictions == 200
        assert old.psi is not None and old.psi < config.drift.psi_alert
        assert new.psi is not None and new.psi > config.drift.psi_alert
        assert old.ks is not None and new.ks is not None and new.ks > old.ks
        assert old.reference_positive_rate == pytest.approx(
            float(np.mean(validation.probabilities >= model.threshold))
        )
        assert abs(old.positive_rate - (old.reference_positive_rate or 0)) < 0.1
        traffic = {t.week: t for t in report.traffic}
        assert traffic[last_week].by_reason == {"not_chest": 30, "unusable_pixels": 10}
        assert traffic[last_week].not_assessed_rate == pytest.approx(40 / 240)
        assert traffic[drift.iso_week(stable_at)].not_assessed_rate < 0.1
        assert {a.week for a in report.alerts} == {last_week}
        assert not any(a.new for a in report.alerts)  # audited by the nightly check already
        assert caplog.records == []
        assert len(alert_events(db)) == len(events)
        with db.read_session() as s:
            assert verify_chain(s).ok

        if db_url.startswith("sqlite"):
            cfg = write_config_file(tmp_path / "config.toml", config)
            out = cli(cfg, "report", "drift", "--format", "json")
            assert out.returncode == 0, out.stderr
            data = json.loads(out.stdout)
            assert {a["metric"] for a in data["alerts"]} >= {"psi", "not_assessed_rate"}
            assert not any(a["new"] for a in data["alerts"])
            table = cli(cfg, "report", "drift")
            assert "Alerts" in table.stdout and "raised before" in table.stdout
            with db.read_session() as s:
                n = s.scalar(select(func.count()).where(AuditEvent.action == drift.ACTION_ALERT))
            assert n == len(events)
    finally:
        db.dispose()


def test_reference_falls_back_to_the_confusion_matrix(tmp_path: Path) -> None:
    config = make_config(tmp_path, f"sqlite:///{tmp_path}/unused.sqlite3")
    model = Model(
        version="no-scores",
        path=str(tmp_path),
        threshold=0.5,
        metrics={"confusion": {"tp": 30, "fp": 10, "tn": 50, "fn": 10}},
    )
    ref = drift.reference_for(config, model)
    assert (ref.source, ref.n, ref.positive_rate, ref.scores) == (
        "confusion matrix",
        100,
        0.4,
        None,
    )
    (tmp_path / FILE).write_bytes(b"not an npz")  # a broken file is not a reference
    assert drift.reference_for(config, model).source == "confusion matrix"
    assert (
        drift.reference_for(
            config, Model(version="x", path=str(tmp_path), threshold=0.5, metrics={})
        ).source
        == "none"
    )


def test_statistics() -> None:
    rng = np.random.default_rng(0)
    ref = rng.beta(2, 5, 2000)
    assert drift.psi(ref, rng.beta(2, 5, 2000)) < 0.05
    assert drift.psi(ref, rng.beta(5, 2, 2000)) > 1.0
    assert drift.ks_statistic(ref, ref) == 0.0
    assert drift.ks_statistic([0.1, 0.2], [0.8, 0.9]) == 1.0
