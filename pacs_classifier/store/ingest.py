"""Record a received instance: file, ``instances`` row, ``classify`` job and audit event.

One transaction per instance, kept small: the expensive part (fsync of the data) happens
before it. Inside it, the chain's tip is locked first, which serialises ingests (the
audit chain would serialise them anyway), so the duplicate check, the rename into the
final name and the inserts cannot race with another association storing the same
instance. If the commit fails, the renamed file is removed again: no file without a row
is left behind, and no row without a file can exist.
"""

from __future__ import annotations

import enum
import logging
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from pacs_classifier.db.audit import append_event
from pacs_classifier.db.engine import Database
from pacs_classifier.db.models import AuditHead, Instance, Job, JobKind
from pacs_classifier.store.storage import Storage, fsync_file

log = logging.getLogger(__name__)

ENTITY_INSTANCE = "instance"
ACTION_STORE = "store"


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


class Ingestor:
    """Turns a received, fsynced temporary file into a committed instance version."""

    def __init__(self, db: Database, storage: Storage) -> None:
        self.db = db
        self.storage = storage

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
        take the transaction; nothing is left behind then.
        """
        final = self.storage.final_path(
            meta.study_instance_uid, meta.series_instance_uid, meta.sop_instance_uid, meta.sha256
        )
        fsync_file(tmp)
        renamed = False
        try:
            with self.db.session() as session:
                # Lock the audit chain's tip first: it orders concurrent ingests on both
                # databases (FOR UPDATE on PostgreSQL, BEGIN IMMEDIATE on SQLite).
                session.execute(select(AuditHead.id).where(AuditHead.id == 1).with_for_update())
                existing = _find_duplicate(session, meta)
                if existing is not None:
                    result = self._record_duplicate(session, existing, meta, actor)
                else:
                    self.storage.commit_file(tmp, final)
                    renamed = True
                    result = self._record_new(session, meta, final, actor, calling_ae, warnings)
        except BaseException:
            if renamed:
                self.storage.remove_final(final)
            raise
        finally:
            if not renamed:
                self.storage.discard(tmp)
        return result

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
            },
        )
        if warnings:
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
