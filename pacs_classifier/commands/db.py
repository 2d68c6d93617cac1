"""``db upgrade``: apply the Alembic migrations to the configured database."""

from __future__ import annotations

import argparse
from typing import Any

from sqlalchemy.exc import OperationalError

from pacs_classifier.config import sqlite_path
from pacs_classifier.db import migrate
from pacs_classifier.db.engine import unavailable
from pacs_classifier.wiring import load_app

ORDER = 10


def register(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser("db", help="database schema management")
    dbsub = p.add_subparsers(dest="db_command", metavar="ACTION", required=True)
    up = dbsub.add_parser("upgrade", help="apply migrations up to head")
    up.add_argument("--revision", default="head", help=argparse.SUPPRESS)
    up.set_defaults(func=run_upgrade)


def run_upgrade(args: argparse.Namespace) -> int:
    app = load_app(args)
    url = app.config.database_url
    sqlite_file = sqlite_path(url)
    if sqlite_file is not None:
        sqlite_file.parent.mkdir(parents=True, exist_ok=True)
    try:
        before = migrate.current_revision(app.db.engine)
        migrate.upgrade(url, args.revision)
        current = migrate.current_revision(app.db.engine)
    except OperationalError as exc:
        raise unavailable(exc) from exc
    finally:
        app.close()
    if before == current:
        print(f"database at revision {current} (already)")
    else:
        print(f"database upgraded from {before or 'nothing'} to revision {current}")
    return 0
