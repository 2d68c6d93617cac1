"""Record a received instance: file, ``instances`` row, ``classify`` job and audit event.

One transaction per instance, kept small: the expensive part (fsync of the data) happens
before it. Inside it, the chain's tip is locked first, which serialises ingests (the
audit chain would serialise them anyway), so the duplicate check, the rename into the
final name and the inserts cannot race with another association storing the same
instance.

No file without a row, no row without a file. Before the rename an intent marker names
the final file (:meth:`Storage.write_intent`); it is dropped once the outcome is settled:

- the commit succeeds: the row references the file;
- the commit fails: a new session, holding the tip lock again, checks whether the row is
  there anyway (on PostgreSQL a COMMIT can succeed and its acknowledgement be lost with
  the connection). Row there: the file is kept and the instance counts as stored. Row
  absent: the file is removed before the lock is released, so an identical instance
  arriving on another association cannot rename its file into place in between.
  The check itself fails: the file *and* the marker are kept and the error is raised
  (the sender is told to retry), for :meth:`Ingestor.recover_pending` to settle;
- the process dies between the rename and the commit: the marker survives, and
  :meth:`Ingestor.recover_pending` (run by the listener at start-up) removes the file
  when no row references it. Such a file was never acknowledged, so the sender still
  holds the instance and sends it again.
"""

from __future__ import annotations

import enum
import logging
import os
import signal
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy import func, select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from pacs_classifier.db.audit import append_event, lock_chain
from pacs_classifier.db.engine import Database
from pacs_classifier.db.models import Instance, Job, JobKind, JobState
from pacs_classifier.errors import DatabaseUnavailable
from pacs_classifier.preprocess import reasons
from pacs_classifier.results.outbound import is_own_output
from pacs_classifier.store.storage import Intent, Storage, fsync_file

log = logging.getLogger(__name__)

ENTITY_INSTANCE = "instance"
ACTION_STORE = "store"
#: Audit action of :meth:`Ingestor.recover_pending` for a file it removed.
ACTION_RECOVER = "storage.recover"
OUTCOME_REMOVED = "removed"

#: Test hook: when this environment variable names a step of :meth:`Ingestor.ingest`
#: (:data:`CRASH_AFTER_RENAME`), the process kills itself there with SIGKILL, so a
#: crash in that window can be reproduced exactly. Inert when unset.
CRASH_AT_ENV = "PACS_CLASSIFIER_TEST_CRASH_AT"
#: The file has its final name; the transaction is not committed.
CRASH_AFTER_RENAME = "after_rename"


class IngestOutcome(enum.StrEnum):
    """The ``outcome`` of a ``store`` audit event."""

    STORED = "stored"
    NEW_VERSION = "new_version"
    DUPLICATE = "duplicate"


@dataclass(frozen=True)
class InstanceMeta:
    """What the database records about a received data set (SPEC §5 ``instances``)."""

    sop_class_uid: str
    sop_instance_uid: str
    study_instance_uid: str
    series_instance_uid: str
    accession_number: str | None
    patient_id: str | None
    study_date: str | None
    modality: str | None
    body_part: str | None
    view_position: str | None
    transfer_syntax_uid: str
    #: SHA-256 of the data set as received, without the file meta (it differs by sender).
    sha256: str
    file_size: int


@dataclass(frozen=True)
class IngestResult:
    outcome: IngestOutcome
    instance_id: int
    version: int
    file_path: Path
    job_id: int | None


@dataclass
class Recovery:
    """What :meth:`Ingestor.recover_pending` settled (``instances.file_path`` values)."""

    #: Files renamed into place but never committed, now removed (or already gone).
    removed: list[str] = field(default_factory=list)
    #: Files whose row was committed after all; only their marker was dropped.
    kept: list[str] = field(default_factory=list)
    #: Markers left for the next start (the database or the file system failed).
    unsettled: list[str] = field(default_factory=list)


