"""The one place that builds the object graph from the configuration.

Commands call :func:`load_app` (or build an :class:`App` from a config and use it as a
context manager) and ask it for the parts they need: the listener with its ingestor, a
worker with its job queue, the scheduler, the sender's results worker, the web
application. Nothing else constructs them, and nothing below reaches for global state.

The queues built here are given the reclassification runs' lifecycle hook
(:meth:`pacs_classifier.reclassify.RunLifecycle.jobs_ended`), so a run progresses and closes
whichever worker ends its jobs.
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass, field
from functools import cached_property
from types import TracebackType
from typing import TYPE_CHECKING, Any

from pacs_classifier.config import Config, load_config
from pacs_classifier.db.engine import Database
from pacs_classifier.db.migrate import require_head

if TYPE_CHECKING:
    from fastapi import FastAPI

    from pacs_classifier.queue.doorbell import Doorbell
    from pacs_classifier.queue.jobs import JobQueue
    from pacs_classifier.receive.listener import Listener
    from pacs_classifier.reclassify import RunLifecycle
    from pacs_classifier.results.role import ResultsWorker
    from pacs_classifier.scheduler import NightlyScheduler
    from pacs_classifier.store.ingest import Ingestor
    from pacs_classifier.store.storage import Storage
    from pacs_classifier.worker import PredictorLoader, Worker


@dataclass
class App:
    config: Config
    #: The listener this process runs (``serve`` in one process sets it), for the web
    #: role's health check.
    running_listener: Listener | None = None
    _schema_checked: bool = field(default=False, init=False, repr=False)

    def __enter__(self) -> App:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    @cached_property
    def db(self) -> Database:
        return Database(
            self.config.database_url, connect_timeout_s=self.config.database.connect_timeout_s
        )

    def checked_db(self) -> Database:
        """The database, after checking its schema is at head (``serve`` and friends)."""
        if self._schema_checked:
            return self.db
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
        self._schema_checked = True
        return self.db

    @cached_property
    def storage(self) -> Storage:
        """The folder of received instances (``[storage]``)."""
        from pacs_classifier.store.storage import Storage

        return Storage(self.config.storage_root, self.config.storage.min_free_mb)

    @cached_property
    def runs(self) -> RunLifecycle:
        """The owner of reclassification runs' progress (the queues' ``on_ended`` hook)."""
        from pacs_classifier.reclassify import RunLifecycle

        return RunLifecycle(self.checked_db())

    @cached_property
    def bell_address(self) -> str:
        """The job doorbell of this deployment (:mod:`pacs_classifier.queue.doorbell`):
        named after its database, the SQLite file by its resolved path."""
        from sqlalchemy.engine import make_url

        from pacs_classifier.config import sqlite_path
        from pacs_classifier.queue.doorbell import bell_address

        db_file = sqlite_path(self.config.database_url)
        if db_file is not None:
            return bell_address(f"sqlite:{db_file.resolve()}")
        return bell_address(make_url(self.config.database_url).render_as_string(hide_password=True))

    @cached_property
    def doorbell(self) -> Doorbell:
        """Rung after a job is queued, to wake this host's idle worker."""
        from pacs_classifier.queue.doorbell import Doorbell

        return Doorbell(self.bell_address)

    def ingestor(self) -> Ingestor:
        """Stores received files and queues their jobs (the listener, ``classify --record``);
        each job queued rings the doorbell."""
        from pacs_classifier.store.ingest import Ingestor

        return Ingestor(self.checked_db(), self.storage, on_queued=self.doorbell.ring)

    def job_queue(self) -> JobQueue:
        """A queue for one worker: this host's worker locks, the runs' lifecycle hook."""
        from pacs_classifier.queue.jobs import JobQueue, QueuePolicy
        from pacs_classifier.queue.liveness import WORKERS_DIR_NAME, WorkerLocks

        return JobQueue(
            self.checked_db(),
            QueuePolicy.from_config(self.config.worker),
            locks=WorkerLocks(self.config.storage_root / WORKERS_DIR_NAME),
            on_ended=self.runs.jobs_ended,
        )

    def listener(self) -> Listener:
        """The DICOM listener on a schema-checked database (``serve --roles listener``)."""
        from pacs_classifier.receive.listener import Listener, build_ssl_context

        return Listener(
            self.config.listener,
            self.checked_db(),
            self.storage,
            self.ingestor(),
            ssl_context=build_ssl_context(self.config),
        )

    def worker(
        self,
        *,
        run_id: int | None = None,
        job_ids: list[int] | None = None,
        loader: PredictorLoader | None = None,
        woken: bool = False,
    ) -> Worker:
        """A classification worker (``--roles worker``); ``run_id`` narrows it to one
        reclassification run, ``job_ids`` to given jobs (``classify --record``); ``woken``
        has it hold this host's job doorbell (``serve``'s worker) instead of only polling."""
        from pacs_classifier.queue.doorbell import Bell
        from pacs_classifier.worker import Worker

        extra: dict[str, Any] = {} if loader is None else {"loader": loader}
        if woken:
            extra["bell"] = Bell(self.bell_address)
        return Worker(
            self.checked_db(),
            self.config,
            self.job_queue(),
            run_id=run_id,
            job_ids=job_ids,
            **extra,
        )

    def scheduler(self) -> NightlyScheduler:
        """The nightly reclassification scheduler (``--roles scheduler``); its leader
        also runs the daily drift check."""
        from pacs_classifier.report.drift import daily_check
        from pacs_classifier.scheduler import NightlyScheduler

        db = self.checked_db()
        scheduler = NightlyScheduler(db, self.config.scheduler)
        scheduler.daily.append(daily_check(db, self.config))
        return scheduler

    def results_worker(self) -> ResultsWorker:
        """Renders and sends result objects (``--roles sender``, ``demo``)."""
        from pacs_classifier.results.role import ResultsWorker

        return ResultsWorker(self.checked_db(), self.config)

    def web_app(self) -> FastAPI:
        """The FastAPI application of the web role (``--roles web``)."""
        from pacs_classifier.web.app import create_app

        return create_app(self.config, self.checked_db(), local_listener=self.running_listener)

    def close(self) -> None:
        if "doorbell" in self.__dict__:
            self.doorbell.close()
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
