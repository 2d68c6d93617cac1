"""Results per instance for the API and the dashboard: typed rows, searchable, paged.

One row per stored instance version with its newest prediction (if any) and its newest
job's state and reason, so an instance that was not assessed or that failed shows up too,
with why. Times are UTC.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import Row, Select, func, or_, select
from sqlalchemy.orm import Session

from pacs_classifier.db.models import (
    Instance,
    Job,
    JobState,
    Label,
    Model,
    Prediction,
    ReclassificationRun,
)


@dataclass(frozen=True)
class ResultQuery:
    """What to look for; every field narrows the search when set."""

    accession: str | None = None
    study_uid: str | None = None
    #: Accession number, patient ID or Study Instance UID, exact (the worklist's box).
    text: str | None = None
    label: str | None = None
    #: ``received_at`` in ``[since, until)``.
    since: datetime | None = None
    until: datetime | None = None
    limit: int = 50
    offset: int = 0


@dataclass(frozen=True)
class ResultRow:
    instance_id: int
    sop_instance_uid: str
    study_instance_uid: str | None
    accession_number: str | None
    patient_id: str | None
    study_date: str | None
    modality: str | None
    received_at: datetime
    file_path: str
    label: str | None
    probability: float | None
    threshold: float | None
    model_version: str | None
    image_size: int | None
    classified_at: datetime | None
    state: str | None
    reason: str | None


@dataclass(frozen=True)
class PredictionRow:
    """One prediction of an instance's history (live or by a reclassification run)."""

    id: int
    label: str
    probability: float
    threshold: float
    model_version: str
    run_id: int | None
    created_at: datetime


#: Instance, latest label, probability, threshold, model version and input size, when it
#: was classified, latest job state and reason.
_Select = Select[Instance, Label, float, float, str, int, datetime, JobState, str | None]


def _base() -> _Select:
    latest_prediction = (
        select(func.max(Prediction.id))
        .where(Prediction.instance_id == Instance.id)
        .correlate(Instance)
        .scalar_subquery()
    )
    latest_job = (
        select(func.max(Job.id))
        .where(Job.instance_id == Instance.id)
        .correlate(Instance)
        .scalar_subquery()
    )
    stmt: _Select = (
        select(
            Instance,
            Prediction.label,
            Prediction.probability,
            Prediction.threshold,
            Model.version,
            Model.image_size,
            Prediction.created_at,
            Job.state,
            Job.reason,
        )
        .outerjoin(Prediction, Prediction.id == latest_prediction)
        .outerjoin(Model, Model.id == Prediction.model_id)
        .outerjoin(Job, Job.id == latest_job)
    )
    return stmt


def _filtered(q: ResultQuery) -> _Select:
    stmt = _base()
    if q.accession:
        stmt = stmt.where(Instance.accession_number == q.accession)
    if q.study_uid:
        stmt = stmt.where(Instance.study_instance_uid == q.study_uid)
    if q.text:
        t = q.text.strip()
        stmt = stmt.where(
            or_(
                Instance.accession_number == t,
                Instance.patient_id == t,
                Instance.study_instance_uid == t,
            )
        )
    if q.label:
        stmt = stmt.where(Prediction.label == q.label)
    if q.since is not None:
        stmt = stmt.where(Instance.received_at >= q.since)
    if q.until is not None:
        stmt = stmt.where(Instance.received_at < q.until)
    return stmt


def find_results(session: Session, q: ResultQuery) -> list[ResultRow]:
    """Newest received first."""
    stmt = (
        _filtered(q)
        .order_by(Instance.received_at.desc(), Instance.id.desc())
        .limit(q.limit)
        .offset(q.offset)
    )
    return [_row(r) for r in session.execute(stmt).all()]


def count_results(session: Session, q: ResultQuery) -> int:
    sub = _filtered(q).with_only_columns(Instance.id).subquery()
    return int(session.scalar(select(func.count()).select_from(sub)) or 0)


def result_for_instance(session: Session, instance_id: int) -> ResultRow | None:
    row = session.execute(_base().where(Instance.id == instance_id)).one_or_none()
    return None if row is None else _row(row)


def prediction_history(session: Session, instance_id: int) -> list[PredictionRow]:
    rows = session.execute(
        select(Prediction, Model.version)
        .join(Model, Model.id == Prediction.model_id)
        .where(Prediction.instance_id == instance_id)
        .order_by(Prediction.id)
    ).all()
    return [
        PredictionRow(
            p.id,
            str(p.label),
            float(p.probability),
            float(p.threshold),
            str(v),
            p.run_id,
            p.created_at,
        )
        for p, v in rows
    ]


def recent_runs(session: Session, limit: int = 50) -> list[ReclassificationRun]:
    return list(
        session.execute(
            select(ReclassificationRun).order_by(ReclassificationRun.id.desc()).limit(limit)
        ).scalars()
    )


def _row(
    r: Row[Instance, Label, float, float, str, int, datetime, JobState, str | None],
) -> ResultRow:
    # Outer joins: every column but the instance may be NULL whatever the static types say.
    inst, label, prob, thr, version, size, classified, state, reason = r
    return ResultRow(
        instance_id=inst.id,
        sop_instance_uid=inst.sop_instance_uid,
        study_instance_uid=inst.study_instance_uid,
        accession_number=inst.accession_number,
        patient_id=inst.patient_id,
        study_date=inst.study_date,
        modality=inst.modality,
        received_at=inst.received_at,
        file_path=inst.file_path,
        label=None if label is None else str(label),
        probability=None if prob is None else float(prob),
        threshold=None if thr is None else float(thr),
        model_version=version,
        image_size=size,
        classified_at=classified,
        state=None if state is None else str(state),
        reason=reason,
    )
