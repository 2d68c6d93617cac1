"""Jobs in the database, claimed in batches under a lease.

A job moves ``queued → running → done | not_assessed | failed``; a failure worth retrying
goes back to ``queued`` with ``not_before`` set (exponential backoff) until
``max_attempts`` claims have been spent. ``attempts`` counts claims, so a job whose worker
dies while holding it (a poison pill that crashes the decoder, say) also ends ``failed``
instead of looping forever.

Claiming is one short transaction. On PostgreSQL ``SELECT … FOR UPDATE SKIP LOCKED`` lets
any number of worker processes, on any number of machines, take disjoint batches without
waiting on each other. On SQLite the engine opens every write transaction with
``BEGIN IMMEDIATE``, so claims are serialised by the database lock (waiting under the busy
timeout, never failing with "database is locked"); ``with_for_update`` renders nothing
there.

A lease that runs out (a worker killed with ``kill -9``, a machine lost) makes the job
claimable again: :meth:`JobQueue.reclaim_expired` runs before every claim. A worker that
stops cleanly gives its leases back at once with :meth:`JobQueue.release`. Every state
change is audited in the transaction that makes it.

Whoever needs to know that jobs ended (a reclassification run counts its jobs) passes
``on_ended`` (:data:`JobsEnded`): the queue calls it after the transaction that ended them
commits, whichever path ended them (an outcome, a retry spent, a lease lost too often).
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import and_, func, or_, select, update
from sqlalchemy.orm import Session

from pacs_classifier.config import WorkerConfig
from pacs_classifier.db.audit import append_event
from pacs_classifier.db.engine import Database
from pacs_classifier.db.models import Instance, Job, JobKind, JobState, utcnow
from pacs_classifier.queue.liveness import WorkerLocks

log = logging.getLogger(__name__)

#: States a job never leaves.
TERMINAL_STATES = (JobState.DONE, JobState.NOT_ASSESSED, JobState.FAILED)
#: A job in one of these states has not ended yet.
OPEN_STATES = (JobState.QUEUED, JobState.RUNNING)
#: ``jobs.reason`` is free text; keep it short enough to group by in reports.
MAX_REASON_CHARS = 300


def enqueue(
    session: Session,
    instance_id: int,
    *,
    kind: JobKind = JobKind.CLASSIFY,
    run_id: int | None = None,
) -> Job:
    """Queue one job inside the caller's transaction (it commits with the instance row)."""
    job = Job(
        instance_id=instance_id,
        kind=kind,
        state=JobState.QUEUED,
        attempts=0,
        run_id=run_id,
        created_at=utcnow(),
        updated_at=utcnow(),
    )
    session.add(job)
    session.flush()
    return job


def default_worker_id() -> str:
    """``host:pid:random``: whose lease a job holds; a reused PID is a different worker."""
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"


@dataclass(frozen=True)
class QueuePolicy:
    """How long a claim lasts and how failures are retried."""

    lease_seconds: float = 300.0
    max_attempts: int = 3
    retry_backoff_s: float = 30.0

    @classmethod
    def from_config(cls, worker: WorkerConfig) -> QueuePolicy:
        return cls(
            lease_seconds=float(worker.lease_seconds),
            max_attempts=worker.max_attempts,
            retry_backoff_s=worker.retry_backoff_s,
        )

    def backoff(self, attempts: int) -> timedelta:
        """Delay before the next claim after ``attempts`` failed claims: doubles each time."""
        return timedelta(seconds=self.retry_backoff_s * 2 ** max(attempts - 1, 0))


@dataclass(frozen=True)
class ClaimedJob:
    """A job this worker holds, with what it needs to process it."""

    id: int
    instance_id: int
    kind: JobKind
    attempts: int
    run_id: int | None
    file_path: str
    sop_instance_uid: str


@dataclass(frozen=True)
class EndedJob:
    """A job that has just reached a terminal state."""

    id: int
    kind: JobKind
    run_id: int | None
    state: JobState


#: Told which jobs ended (after their transaction committed) and by whom (an audit actor).
JobsEnded = Callable[[Sequence[EndedJob], str], None]
#: ``(session, [(job, reason)])`` → extra audit detail per job, in order.
NotAssessedPlanner = Callable[
    [Session, Sequence[tuple[ClaimedJob, str]]], Sequence[Mapping[str, object]]
]


@dataclass(frozen=True)
class Outcome:
    """What became of a job that did not end with a prediction."""

    job: ClaimedJob
    state: JobState
    reason: str


