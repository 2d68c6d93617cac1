"""The nightly reclassification schedule (SPEC §7), with one active scheduler at a time.

APScheduler 3 keeps the job in ``apscheduler_jobs`` (created by our migrations) under a
stable id, so it survives restarts. ``coalesce`` turns several missed runs into one,
``max_instances=1`` forbids overlap, and ``misfire_grace_time`` (``scheduler.misfire_grace_s``)
says how late a missed run may still be caught up. The job function is module-level and
takes only the database URL (without its password, which comes from the environment), so
the stored job unpickles in any process.

APScheduler's ``replace_existing`` recomputes the next run time from *now*, which would
silently drop a run missed while the daemon was down; so when the stored job has the same
trigger, its next run time is kept and the missed run is caught up once after restart.

Several ``serve`` processes may run the scheduler role; only the one holding the leader
lock schedules. On PostgreSQL that is a session-level advisory lock on a dedicated
connection (released by the server if the process dies); on SQLite a lease row in
``scheduler_lock`` that the leader renews and others take over once it expires.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Protocol

from sqlalchemy import Connection, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError

from pacs_classifier.config import SchedulerConfig
from pacs_classifier.db.engine import Database
from pacs_classifier.db.models import (
    RunTrigger,
    SchedulerLock,
    utcnow,
)
from pacs_classifier.errors import ConfigError, PacsClassifierError, PermanentError
from pacs_classifier.queue.jobs import default_worker_id

log = logging.getLogger(__name__)

JOB_ID = "pacs_classifier.nightly_reclassify"
LOCK_NAME = "scheduler"
#: pg_try_advisory_lock key: "pacsschd" as a 64-bit integer, unlikely to meet another app's.
ADVISORY_KEY = 0x7061637373636864 & 0x7FFFFFFFFFFFFFFF
LEASE_SECONDS = 30.0
RENEW_SECONDS = 5.0
ACTOR = "scheduler"


def nightly_reclassify(database_url: str) -> None:
    """The scheduled job: start a reclassification run for the workers to process."""
    from pacs_classifier.config import resolve_database_url
    from pacs_classifier.reclassify import start_run

    db = Database(resolve_database_url(database_url, base_dir=Path.cwd()))
    try:
        start_run(db, trigger=RunTrigger.SCHEDULE, actor=ACTOR)
    except PermanentError as exc:  # no active model: nothing to run, say so
        log.warning("nightly reclassification skipped: %s", exc)
    finally:
        db.dispose()


def build_trigger(cron: str, timezone: str) -> Any:
    """A CronTrigger from 5 fields (minute first) or 6 (seconds first)."""
    from apscheduler.triggers.cron import CronTrigger

    fields = cron.split()
    try:
        if len(fields) == 5:
            return CronTrigger.from_crontab(cron, timezone=timezone)
        if len(fields) == 6:
            second, minute, hour, day, month, dow = fields
            return CronTrigger(
                second=second,
                minute=minute,
                hour=hour,
                day=day,
                month=month,
                day_of_week=dow,
                timezone=timezone,
            )
    except ValueError as exc:
        raise ConfigError(f"scheduler.reclassify_cron: {exc} (received {cron!r})") from None
    raise ConfigError(f"scheduler.reclassify_cron: expected 5 or 6 fields, received {cron!r}")


# --------------------------------------------------------------------------- leader locks


class LeaderLock(Protocol):
    def acquire(self) -> bool: ...
    def still_held(self) -> bool: ...
    def release(self) -> None: ...


class AdvisoryLock:
    """PostgreSQL: a session-level advisory lock held on one dedicated connection."""

    def __init__(self, db: Database) -> None:
        self.db = db
        self._conn: Connection | None = None

    def acquire(self) -> bool:
        conn = self.db.engine.connect()
        got = bool(conn.scalar(text("SELECT pg_try_advisory_lock(:k)"), {"k": ADVISORY_KEY}))
        conn.commit()
        if got:
            self._conn = conn
        else:
            conn.close()
        return got

    def still_held(self) -> bool:
        if self._conn is None:
            return False
        try:
            self._conn.scalar(text("SELECT 1"))
            self._conn.commit()
        except DBAPIError:
            # The session is gone, and with it the lock: another process may lead now.
            self._conn = None
            return False
        return True

    def release(self) -> None:
        if self._conn is None:
            return
        try:
            self._conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": ADVISORY_KEY})
            self._conn.commit()
        except DBAPIError:
            pass  # the connection died; the server already dropped the lock
        finally:
            self._conn.close()
            self._conn = None


class LeaseLock:
    """SQLite (one host): a lease row the leader renews; others take it once it expires."""

    def __init__(self, db: Database, holder: str, lease_seconds: float = LEASE_SECONDS) -> None:
        self.db = db
        self.holder = holder
        self.lease = timedelta(seconds=lease_seconds)
        self._held = False

    def acquire(self) -> bool:
        self._held = self._take()
        return self._held

    def still_held(self) -> bool:
        self._held = self._held and self._take()
        return self._held

    def _take(self) -> bool:
        now = utcnow()
        with self.db.session() as session:
            row = session.get(SchedulerLock, LOCK_NAME, populate_existing=True)
            if row is None:
                session.add(
                    SchedulerLock(name=LOCK_NAME, holder=self.holder, lease_until=now + self.lease)
                )
                return True
            if row.holder != self.holder and row.lease_until > now:
                return False
            row.holder = self.holder
            row.lease_until = now + self.lease
            return True

    def release(self) -> None:
        if not self._held:
            return
        self._held = False
        with self.db.session() as session:
            row = session.get(SchedulerLock, LOCK_NAME)
            if row is not None and row.holder == self.holder:
                session.delete(row)


def leader_lock(db: Database, holder: str) -> LeaderLock:
    return AdvisoryLock(db) if db.dialect == "postgresql" else LeaseLock(db, holder)


# --------------------------------------------------------------------------- the role


class NightlyScheduler:
    """Runs APScheduler while this process holds the leader lock; stands by otherwise."""

    def __init__(
        self,
        db: Database,
        config: SchedulerConfig,
        *,
        holder: str | None = None,
        renew_seconds: float = RENEW_SECONDS,
    ) -> None:
        self.db = db
        self.config = config
        self.holder = holder or default_worker_id()
        self.renew_seconds = renew_seconds
        self.lock = leader_lock(db, self.holder)
        self.trigger = build_trigger(config.reclassify_cron, config.timezone)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._standby_logged = False
        self._scheduler: Any = None
        self.is_leader = threading.Event()
        #: Checks the leader runs once per UTC day (the drift check), beside the schedule.
        self.daily: list[Callable[[], object]] = []
        self._daily_done: str | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="scheduler", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def _loop(self) -> None:
        try:
            while not self._stop.is_set():
                try:
                    self._tick()
                except PacsClassifierError as exc:
                    log.warning("scheduler: %s", exc)
                self._stop.wait(self.renew_seconds)
        finally:
            self._step_down()

    def _tick(self) -> None:
        if self._scheduler is None:
            if self.lock.acquire():
                log.info(
                    "scheduler: leader (%s); next runs at %s",
                    self.holder,
                    self.config.reclassify_cron,
                )
                self._start_apscheduler()
                self.is_leader.set()
                self._standby_logged = False
            elif not self._standby_logged:
                # Said once, so an operator running several serve processes sees why this
                # one's scheduler is quiet.
                log.info("scheduler: another process leads; standing by (%s)", self.holder)
                self._standby_logged = True
            return
        if not self.lock.still_held():
            log.warning("scheduler: leadership lost; standing by")
            self._step_down()
            return
        self.run_daily()

    def run_daily(self) -> None:
        """Run the daily checks once per UTC day (again after a restart: they are
        idempotent). A failing check is logged and tried again the next day."""
        today = utcnow().date().isoformat()
        if self._daily_done == today:
            return
        self._daily_done = today
        for check in self.daily:
            try:
                check()
            except Exception:
                log.exception("scheduler: daily check %s failed", getattr(check, "__name__", check))

    def _start_apscheduler(self) -> None:
        from apscheduler.jobstores.sqlalchemy import SQLAlchemyJobStore
        from apscheduler.schedulers.background import BackgroundScheduler

        scheduler = BackgroundScheduler(
            jobstores={
                "default": SQLAlchemyJobStore(engine=self.db.engine, tablename="apscheduler_jobs")
            },
            job_defaults={
                "coalesce": True,
                "max_instances": 1,
                "misfire_grace_time": self.config.misfire_grace_s,
            },
            timezone=self.config.timezone,
        )
        scheduler.start(paused=True)
        keep: dict[str, datetime] = {}
        existing = scheduler.get_job(JOB_ID)
        if (
            existing is not None
            and str(existing.trigger) == str(self.trigger)
            and existing.next_run_time
        ):
            # Keep a pending (possibly missed) run: replace_existing alone would drop it.
            keep["next_run_time"] = existing.next_run_time
        scheduler.add_job(
            nightly_reclassify,
            trigger=self.trigger,
            id=JOB_ID,
            name="nightly reclassification",
            kwargs={"database_url": _url_without_password(self.db.url)},
            replace_existing=True,
            coalesce=True,
            max_instances=1,
            misfire_grace_time=self.config.misfire_grace_s,
            **keep,
        )
        job = scheduler.get_job(JOB_ID)
        log.info(
            "scheduler: nightly reclassification next at %s", job.next_run_time if job else None
        )
        scheduler.resume()
        self._scheduler = scheduler

    def _step_down(self) -> None:
        self.is_leader.clear()
        if self._scheduler is not None:
            self._scheduler.shutdown(wait=True)
            self._scheduler = None
        self.lock.release()


def _url_without_password(url: str) -> str:
    """The job's stored argument: never a secret in the database."""
    return make_url(url).set(password=None).render_as_string(hide_password=False)
