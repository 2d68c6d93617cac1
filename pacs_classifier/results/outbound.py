"""The outbound side in the database: which objects a prediction yields, and their queues.

Two leased queues, claimed like classification jobs (``queue/jobs.py``: ``FOR UPDATE SKIP
LOCKED`` on PostgreSQL, ``BEGIN IMMEDIATE`` on SQLite):

- ``result_objects``: one render job per DICOM object. A row is inserted in the
  transaction that records the prediction (:func:`plan_results`), with its SOP Instance
  UID and Series Instance UID already chosen (a not-assessed instance's SR, with
  ``[results] sr_not_assessed``, in the transaction that ends its job), so rendering
  twice (after a crash) yields the same object and a destination never sees two
  objects for one result.
- ``send_jobs``: one C-STORE per rendered object per destination that wants its kind,
  inserted in the transaction that marks the object rendered.

Both move ``queued → running → done | failed``; ``attempts`` counts claims. A retry waits
``min(retry_backoff_s · 2^(attempts-1), retry_backoff_max_s)``. A passing failure
(connection refused, time-out, out of resources) is retried up to ``max_attempts``; a
refusal (association rejected, a failure status) up to ``refused_attempts``. Every
outcome is audited in the transaction that records it.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from pydicom.uid import generate_uid
from sqlalchemy import and_, func, insert, or_, select, update
from sqlalchemy.orm import Session

from pacs_classifier.config import Config, ResultsConfig
from pacs_classifier.db.audit import append_event
from pacs_classifier.db.engine import Database
from pacs_classifier.db.models import (
    Instance,
    Job,
    JobState,
    Label,
    Model,
    Prediction,
    ResultKind,
    ResultObject,
    SendJob,
    utcnow,
)
from pacs_classifier.results.sr import Predecessor

log = logging.getLogger(__name__)

#: PS3.4 B.5: the SOP classes of what we make.
COMPREHENSIVE_3D_SR = "1.2.840.10008.5.1.4.1.1.88.34"
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
SOP_CLASS = {ResultKind.SR: COMPREHENSIVE_3D_SR, ResultKind.SC: SECONDARY_CAPTURE}
#: Audit actions.
ACTION_RENDER = "result.render"
ACTION_SEND = "result.send"
ACTION_RETRY = "result.send_retry"
MAX_REASON_CHARS = 300


def series_uid_for(study_instance_uid: str, kind: ResultKind) -> str:
    """One series per study and kind: every SR (or overlay) of a study lands in it.

    Derived from the study's UID, so every process, and every restart, picks the same one.
    """
    return str(generate_uid(entropy_srcs=["pacs-classifier", str(kind), study_instance_uid]))


def wants_overlay(results: ResultsConfig, label: Label) -> bool:
    """``[results] sc_overlay``: off, PNEUMONIA results only, or all."""
    if results.sc_overlay == "all":
        return True
    return results.sc_overlay == "positives" and label == Label.PNEUMONIA


@dataclass(frozen=True)
class PlanItem:
    """One outcome of a batch that may yield objects: a prediction, or a not-assessed job.

    A prediction has ``prediction_id`` and ``label``; a not-assessed instance has neither,
    and names its ``job_id`` (whose ``reason`` the SR reports) and the ``model_id`` that
    was active.
    """

    instance_id: int
    prediction_id: int | None = None
    label: Label | None = None
    job_id: int | None = None
    model_id: int | None = None


@dataclass(frozen=True)
class PlannedObject:
    """A queued ``result_objects`` row, as the audit event of its job names it."""

    id: int
    kind: ResultKind
    sop_instance_uid: str
    supersedes: int | None

    def detail(self) -> dict[str, object]:
        return {
            "object_id": self.id,
            "kind": str(self.kind),
            "sop_instance_uid": self.sop_instance_uid,
            "supersedes": self.supersedes,
        }


def kinds_for(results: ResultsConfig, label: Label | None) -> list[ResultKind]:
    """What one outcome yields: ``label`` None is a not-assessed instance."""
    if label is None:
        return [ResultKind.SR] if results.sr and results.sr_not_assessed else []
    kinds = [ResultKind.SR] if results.sr else []
    if wants_overlay(results, label):
        kinds.append(ResultKind.SC)
    return kinds


def plan_results(
    session: Session, results: ResultsConfig, items: Sequence[PlanItem]
) -> list[list[PlannedObject]]:
    """Queue the objects a batch of outcomes yields, in the caller's transaction.

    An instance's first outcome yields an SR (and an overlay per ``sc_overlay``; a
    not-assessed one an SR only, per ``sr_not_assessed``). A later one (a
    reclassification) yields a new object only when its label differs from that of the
    newest object of the same kind, "not assessed" counting as a label of its own; the
    new SR names the old one in its Predecessor Documents Sequence.

    A few statements per batch, whatever its size: the studies, the newest objects, one
    insert. Nothing is audited here: the caller names the objects in the audit event of
    each item's job (``result_objects``), in the same transaction. Returns the planned
    objects of each item, in the order of ``items``.
    """
    planned: list[list[PlannedObject]] = [[] for _ in items]
    wanted = [(n, item) for n, item in enumerate(items) if kinds_for(results, item.label)]
    # An instance twice in one batch (a live job and a run's job) is planned in a later
    # round, so that it sees the object the first one planned.
    while wanted:
        seen: set[int] = set()
        now_round: list[tuple[int, PlanItem]] = []
        later: list[tuple[int, PlanItem]] = []
        for n, item in wanted:
            (later if item.instance_id in seen else now_round).append((n, item))
            seen.add(item.instance_id)
        for n, objects in _plan_round(session, results, now_round):
            planned[n] = objects
        wanted = later
    return planned


def _plan_round(
    session: Session, results: ResultsConfig, items: list[tuple[int, PlanItem]]
) -> list[tuple[int, list[PlannedObject]]]:
    ids = [item.instance_id for _, item in items]
    studies: dict[int, str | None] = {
        instance_id: study
        for instance_id, study in session.execute(
            select(Instance.id, Instance.study_instance_uid).where(Instance.id.in_(ids))
        )
    }
    newest = (
        select(func.max(ResultObject.id))
        .where(ResultObject.instance_id.in_(ids))
        .group_by(ResultObject.instance_id, ResultObject.kind)
    )
    last: dict[tuple[int, ResultKind], tuple[int, Label | None]] = {}
    for obj_id, instance_id, kind, label in session.execute(
        select(ResultObject.id, ResultObject.instance_id, ResultObject.kind, Prediction.label)
        .outerjoin(Prediction, Prediction.id == ResultObject.prediction_id)
        .where(ResultObject.id.in_(newest))
    ):
        last[(instance_id, ResultKind(kind))] = (obj_id, Label(label) if label else None)
    rows: list[dict[str, Any]] = []
    owners: list[int] = []
    now = utcnow()
    for n, item in items:
        study = studies.get(item.instance_id)
        if not study:
            continue
        for kind in kinds_for(results, item.label):
            previous = last.get((item.instance_id, kind))
            if previous is not None and previous[1] == item.label:
                continue
            rows.append(
                {
                    "instance_id": item.instance_id,
                    "prediction_id": item.prediction_id,
                    "job_id": item.job_id if item.prediction_id is None else None,
                    "model_id": item.model_id if item.prediction_id is None else None,
                    "kind": kind,
                    "sop_class_uid": SOP_CLASS[kind],
                    "sop_instance_uid": str(generate_uid()),
                    "series_instance_uid": series_uid_for(study, kind),
                    "study_instance_uid": study,
                    "predecessor_id": (
                        previous[0] if previous is not None and kind == ResultKind.SR else None
                    ),
                    "state": JobState.QUEUED,
                    "attempts": 0,
                    "created_at": now,
                    "updated_at": now,
                }
            )
            owners.append(n)
    out: dict[int, list[PlannedObject]] = {}
    if not rows:
        return []
    new_ids = session.execute(
        insert(ResultObject).returning(ResultObject.id, sort_by_parameter_order=True), rows
    ).scalars()
    for n, row, obj_id in zip(owners, rows, new_ids, strict=True):
        out.setdefault(n, []).append(
            PlannedObject(obj_id, row["kind"], row["sop_instance_uid"], row["predecessor_id"])
        )
    return list(out.items())


def is_own_output(session: Session, sop_instance_uid: str) -> bool:
    """Whether a received SOP Instance UID is one of the objects we made."""
    found = session.execute(
        select(ResultObject.id).where(ResultObject.sop_instance_uid == sop_instance_uid)
    ).first()
    return found is not None


# --------------------------------------------------------------------------- policy


class Failure(enum.StrEnum):
    """How a failed attempt is retried."""

    #: Connection refused, time-out, abort, out of resources: the peer may come back.
    TRANSIENT = "transient"
    #: Association rejected, a failure status: retried ``refused_attempts`` times only.
    REFUSED = "refused"


@dataclass(frozen=True)
class RetryPolicy:
    max_attempts: int
    refused_attempts: int
    backoff_s: float
    backoff_max_s: float
    lease_seconds: float

    @classmethod
    def from_config(cls, results: ResultsConfig) -> RetryPolicy:
        return cls(
            max_attempts=results.max_attempts,
            refused_attempts=min(results.refused_attempts, results.max_attempts),
            backoff_s=results.retry_backoff_s,
            backoff_max_s=results.retry_backoff_max_s,
            lease_seconds=float(results.lease_seconds),
        )

    def backoff(self, attempts: int) -> timedelta:
        """Capped exponential: doubles per failed attempt, never beyond the cap."""
        delay = self.backoff_s * 2 ** max(attempts - 1, 0)
        return timedelta(seconds=min(delay, self.backoff_max_s))

    def allows_retry(self, attempts: int, failure: Failure) -> bool:
        limit = self.max_attempts if failure == Failure.TRANSIENT else self.refused_attempts
        return attempts < limit


# --------------------------------------------------------------------------- claims


@dataclass(frozen=True)
class RenderTask:
    """A claimed render job with what rendering needs."""

    object_id: int
    kind: ResultKind
    attempts: int
    instance_id: int
    source_path: str
    sop_instance_uid: str
    series_instance_uid: str
    study_instance_uid: str
    #: None, with probability and threshold: the SR of a not-assessed instance.
    label: Label | None
    probability: float | None
    threshold: float | None
    #: The job's reason code where the instance was not assessed.
    not_assessed_reason: str | None
    model_version: str
    model_sha256: str
    model_path: str
    predecessor: Predecessor | None


@dataclass(frozen=True)
class SendTask:
    """A claimed send job with the object's file."""

    job_id: int
    object_id: int
    destination: str
    attempts: int
    kind: ResultKind
    file_path: str
    sop_class_uid: str
    sop_instance_uid: str