class JobQueue:
    """Claims, completes, retries and releases jobs on behalf of one worker."""

    def __init__(
        self,
        db: Database,
        policy: QueuePolicy,
        *,
        worker_id: str | None = None,
        locks: WorkerLocks | None = None,
        on_ended: JobsEnded | None = None,
    ) -> None:
        self.db = db
        self.policy = policy
        self.worker_id = worker_id or default_worker_id()
        #: This host's worker locks (queue/liveness.py); None: judge by PID alone.
        self.locks = locks
        self.on_ended = on_ended
        self.actor = f"worker:{self.worker_id}"
        # Reclaiming writes; on SQLite every write takes the database lock, so do it
        # every few seconds rather than before every claim.
        self._reclaim_every = min(self.policy.lease_seconds / 2, 5.0)
        self._next_reclaim = 0.0

    # ------------------------------------------------------------------ claiming

    def claim(
        self,
        limit: int,
        *,
        run_id: int | None = None,
        job_ids: Sequence[int] | None = None,
        fresh_only: bool = False,
    ) -> list[ClaimedJob]:
        """Lease up to ``limit`` queued jobs (oldest first).

        A job claimed before (``attempts`` > 0: its worker died holding it, or it is a
        retry) comes first and alone, so whatever it does to a worker it does alone.
        ``fresh_only`` leaves those out (filling a batch). ``run_id`` narrows to one
        reclassification run, ``job_ids`` to given jobs (``classify --record`` processes
        its own jobs and no one else's).
        """
        if limit < 1:
            return []
        if time.monotonic() >= self._next_reclaim:
            self.reclaim_expired()
            self._next_reclaim = time.monotonic() + self._reclaim_every
        now = utcnow()
        with self.db.session() as session:
            query = (
                select(Job.id, Job.attempts)
                .where(
                    Job.state == JobState.QUEUED,
                    or_(Job.not_before.is_(None), Job.not_before <= now),
                )
                .order_by((Job.attempts > 0).desc(), Job.id)
                .limit(limit)
                .with_for_update(skip_locked=True)
            )
            if fresh_only:
                query = query.where(Job.attempts == 0)
            if run_id is not None:
                query = query.where(Job.run_id == run_id)
            if job_ids is not None:
                query = query.where(Job.id.in_(list(job_ids)))
            found = session.execute(query).all()
            if not found:
                return []
            ids = [found[0].id] if found[0].attempts > 0 else [r.id for r in found]
            session.execute(
                update(Job)
                .where(Job.id.in_(ids))
                .values(
                    state=JobState.RUNNING,
                    attempts=Job.attempts + 1,
                    lease_until=now + timedelta(seconds=self.policy.lease_seconds),
                    worker_id=self.worker_id,
                    updated_at=now,
                )
            )
            rows = session.execute(
                select(
                    Job.id,
                    Job.instance_id,
                    Job.kind,
                    Job.attempts,
                    Job.run_id,
                    Instance.file_path,
                    Instance.sop_instance_uid,
                )
                .join(Instance, Instance.id == Job.instance_id)
                .where(Job.id.in_(ids))
                .order_by(Job.id)
            ).all()
        return [
            ClaimedJob(
                id=r.id,
                instance_id=r.instance_id,
                kind=JobKind(r.kind),
                attempts=r.attempts,
                run_id=r.run_id,
                file_path=r.file_path,
                sop_instance_uid=r.sop_instance_uid,
            )
            for r in rows
        ]

    def reclaim_expired(self) -> int:
        """Make jobs whose lease ran out claimable again (or failed, out of attempts)."""
        now = utcnow()
        return self._reclaim(and_(Job.state == JobState.RUNNING, Job.lease_until < now), now)

    def reclaim_dead_local(self) -> int:
        """Reclaim at once the jobs held by workers of this host whose process is gone.

        After a crash and restart the new process need not wait for the old leases to
        run out. Only this host's ids are checked: another machine's processes cannot be
        seen from here, their leases expire instead. A holder is judged by its lock file
        (:class:`~pacs_classifier.queue.liveness.WorkerLocks`) when it has one, else by
        its PID.
        """
        prefix = f"{socket.gethostname()}:"
        with self.db.session() as session:
            holders = session.execute(
                select(Job.worker_id)
                .where(Job.state == JobState.RUNNING, Job.worker_id.startswith(prefix))
                .distinct()
            ).scalars()
            dead = [h for h in holders if h and h != self.worker_id and not self._alive(h)]
        if not dead:
            return 0
        return self._reclaim(and_(Job.state == JobState.RUNNING, Job.worker_id.in_(dead)), utcnow())

    def _alive(self, holder: str) -> bool:
        alive = self.locks.alive(holder) if self.locks is not None else None
        return _pid_alive(holder) if alive is None else alive

    def _reclaim(self, condition: object, now: datetime) -> int:
        ended: list[EndedJob] = []
        with self.db.session() as session:
            jobs = list(
                session.execute(
                    select(Job).where(condition).with_for_update(skip_locked=True)  # type: ignore[arg-type]
                ).scalars()
            )
            for job in jobs:
                previous = job.worker_id
                if job.attempts >= self.policy.max_attempts:
                    job.state = JobState.FAILED
                    job.reason = (
                        f"lease_lost: worker stopped without finishing, {job.attempts} times"
                    )
                    ended.append(EndedJob(job.id, JobKind(job.kind), job.run_id, job.state))
                else:
                    job.state = JobState.QUEUED
                job.lease_until = None
                job.worker_id = None
                job.updated_at = now
                append_event(
                    session,
                    actor=self.actor,
                    action="job.reclaim",
                    entity_type="instance",
                    entity_id=job.instance_id,
                    outcome=str(job.state),
                    detail={"job_id": job.id, "attempts": job.attempts, "holder": previous},
                )
        if jobs:
            log.info("reclaimed %d job(s) whose worker lost its lease", len(jobs))
        self.ended(ended)
        return len(jobs)

    # ------------------------------------------------------------------ outcomes

    def ended(self, jobs: Sequence[EndedJob]) -> None:
        """Tell ``on_ended`` about jobs whose ending has committed."""
        if jobs and self.on_ended is not None:
            self.on_ended(jobs, self.actor)

    def mark_done(self, session: Session, job: ClaimedJob, detail: dict[str, object]) -> bool:
        """In the caller's transaction (with the prediction): the job is done.

        Returns False when this worker no longer holds the job (its lease ran out and
        another worker took it); the prediction's unique key keeps that harmless. The
        caller passes the jobs to :meth:`ended` once its transaction has committed.
        """
        held = self._finish(session, job, JobState.DONE, None)
        self._audit_outcome(session, job, "done" if held else "done_lease_lost", detail)
        return held

    def mark_not_assessed(
        self,
        outcomes: Sequence[tuple[ClaimedJob, str]],
        details: Mapping[int, Mapping[str, object]] | None = None,
        *,
        plan: NotAssessedPlanner | None = None,
    ) -> None:
        """End jobs ``not_assessed`` with their reason codes (no retry: the input is what it is).

        ``details`` (by job id) adds to a job's audit event, e.g. the score that refused it.
        ``plan``, called in the same transaction with the jobs this worker still held,
        queues what follows from them (``[results] sr_not_assessed``) and returns extra
        audit detail per job, in order.
        """
        if not outcomes:
            return
        ended: list[EndedJob] = []
        with self.db.session() as session:
            held = [
                (job, reason)
                for job, reason in outcomes
                if self._finish(session, job, JobState.NOT_ASSESSED, reason)
            ]
            extra: dict[int, Mapping[str, object]] = {}
            if plan is not None and held:
                extra = dict(zip((j.id for j, _ in held), plan(session, held), strict=True))
            for job, reason in outcomes:
                detail: dict[str, object] = {
                    "reason": reason,
                    **(details or {}).get(job.id, {}),
                    **extra.get(job.id, {}),
                }
                self._audit_outcome(session, job, "not_assessed", detail)
            ended = [ended_job(job, JobState.NOT_ASSESSED) for job, _ in held]
        self.ended(ended)

    def fail(self, failures: Sequence[tuple[ClaimedJob, str, bool]]) -> list[Outcome]:
        """Record failed attempts: ``(job, reason, retryable)``.

        A retryable failure with attempts left goes back to the queue after the backoff;
        otherwise the job ends ``failed`` with its reason.
        """
        outcomes: list[Outcome] = []
        if not failures:
            return outcomes
        now = utcnow()
        with self.db.session() as session:
            for job, reason, retryable in failures:
                short = reason[:MAX_REASON_CHARS]
                detail: dict[str, object] = {"attempts": job.attempts, "reason": short}
                not_before: datetime | None = None
                if retryable and job.attempts < self.policy.max_attempts:
                    state, not_before = JobState.QUEUED, now + self.policy.backoff(job.attempts)
                    detail["retry_at"] = not_before.isoformat()
                else:
                    state = JobState.FAILED
                held = _guarded_update(
                    session,
                    job,
                    self.worker_id,
                    state=state,
                    reason=short,
                    not_before=not_before,
                    now=now,
                )
                if not held:
                    continue
                outcomes.append(Outcome(job, state, short))
                outcome = "retry" if state == JobState.QUEUED else "failed"
                self._audit_outcome(session, job, outcome, detail)
        self.ended([ended_job(o.job, o.state) for o in outcomes if o.state in TERMINAL_STATES])
        return outcomes

    def release(self, jobs: Iterable[ClaimedJob]) -> int:
        """Give leases back unprocessed (shutdown): queued again, the claim not counted."""
        ids = [j.id for j in jobs]
        if not ids:
            return 0
        now = utcnow()
        with self.db.session() as session:
            result = session.execute(
                update(Job)
                .where(
                    Job.id.in_(ids),
                    Job.state == JobState.RUNNING,
                    Job.worker_id == self.worker_id,
                )
                .values(
                    state=JobState.QUEUED,
                    attempts=func.max(Job.attempts - 1, 0)
                    if self.db.dialect == "sqlite"
                    else func.greatest(Job.attempts - 1, 0),
                    lease_until=None,
                    worker_id=None,
                    updated_at=now,
                )
            )
            count = int(result.rowcount)  # type: ignore[attr-defined]
            if count:
                append_event(
                    session,
                    actor=self.actor,
                    action="job.release",
                    entity_type="worker",
                    entity_id=self.worker_id,
                    outcome="ok",
                    detail={"job_ids": ids[:100], "released": count},
                )
        return count

    def _finish(
        self, session: Session, job: ClaimedJob, state: JobState, reason: str | None
    ) -> bool:
        return _guarded_update(session, job, self.worker_id, state=state, reason=reason)

    def _audit_outcome(
        self, session: Session, job: ClaimedJob, outcome: str, detail: Mapping[str, object]
    ) -> None:
        """The ``job.classify`` event of one job's outcome, on its instance."""
        append_event(
            session,
            actor=self.actor,
            action="job.classify",
            entity_type="instance",
            entity_id=job.instance_id,
            outcome=outcome,
            detail={"job_id": job.id, "kind": str(job.kind), **detail},
        )


