"""``/health/live`` and ``/health/ready``: one line per component, 200 or 503.

Ready means every component this daemon depends on answers now:

- ``database``: a ``SELECT 1`` in a read-only unit of work (PostgreSQL's connect timeout
  bounds it);
- ``storage``: free space under ``storage.root`` above ``storage.min_free_mb``, the same
  watermark at which the listener starts answering Out of Resources;
- ``model``: an active model is registered and its bundle's files match their recorded
  checksums (the check is remembered per file size and mtime, so a probe does not hash
  the weights again);
- ``listener``: when this process runs the listener, whether it is serving; otherwise a
  TCP connection to ``[listener] host:port`` opens (0.0.0.0 is probed on loopback). That
  probe's answer is kept for ``listener.acse_timeout_s``: pynetdicom holds an association
  slot for a connection that never sends an A-ASSOCIATE-RQ until that timeout, so a
  probe on every request would eat into ``max_associations``;
- ``destination:AE``: one per outbound destination, a TCP connection opens (the list is
  given by whoever wires the results-to-PACS destinations).
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from sqlalchemy import text

from pacs_classifier.config import Config
from pacs_classifier.db.engine import Database
from pacs_classifier.errors import ModelError, PacsClassifierError

if TYPE_CHECKING:
    from pacs_classifier.receive.listener import Listener

log = logging.getLogger(__name__)

TCP_PROBE_TIMEOUT_S = 2.0


@dataclass(frozen=True)
class ComponentCheck:
    """One component's state, as a line of ``/health/ready``."""

    name: str
    ok: bool
    detail: str


@dataclass(frozen=True)
class Endpoint:
    """A TCP peer to probe (an outbound DICOM destination)."""

    name: str
    host: str
    port: int


@dataclass
class _BundleCache:
    """The last checksum verdict per model path, keyed by its files' sizes and mtimes."""

    seen: dict[str, tuple[tuple[tuple[str, int, int], ...], str | None]] = field(
        default_factory=dict
    )
    lock: threading.Lock = field(default_factory=threading.Lock)


def _signature(folder: Path) -> tuple[tuple[str, int, int], ...]:
    return tuple(
        sorted(
            (p.name, st.st_size, st.st_mtime_ns)
            for p in folder.iterdir()
            if p.is_file() and (st := p.stat())
        )
    )


class HealthChecks:
    """The readiness checks of one web process."""

    def __init__(
        self,
        config: Config,
        db: Database,
        destinations: Sequence[Endpoint] = (),
        *,
        local_listener: Listener | None = None,
    ) -> None:
        self.config = config
        self.db = db
        self.destinations = tuple(destinations)
        self.local_listener = local_listener
        self._bundles = _BundleCache()
        self._listener_probe: tuple[float, ComponentCheck] | None = None
        self._probe_lock = threading.Lock()

    def run(self) -> list[ComponentCheck]:
        database = self.database()
        # The registry is in the database: do not wait for its timeout a second time.
        model = self.model() if database.ok else ComponentCheck("model", False, "database down")
        checks = [database, self.storage(), model, self.listener()]
        checks += [probe_tcp(f"destination:{d.name}", d.host, d.port) for d in self.destinations]
        return checks

    def database(self) -> ComponentCheck:
        try:
            with self.db.read_session() as session:
                session.execute(text("SELECT 1"))
        except PacsClassifierError as exc:
            return ComponentCheck("database", False, str(exc))
        return ComponentCheck("database", True, f"{self.db.dialect} reachable")

    def storage(self) -> ComponentCheck:
        root = self.config.storage_root
        floor = self.config.storage.min_free_mb
        try:
            from pacs_classifier.store.storage import Storage

            free = Storage(root, floor).free_mb()
        except OSError as exc:
            return ComponentCheck("storage", False, f"{root}: {exc.strerror or exc}")
        ok = free >= floor
        return ComponentCheck(
            "storage", ok, f"{free:.0f} MB free under {root} (watermark {floor} MB)"
        )

    def model(self) -> ComponentCheck:
        from pacs_classifier.model.bundle import read_bundle
        from pacs_classifier.model.registry import active_model

        try:
            with self.db.read_session() as session:
                row = active_model(session)
                version, path = (row.version, row.path) if row is not None else ("", "")
        except PacsClassifierError as exc:
            return ComponentCheck("model", False, f"cannot read the registry: {exc}")
        if not version:
            return ComponentCheck(
                "model", False, "no active model (pacs-classifier model activate)"
            )
        folder = Path(path)
        try:
            sig = _signature(folder)
        except OSError as exc:
            return ComponentCheck("model", False, f"{version}: {folder}: {exc.strerror or exc}")
        with self._bundles.lock:
            cached = self._bundles.seen.get(path)
            if cached is not None and cached[0] == sig:
                problem = cached[1]
            else:
                try:
                    read_bundle(folder, verify=True)
                    problem = None
                except (ModelError, OSError) as exc:
                    problem = str(exc)
                self._bundles.seen[path] = (sig, problem)
        if problem is not None:
            return ComponentCheck("model", False, f"{version}: {problem}")
        return ComponentCheck("model", True, f"{version} active, files match their checksums")

    def listener(self) -> ComponentCheck:
        c = self.config.listener
        if self.local_listener is not None:
            if not self.local_listener.serving:
                return ComponentCheck("listener", False, "stopped")
            host, port = self.local_listener.address
            return ComponentCheck("listener", True, f"{host}:{port} serving in this process")
        with self._probe_lock:
            now = time.monotonic()
            if self._listener_probe is not None and now < self._listener_probe[0]:
                return self._listener_probe[1]
            host = "127.0.0.1" if c.host in ("0.0.0.0", "") else c.host  # noqa: S104
            check = probe_tcp("listener", host, c.port)
            # A refused connection holds no slot: look again at once next time.
            self._listener_probe = (now + c.acse_timeout_s, check) if check.ok else None
            return check


def probe_tcp(name: str, host: str, port: int) -> ComponentCheck:
    """Open and close a TCP connection: is anything accepting at ``host:port``?"""
    try:
        with socket.create_connection((host, port), timeout=TCP_PROBE_TIMEOUT_S):
            pass
    except OSError as exc:
        return ComponentCheck(name, False, f"{host}:{port}: {exc.strerror or exc}")
    return ComponentCheck(name, True, f"{host}:{port} accepting")
