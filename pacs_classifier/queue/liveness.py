"""Whether a worker of this host is alive: an ``flock`` it holds for as long as it runs.

A PID says little: a worker killed with ``kill -9`` stays a zombie until its parent
reaps it (``kill(pid, 0)`` succeeds), and after a restart in a container the new
daemon often gets the very same PID. Its jobs then stayed ``running`` until their lease
ran out (300 s). Instead each worker holds an exclusive ``flock`` on
``<storage.root>/.workers/<worker id>.lock`` for its lifetime. The kernel drops the
lock as the process exits (before it is a zombie), so another process that can take
the lock knows for certain that the worker is gone. Worker ids carry a random part
(:func:`~pacs_classifier.queue.jobs.default_worker_id`), so a reused PID is never the
same worker.

The folder is the storage root's because every process of one installation on one
host sees it (a private ``/tmp`` per service would hide the locks from each other).
"""

from __future__ import annotations

import fcntl
import logging
import os
import uuid
from pathlib import Path
from urllib.parse import quote

log = logging.getLogger(__name__)

WORKERS_DIR_NAME = ".workers"


class WorkerLocks:
    """The lock files of the workers of one installation on this host."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._fd: int | None = None
        self._held: Path | None = None

    def path(self, worker_id: str) -> Path:
        return self.directory / f"{quote(worker_id, safe='')}.lock"

    def hold(self, worker_id: str) -> None:
        """Take this process's lock; kept until :meth:`release` or the process ends."""
        if self._fd is not None:
            return
        self.directory.mkdir(parents=True, exist_ok=True)
        final = self.path(worker_id)
        # Locked under a temporary name, then renamed: nobody can see the file unlocked
        # and take it for a dead worker's.
        tmp = self.directory / f".{uuid.uuid4().hex}.tmp"
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            os.replace(tmp, final)
        except OSError:
            os.close(fd)
            tmp.unlink(missing_ok=True)
            raise
        self._fd, self._held = fd, final

    def release(self) -> None:
        """Remove and unlock this process's lock file (a clean stop)."""
        fd, held = self._fd, self._held
        self._fd = self._held = None
        if fd is None or held is None:
            return
        held.unlink(missing_ok=True)
        os.close(fd)

    def alive(self, worker_id: str) -> bool | None:
        """True: its process holds its lock; False: gone (the file is removed); None: no file.

        ``None`` is for ids that never had a lock here (an older version, a worker of a
        process that did not take one): the caller decides by other means.
        """
        path = self.path(worker_id)
        try:
            fd = os.open(path, os.O_RDWR)
        except FileNotFoundError:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        except OSError as exc:
            log.warning("cannot check the lock of worker %s: %s", worker_id, exc)
            return True  # not ours to judge: its lease will run out
        else:
            path.unlink(missing_ok=True)  # ours now, and its owner is gone
            return False
        finally:
            os.close(fd)
