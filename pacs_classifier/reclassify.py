"""Reclassification runs (SPEC §7): the nightly job and ``reclassify`` share this code.

A run is a ``reclassification_runs`` row plus one ``reclassify`` job per instance, all
through the same queue and workers as live traffic. It selects every *assessed* instance
(one that has a prediction) whose latest prediction was not made by the active model, or
all assessed instances with ``all_instances``; ``since``/``until`` bound ``received_at``.
An instance that already has a queued or running job is left to that job.

Predictions are appended with the run's id (never overwritten). :class:`RunLifecycle` is
the one owner of a run after it starts: the wiring hands its :meth:`RunLifecycle.jobs_ended`
to every job queue it builds (``JobQueue(on_ended=...)``), so whichever process ends a
run's jobs (a ``serve`` worker, ``reclassify``'s own, a lease reclaimed after a crash)
updates its progress; when the last one ends it counts the instances done and the labels
that changed against each instance's previous latest prediction, and closes the run.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import and_, exists, func, select, update
from sqlalchemy.orm import Session, aliased

from pacs_classifier.db.audit import append_event
from pacs_classifier.db.engine import Database
from pacs_classifier.db.models import (
    Instance,
    Job,
    JobKind,
    JobState,
    Prediction,
    ReclassificationRun,
    RunState,
    RunTrigger,
    utcnow,
)
from pacs_classifier.errors import PermanentError
from pacs_classifier.model.registry import active_model
from pacs_classifier.queue.jobs import OPEN_STATES, EndedJob, enqueue

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunSummary:
    """A run as reported to people."""

    id: int
    trigger: str
    state: str
    model_version: str
    instances_total: int
    instances_done: int
    labels_changed: int
    started_at: datetime
    finished_at: datetime | None


def start_run(
    db: Database,
    *,
    trigger: RunTrigger,
    actor: str,
    since: datetime | None = None,
    until: datetime | None = None,
    all_instances: bool = False,
) -> int:
    """Create a run and queue its jobs in one transaction; return the run id.

    A run with nothing to do is recorded and closed at once, so the nightly history shows
    that it ran.
    """
    with db.session() as session:
        model = active_model(session)
        if model is None:
            raise PermanentError("no active model: register and activate one first")
        instance_ids = select_instances(
            session, model.id, since=since, until=until, all_instances=all_instances
        )
        now = utcnow()
        run = ReclassificationRun(
            trigger=trigger,
            model_id=model.id,
            started_at=now,
            instances_total=len(instance_ids),
            instances_done=0,
            labels_changed=0,
            state=RunState.RUNNING if instance_ids else RunState.DONE,
            finished_at=None if instance_ids else now,
        )
        session.add(run)
        session.flush()
        for instance_id in instance_ids:
            enqueue(session, instance_id, kind=JobKind.RECLASSIFY, run_id=run.id)
        append_event(
            session,
            actor=actor,
            action="reclassify.start",
            entity_type="run",
            entity_id=run.id,
            outcome="ok" if instance_ids else "nothing_to_do",
            detail={
                "trigger": str(trigger),
                "model_version": model.version,
                "instances": len(instance_ids),
                "since": since.isoformat() if since else None,
                "until": until.isoformat() if until else None,
                "all": all_instances,
            },
        )
        run_id = run.id
    log.info("reclassification run %d: %d instance(s) queued", run_id, len(instance_ids))
    return run_id


def select_instances(
    session: Session,
    model_id: int,
    *,
    since: datetime | None = None,
    until: datetime | None = None,
    all_instances: bool = False,
) -> list[int]:
    """Ids of the instances a run takes (see the module docstring)."""
    latest = (
        select(func.max(Prediction.id))
        .where(Prediction.instance_id == Instance.id)
        .correlate(Instance)
        .scalar_subquery()
    )
    p = aliased(Prediction)
    query = (
        select(Instance.id)
        .join(p, p.id == latest)
        .where(
            ~exists().where(
                Job.instance_id == Instance.id,
                Job.state.in_(OPEN_STATES),
            )
        )
        .order_by(Instance.id)
    )
    if not all_instances:
        query = query.where(p.model_id != model_id)
    if since is not None:
        query = query.where(Instance.received_at >= since)
    if until is not None:
        query = query.where(Instance.received_at < until)
    return list(session.execute(query).scalars())


class RunLifecycle:
    """Progress and close the runs whose jobs end: the queue's ``on_ended`` hook."""

    def __init__(self, db: Database) -> None:
        self.db = db

    def jobs_ended(self, jobs: Sequence[EndedJob], actor: str) -> None:
        """Called after jobs ended: update (and maybe close) the runs they belong to."""
        runs = {j.run_id for j in jobs if j.kind == JobKind.RECLASSIFY and j.run_id is not None}
        finish_runs(self.db, runs, actor=actor)

    def settle(self, actor: str) -> None:
        """Close the running runs that have no open job left.

        A process killed between ending a run's last job and calling the hook leaves the
        run open; the worker role calls this once when it starts.
        """
        with self.db.read_session() as session:
            stale = list(
                session.execute(
                    select(ReclassificationRun.id).where(
                        ReclassificationRun.state == RunState.RUNNING,
                        ~exists().where(
                            Job.run_id == ReclassificationRun.id, Job.state.in_(OPEN_STATES)
                        ),
                    )
                ).scalars()
            )
        finish_runs(self.db, stale, actor=actor)


