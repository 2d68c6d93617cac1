"""Units of work: on SQLite a reader neither waits for nor blocks the writers."""

from __future__ import annotations

import time

from sqlalchemy import text

from pacs_classifier.db.engine import Database


def test_read_session_reads_beside_an_open_write_transaction(sqlite_url: str) -> None:
    writer, reader = Database(sqlite_url), Database(sqlite_url)
    try:
        with writer.session() as w:
            w.execute(text("UPDATE audit_head SET last_id = 7 WHERE id = 1"))
            started = time.monotonic()
            with reader.read_session() as r:
                # a snapshot from before the writer's commit, at once (no busy wait)
                assert r.execute(text("SELECT last_id FROM audit_head")).scalar_one() == 0
            assert time.monotonic() - started < 5  # a write session would wait 30 s
        with reader.read_session() as r:
            assert r.execute(text("SELECT last_id FROM audit_head")).scalar_one() == 7
    finally:
        writer.dispose()
        reader.dispose()


def test_sqlite_commits_are_durable(sqlite_url: str) -> None:
    """WAL with synchronous=FULL: a commit is on disk before the C-STORE's Success."""
    db = Database(sqlite_url)
    try:
        with db.read_session() as s:
            assert s.execute(text("PRAGMA journal_mode")).scalar_one() == "wal"
            assert s.execute(text("PRAGMA synchronous")).scalar_one() == 2  # FULL
    finally:
        db.dispose()


def test_read_session_works_on_both_databases(
    database: Database,
) -> None:
    with database.read_session() as s:
        assert s.execute(text("SELECT COUNT(*) FROM audit_events")).scalar_one() == 0
