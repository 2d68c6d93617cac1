"""``serve --roles sender``: render result objects and send them, each in its own thread.

Rendering (an SR in milliseconds, a Grad-CAM overlay in a second or more) and sending
(bounded by the slowest destination) do not wait on each other, and neither runs on the
classification path: the worker only inserts the rows.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pacs_classifier.config import Config, DestinationConfig
from pacs_classifier.db.engine import Database
from pacs_classifier.db.models import utcnow
from pacs_classifier.errors import PermanentError, RetryableError
from pacs_classifier.queue.jobs import default_worker_id
from pacs_classifier.results.outbound import (
    Failure,
    LeasedQueue,
    RenderQueue,
    RetryPolicy,
    SendQueue,
    classification_waiting,
)
from pacs_classifier.results.sender import (
    DestinationRefused,
    DestinationUnavailable,
    ssl_context_for,
    store_file,
)

log = logging.getLogger(__name__)

#: One object per claim: a stop finishes the object in hand and leaves nothing leased.
RENDER_BATCH = 1
SEND_BATCH = 1
#: How often a deferring loop asks whether the workers are still busy.
DEFER_CHECK_S = 1.0


class ResultsWorker:
    """Claims render and send jobs; one instance per ``sender`` role.

    :meth:`run_render` and :meth:`run_send` are the role's two loops, each meant for its
    own thread (``commands/_roles.py`` starts them).
    """

    def __init__(self, db: Database, config: Config, *, worker_id: str | None = None) -> None:
        self.db = db
        self.config = config
        self.worker_id = worker_id or default_worker_id()
        actor = f"sender:{self.worker_id}"
        policy = RetryPolicy.from_config(config.results)
        self.renders = RenderQueue(db, policy, self.worker_id, actor)
        self.sends = SendQueue(db, policy, self.worker_id, actor)
        self.destinations: dict[str, DestinationConfig] = {
            d.ae_title: d for d in config.destinations
        }
        self._overlays: Any = None

    # ------------------------------------------------------------------ render

    def render_once(self, limit: int = RENDER_BATCH) -> int:
        """Render up to ``limit`` queued objects; return how many were claimed."""
        from pacs_classifier.results.render import render

        tasks = self.renders.claim(limit)
        for n, task in enumerate(tasks):
            try:
                if task.kind == "sc" and self._overlays is None:
                    from pacs_classifier.results.overlay import OverlayRenderer

                    self._overlays = OverlayRenderer(self.config)
                path = render(self.config, task, self._overlays)
            except PermanentError as exc:
                self.renders.fail(task.object_id, task.attempts, _reason(exc), Failure.REFUSED)
                continue
            except (RetryableError, OSError) as exc:
                self.renders.fail(task.object_id, task.attempts, _reason(exc), Failure.TRANSIENT)
                continue
            except Exception as exc:  # a rendering bug must not stop the role
                log.exception("result object %d: unexpected error while rendering", task.object_id)
                self.renders.fail(task.object_id, task.attempts, _reason(exc), Failure.REFUSED)
                continue
            except BaseException:
                self.renders.release([t.object_id for t in tasks[n:]])
                raise
            self.renders.done(task, path, self.config)
        return len(tasks)

    # ------------------------------------------------------------------ send

    def send_once(self, limit: int = SEND_BATCH) -> int:
        """Send up to ``limit`` queued objects; return how many were claimed."""
        tasks = self.sends.claim(limit)
        for task in tasks:
            dest = self.destinations.get(task.destination)
            if dest is None:
                self.sends.fail(
                    task.job_id,
                    task.attempts,
                    f"destination {task.destination!r} is no longer configured",
                    Failure.REFUSED,
                )
                continue
            path = Path(task.file_path)
            if not path.is_absolute():
                path = self.config.storage_root / path
            try:
                status = store_file(
                    path,
                    dest,
                    calling_ae=self.config.listener.ae_title,
                    timeout_s=self.config.results.timeout_s,
                    ssl_context=ssl_context_for(self.config, dest),
                )
            except DestinationRefused as exc:
                self.sends.fail(task.job_id, task.attempts, str(exc), Failure.REFUSED)
                continue
            except (DestinationUnavailable, OSError) as exc:
                self.sends.fail(task.job_id, task.attempts, _reason(exc), Failure.TRANSIENT)
                continue
            except Exception as exc:  # e.g. an unreadable file: not the peer's fault
                log.exception("send job %d: unexpected error", task.job_id)
                self.sends.fail(task.job_id, task.attempts, _reason(exc), Failure.REFUSED)
                continue
            self.sends.done(task, status)
            log.info("sent %s %s to %s", task.kind, task.sop_instance_uid, dest.ae_title)
        return len(tasks)

    # ------------------------------------------------------------------ loops

    def defer(self, queue: LeasedQueue) -> bool:
        """Whether to leave ``queue`` alone for now: classification goes first.

        Rendering and sending compete with the workers for CPU when they share a machine;
        while classification jobs wait, results wait too, unless the oldest due result has
        waited ``max_defer_s`` already (a backlog that never ends must not starve them).
        """
        limit = self.config.results.max_defer_s
        if limit <= 0:
            return False
        now = utcnow()
        with self.db.read_session() as session:
            if not classification_waiting(session, now):
                return False
            oldest = queue.oldest_due(session, now)
        return oldest is None or (now - oldest).total_seconds() < limit

    def _loop(
        self,
        step: Callable[[], int],
        reclaim: Callable[[], int],
        stop: threading.Event,
        queue: LeasedQueue,
    ) -> None:
        import time

        poll = self.config.results.poll_interval_ms / 1000
        every = min(self.config.results.lease_seconds / 2, 30.0)
        next_reclaim = 0.0
        while not stop.is_set():
            if time.monotonic() >= next_reclaim:
                try:
                    reclaim()
                except RetryableError as exc:
                    log.warning("results: %s; retrying", exc)
                next_reclaim = time.monotonic() + every
            deferred = False
            try:
                deferred = self.defer(queue)
                busy = 0 if deferred else step()
            except RetryableError as exc:
                log.warning("results: %s; retrying", exc)
                busy = 0
            if not busy:
                # While deferring, look again less often: each look is a query that takes
                # CPU from the workers the deferral is for.
                stop.wait(max(poll, DEFER_CHECK_S) if deferred else poll)

    def run_render(self, stop: threading.Event) -> None:
        self._loop(self.render_once, self.renders.reclaim_expired, stop, self.renders)

    def run_send(self, stop: threading.Event) -> None:
        self._loop(self.send_once, self.sends.reclaim_expired, stop, self.sends)

    def drain(self, timeout_s: float = 60.0) -> None:
        """Render and send until nothing is due (tests, ``demo``)."""
        import time

        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if not (self.render_once() + self.send_once()):
                return


def _reason(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