class LeasedQueue:
    """Claiming, releasing and retrying for a table with the job columns."""

    table: Any = None
    entity = "result_object"

    def __init__(self, db: Database, policy: RetryPolicy, worker_id: str, actor: str) -> None:
        self.db = db
        self.policy = policy
        self.worker_id = worker_id
        self.actor = actor

    def oldest_due(self, session: Session, now: datetime) -> datetime | None:
        """When the oldest row that could be claimed now was queued."""
        t = self.table
        oldest: datetime | None = session.scalar(
            select(func.min(t.created_at)).where(
                t.state == JobState.QUEUED, or_(t.not_before.is_(None), t.not_before <= now)
            )
        )
        return oldest

    def _claim_ids(self, session: Session, limit: int, now: datetime) -> list[int]:
        t = self.table
        ids = list(
            session.execute(
                select(t.id)
                .where(t.state == JobState.QUEUED, or_(t.not_before.is_(None), t.not_before <= now))
                .order_by(t.id)
                .limit(limit)
                .with_for_update(skip_locked=True)
            ).scalars()
        )
        if ids:
            session.execute(
                update(t)
                .where(t.id.in_(ids))
                .values(
                    state=JobState.RUNNING,
                    attempts=t.attempts + 1,
                    lease_until=now + timedelta(seconds=self.policy.lease_seconds),
                    worker_id=self.worker_id,
                    updated_at=now,
                )
            )
        return ids

    def reclaim_expired(self) -> int:
        """Rows whose lease ran out (a killed process): queued again, or failed."""
        t = self.table
        now = utcnow()
        with self.db.session() as session:
            rows = list(
                session.execute(
                    select(t)
                    .where(and_(t.state == JobState.RUNNING, t.lease_until < now))
                    .with_for_update(skip_locked=True)
                ).scalars()
            )
            for row in rows:
                out = row.attempts >= self.policy.max_attempts
                row.state = JobState.FAILED if out else JobState.QUEUED
                row.reason = "lease_lost" if out else row.reason
                row.lease_until = None
                row.worker_id = None
                row.updated_at = now
                self._audit(session, row.id, "reclaimed", {"state": str(row.state)})
        return len(rows)

    def release(self, ids: Sequence[int]) -> None:
        """Give claims back unprocessed (shutdown): queued, the claim not counted."""
        if not ids:
            return
        t = self.table
        with self.db.session() as session:
            session.execute(
                update(t)
                .where(t.id.in_(list(ids)), t.state == JobState.RUNNING)
                .values(
                    state=JobState.QUEUED,
                    attempts=t.attempts - 1,
                    lease_until=None,
                    worker_id=None,
                    updated_at=utcnow(),
                )
            )

    def fail(self, row_id: int, attempts: int, reason: str, failure: Failure) -> JobState:
        """Record a failed attempt: queued again after the backoff, or ``failed``."""
        t = self.table
        now = utcnow()
        short = reason[:MAX_REASON_CHARS]
        retry = self.policy.allows_retry(attempts, failure)
        state = JobState.QUEUED if retry else JobState.FAILED
        not_before = now + self.policy.backoff(attempts) if retry else None
        with self.db.session() as session:
            session.execute(
                update(t)
                .where(t.id == row_id, t.state == JobState.RUNNING, t.worker_id == self.worker_id)
                .values(
                    state=state,
                    reason=short,
                    not_before=not_before,
                    lease_until=None,
                    worker_id=None,
                    updated_at=now,
                )
            )
            detail: dict[str, object] = {
                "attempts": attempts,
                "reason": short,
                "failure": str(failure),
            }
            if not_before is not None:
                detail["retry_at"] = not_before.isoformat()
            self._audit(session, row_id, "retry" if retry else "failed", detail)
        if not retry:
            log.error("%s %d failed after %d attempt(s): %s", self.entity, row_id, attempts, short)
        return state

    def _audit(
        self, session: Session, row_id: int, outcome: str, detail: dict[str, object]
    ) -> None:
        raise NotImplementedError


