"""Append predictions: exactly one per (instance version, model, run).

The unique index on ``predictions(instance_id, model_id, run_key)`` is the guarantee; the
insert uses ``ON CONFLICT DO NOTHING`` (SQLite and PostgreSQL both have it), so a job
processed twice after a lost lease or a crash leaves the first prediction and no error.
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from pacs_classifier.db.models import Label, Prediction, utcnow


@dataclass(frozen=True)
class ModelRef:
    """The model a prediction is made with: its row id, version and decision threshold."""

    id: int
    version: str
    threshold: float
    image_size: int


def label_for(probability: float, threshold: float) -> Label:
    """PNEUMONIA at or above the threshold, NORMAL below."""
    return Label.PNEUMONIA if probability >= threshold else Label.NORMAL


def record_prediction(
    session: Session,
    *,
    instance_id: int,
    model: ModelRef,
    probability: float,
    run_id: int | None = None,
    job_id: int | None = None,
) -> int | None:
    """Insert the prediction in the caller's transaction.

    Returns the new row's id, or None when this (instance, model, run) already has one.
    """
    if not 0.0 <= probability <= 1.0:
        raise ValueError(f"probability must be in [0, 1], received {probability!r}")
    values = {
        "instance_id": instance_id,
        "model_id": model.id,
        "probability": float(probability),
        "label": label_for(probability, model.threshold),
        "threshold": model.threshold,
        "run_id": run_id,
        "run_key": run_id or 0,
        "job_id": job_id,
        "created_at": utcnow(),
    }
    dialect = session.get_bind().dialect.name
    insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
    stmt = (
        insert(Prediction)
        .values(**values)
        .on_conflict_do_nothing(index_elements=["instance_id", "model_id", "run_key"])
        .returning(Prediction.id)
    )
    return session.execute(stmt).scalar_one_or_none()


def predictions_for(session: Session, instance_id: int) -> list[Prediction]:
    """All predictions of one instance version, oldest first."""
    return list(
        session.execute(
            select(Prediction).where(Prediction.instance_id == instance_id).order_by(Prediction.id)
        ).scalars()
    )
