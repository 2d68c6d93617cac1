"""Engines and units of work for SQLite and PostgreSQL.

SQLite runs in WAL mode with foreign keys on and a busy timeout, and every write
transaction starts with ``BEGIN IMMEDIATE`` so two writers queue for the lock instead of
failing half-way with "database is locked". Connection failures surface as
:class:`DatabaseUnavailable` (retryable), never as a driver exception.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

from pacs_classifier.errors import DatabaseUnavailable

log = logging.getLogger(__name__)

SQLITE_BUSY_TIMEOUT_MS = 30_000
#: Execution option that marks a read-only unit of work (see Database.read_session).
READ_ONLY_OPTION = "pacs_read_only"


def make_engine(url: str, *, connect_timeout_s: int = 5, pool_size: int = 5) -> Engine:
    """Create an engine with the project's connection settings for either database."""
    parsed = make_url(url)
    kwargs: dict[str, Any] = {"future": True}
    if parsed.get_backend_name() == "sqlite":
        kwargs["connect_args"] = {
            "timeout": SQLITE_BUSY_TIMEOUT_MS / 1000,
            "check_same_thread": False,
        }
        engine = create_engine(url, **kwargs)
        _configure_sqlite(engine)
        return engine
    kwargs["connect_args"] = {"connect_timeout": connect_timeout_s}
    kwargs["pool_pre_ping"] = True
    kwargs["pool_size"] = pool_size
    return create_engine(url, **kwargs)


def _configure_sqlite(engine: Engine) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        # Let SQLAlchemy, not the driver, open transactions (so BEGIN IMMEDIATE is ours).
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        # FULL: WAL is synced at every commit. NORMAL would let a power cut roll back a
        # committed ingest whose Success the sender already has (SPEC §4: Success only
        # after the row is committed), leaving a stored file that no row references.
        cur.execute("PRAGMA synchronous=FULL")
        cur.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Any) -> None:
        # A reader (Database.read_session) must not take the write lock: with WAL it reads
        # a snapshot beside the writers instead of queueing behind them.
        read_only = conn.get_execution_options().get(READ_ONLY_OPTION, False)
        conn.exec_driver_sql("BEGIN" if read_only else "BEGIN IMMEDIATE")


def is_postgres(engine: Engine) -> bool:
    return engine.dialect.name == "postgresql"


class Database:
    """An engine and its session factory; pass it in, open one session per unit of work."""

    def __init__(self, url: str, *, connect_timeout_s: int = 5) -> None:
        self.url = url
        self.engine = make_engine(url, connect_timeout_s=connect_timeout_s)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)
        self._read_sessions = sessionmaker(
            self.engine.execution_options(**{READ_ONLY_OPTION: True}), expire_on_commit=False
        )

    @property
    def dialect(self) -> str:
        return self.engine.dialect.name

    @contextmanager
    def session(self) -> Iterator[Session]:
        """One transaction: committed on success, rolled back on any error.

        Connection-level failures are raised as :class:`DatabaseUnavailable`.
        """
        with self._translate_errors(), self._sessions() as session, session.begin():
            yield session

    @contextmanager
    def read_session(self) -> Iterator[Session]:
        """A unit of work that only reads (status, reports, polling, audit verify).

        On SQLite it starts with a plain ``BEGIN`` instead of ``BEGIN IMMEDIATE``, so it
        neither waits for nor blocks the listener's and workers' writes. On PostgreSQL it
        is the same as :meth:`session`.
        """
        with self._translate_errors(), self._read_sessions() as session, session.begin():
            yield session

    @contextmanager
    def _translate_errors(self) -> Iterator[None]:
        try:
            yield
        except OperationalError as exc:
            raise unavailable(exc) from exc
        except DBAPIError as exc:
            if exc.connection_invalidated:
                raise DatabaseUnavailable(f"database connection lost: {_short(exc)}") from exc
            raise

    def dispose(self) -> None:
        self.engine.dispose()


def unavailable(exc: DBAPIError) -> DatabaseUnavailable:
    """The one-line error for a database that cannot be reached or used."""
    return DatabaseUnavailable(f"database unavailable: {_short(exc)}")


def _short(exc: DBAPIError) -> str:
    return str(exc.orig).strip().splitlines()[0] if exc.orig is not None else str(exc)