class RenderQueue(LeasedQueue):
    table = ResultObject
    entity = "result_object"

    def claim(self, limit: int) -> list[RenderTask]:
        now = utcnow()
        with self.db.session() as session:
            ids = self._claim_ids(session, limit, now)
            if not ids:
                return []
            objects = session.execute(
                select(ResultObject, Instance.file_path, Prediction, Model, Job.reason)
                .join(Instance, Instance.id == ResultObject.instance_id)
                .outerjoin(Prediction, Prediction.id == ResultObject.prediction_id)
                .outerjoin(Job, Job.id == ResultObject.job_id)
                .join(Model, Model.id == func.coalesce(Prediction.model_id, ResultObject.model_id))
                .where(ResultObject.id.in_(ids))
                .order_by(ResultObject.id)
            ).all()
            tasks = []
            for obj, source_path, pred, model, job_reason in objects:
                predecessor = None
                if obj.predecessor_id is not None:
                    pre = session.get(ResultObject, obj.predecessor_id)
                    if pre is not None:
                        predecessor = Predecessor(
                            sop_class_uid=pre.sop_class_uid,
                            sop_instance_uid=pre.sop_instance_uid,
                            series_instance_uid=pre.series_instance_uid,
                            study_instance_uid=pre.study_instance_uid,
                        )
                tasks.append(
                    RenderTask(
                        object_id=obj.id,
                        kind=ResultKind(obj.kind),
                        attempts=obj.attempts,
                        instance_id=obj.instance_id,
                        source_path=source_path,
                        sop_instance_uid=obj.sop_instance_uid,
                        series_instance_uid=obj.series_instance_uid,
                        study_instance_uid=obj.study_instance_uid,
                        label=Label(pred.label) if pred is not None else None,
                        probability=pred.probability if pred is not None else None,
                        threshold=pred.threshold if pred is not None else None,
                        not_assessed_reason=None if pred is not None else job_reason,
                        model_version=model.version,
                        model_sha256=model.sha256,
                        model_path=model.path,
                        predecessor=predecessor,
                    )
                )
        return tasks

    def done(self, task: RenderTask, file_path: str, config: Config) -> list[int]:
        """The object is written: record its file and queue one send per destination."""
        now = utcnow()
        with self.db.session() as session:
            result = session.execute(
                update(ResultObject)
                .where(
                    ResultObject.id == task.object_id,
                    ResultObject.state == JobState.RUNNING,
                    ResultObject.worker_id == self.worker_id,
                )
                .values(
                    state=JobState.DONE,
                    file_path=file_path,
                    reason=None,
                    lease_until=None,
                    updated_at=now,
                )
            )
            if int(result.rowcount) != 1:  # type: ignore[attr-defined]
                log.warning("result object %d: lease lost before it was recorded", task.object_id)
                return []
            job_ids = []
            for dest in config.destinations:
                if str(task.kind) not in dest.send:
                    continue
                job = SendJob(
                    object_id=task.object_id,
                    destination=dest.ae_title,
                    state=JobState.QUEUED,
                    attempts=0,
                    created_at=now,
                    updated_at=now,
                )
                session.add(job)
                session.flush()
                job_ids.append(job.id)
            self._audit(
                session,
                task.object_id,
                "done",
                {
                    "kind": str(task.kind),
                    "file_path": file_path,
                    "sop_instance_uid": task.sop_instance_uid,
                    "send_jobs": job_ids,
                },
            )
        return job_ids

    def _audit(
        self, session: Session, row_id: int, outcome: str, detail: dict[str, object]
    ) -> None:
        append_event(
            session,
            actor=self.actor,
            action=ACTION_RENDER,
            outcome=outcome,
            entity_type=self.entity,
            entity_id=row_id,
            detail=detail,
        )


