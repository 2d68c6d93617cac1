"""The append-only, hash-chained audit trail.

Each event's ``hash`` is SHA-256 over ``prev_hash`` and the row's canonical content
(id, time, actor, action, entity, outcome, detail). Ids are assigned from the chain's tip
in ``audit_head``, which every append locks, so ids are gap-free and the chain is a single
line even with many writer processes: on PostgreSQL the ``FOR UPDATE`` row lock orders
them, on SQLite the ``BEGIN IMMEDIATE`` write transaction does. Editing a row breaks its
hash, deleting one breaks the id sequence or the next ``prev_hash``, deleting the newest
rows disagrees with ``audit_head``; :func:`verify_chain` names the first bad row.

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

from sqlalchemy import select
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
    head = session.execute(
        select(AuditHead).where(AuditHead.id == 1).with_for_update()
    ).scalar_one()
    # Round-trip through JSON so what is hashed is exactly what the database returns.
    clean_detail: dict[str, Any] = json.loads(json.dumps(dict(detail or {}), default=str))
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
    ok: bool
    events: int
    #: The id of the first row that breaks the chain (or the missing id), when not ok.
    bad_id: int | None = None
    problem: str = ""


def verify_chain(session: Session, batch: int = 5000) -> ChainReport:
    """Walk the whole chain in id order and report the first broken link."""
    expected_prev = GENESIS_HASH
    expected_id = 1
    count = 0
    for ev in _iter_events(session, batch):
        if ev.id != expected_id:
            return ChainReport(
                False, count, expected_id, f"event {expected_id} is missing (next is {ev.id})"
            )
        if ev.prev_hash != expected_prev:
            return ChainReport(
                False, count, ev.id, f"event {ev.id}: prev_hash does not match event {ev.id - 1}"
            )
        recomputed = chain_hash(
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
        if recomputed != ev.hash:
            return ChainReport(
                False, count, ev.id, f"event {ev.id}: content does not match its hash"
            )
        expected_prev = ev.hash
        expected_id += 1
        count += 1
    head = session.execute(select(AuditHead).where(AuditHead.id == 1)).scalar_one_or_none()
    if head is None:
        return ChainReport(False, count, None, "audit_head row is missing")
    if head.last_id != count or head.last_hash != expected_prev:
        return ChainReport(
            False,
            count,
            count + 1,
            f"events after {count} were deleted (the chain's tip is {head.last_id})",
        )
    return ChainReport(True, count)


def _iter_events(session: Session, batch: int) -> Iterator[AuditEvent]:
    last = 0
    while True:
        rows = (
            session.execute(
                select(AuditEvent).where(AuditEvent.id > last).order_by(AuditEvent.id).limit(batch)
            )
            .scalars()
            .all()
        )
        if not rows:
            return
        yield from rows
        last = rows[-1].id
        session.expunge_all()
