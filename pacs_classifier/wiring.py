"""The one place that builds the object graph from the configuration.

Commands call :func:`load_app` and pass the parts they need onward; nothing else reaches
for global state.
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING

from pacs_classifier.config import Config, load_config
from pacs_classifier.db.engine import Database
from pacs_classifier.db.migrate import require_head

if TYPE_CHECKING:
    from pacs_classifier.receive.listener import Listener
    from pacs_classifier.scheduler import NightlyScheduler
    from pacs_classifier.store.storage import Storage
    from pacs_classifier.worker import Worker


@dataclass
class App:
    config: Config
    #: The listener this process runs (``serve`` sets it), for the web role's health check.
    running_listener: Listener | None = None

    @cached_property
    def db(self) -> Database:
        return Database(
            self.config.database_url, connect_timeout_s=self.config.database.connect_timeout_s
        )

    def checked_db(self) -> Database:
        """The database, after checking its schema is at head (``serve`` and friends)."""
        from sqlalchemy.exc import OperationalError

        from pacs_classifier.config import sqlite_path
        from pacs_classifier.db.engine import unavailable
        from pacs_classifier.errors import SchemaOutdated

        # Connecting would create an empty SQLite file: a stray file in the wrong folder
        # is worse than saying where the database was expected.
        sqlite_file = sqlite_path(self.config.database_url)
        if sqlite_file is not None and not sqlite_file.exists():
            raise SchemaOutdated(
                f"database file {sqlite_file} does not exist; run 'pacs-classifier db upgrade'"
            )
        try:
            require_head(self.db.engine)
        except OperationalError as exc:
            raise unavailable(exc) from exc
        return self.db

    @cached_property
    def storage(self) -> Storage:
        """The folder of received instances (``[storage]``)."""
        from pacs_classifier.store.storage import Storage

        return Storage(self.config.storage_root, self.config.storage.min_free_mb)

    def listener(self) -> Listener:
        """The DICOM listener on a schema-checked database (``serve --roles listener``)."""
        from pacs_classifier.receive.listener import Listener, build_ssl_context
        from pacs_classifier.store.ingest import Ingestor

        db = self.checked_db()
        return Listener(
            self.config.listener,
            db,
            self.storage,
            Ingestor(db, self.storage),
            ssl_context=build_ssl_context(self.config),
        )

    def worker(self) -> Worker:
        """A classification worker on a schema-checked database (``--roles worker``)."""
        from pacs_classifier.worker import Worker

        return Worker(self.checked_db(), self.config)

    def scheduler(self) -> NightlyScheduler:
        """The nightly reclassification scheduler (``--roles scheduler``)."""
        from pacs_classifier.scheduler import NightlyScheduler

        return NightlyScheduler(self.checked_db(), self.config.scheduler)

    def close(self) -> None:
        if "db" in self.__dict__:
            self.db.dispose()


def load_app(args: argparse.Namespace) -> App:
    config = load_config(getattr(args, "config", None))
    if not getattr(args, "verbose", False):
        logging.getLogger().setLevel(config.logging.level.upper())
        # Alembic logs "Context impl ..." at INFO on every schema check; a user's command
        # should answer in its own words (``db upgrade`` reports the revisions itself).
        logging.getLogger("alembic").setLevel(logging.WARNING)
    return App(config)