def finish_runs(db: Database, run_ids: Iterable[int], *, actor: str) -> None:
    """Update the progress of running runs and close those whose jobs have all ended."""
    for run_id in sorted(set(run_ids)):
        with db.session() as session:
            _update_run(session, run_id, actor)


def _update_run(session: Session, run_id: int, actor: str) -> None:
    pending = session.scalar(
        select(func.count())
        .select_from(Job)
        .where(Job.run_id == run_id, Job.state.in_(OPEN_STATES))
    )
    done = session.scalar(
        select(func.count()).select_from(Prediction).where(Prediction.run_id == run_id)
    )
    if pending:
        session.execute(
            update(ReclassificationRun)
            .where(ReclassificationRun.id == run_id, ReclassificationRun.state == RunState.RUNNING)
            .values(instances_done=done)
        )
        return
    changed = count_label_changes(session, run_id)
    failed = session.scalar(
        select(func.count())
        .select_from(Job)
        .where(Job.run_id == run_id, Job.state != JobState.DONE)
    )
    # Guarded on state: two workers finishing the last jobs at once close the run once.
    result = session.execute(
        update(ReclassificationRun)
        .where(ReclassificationRun.id == run_id, ReclassificationRun.state == RunState.RUNNING)
        .values(
            instances_done=done,
            labels_changed=changed,
            state=RunState.DONE,
            finished_at=utcnow(),
        )
    )
    if int(result.rowcount) != 1:  # type: ignore[attr-defined]
        return
    append_event(
        session,
        actor=actor,
        action="reclassify.finish",
        entity_type="run",
        entity_id=run_id,
        outcome="ok",
        detail={"instances_done": done, "labels_changed": changed, "jobs_not_done": failed},
    )
    log.info(
        "reclassification run %d finished: %s instance(s), %d label(s) changed",
        run_id,
        done,
        changed,
    )


def count_label_changes(session: Session, run_id: int) -> int:
    """Predictions of the run whose label differs from the instance's previous latest one."""
    new = aliased(Prediction)
    old = aliased(Prediction)
    previous = (
        select(func.max(old.id))
        .where(old.instance_id == new.instance_id, old.id < new.id)
        .correlate(new)
        .scalar_subquery()
    )
    prior = aliased(Prediction)
    query = (
        select(func.count())
        .select_from(new)
        .join(prior, and_(prior.id == previous))
        .where(new.run_id == run_id, prior.label != new.label)
    )
    return int(session.scalar(query) or 0)


def run_summary(session: Session, run_id: int) -> RunSummary:
    """The run row with its model's version."""
    from pacs_classifier.db.models import Model

    row = session.execute(
        select(ReclassificationRun, Model.version)
        .join(Model, Model.id == ReclassificationRun.model_id)
        .where(ReclassificationRun.id == run_id)
    ).one_or_none()
    if row is None:
        raise PermanentError(f"no reclassification run {run_id}")
    run, version = row
    return RunSummary(
        id=run.id,
        trigger=str(run.trigger),
        state=str(run.state),
        model_version=version,
        instances_total=run.instances_total,
        instances_done=run.instances_done,
        labels_changed=run.labels_changed,
        started_at=run.started_at,
        finished_at=run.finished_at,
    )


def run_finished(db: Database, run_id: int) -> bool:
    """True once the run is no longer running."""
    with db.read_session() as session:
        state = session.scalar(
            select(ReclassificationRun.state).where(ReclassificationRun.id == run_id)
        )
    return state is not None and state != RunState.RUNNING