class SendQueue(LeasedQueue):
    table = SendJob
    entity = "send_job"

    def claim(self, limit: int) -> list[SendTask]:
        now = utcnow()
        with self.db.session() as session:
            ids = self._claim_ids(session, limit, now)
            if not ids:
                return []
            rows = session.execute(
                select(SendJob, ResultObject)
                .join(ResultObject, ResultObject.id == SendJob.object_id)
                .where(SendJob.id.in_(ids))
                .order_by(SendJob.id)
            ).all()
        return [
            SendTask(
                job_id=job.id,
                object_id=obj.id,
                destination=job.destination,
                attempts=job.attempts,
                kind=ResultKind(obj.kind),
                file_path=obj.file_path or "",
                sop_class_uid=obj.sop_class_uid,
                sop_instance_uid=obj.sop_instance_uid,
            )
            for job, obj in rows
        ]

    def done(self, task: SendTask, status: int) -> None:
        now = utcnow()
        with self.db.session() as session:
            session.execute(
                update(SendJob)
                .where(
                    SendJob.id == task.job_id,
                    SendJob.state == JobState.RUNNING,
                    SendJob.worker_id == self.worker_id,
                )
                .values(
                    state=JobState.DONE, reason=None, sent_at=now, lease_until=None, updated_at=now
                )
            )
            self._audit(
                session,
                task.job_id,
                "done",
                {
                    "destination": task.destination,
                    "object_id": task.object_id,
                    "sop_instance_uid": task.sop_instance_uid,
                    "attempts": task.attempts,
                    "status": f"0x{status:04X}",
                },
            )

    def _audit(
        self, session: Session, row_id: int, outcome: str, detail: dict[str, object]
    ) -> None:
        append_event(
            session,
            actor=self.actor,
            action=ACTION_SEND,
            outcome=outcome,
            entity_type=self.entity,
            entity_id=row_id,
            detail=detail,
        )