def ended_job(job: ClaimedJob, state: JobState) -> EndedJob:
    return EndedJob(job.id, job.kind, job.run_id, state)


def _guarded_update(
    session: Session,
    job: ClaimedJob,
    worker_id: str,
    *,
    state: JobState,
    reason: str | None,
    not_before: datetime | None = None,
    now: datetime | None = None,
) -> bool:
    """Change a job this worker still holds; False when the lease was lost meanwhile."""
    now = now or utcnow()
    result = session.execute(
        update(Job)
        .where(Job.id == job.id, Job.state == JobState.RUNNING, Job.worker_id == worker_id)
        .values(
            state=state,
            reason=reason,
            not_before=not_before,
            lease_until=None,
            worker_id=None if state == JobState.QUEUED else worker_id,
            updated_at=now,
        )
    )
    held = int(result.rowcount) == 1  # type: ignore[attr-defined]
    if not held:
        log.warning("job %d: lease lost before it finished (%s)", job.id, state)
    return held


def queue_depth(session: Session) -> dict[str, int]:
    """Number of jobs per state."""
    rows = session.execute(select(Job.state, func.count()).group_by(Job.state)).all()
    return {str(state): int(n) for state, n in rows}


def _pid_alive(worker_id: str) -> bool:
    try:
        pid = int(worker_id.split(":")[1])  # host:pid, or host:pid:random
    except (IndexError, ValueError):
        return True  # not ours to judge: let its lease expire
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@dataclass(frozen=True)
class JobRow:
    """A job as the dashboard and the API show it."""

    id: int
    instance_id: int
    kind: str
    state: str
    reason: str | None
    attempts: int
    created_at: datetime
    updated_at: datetime


