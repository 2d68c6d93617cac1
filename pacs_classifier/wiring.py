"""The one place that builds the object graph from the configuration.

Commands call :func:`load_app` and pass the parts they need onward; nothing else reaches
for global state.
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass
from functools import cached_property

from pacs_classifier.config import Config, load_config
from pacs_classifier.db.engine import Database
from pacs_classifier.db.migrate import require_head


@dataclass
class App:
    config: Config

    @cached_property
    def db(self) -> Database:
        return Database(
            self.config.database_url, connect_timeout_s=self.config.database.connect_timeout_s
        )

    def checked_db(self) -> Database:
        """The database, after checking its schema is at head (``serve`` and friends)."""
        from sqlalchemy.exc import OperationalError

        from pacs_classifier.errors import DatabaseUnavailable

        try:
            require_head(self.db.engine)
        except OperationalError as exc:
            raise DatabaseUnavailable(
                f"database unavailable: {str(exc.orig).strip().splitlines()[0]}"
            ) from exc
        return self.db

    def close(self) -> None:
        if "db" in self.__dict__:
            self.db.dispose()


def load_app(args: argparse.Namespace) -> App:
    config = load_config(getattr(args, "config", None))
    if not getattr(args, "verbose", False):
        logging.getLogger().setLevel(config.logging.level.upper())
    return App(config)
