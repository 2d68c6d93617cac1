"""``serve --roles web``: uvicorn in a thread of the daemon, stopped with the other roles."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from pacs_classifier.config import WebConfig
from pacs_classifier.errors import PermanentError

log = logging.getLogger(__name__)

START_TIMEOUT_S = 30.0
GRACEFUL_SHUTDOWN_S = 5


class WebError(PermanentError):
    """The web role could not start (most often: its port is taken)."""


def serve_in_thread(asgi: Any, c: WebConfig) -> Callable[[], None]:
    """Serve ``asgi`` on ``[web] host:port`` in a thread; returns its stop function."""
    import uvicorn

    server = uvicorn.Server(
        uvicorn.Config(
            asgi,
            host=c.host,
            port=c.port,
            # Request lines carry accession numbers and study UIDs: no access log.
            access_log=False,
            log_config=None,
            lifespan="off",
            server_header=False,
            # A browser's keep-alive connection must not hold up the daemon's shutdown.
            timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S,
        )
    )
    # Off the main thread uvicorn leaves the signals to the daemon's own handlers.
    thread = threading.Thread(target=server.run, name="web", daemon=True)
    thread.start()
    deadline = time.monotonic() + START_TIMEOUT_S
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            server.should_exit = True
            raise WebError(f"web: cannot serve on {c.host}:{c.port} (is the port taken?)")
        time.sleep(0.05)
    log.info("web on http://%s:%d (health, metrics, /api/v1, dashboard)", c.host, c.port)

    def stop() -> None:
        server.should_exit = True
        thread.join(15)
        log.info("web stopped")

    return stop