# --------------------------------------------------------------------------- commands


def requeue_sends(
    db: Database, *, include_failed: bool, destination: str | None, actor: str
) -> int:
    """``send retry``: make waiting sends due now; with ``include_failed`` failed ones too.

    A failed send starts over with its attempts at zero. Audited as one event.
    """
    states = [JobState.QUEUED, *([JobState.FAILED] if include_failed else [])]
    now = utcnow()
    with db.session() as session:
        query = select(SendJob.id).where(SendJob.state.in_(states))
        if destination is not None:
            query = query.where(SendJob.destination == destination)
        ids = list(session.execute(query.with_for_update()).scalars())
        if not ids:
            return 0
        session.execute(
            update(SendJob)
            .where(SendJob.id.in_(ids), SendJob.state == JobState.FAILED)
            .values(state=JobState.QUEUED, attempts=0)
        )
        session.execute(
            update(SendJob).where(SendJob.id.in_(ids)).values(not_before=None, updated_at=now)
        )
        append_event(
            session,
            actor=actor,
            action=ACTION_RETRY,
            outcome="queued",
            entity_type="send_job",
            entity_id=None,
            detail={
                "send_jobs": ids[:100],
                "count": len(ids),
                "failed_included": include_failed,
                "destination": destination,
            },
        )
    return len(ids)