def _crash_point(step: str) -> None:
    """Die here, as ``kill -9`` would, if :data:`CRASH_AT_ENV` names ``step`` (tests)."""
    if os.environ.get(CRASH_AT_ENV) == step:
        log.critical("%s=%s: killing this process", CRASH_AT_ENV, step)
        os.kill(os.getpid(), signal.SIGKILL)


class Ingestor:
    """Turns a received, fsynced temporary file into a committed instance version."""

    def __init__(
        self, db: Database, storage: Storage, *, on_queued: Callable[[], None] | None = None
    ) -> None:
        self.db = db
        self.storage = storage
        #: Called after a commit that queued a classification job (the wiring rings the
        #: worker's doorbell); it must not raise or block.
        self._on_queued = on_queued

    def ingest(
        self,
        tmp: Path,
        meta: InstanceMeta,
        *,
        actor: str,
        calling_ae: str | None,
        warnings: tuple[str, ...] = (),
    ) -> IngestResult:
        """Commit ``tmp`` (a temporary file under ``storage.tmp_dir``) as ``meta``.

        ``tmp`` is consumed: renamed into place or deleted. Raises
        :class:`~pacs_classifier.errors.DatabaseUnavailable` when the database cannot
        take the transaction; nothing is left behind then, except when the commit's
        outcome cannot be checked (see the module's docstring): the file and its intent
        marker stay for :meth:`recover_pending`. A new instance or version queued a job:
        ``on_queued`` is called after the commit.
        """
        result = self._commit(tmp, meta, actor=actor, calling_ae=calling_ae, warnings=warnings)
        if self._on_queued is not None and result.outcome is not IngestOutcome.DUPLICATE:
            self._on_queued()
        return result

    def _commit(
        self,
        tmp: Path,
        meta: InstanceMeta,
        *,
        actor: str,
        calling_ae: str | None,
        warnings: tuple[str, ...],
    ) -> IngestResult:
        final = self.storage.final_path(
            meta.study_instance_uid, meta.series_instance_uid, meta.sop_instance_uid, meta.sha256
        )
        fsync_file(tmp)
        marker: Path | None = None
        moving = False
        try:
            with self.db.session() as session:
                # Lock the audit chain's tip first: it orders concurrent ingests on both
                # databases (FOR UPDATE on PostgreSQL, BEGIN IMMEDIATE on SQLite).
                lock_chain(session)
                existing = _find_duplicate(session, meta)
                if existing is not None:
                    result = self._record_duplicate(session, existing, meta, actor)
                else:
                    # Announced while the lock is held, so a recovery (which takes it
                    # too) never mistakes a live marker for one left by a crash.
                    marker = self.storage.write_intent(final)
                    moving = True
                    self.storage.commit_file(tmp, final)
                    _crash_point(CRASH_AFTER_RENAME)
                    result = self._record_new(session, meta, final, actor, calling_ae, warnings)
        except BaseException as exc:
            if not moving:
                # Nothing has its final name. A marker a failed write_intent may have
                # left names no file, or an unreferenced one: recovery settles either.
                raise
            settled = self._settle_failed_commit(final, meta, marker, exc)
            if settled is None or not isinstance(exc, Exception):
                raise
            return settled
        finally:
            # Gone already once renamed; still there when the rename itself failed.
            self.storage.discard(tmp)
        if marker is not None:
            self.storage.clear_intent(marker)
        return result

    def _settle_failed_commit(
        self, final: Path, meta: InstanceMeta, marker: Path | None, exc: BaseException
    ) -> IngestResult | None:
        """After a failure past the rename: keep the file if its row made it, else remove it.

        Returns the committed instance when the row is there (the failure was only the
        acknowledgement of the COMMIT), ``None`` when the file was removed or when the
        check itself failed (then the file and the marker are kept for recovery).

        The check and the removal hold the chain's tip lock, as an ingest does from its
        duplicate check to its commit: another association storing the identical data
        set (same final path) cannot rename its file into place between our "no row"
        and our unlink, which would delete a file its committed row references.
        """
        file_path = self.storage.relative(final)
        try:
            with self.db.session() as session:
                lock_chain(session)
                committed = self._committed(session, final, meta)
                if committed is None:
                    self.storage.remove_final(final)
        except Exception as check_exc:  # any failure: the outcome is unknown
            log.error(
                "ingest of %s failed (%s) and whether its row was committed cannot be "
                "checked (%s): keeping the file and its intent marker for start-up recovery",
                file_path,
                exc,
                check_exc,
            )
            return None
        if committed is not None:
            log.warning(
                "ingest of %s reported a failure (%s) but its row was committed "
                "(instance %d): keeping the file",
                file_path,
                exc,
                committed.instance_id,
            )
        if marker is not None:
            self.storage.clear_intent(marker)
        return committed

    def _committed(self, session: Session, final: Path, meta: InstanceMeta) -> IngestResult | None:
        """The committed instance whose file is ``final``."""
        row = session.execute(
            select(Instance).where(
                Instance.sop_instance_uid == meta.sop_instance_uid,
                Instance.file_path == self.storage.relative(final),
                Instance.file_sha256 == meta.sha256,
            )
        ).scalar_one_or_none()
        if row is None:
            return None
        job_id = session.execute(
            select(func.min(Job.id)).where(Job.instance_id == row.id, Job.kind == JobKind.CLASSIFY)
        ).scalar_one()
        outcome = IngestOutcome.STORED if row.version == 1 else IngestOutcome.NEW_VERSION
        return IngestResult(outcome, row.id, row.version, final, job_id)

    # ------------------------------------------------------------------ recovery

    def recover_pending(self, actor: str) -> Recovery:
        """Settle the intent markers in ``.pending``; run at start-up, before serving.

        For each marker: if an ``instances`` row has its file path, the commit made it
        and only the marker goes; otherwise the file is removed (it was never
        acknowledged, so the sender still holds the instance), the removal is audited
        (``storage.recover``, outcome ``removed``) and the marker goes. A failing
        database stops the pass and leaves the remaining markers for the next start.
        """
        recovery = Recovery()
        for intent in self.storage.pending_intents():
            try:
                removed = self._settle_intent(intent, actor)
            except (DatabaseUnavailable, SQLAlchemyError) as exc:
                log.error("cannot settle intent markers in %s: %s", self.storage.pending_dir, exc)
                recovery.unsettled.append(intent.file_path)
                break
            except OSError as exc:
                log.error("cannot remove %s: %s", intent.final, exc)
                recovery.unsettled.append(intent.file_path)
                continue
            (recovery.removed if removed else recovery.kept).append(intent.file_path)
            self.storage.clear_intent(intent.marker)
        if recovery.removed:
            log.warning(
                "removed %d file(s) renamed into place but never committed: %s",
                len(recovery.removed),
                ", ".join(recovery.removed),
            )
        return recovery

    def _settle_intent(self, intent: Intent, actor: str) -> bool:
        """Remove ``intent``'s file unless a row references it; ``True`` if removed."""
        with self.db.session() as session:
            # The tip lock: an ingest holds it from its marker to its commit, so a marker
            # seen here with no row is not one whose commit is still under way.
            lock_chain(session)
            row_id = session.execute(
                select(Instance.id).where(
                    Instance.sop_instance_uid == intent.sop_instance_uid,
                    Instance.file_path == intent.file_path,
                )
            ).scalar_one_or_none()
            if row_id is not None:
                log.info(
                    "%s was committed (instance %d); dropping its marker", intent.file_path, row_id
                )
                return False
            existed = intent.final.exists()
            # Removed while the lock is held: no ingest can rename the same file meanwhile.
            self.storage.remove_final(intent.final)
            append_event(
                session,
                actor=actor,
                action=ACTION_RECOVER,
                outcome=OUTCOME_REMOVED,
                entity_type=ENTITY_INSTANCE,
                entity_id=intent.sop_instance_uid,
                detail={
                    "file_path": intent.file_path,
                    "file_existed": existed,
                    "reason": "renamed into place but never committed (never acknowledged)",
                },
            )
        return True

    def _record_duplicate(
        self, session: Session, existing: Instance, meta: InstanceMeta, actor: str
    ) -> IngestResult:
        append_event(
            session,
            actor=actor,
            action=ACTION_STORE,
            outcome=IngestOutcome.DUPLICATE,
            entity_type=ENTITY_INSTANCE,
            entity_id=existing.id,
            detail={
                "sop_instance_uid": meta.sop_instance_uid,
                "sha256": meta.sha256,
                "version": existing.version,
                "transfer_syntax_uid": meta.transfer_syntax_uid,
            },
        )
        return IngestResult(
            IngestOutcome.DUPLICATE,
            existing.id,
            existing.version,
            self.storage.root / existing.file_path,
            None,
        )

    def _record_new(
        self,
        session: Session,
        meta: InstanceMeta,
        final: Path,
        actor: str,
        calling_ae: str | None,
        warnings: tuple[str, ...],
    ) -> IngestResult:
        previous = session.execute(
            select(func.max(Instance.version)).where(
                Instance.sop_instance_uid == meta.sop_instance_uid
            )
        ).scalar_one()
        version = 1 if previous is None else previous + 1
        instance = Instance(
            sop_instance_uid=meta.sop_instance_uid,
            study_instance_uid=meta.study_instance_uid,
            series_instance_uid=meta.series_instance_uid,
            sop_class_uid=meta.sop_class_uid,
            accession_number=meta.accession_number,
            patient_id=meta.patient_id,
            study_date=meta.study_date,
            modality=meta.modality,
            body_part=meta.body_part,
            view_position=meta.view_position,
            calling_ae=calling_ae,
            file_path=self.storage.relative(final),
            file_sha256=meta.sha256,
            file_size=meta.file_size,
            transfer_syntax_uid=meta.transfer_syntax_uid,
            version=version,
        )
        session.add(instance)
        session.flush()
        job = Job(instance_id=instance.id, kind=JobKind.CLASSIFY)
        own = is_own_output(session, meta.sop_instance_uid)
        if own:
            # An SR or overlay we made, echoed back by a PACS that forwards everything:
            # kept like any instance, never classified (an overlay is not a radiograph).
            job.state = JobState.NOT_ASSESSED
            job.reason = reasons.OWN_OUTPUT
        session.add(job)
        session.flush()
        outcome = IngestOutcome.STORED if version == 1 else IngestOutcome.NEW_VERSION
        append_event(
            session,
            actor=actor,
            action=ACTION_STORE,
            outcome=outcome,
            entity_type=ENTITY_INSTANCE,
            entity_id=instance.id,
            detail={
                "sop_instance_uid": meta.sop_instance_uid,
                "sha256": meta.sha256,
                "version": version,
                "job_id": job.id,
                "file_path": instance.file_path,
                "transfer_syntax_uid": meta.transfer_syntax_uid,
                **({"not_assessed": reasons.OWN_OUTPUT} if own else {}),
            },
        )
        if warnings:
            log.warning(
                "instance %s: %s not conformant (a component with a leading zero); "
                "accepted and audited",
                meta.sop_instance_uid,
                ", ".join(warnings),
            )
            append_event(
                session,
                actor=actor,
                action="uid_leading_zero",
                outcome="warning",
                entity_type=ENTITY_INSTANCE,
                entity_id=instance.id,
                detail={"attributes": list(warnings), "sop_instance_uid": meta.sop_instance_uid},
            )
        return IngestResult(outcome, instance.id, version, final, job.id)


def _find_duplicate(session: Session, meta: InstanceMeta) -> Instance | None:
    return session.execute(
        select(Instance).where(
            Instance.sop_instance_uid == meta.sop_instance_uid,
            Instance.file_sha256 == meta.sha256,
        )
    ).scalar_one_or_none()
