"""Wake an idle worker when a job is queued, instead of leaving it to its next poll.

The listener rings after the transaction that queued a job commits; the worker of
``serve`` on the same host waits on the bell between claims. The database stays the only
truth: a ring carries nothing, and a lost one (nobody listening, the socket's buffer full,
the roles on different hosts) costs at most one ``worker.poll_interval_ms``, the wait there
was before. Measured for issue #17 (docs/benchmarks.md, "Waking the worker"): at a steady
5 images/s the poll and the batch wait were most of the receive → result p95.

The bell is a Linux abstract Unix datagram socket (no file to clean up, gone with the
process that holds it) named after the deployment's database, so that two deployments on
one host, or two test databases, never wake each other. One process holds it at a time:
another worker on the same host finds it taken and keeps polling, and tries again to take
it each time it waits (a ``reclassify`` that held it ends, and ``serve``'s worker takes
over). Where abstract sockets do not exist (not Linux), everything polls as before.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import select
import socket
import sys

log = logging.getLogger(__name__)

#: Abstract socket names start with a NUL byte; the rest is ours.
_PREFIX = "\0pacs-classifier/jobs/"
#: Abstract Unix sockets are a Linux feature.
SUPPORTED = sys.platform.startswith("linux")


def bell_address(database_identity: str) -> str:
    """The bell's socket name for one deployment (its database URL, SQLite path resolved)."""
    digest = hashlib.sha256(database_identity.encode("utf-8")).hexdigest()[:32]
    return _PREFIX + digest


class Doorbell:
    """The ringing side: one datagram, never blocking, never raising."""

    def __init__(self, address: str) -> None:
        self.address = address
        # Made here, not on the first ring: the listener rings from many threads at once.
        self._sock: socket.socket | None = None
        if SUPPORTED:
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            self._sock.setblocking(False)

    def ring(self) -> None:
        if self._sock is None:
            return
        try:
            self._sock.sendto(b"!", self.address)
        except OSError as exc:
            # ECONNREFUSED / ENOENT: no worker holds the bell; EAGAIN: rings are already
            # pending. Either way the worker finds the job by polling.
            if exc.errno not in (errno.ECONNREFUSED, errno.ENOENT, errno.EAGAIN):
                log.debug("doorbell %r: %s", self.address, exc)

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


class Bell:
    """The waiting side, held by at most one process per host and deployment."""

    def __init__(self, address: str) -> None:
        self.address = address
        self._sock: socket.socket | None = None
        self._taken_logged = False

    def held(self) -> bool:
        """Whether this process holds the bell now."""
        return self._sock is not None

    def _take(self) -> bool:
        if self._sock is not None:
            return True
        if not SUPPORTED:
            return False
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            sock.bind(self.address)
        except OSError as exc:
            sock.close()
            if not self._taken_logged:
                # EADDRINUSE: another worker of this deployment on this host holds it.
                log.info("worker: job doorbell not taken (%s); polling for jobs", exc.strerror)
                self._taken_logged = True
            return False
        sock.setblocking(False)
        self._sock = sock
        if self._taken_logged:
            log.info("worker: job doorbell taken; woken when jobs are queued")
            self._taken_logged = False
        return True

    def wait(self, timeout_s: float) -> bool:
        """Wait up to ``timeout_s`` for a ring; True when rung (every pending ring is
        consumed). Without the bell, sleeps ``timeout_s`` and returns False."""
        if not self._take():
            select.select([], [], [], timeout_s)
            return False
        assert self._sock is not None
        readable, _, _ = select.select([self._sock], [], [], timeout_s)
        if not readable:
            return False
        while True:  # drain: rings that came together are one wake-up
            try:
                self._sock.recv(64)
            except OSError:  # BlockingIOError once empty
                return True

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