def classification_waiting(session: Session, now: datetime) -> bool:
    """Whether the workers have work: a classification job due, or one in hand.

    A job in hand (running, its lease alive) counts: the last batch of a backlog is
    being inferred while nothing is queued any more, and results rendered beside it
    would take its CPU. A running job whose lease ran out belongs to a dead worker and
    does not hold results back.
    """
    busy = session.execute(
        select(Job.id)
        .where(
            or_(
                and_(
                    Job.state == JobState.QUEUED,
                    or_(Job.not_before.is_(None), Job.not_before <= now),
                ),
                and_(Job.state == JobState.RUNNING, Job.lease_until > now),
            )
        )
        .limit(1)
    ).first()
    return busy is not None


def send_counts(session: Session) -> dict[tuple[str, str], int]:
    """(destination, state) → number of send jobs."""
    rows = session.execute(
        select(SendJob.destination, SendJob.state, func.count()).group_by(
            SendJob.destination, SendJob.state
        )
    ).all()
    return {(str(d), str(s)): int(n) for d, s, n in rows}


def render_counts(session: Session) -> dict[tuple[str, str], int]:
    """(kind, state) → number of result objects."""
    rows = session.execute(
        select(ResultObject.kind, ResultObject.state, func.count()).group_by(
            ResultObject.kind, ResultObject.state
        )
    ).all()
    return {(str(k), str(s)): int(n) for k, s, n in rows}
