"""The SQL schema (SPEC §5) as typed SQLAlchemy 2 models.

The database is created only by the Alembic migrations in ``migrations/``; a test checks
that the migrated schema equals these models. All times are timezone-aware UTC.
"""

from __future__ import annotations

import enum
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Enum,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
    text,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def utcnow() -> datetime:
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """A timestamp stored as UTC and always returned timezone-aware.

    SQLite has no time zone type; PostgreSQL's ``timestamptz`` would return the
    session's zone. Both come back as UTC-aware ``datetime`` objects here.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError(f"naive datetime given for a UTC column: {value!r}")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class JobKind(enum.StrEnum):
    CLASSIFY = "classify"
    RECLASSIFY = "reclassify"


class JobState(enum.StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    NOT_ASSESSED = "not_assessed"
    FAILED = "failed"


class Label(enum.StrEnum):
    PNEUMONIA = "PNEUMONIA"
    NORMAL = "NORMAL"


class RunTrigger(enum.StrEnum):
    SCHEDULE = "schedule"
    CLI = "cli"


class RunState(enum.StrEnum):
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"


def _enum(cls: type[enum.StrEnum], name: str) -> Enum:
    # Stored as VARCHAR + CHECK on both databases, so adding a value is a plain migration.
    return Enum(
        cls,
        name=name,
        native_enum=False,
        create_constraint=True,
        length=16,
        values_callable=lambda e: [m.value for m in e],
    )


class Instance(Base):
    """One stored instance *version*: a re-send with other content is a new row."""

    __tablename__ = "instances"
    __table_args__ = (
        UniqueConstraint("sop_instance_uid", "file_sha256", name="uq_instances_sop_sha"),
        Index("ix_instances_study_instance_uid", "study_instance_uid"),
        Index("ix_instances_received_at", "received_at"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    sop_instance_uid: Mapped[str] = mapped_column(String(64), index=True)
    study_instance_uid: Mapped[str | None] = mapped_column(String(64))
    series_instance_uid: Mapped[str | None] = mapped_column(String(64))
    sop_class_uid: Mapped[str] = mapped_column(String(64))
    accession_number: Mapped[str | None] = mapped_column(String(64))
    patient_id: Mapped[str | None] = mapped_column(String(64))
    study_date: Mapped[str | None] = mapped_column(String(8))
    modality: Mapped[str | None] = mapped_column(String(16))
    body_part: Mapped[str | None] = mapped_column(String(64))
    view_position: Mapped[str | None] = mapped_column(String(16))
    calling_ae: Mapped[str | None] = mapped_column(String(16))
    received_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    file_path: Mapped[str] = mapped_column(Text)
    file_sha256: Mapped[str] = mapped_column(String(64))
    file_size: Mapped[int] = mapped_column(BigInteger)
    transfer_syntax_uid: Mapped[str | None] = mapped_column(String(64))
    version: Mapped[int] = mapped_column(Integer, default=1)


class Job(Base):
    __tablename__ = "jobs"
    __table_args__ = (
        Index("ix_jobs_state_lease_until", "state", "lease_until"),
        Index("ix_jobs_instance_id", "instance_id"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    instance_id: Mapped[int] = mapped_column(ForeignKey("instances.id"))
    kind: Mapped[JobKind] = mapped_column(_enum(JobKind, "job_kind"))
    state: Mapped[JobState] = mapped_column(_enum(JobState, "job_state"), default=JobState.QUEUED)
    reason: Mapped[str | None] = mapped_column(Text)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    lease_until: Mapped[datetime | None] = mapped_column(UTCDateTime())
    #: When a queued job may next be claimed (retry backoff); null means now.
    not_before: Mapped[datetime | None] = mapped_column(UTCDateTime())
    #: The reclassification run that queued this job, if any.
    run_id: Mapped[int | None] = mapped_column(ForeignKey("reclassification_runs.id"))
    worker_id: Mapped[str | None] = mapped_column(String(128))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow, onupdate=utcnow)


class Model(Base):
    __tablename__ = "models"
    __table_args__ = (
        # At most one active model, enforced by the database rather than by care.
        Index(
            "uq_models_single_active",
            "active",
            unique=True,
            sqlite_where=text("active"),
            postgresql_where=text("active"),
        ),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    version: Mapped[str] = mapped_column(String(64), unique=True)
    path: Mapped[str] = mapped_column(Text)
    sha256: Mapped[str] = mapped_column(String(64))
    threshold: Mapped[float] = mapped_column(Float)
    image_size: Mapped[int] = mapped_column(Integer)
    metrics: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    registered_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    active: Mapped[bool] = mapped_column(Boolean, default=False)


class Prediction(Base):
    """Append-only. Exactly one row per (instance version, model, run)."""

    __tablename__ = "predictions"
    __table_args__ = (
        Index("ix_predictions_instance_id_id", "instance_id", "id"),
        # run_id is NULL for live classification, and NULLs never collide in a unique
        # index, so the key is on run_key (run_id or 0).
        Index(
            "uq_predictions_instance_model_run", "instance_id", "model_id", "run_key", unique=True
        ),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    instance_id: Mapped[int] = mapped_column(ForeignKey("instances.id"))
    model_id: Mapped[int] = mapped_column(ForeignKey("models.id"))
    probability: Mapped[float] = mapped_column(Float)
    label: Mapped[Label] = mapped_column(_enum(Label, "label"))
    threshold: Mapped[float] = mapped_column(Float)
    run_id: Mapped[int | None] = mapped_column(ForeignKey("reclassification_runs.id"))
    #: ``run_id`` or 0 for live classification: a unique key that NULL cannot dodge.
    run_key: Mapped[int] = mapped_column(Integer, default=0)
    job_id: Mapped[int | None] = mapped_column(ForeignKey("jobs.id"))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


class ReclassificationRun(Base):
    __tablename__ = "reclassification_runs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    trigger: Mapped[RunTrigger] = mapped_column(_enum(RunTrigger, "run_trigger"))
    model_id: Mapped[int] = mapped_column(ForeignKey("models.id"))
    started_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    instances_total: Mapped[int] = mapped_column(Integer, default=0)
    instances_done: Mapped[int] = mapped_column(Integer, default=0)
    labels_changed: Mapped[int] = mapped_column(Integer, default=0)
    state: Mapped[RunState] = mapped_column(_enum(RunState, "run_state"), default=RunState.RUNNING)


class ResultKind(enum.StrEnum):
    """A DICOM object made from a result (SPEC §11)."""

    SR = "sr"
    SC = "sc"


class ResultObject(Base):
    """One DICOM object made from a prediction (or a not-assessed job), and its render job.

    The UIDs are chosen when the row is inserted (with the prediction), so rendering
    again after a crash, or sending again after a failure, always yields the same object.
    ``state`` is the render job's (``queued → running → done | failed``); ``file_path``
    (relative to the storage root) is set once the object is written.
    """

    __tablename__ = "result_objects"
    __table_args__ = (
        Index("ix_result_objects_state_lease_until", "state", "lease_until"),
        Index("ix_result_objects_instance_id", "instance_id"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    instance_id: Mapped[int] = mapped_column(ForeignKey("instances.id"))
    #: The prediction it reports; None for the SR of a not-assessed instance
    #: (``[results] sr_not_assessed``), which reports ``job_id``'s reason instead.
    prediction_id: Mapped[int | None] = mapped_column(ForeignKey("predictions.id"))
    #: The classification job that ended not assessed (set only where prediction_id is None).
    job_id: Mapped[int | None] = mapped_column(ForeignKey("jobs.id"))
    #: The model that was active then (set only where prediction_id is None).
    model_id: Mapped[int | None] = mapped_column(ForeignKey("models.id"))
    kind: Mapped[ResultKind] = mapped_column(_enum(ResultKind, "result_kind"))
    sop_class_uid: Mapped[str] = mapped_column(String(64))
    sop_instance_uid: Mapped[str] = mapped_column(String(64), unique=True)
    series_instance_uid: Mapped[str] = mapped_column(String(64))
    study_instance_uid: Mapped[str] = mapped_column(String(64))
    #: The SR this one supersedes (Predecessor Documents Sequence), if any.
    predecessor_id: Mapped[int | None] = mapped_column(ForeignKey("result_objects.id"))
    state: Mapped[JobState] = mapped_column(
        _enum(JobState, "result_state"), default=JobState.QUEUED
    )
    reason: Mapped[str | None] = mapped_column(Text)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    lease_until: Mapped[datetime | None] = mapped_column(UTCDateTime())
    not_before: Mapped[datetime | None] = mapped_column(UTCDateTime())
    worker_id: Mapped[str | None] = mapped_column(String(128))
    file_path: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow, onupdate=utcnow)


class SendJob(Base):
    """One C-STORE of one result object to one destination (its AE title), under a lease."""

    __tablename__ = "send_jobs"
    __table_args__ = (
        UniqueConstraint("object_id", "destination", name="uq_send_jobs_object_destination"),
        Index("ix_send_jobs_state_lease_until", "state", "lease_until"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    object_id: Mapped[int] = mapped_column(ForeignKey("result_objects.id"))
    destination: Mapped[str] = mapped_column(String(16))
    state: Mapped[JobState] = mapped_column(_enum(JobState, "send_state"), default=JobState.QUEUED)
    reason: Mapped[str | None] = mapped_column(Text)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    lease_until: Mapped[datetime | None] = mapped_column(UTCDateTime())
    not_before: Mapped[datetime | None] = mapped_column(UTCDateTime())
    worker_id: Mapped[str | None] = mapped_column(String(128))
    sent_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow, onupdate=utcnow)


class AuditEvent(Base):
    """Append-only, hash-chained: ``hash = sha256(prev_hash + canonical row)``."""

    __tablename__ = "audit_events"
    #: /metrics counts associations and C-STOREs by action and outcome on every scrape.
    __table_args__ = (Index("ix_audit_events_action_outcome", "action", "outcome"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    occurred_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    actor: Mapped[str] = mapped_column(String(128))
    action: Mapped[str] = mapped_column(String(64))
    entity_type: Mapped[str | None] = mapped_column(String(32))
    entity_id: Mapped[str | None] = mapped_column(String(128))
    outcome: Mapped[str] = mapped_column(String(32))
    detail: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    prev_hash: Mapped[str] = mapped_column(String(64))
    hash: Mapped[str] = mapped_column(String(64), unique=True)


class AuditHead(Base):
    """A single row holding the chain's tip; locking it serialises appends.

    On PostgreSQL ``SELECT … FOR UPDATE`` on this row orders concurrent writers from any
    number of processes; on SQLite the write transaction itself does (``BEGIN IMMEDIATE``).
    """

    __tablename__ = "audit_head"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    last_id: Mapped[int] = mapped_column(Integer, default=0)
    last_hash: Mapped[str] = mapped_column(String(64))


class UserRole(enum.StrEnum):
    """What a dashboard account may do: viewers read, admins also retry failed jobs."""

    VIEWER = "viewer"
    ADMIN = "admin"


class User(Base):
    """A local dashboard and API account (``pacs-classifier user add``)."""

    __tablename__ = "users"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    role: Mapped[UserRole] = mapped_column(_enum(UserRole, "user_role"))
    #: An argon2id hash (the PHC string, parameters included); never the password.
    password_hash: Mapped[str] = mapped_column(String(255))
    active: Mapped[bool] = mapped_column(Boolean, default=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    disabled_at: Mapped[datetime | None] = mapped_column(UTCDateTime())


class WebSession(Base):
    """A dashboard login. The cookie holds a random token; only its SHA-256 is stored."""

    __tablename__ = "web_sessions"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    token_sha256: Mapped[str] = mapped_column(String(64), unique=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id"), index=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime())
    #: Set by logout; an ended session is refused even before it expires.
    ended_at: Mapped[datetime | None] = mapped_column(UTCDateTime())


class ApiToken(Base):
    """A bearer token for machine clients of ``/api/v1``, acting as its user."""

    __tablename__ = "api_tokens"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id"), index=True)
    name: Mapped[str] = mapped_column(String(64))
    token_sha256: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime())


class SchedulerJob(Base):
    """APScheduler 3's SQLAlchemyJobStore table, created here so migrations own the schema."""

    __tablename__ = "apscheduler_jobs"

    id: Mapped[str] = mapped_column(String(191), primary_key=True)
    next_run_time: Mapped[float | None] = mapped_column(Float(25), index=True)
    job_state: Mapped[bytes] = mapped_column(LargeBinary)


class SchedulerLock(Base):
    """Leader lease for the scheduler role on SQLite (PostgreSQL uses an advisory lock)."""

    __tablename__ = "scheduler_lock"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    holder: Mapped[str] = mapped_column(String(128))
    lease_until: Mapped[datetime] = mapped_column(UTCDateTime())


# The reporting views (v_latest_predictions, v_results) are defined once, in the migration
# that creates them (migrations/versions/0001_initial_schema.py): a migration must keep
# the SQL it ran, and a second copy here could drift unseen. tests/test_views.py checks them.