def list_jobs(
    session: Session, *, state: JobState | None = None, limit: int = 100, offset: int = 0
) -> list[JobRow]:
    """Newest first, optionally of one state (``failed`` for the dashboard's queue page)."""
    stmt = select(Job).order_by(Job.id.desc()).limit(limit).offset(offset)
    if state is not None:
        stmt = stmt.where(Job.state == state)
    return [
        JobRow(
            j.id,
            j.instance_id,
            str(j.kind),
            str(j.state),
            j.reason,
            j.attempts,
            j.created_at,
            j.updated_at,
        )
        for j in session.execute(stmt).scalars()
    ]


def retry_failed(session: Session, job_id: int, *, actor: str) -> bool:
    """Queue a failed job again with fresh attempts; False when it is not ``failed``.

    The old reason is kept in the audit event, so the history of why it failed survives.
    """
    job = session.execute(
        select(Job).where(Job.id == job_id).with_for_update()
    ).scalar_one_or_none()
    if job is None or job.state != JobState.FAILED:
        return False
    previous = job.reason
    job.state = JobState.QUEUED
    job.attempts = 0
    job.reason = None
    job.not_before = None
    job.lease_until = None
    job.worker_id = None
    job.updated_at = utcnow()
    append_event(
        session,
        actor=actor,
        action="job.retry",
        entity_type="instance",
        entity_id=job.instance_id,
        outcome="queued",
        detail={"job_id": job.id, "previous_reason": previous},
    )
    return True
