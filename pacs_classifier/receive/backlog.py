"""The listener's audit events that could not be written at once, kept until they are.

An association is audited when it is accepted, rejected or aborted, outside any
C-STORE transaction. If the database is locked or down at that moment the event must
not be lost (it was only logged before): :class:`AuditBacklog` writes it at once when
it can, and otherwise keeps it, in order, and a background thread retries every
``retry_s``. While more than ``capacity`` events wait, :attr:`full` is true and the
listener refuses new associations (A-ASSOCIATE-RJ, transient, local limit exceeded):
the work that would have to be audited is refused rather than done unaudited.

Events from the accept thread (refused connections) are only queued
(:meth:`submit`): that thread never waits on the database.

At :meth:`stop`, what still cannot be written is logged, one line per event with its
content, so that the trail can be completed by hand.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy.exc import SQLAlchemyError

from pacs_classifier.db.audit import append_event
from pacs_classifier.db.engine import Database
from pacs_classifier.db.models import utcnow
from pacs_classifier.errors import DatabaseUnavailable

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PendingEvent:
    """One audit event as :func:`~pacs_classifier.db.audit.append_event` takes it."""

    actor: str
    action: str
    outcome: str
    entity_type: str | None = None
    entity_id: str | None = None
    detail: dict[str, Any] = field(default_factory=dict)
    #: When it happened; written into the detail if the event is written late.
    at: datetime = field(default_factory=utcnow)


class AuditBacklog:
    """Write audit events now, or keep and retry them; never drop one."""

    def __init__(self, db: Database, *, capacity: int = 10_000, retry_s: float = 1.0) -> None:
        self.db = db
        self.capacity = capacity
        self.retry_s = retry_s
        self._queue: deque[PendingEvent] = deque()
        self._lock = threading.Lock()
        #: Serialises writers so the queued events keep their order.
        self._write_lock = threading.Lock()
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def pending(self) -> int:
        with self._lock:
            return len(self._queue)

    @property
    def full(self) -> bool:
        """True while new work must be refused: too many events wait."""
        return self.pending >= self.capacity

    def write(self, event: PendingEvent) -> bool:
        """Write ``event`` now if nothing is waiting before it; else keep it. True: written."""
        with self._lock:
            queued = bool(self._queue)
            if queued:
                self._queue.append(event)
        if queued:
            self._wake.set()
            return False
        try:
            with self._write_lock:
                self._write([event], late=False)
            return True
        except (DatabaseUnavailable, SQLAlchemyError) as exc:
            log.warning(
                "audit %s/%s kept for retry: %s",
                event.action,
                event.outcome,
                str(exc).splitlines()[0],
            )
            self.submit(event)
            return False

    def submit(self, event: PendingEvent) -> None:
        """Keep ``event`` for the background writer (never blocks on the database)."""
        with self._lock:
            self._queue.append(event)
        self._wake.set()

    def flush(self) -> bool:
        """Write what waits, in order, in one transaction. True when nothing is left."""
        with self._write_lock:
            with self._lock:
                batch = list(self._queue)
            if not batch:
                return True
            try:
                self._write(batch, late=True)
            except (DatabaseUnavailable, SQLAlchemyError) as exc:
                log.warning(
                    "%d audit events still waiting: %s", len(batch), str(exc).splitlines()[0]
                )
                return False
            with self._lock:
                for _ in batch:
                    self._queue.popleft()
                return not self._queue

    def _write(self, events: list[PendingEvent], *, late: bool) -> None:
        with self.db.session() as session:
            for e in events:
                detail = {**e.detail, "occurred_at": e.at.isoformat()} if late else e.detail
                append_event(
                    session,
                    actor=e.actor,
                    action=e.action,
                    outcome=e.outcome,
                    entity_type=e.entity_type,
                    entity_id=e.entity_id,
                    detail=detail,
                )

    def start(self) -> None:
        """Start the background writer."""
        if self._thread is not None:
            return
        self._stopping.clear()
        self._thread = threading.Thread(target=self._run, name="audit-backlog", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stopping.is_set():
            self._wake.wait(self.retry_s)
            self._wake.clear()
            if self.pending and not self.flush():
                self._stopping.wait(self.retry_s)

    def stop(self) -> None:
        """Stop the writer after a last attempt; log each event that is still unwritten."""
        self._stopping.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None
        if self.flush():
            return
        with self._lock:
            left, self._queue = list(self._queue), deque()
        for e in left:
            log.error(
                "audit event not written: at=%s actor=%s action=%s outcome=%s entity=%s/%s "
                "detail=%s",
                e.at.isoformat(),
                e.actor,
                e.action,
                e.outcome,
                e.entity_type,
                e.entity_id,
                e.detail,
            )
