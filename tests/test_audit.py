"""The audit trail's hash chain: concurrent writers keep one valid chain, and tampering
with any row is caught by ``pacs-classifier audit verify``, which names the row."""

from __future__ import annotations

import multiprocessing
import time
from collections import Counter
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import delete, select, update

from pacs_classifier import cli
from pacs_classifier.db.audit import GENESIS_HASH, ChainReport, append_event, verify_chain
from pacs_classifier.db.engine import Database
from pacs_classifier.db.models import AuditEvent, AuditHead

WRITERS = 2
APPENDS_PER_WRITER = 500


def _append_many(url: str, actor: str, n: int, barrier: Any) -> None:
    """One writer process: its own Database, one transaction per event."""
    db = Database(url)
    try:
        barrier.wait(timeout=120)  # start together so the appends really interleave
        for i in range(n):
            with db.session() as session:
                append_event(
                    session,
                    actor=actor,
                    action="test.append",
                    outcome="ok",
                    entity_type="test",
                    entity_id=i,
                    detail={"i": i, "actor": actor},
                )
    finally:
        db.dispose()


def _verify(url: str) -> ChainReport:
    db = Database(url)
    try:
        with db.session() as session:
            return verify_chain(session)
    finally:
        db.dispose()


def _cli_verify(url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    """Run the real ``audit verify`` command; return its status and its one output line."""
    config = tmp_path / "config.toml"
    config.write_text(f'[database]\nurl = "{url}"\n', encoding="utf-8")
    capsys.readouterr()
    rc = cli.main(["--config", str(config), "audit", "verify"])
    out, err = capsys.readouterr()
    text = out if rc == 0 else err
    lines = text.splitlines()
    assert len(lines) == 1, f"expected one line, got {text!r}"
    return rc, lines[0]


def _seed(url: str, n: int = 10) -> None:
    db = Database(url)
    try:
        for i in range(1, n + 1):
            with db.session() as session:
                append_event(
                    session,
                    actor=f"ae:MODALITY{i}@127.0.0.1",
                    action="instance.stored",
                    outcome="ok",
                    entity_type="instance",
                    entity_id=i,
                    detail={"n": i, "sha256": "ab" * 32, "ratio": i / 7, "tags": ["x", i]},
                )
    finally:
        db.dispose()


def _execute(url: str, stmt: Any) -> None:
    db = Database(url)
    try:
        with db.session() as session:
            session.execute(stmt.execution_options(synchronize_session=False))
    finally:
        db.dispose()


def test_concurrent_appends_from_two_processes_keep_one_chain(
    db_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(WRITERS)
    procs = [
        ctx.Process(target=_append_many, args=(db_url, f"writer{k}", APPENDS_PER_WRITER, barrier))
        for k in range(WRITERS)
    ]
    for p in procs:
        p.start()
    try:
        # Verifying while others append must never report a break that is not there.
        while any(p.is_alive() for p in procs):
            report = _verify(db_url)
            assert report.ok, report
            time.sleep(0.1)  # leave the writers most of the lock (SQLite verifies under it)
        for p in procs:
            p.join(timeout=600)
    finally:
        for p in procs:
            if p.is_alive():
                p.terminate()
                p.join()
    assert [p.exitcode for p in procs] == [0] * WRITERS

    total = WRITERS * APPENDS_PER_WRITER
    assert _verify(db_url) == ChainReport(True, total)
    db = Database(db_url)
    try:
        with db.session() as session:
            rows = session.execute(
                select(AuditEvent.id, AuditEvent.actor).order_by(AuditEvent.id)
            ).all()
            tip = session.execute(select(AuditHead)).scalar_one()
    finally:
        db.dispose()
    assert [r.id for r in rows] == list(range(1, total + 1))
    assert Counter(r.actor for r in rows) == {
        f"writer{k}": APPENDS_PER_WRITER for k in range(WRITERS)
    }
    assert tip.last_id == total
    assert _cli_verify(db_url, tmp_path, capsys) == (0, f"ok {total} events")


def test_empty_chain_verifies(
    db_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert _cli_verify(db_url, tmp_path, capsys) == (0, "ok 0 events")


def test_first_event_links_to_genesis_and_each_to_the_one_before(database: Database) -> None:
    with database.session() as session:
        first = append_event(session, actor="cli:test", action="a", outcome="ok")
        second = append_event(session, actor="cli:test", action="b", outcome="ok")
    assert (first.id, first.prev_hash) == (1, GENESIS_HASH)
    assert (second.id, second.prev_hash) == (2, first.hash)


def test_rolled_back_event_leaves_no_trace(database: Database) -> None:
    with pytest.raises(RuntimeError), database.session() as session:
        append_event(session, actor="cli:test", action="a", outcome="ok")
        raise RuntimeError("the action failed")
    with database.session() as session:
        event = append_event(session, actor="cli:test", action="b", outcome="ok")
        assert verify_chain(session) == ChainReport(True, 1)
    assert event.id == 1


def test_detail_that_json_cannot_store_is_refused(database: Database) -> None:
    with pytest.raises(ValueError), database.session() as session:
        append_event(
            session, actor="cli:test", action="a", outcome="ok", detail={"p": float("nan")}
        )


def test_append_after_an_unlocked_read_of_the_tip_uses_the_newest_tip(pg_url: str) -> None:
    """A session that read the tip earlier must not append from its stale copy."""
    db = Database(pg_url)
    try:
        with db.session() as reader:
            # Held, so the identity map keeps this (soon stale) copy of the tip.
            stale = reader.execute(select(AuditHead)).scalar_one()
            assert stale.last_id == 0
            with db.session() as other:
                append_event(other, actor="cli:other", action="a", outcome="ok")
            event = append_event(reader, actor="cli:reader", action="b", outcome="ok")
            assert event.id == 2
        assert _verify(pg_url) == ChainReport(True, 2)
    finally:
        db.dispose()


# Each column of one middle row, changed to another value of the right type.
TAMPERING: dict[str, Any] = {
    "occurred_at": "shift",
    "actor": "cli:mallory",
    "action": "instance.deleted",
    "entity_type": None,
    "entity_id": "999",
    "outcome": "denied",
    "detail": {"n": 999},
    "prev_hash": "1" * 64,
    "hash": "f" * 64,
    "id": 1000,
}


def test_editing_any_column_of_a_row_is_caught_and_named(
    db_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _seed(db_url)
    assert _cli_verify(db_url, tmp_path, capsys) == (0, "ok 10 events")
    db = Database(db_url)
    try:
        with db.session() as session:
            original = session.execute(select(AuditEvent).where(AuditEvent.id == 4)).scalar_one()
            saved = {col: getattr(original, col) for col in TAMPERING}
    finally:
        db.dispose()
    for column, tampered in TAMPERING.items():
        value = saved[column] + timedelta(seconds=1) if tampered == "shift" else tampered
        _execute(db_url, update(AuditEvent).where(AuditEvent.id == 4).values({column: value}))
        row_now = value if column == "id" else 4
        rc, line = _cli_verify(db_url, tmp_path, capsys)
        assert rc != 0, f"editing {column} went unnoticed"
        assert "audit chain broken at event 4:" in line, (column, line)
        _execute(
            db_url,
            update(AuditEvent).where(AuditEvent.id == row_now).values({column: saved[column]}),
        )
        assert _cli_verify(db_url, tmp_path, capsys) == (0, "ok 10 events"), column


@pytest.mark.parametrize("row", [1, 10])
def test_editing_the_first_or_last_row_is_named(
    db_url: str, row: int, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _seed(db_url)
    _execute(db_url, update(AuditEvent).where(AuditEvent.id == row).values(outcome="denied"))
    rc, line = _cli_verify(db_url, tmp_path, capsys)
    assert rc != 0
    assert line.startswith(f"pacs-classifier: audit chain broken at event {row}: content")


@pytest.mark.parametrize("row", [5, 10], ids=["middle", "last"])
def test_deleting_a_row_is_caught_and_named(
    db_url: str, row: int, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _seed(db_url)
    _execute(db_url, delete(AuditEvent).where(AuditEvent.id == row))
    rc, line = _cli_verify(db_url, tmp_path, capsys)
    assert rc != 0
    assert f"audit chain broken at event {row}: missing" in line


def test_rewriting_the_last_row_with_a_fresh_hash_is_caught(
    db_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Recomputing the edited row's own hash does not help: the tip remembers the old one."""
    from pacs_classifier.db.audit import event_hash

    _seed(db_url, 3)
    db = Database(db_url)
    try:
        with db.session() as session:
            ev = session.execute(select(AuditEvent).where(AuditEvent.id == 3)).scalar_one()
            ev.outcome = "denied"
            ev.hash = event_hash(ev)
    finally:
        db.dispose()
    rc, line = _cli_verify(db_url, tmp_path, capsys)
    assert rc != 0
    assert "audit chain broken at event 3: hash does not match the chain's tip" in line


def test_a_row_inserted_past_the_tip_is_named(
    db_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _seed(db_url, 3)
    db = Database(db_url)
    try:
        with db.session() as session:
            tip = session.execute(select(AuditHead)).scalar_one()
            forged = AuditEvent(
                id=4,
                actor="cli:mallory",
                action="x",
                outcome="ok",
                detail={},
                prev_hash=tip.last_hash,
                hash="e" * 64,
            )
            session.add(forged)
    finally:
        db.dispose()
    rc, line = _cli_verify(db_url, tmp_path, capsys)
    assert rc != 0
    assert "audit chain broken at event 4: stored beyond the chain's tip" in line
