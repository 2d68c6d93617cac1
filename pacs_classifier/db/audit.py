"""The append-only, hash-chained audit trail.

Each event's ``hash`` is SHA-256 over ``prev_hash`` and the row's canonical content
(id, time, actor, action, entity, outcome, detail). Ids are assigned from the chain's tip
in ``audit_head``, which every append locks, so ids are gap-free and the chain is a single
line even with many writer processes: on PostgreSQL the ``FOR UPDATE`` row lock orders
them, on SQLite the ``BEGIN IMMEDIATE`` write transaction does. The tip row and the event
are written in the same transaction, so a committed tip always has all its events.

Editing a row breaks its hash (or, for ``prev_hash``, the link to the row before);
deleting one leaves its id missing; deleting the newest rows leaves ids missing below the
tip; a row inserted past the tip by hand is older than the tip that should cover it.
:func:`verify_chain` names the first bad row. Whoever can rewrite every row *and* the tip
can forge a consistent chain: the chain detects tampering, it does not prevent it.

An event is written inside the caller's transaction, so it commits or rolls back with the
action it describes.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from pacs_classifier.db.models import AuditEvent, AuditHead, utcnow

GENESIS_HASH = "0" * 64


def canonical_content(
    event_id: int,
    occurred_at: datetime,
    actor: str,
    action: str,
    entity_type: str | None,
    entity_id: str | None,
    outcome: str,
    detail: Mapping[str, Any],
) -> bytes:
    """The exact bytes that are hashed; stable across databases and drivers."""
    payload = {
        "id": event_id,
        "occurred_at": occurred_at.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
        "actor": actor,
        "action": action,
        "entity_type": entity_type,
        "entity_id": entity_id,
        "outcome": outcome,
        "detail": detail,
    }
    return json.dumps(
        payload, sort_keys=True, separators=(",", ":"), ensure_ascii=True, default=str
    ).encode("ascii")


def chain_hash(prev_hash: str, content: bytes) -> str:
    return hashlib.sha256(prev_hash.encode("ascii") + content).hexdigest()


def lock_chain(session: Session) -> None:
    """Take the chain's tip lock for the rest of ``session``'s transaction.

    Every :func:`append_event` takes it too; taking it first orders a whole unit of work
    (an ingest, its clean-up, a recovery) against the others on both databases (FOR
    UPDATE on PostgreSQL; SQLite's ``BEGIN IMMEDIATE`` already holds the write lock).
    """
    session.execute(select(AuditHead.id).where(AuditHead.id == 1).with_for_update())


def append_event(
    session: Session,
    *,
    actor: str,
    action: str,
    outcome: str,
    entity_type: str | None = None,
    entity_id: str | int | None = None,
    detail: Mapping[str, Any] | None = None,
) -> AuditEvent:
    """Append one event inside ``session``'s transaction and return it.

    ``detail`` must be JSON-serialisable; keep patient names out of it.
    """
    # populate_existing: if this session loaded the tip before (unlocked), the identity
    # map would hand back that stale copy and two writers would compute the same id.
    head = session.execute(
        select(AuditHead)
        .where(AuditHead.id == 1)
        .with_for_update()
        .execution_options(populate_existing=True)
    ).scalar_one()
    # Round-trip through JSON so what is hashed is exactly what the database returns;
    # NaN/Infinity are refused here because PostgreSQL's json type refuses them later.
    clean_detail: dict[str, Any] = json.loads(
        json.dumps(dict(detail or {}), default=str, allow_nan=False)
    )
    occurred_at = utcnow()
    event_id = head.last_id + 1
    ent_id = None if entity_id is None else str(entity_id)
    digest = chain_hash(
        head.last_hash,
        canonical_content(
            event_id, occurred_at, actor, action, entity_type, ent_id, outcome, clean_detail
        ),
    )
    event = AuditEvent(
        id=event_id,
        occurred_at=occurred_at,
        actor=actor,
        action=action,
        entity_type=entity_type,
        entity_id=ent_id,
        outcome=outcome,
        detail=clean_detail,
        prev_hash=head.last_hash,
        hash=digest,
    )
    session.add(event)
    head.last_id = event_id
    head.last_hash = digest
    session.flush()
    return event


@dataclass(frozen=True)
class ChainReport:
    """The outcome of :func:`verify_chain`."""

    ok: bool
    #: Events verified (all of them when ``ok``; those before the break otherwise).
    events: int
    #: The id of the first row that breaks the chain (or the missing id), when not ok.
    bad_id: int | None = None
    problem: str = ""

    def describe(self) -> str:
        """One line for people: ``ok N events`` or where and why the chain breaks."""
        if self.ok:
            return f"ok {self.events} events"
        where = f"event {self.bad_id}" if self.bad_id is not None else "the chain's tip"
        return f"audit chain broken at {where}: {self.problem}"


def verify_chain(session: Session, batch: int = 5000) -> ChainReport:
    """Walk the whole chain in id order and report the first broken link.

    The tip is read first and only events up to it are checked, so the result is right
    under any isolation level while other processes keep appending: a committed tip
    always comes with all its events, and newer events lie beyond it.
    """
    tip = _read_tip(session)
    if tip is None:
        return ChainReport(False, 0, None, "the audit_head row is missing")
    tip_id, tip_hash = tip
    expected_prev = GENESIS_HASH
    expected_id = 1
    for ev in _iter_events(session, batch, tip_id):
        if ev.id != expected_id:
            return ChainReport(
                False, expected_id - 1, expected_id, f"missing (the next stored is {ev.id})"
            )
        if ev.prev_hash != expected_prev:
            return ChainReport(
                False, ev.id - 1, ev.id, f"prev_hash does not match the hash of event {ev.id - 1}"
            )
        if event_hash(ev) != ev.hash:
            return ChainReport(False, ev.id - 1, ev.id, "content does not match its hash")
        expected_prev = ev.hash
        expected_id += 1
    count = expected_id - 1
    if count < tip_id:
        return ChainReport(False, count, count + 1, f"missing (the chain's tip is event {tip_id})")
    if expected_prev != tip_hash:
        return ChainReport(
            False, count - 1, tip_id, "hash does not match the chain's tip in audit_head"
        )
    forged = _first_beyond_tip(session, tip_id)
    if forged is not None:
        return ChainReport(
            False, count, forged, "stored beyond the chain's tip (not written by the audit writer)"
        )
    return ChainReport(True, count)


def event_hash(ev: AuditEvent) -> str:
    """The hash a stored event should carry, from its content and ``prev_hash``."""
    return chain_hash(
        ev.prev_hash,
        canonical_content(
            ev.id,
            ev.occurred_at,
            ev.actor,
            ev.action,
            ev.entity_type,
            ev.entity_id,
            ev.outcome,
            ev.detail,
        ),
    )


def _read_tip(session: Session) -> tuple[int, str] | None:
    row = session.execute(
        select(AuditHead.last_id, AuditHead.last_hash).where(AuditHead.id == 1)
    ).one_or_none()
    return None if row is None else (int(row[0]), str(row[1]))


def _first_beyond_tip(session: Session, tip_id: int) -> int | None:
    """The first row past the tip that no append accounts for, if any.

    Rows appended since the tip was read are legitimate; they come with a newer tip. So
    read the newest id first and the tip again afterwards: a row newer than both reads
    of the tip was not written by :func:`append_event`.
    """
    newest = session.scalar(select(func.max(AuditEvent.id)).where(AuditEvent.id > tip_id))
    if newest is None:
        return None
    latest = _read_tip(session)
    latest_id = latest[0] if latest is not None else tip_id
    if newest <= latest_id:
        return None
    return session.scalar(
        select(func.min(AuditEvent.id)).where(AuditEvent.id > latest_id, AuditEvent.id <= newest)
    )


def _iter_events(session: Session, batch: int, upto: int) -> Iterator[AuditEvent]:
    last = 0
    while True:
        rows = (
            session.execute(
                select(AuditEvent)
                .where(AuditEvent.id > last, AuditEvent.id <= upto)
                .order_by(AuditEvent.id)
                .limit(batch)
            )
            .scalars()
            .all()
        )
        if not rows:
            return
        yield from rows
        last = rows[-1].id
        # Keep memory flat on long chains; verify owns this session.
        session.expunge_all()
