"""``/api/v1``: results, jobs and models as JSON for machine clients.

Authentication: ``Authorization: Bearer TOKEN`` (``pacs-classifier user token NAME``) or a
dashboard session. Every answer that carries a patient's result is audited
(``result.view``, actor ``api:USER``). The OpenAPI document is ``/api/v1/openapi.json``.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Annotated, Any

from fastapi import APIRouter, Depends, HTTPException, Query, Request, status
from pydantic import BaseModel

from pacs_classifier.db.models import JobState, Label
from pacs_classifier.model.registry import list_models
from pacs_classifier.queue.jobs import list_jobs
from pacs_classifier.report import drift
from pacs_classifier.report.results import (
    ResultQuery,
    ResultRow,
    count_results,
    find_results,
    prediction_history,
    result_for_instance,
)
from pacs_classifier.web.auth import Principal
from pacs_classifier.web.context import api_principal, audit_view, ctx_of

router = APIRouter(prefix="/api/v1", tags=["api"])
MAX_LIMIT = 1000

Who = Annotated[Principal, Depends(api_principal)]


class ResultOut(BaseModel):
    instance_id: int
    sop_instance_uid: str
    study_instance_uid: str | None
    accession_number: str | None
    patient_id: str | None
    study_date: str | None
    modality: str | None
    received_at: datetime
    label: str | None
    probability: float | None
    threshold: float | None
    model_version: str | None
    classified_at: datetime | None
    #: The newest job's state: queued, running, done, not_assessed or failed.
    state: str | None
    #: Why it was not assessed or failed (a reason code or the last error).
    reason: str | None

    @classmethod
    def of(cls, r: ResultRow) -> ResultOut:
        return cls(
            instance_id=r.instance_id,
            sop_instance_uid=r.sop_instance_uid,
            study_instance_uid=r.study_instance_uid,
            accession_number=r.accession_number,
            patient_id=r.patient_id,
            study_date=r.study_date,
            modality=r.modality,
            received_at=r.received_at,
            label=r.label,
            probability=r.probability,
            threshold=r.threshold,
            model_version=r.model_version,
            classified_at=r.classified_at,
            state=r.state,
            reason=r.reason,
        )


class ResultPage(BaseModel):
    total: int
    limit: int
    offset: int
    results: list[ResultOut]


class PredictionOut(BaseModel):
    label: str
    probability: float
    threshold: float
    model_version: str
    run_id: int | None
    created_at: datetime


class ResultDetail(ResultOut):
    history: list[PredictionOut]


class JobOut(BaseModel):
    id: int
    instance_id: int
    kind: str
    state: str
    reason: str | None
    attempts: int
    created_at: datetime
    updated_at: datetime


class ModelOut(BaseModel):
    version: str
    active: bool
    threshold: float
    image_size: int
    sha256: str
    metrics: dict[str, Any]
    created_at: datetime
    registered_at: datetime


@router.get("/results", response_model=ResultPage, summary="Results by accession, study or date")
def get_results(
    request: Request,
    who: Who,
    accession: Annotated[str | None, Query(description="Accession Number")] = None,
    study_uid: Annotated[str | None, Query(description="Study Instance UID")] = None,
    since: Annotated[datetime | None, Query(description="received at or after (UTC)")] = None,
    until: Annotated[datetime | None, Query(description="received before (UTC)")] = None,
    label: Label | None = None,
    limit: Annotated[int, Query(ge=1, le=MAX_LIMIT)] = 100,
    offset: Annotated[int, Query(ge=0)] = 0,
) -> ResultPage:
    ctx = ctx_of(request)
    q = ResultQuery(
        accession=accession,
        study_uid=study_uid,
        since=_utc(since),
        until=_utc(until),
        label=None if label is None else label.value,
        limit=limit,
        offset=offset,
    )
    with ctx.db.read_session() as session:
        rows = find_results(session, q)
        total = count_results(session, q)
    if rows:
        audit_view(
            ctx,
            who,
            entity_id=rows[0].instance_id if len(rows) == 1 else None,
            detail={"via": "api", "instance_ids": [r.instance_id for r in rows]},
        )
    return ResultPage(
        total=total, limit=limit, offset=offset, results=[ResultOut.of(r) for r in rows]
    )


@router.get("/results/{instance_id}", response_model=ResultDetail, summary="One instance's result")
def get_result(request: Request, who: Who, instance_id: int) -> ResultDetail:
    ctx = ctx_of(request)
    with ctx.db.read_session() as session:
        row = result_for_instance(session, instance_id)
        history = prediction_history(session, instance_id) if row is not None else []
    if row is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no instance {instance_id}")
    audit_view(ctx, who, entity_id=instance_id, detail={"via": "api"})
    return ResultDetail(
        **ResultOut.of(row).model_dump(),
        history=[
            PredictionOut(
                label=p.label,
                probability=p.probability,
                threshold=p.threshold,
                model_version=p.model_version,
                run_id=p.run_id,
                created_at=p.created_at,
            )
            for p in history
        ],
    )


@router.get("/jobs", response_model=list[JobOut], summary="Jobs, newest first, with their errors")
def get_jobs(
    request: Request,
    who: Who,
    state: JobState | None = None,
    limit: Annotated[int, Query(ge=1, le=MAX_LIMIT)] = 100,
    offset: Annotated[int, Query(ge=0)] = 0,
) -> list[JobOut]:
    with ctx_of(request).db.read_session() as session:
        rows = list_jobs(session, state=state, limit=limit, offset=offset)
    return [JobOut(**vars(j)) for j in rows]


@router.get("/models", response_model=list[ModelOut], summary="Registered models")
def get_models(request: Request, who: Who) -> list[ModelOut]:
    with ctx_of(request).db.read_session() as session:
        rows = list_models(session)
        return [
            ModelOut(
                version=m.version,
                active=m.active,
                threshold=m.threshold,
                image_size=m.image_size,
                sha256=m.sha256,
                metrics=dict(m.metrics or {}),
                created_at=m.created_at,
                registered_at=m.registered_at,
            )
            for m in rows
        ]


@router.get("/drift", summary="Live traffic against validation, per model version and week")
def get_drift(
    request: Request,
    who: Who,
    weeks: Annotated[int, Query(ge=1, le=520, description="ISO weeks back from now")] = 12,
) -> dict[str, Any]:
    """``report drift`` as JSON (docs/reports.md); alerts are those the thresholds find,
    read only: the nightly check and ``report drift`` log and audit them."""
    ctx = ctx_of(request)
    since = drift.week_start(datetime.now(UTC)) - timedelta(weeks=weeks - 1)
    with ctx.db.read_session() as session:
        report = drift.compute(session, ctx.config, since=since)
    return drift.as_dict(report)


@router.get("/openapi.json", include_in_schema=False)
def get_openapi(request: Request, who: Who) -> dict[str, Any]:
    schema: dict[str, Any] = request.app.openapi()
    return schema


def _utc(value: datetime | None) -> datetime | None:
    if value is None:
        return None
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
