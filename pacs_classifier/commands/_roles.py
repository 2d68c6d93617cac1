"""The roles ``serve`` runs: each starts from the :class:`~pacs_classifier.wiring.App` and
returns the function that stops it (finishing or releasing its in-flight work).

Adding a role is one function here and one entry in :data:`ROLES`. The objects come from
the wiring; a starter only puts them on threads.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from pacs_classifier.wiring import App

log = logging.getLogger(__name__)

#: A started role's way to stop: finish or release in-flight work, then return.
StopRole = Callable[[], None]
StartRole = Callable[[App], StopRole]

#: The roles SPEC §2 names, in start order; :data:`ROLES` holds the ones this version runs.
KNOWN_ROLES = ("listener", "worker", "scheduler", "sender", "web")


def start_listener(app: App) -> StopRole:
    """The DICOM listener (SPEC §4)."""
    listener = app.listener()
    listener.start()
    app.running_listener = listener
    return listener.stop


def start_worker(app: App) -> StopRole:
    """The classification worker (claims jobs, infers, records) in a thread.

    Stopping stops claiming, finishes the batches already prepared, releases the rest and
    waits for the thread.
    """
    worker = app.worker(woken=True)
    # A run whose last job ended just before a crash is closed now, not never.
    app.runs.settle(worker.jobs.actor)
    stop = threading.Event()
    thread = threading.Thread(target=worker.run, args=(stop,), name="worker", daemon=True)
    thread.start()

    def halt() -> None:
        stop.set()
        thread.join()

    return halt


def start_scheduler(app: App) -> StopRole:
    """The nightly reclassification scheduler (one leader across processes)."""
    if not app.config.scheduler.enabled:
        log.info("scheduler: disabled in the configuration (scheduler.enabled = false)")
        return lambda: None
    scheduler = app.scheduler()
    scheduler.start()
    return scheduler.stop


def start_sender(app: App) -> StopRole:
    """Render result objects (SR, overlay) and send them to the destinations (SPEC §11).

    Rendering and sending run in threads of their own; stopping finishes the object in
    hand (claims not started are given back when their lease runs out).
    """
    worker = app.results_worker()
    stop = threading.Event()
    threads = [
        threading.Thread(
            target=worker.run_render, args=(stop,), name="results-render", daemon=True
        ),
        threading.Thread(target=worker.run_send, args=(stop,), name="results-send", daemon=True),
    ]
    for t in threads:
        t.start()

    def halt() -> None:
        stop.set()
        for t in threads:
            t.join()

    return halt


def start_web(app: App) -> StopRole:
    """Health, /metrics, the JSON API and the dashboard (SPEC §12)."""
    from pacs_classifier.web.server import serve_in_thread

    return serve_in_thread(app.web_app(), app.config.web)


#: Role name → start function, in start order.
ROLES: dict[str, StartRole] = {
    "listener": start_listener,
    "worker": start_worker,
    "scheduler": start_scheduler,
    "sender": start_sender,
    "web": start_web,
}
