"""The DICOM listener: a pynetdicom Application Entity that stores what it receives.

Services (SPEC §4): Verification, and Storage for CR, DX (presentation and processing)
and Secondary Capture in every transfer syntax listed there; other SOP classes are
refused at association negotiation. A calling AE title outside ``allowed_calling_aets``
gets A-ASSOCIATE-RJ "calling AE title not recognised", a called AE title other than ours
"called AE title not recognised"; accepted, rejected and aborted associations are
audited with the peer address, through an :class:`~pacs_classifier.receive.backlog.AuditBacklog`
that retries what the database cannot take at once.

Connections reach pynetdicom through :class:`~pacs_classifier.receive.gate.GatedServer`:
connection caps, a deadline for the TLS handshake and the A-ASSOCIATE-RQ, AE titles
checked byte by byte (``docs/threat-model.md``).

The C-STORE handler only checks and stores: pynetdicom streams the data set into a
temporary file in ``<storage.root>/.tmp`` (hashed and handed to the disk as the fragments
arrive, see :mod:`pacs_classifier.receive.transport`), the handler walks its element
headers, fsyncs it and hands it to :class:`~pacs_classifier.store.ingest.Ingestor`, which
renames it into place and commits the row, the job and the audit event in one
transaction. Success is answered only after that commit. No pixel data is decoded here.

Crashes: the rename into the final name is announced by an intent marker in
``<storage.root>/.pending``, dropped once the commit is settled. At start-up, before the
port is bound, the listener deletes the temporary files a crash left in ``.tmp`` and
settles every marker left in ``.pending``
(:meth:`~pacs_classifier.store.ingest.Ingestor.recover_pending`): a file that no
``instances`` row references was never acknowledged, so it is removed and the removal
audited (action ``storage.recover``, actor ``listener``); the sender still holds that
instance and sends it again. A commit that fails but whose row is found committed by a
second look (a lost COMMIT acknowledgement) is answered Success; if that look fails too,
0xA700, and the marker is left for the next start.
"""

from __future__ import annotations

import logging
import os
import ssl
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydicom import uid as dicom_uid
from pynetdicom import AE, evt
from sqlalchemy.exc import SQLAlchemyError

from pacs_classifier.config import ENV_TLS_PASSPHRASE, Config, ListenerConfig
from pacs_classifier.db.engine import Database
from pacs_classifier.errors import ConfigError, DatabaseUnavailable, StorageFull
from pacs_classifier.receive import statuses
from pacs_classifier.receive.backlog import AuditBacklog, PendingEvent
from pacs_classifier.receive.gate import GatedServer, GateLimits, Refusal
from pacs_classifier.receive.inspect import CannotUnderstand, SOPClassMismatch, inspect_received
from pacs_classifier.receive.transport import (
    ABORT_REASON_ATTR,
    configure_pynetdicom,
    received_file,
)
from pacs_classifier.store.ingest import ENTITY_INSTANCE, Ingestor
from pacs_classifier.store.storage import InvalidUID, Storage

log = logging.getLogger(__name__)

#: SPEC §4: the Storage SOP classes we accept.
STORAGE_SOP_CLASSES: tuple[str, ...] = (
    dicom_uid.ComputedRadiographyImageStorage,
    dicom_uid.DigitalXRayImageStorageForPresentation,
    dicom_uid.DigitalXRayImageStorageForProcessing,
    dicom_uid.SecondaryCaptureImageStorage,
)

#: SPEC §4: implicit and explicit VR little endian, deflated, JPEG baseline and extended,
#: JPEG lossless, JPEG-LS, JPEG 2000 (lossless and lossy), RLE.
TRANSFER_SYNTAXES: tuple[str, ...] = (
    dicom_uid.ExplicitVRLittleEndian,
    dicom_uid.ImplicitVRLittleEndian,
    dicom_uid.DeflatedExplicitVRLittleEndian,
    dicom_uid.JPEGBaseline8Bit,
    dicom_uid.JPEGExtended12Bit,
    dicom_uid.JPEGLossless,
    dicom_uid.JPEGLosslessSV1,
    dicom_uid.JPEGLSLossless,
    dicom_uid.JPEGLSNearLossless,
    dicom_uid.JPEG2000Lossless,
    dicom_uid.JPEG2000,
    dicom_uid.RLELossless,
)

#: PS3.4 Annex A: the Verification SOP Class.
VERIFICATION_SOP_CLASS = "1.2.840.10008.1.1"
ACTION_ASSOCIATION = "association"
#: A TCP connection that never became an association (caps, timeouts, not DICOM).
ACTION_CONNECTION = "connection"
#: Audit actor of what the listener does on its own (start-up recovery).
ACTOR_LISTENER = "listener"
REJECT_REASON_CALLING_AE = "calling AE title not recognised"
REJECT_REASON_CALLED_AE = "called AE title not recognised"
REJECT_REASON_LIMIT = "too many associations"
ABORT_REASON_STOPPING = "listener stopping"
ABORT_REASON_IDLE = "no PDU within network_timeout_s"
ABORT_REASON_PEER = "aborted by the peer, or the connection closed"


class _ListenerAE(AE):
    """An AE that knows where its received data sets are buffered."""

    receive_dir: Path | None = None


def build_ssl_context(config: Config) -> ssl.SSLContext | None:
    """The server TLS context of ``[listener.tls]``, or ``None`` when TLS is off."""
    tls = config.listener.tls
    if not tls.enabled:
        return None
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(
            config.path(tls.cert),
            config.path(tls.key),
            password=os.environ.get(ENV_TLS_PASSPHRASE) or None,
        )
        if tls.ca:
            ctx.load_verify_locations(cafile=config.path(tls.ca))
    except (ssl.SSLError, OSError) as exc:
        raise ConfigError(f"listener.tls: cannot load certificate or key: {exc}") from None
    ctx.verify_mode = ssl.CERT_REQUIRED if tls.require_client_cert else ssl.CERT_NONE
    return ctx


@dataclass
class _InFlight:
    """Counts running C-STORE handlers so shutdown can wait for them."""

    draining: threading.Event = field(default_factory=threading.Event)
    _count: int = 0
    _cond: threading.Condition = field(default_factory=threading.Condition)

    @contextmanager
    def track(self) -> Iterator[None]:
        with self._cond:
            self._count += 1
        try:
            yield
        finally:
            with self._cond:
                self._count -= 1
                self._cond.notify_all()

    def wait_idle(self, timeout_s: float) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: self._count == 0, timeout=timeout_s)


@dataclass
class HandlerContext:
    """What the event handlers need, bound through pynetdicom's ``(event, handler, args)``."""

    db: Database
    storage: Storage
    ingestor: Ingestor
    allowed_calling_aets: tuple[str, ...]
    audit: AuditBacklog
    #: Our AE title: a request for another is rejected.
    ae_title: str = ""
    #: A temporary file idle this long belongs to an aborted transfer.
    stale_temp_s: float = 120.0
    in_flight: _InFlight = field(default_factory=_InFlight)


def peer_actor(assoc: Any) -> str:
    """``ae:CALLING@ip``: the audit actor for whoever is on the other end."""
    calling = str(assoc.requestor.ae_title or "").strip() or "?"
    return f"ae:{calling}@{assoc.requestor.address}"[:128]


def _audit(
    ctx: HandlerContext,
    *,
    actor: str,
    action: str,
    outcome: str,
    entity_type: str | None = None,
    entity_id: str | None = None,
    detail: dict[str, Any] | None = None,
) -> None:
    """Write one audit event in its own transaction, or keep it until the database is back."""
    ctx.audit.write(
        PendingEvent(actor, action, outcome, entity_type, entity_id, dict(detail or {}))
    )


def report_refusal(ctx: HandlerContext, refusal: Refusal) -> None:
    """Audit a connection the gate turned away (queued: the gate never waits)."""
    detail: dict[str, Any] = {**refusal.detail, "peer_address": refusal.peer}
    detail["reason"] = refusal.reason
    calling = refusal.calling_ae or "?"
    ctx.audit.submit(
        PendingEvent(
            actor=f"ae:{calling}@{refusal.peer}"[:128],
            action=ACTION_ASSOCIATION if refusal.outcome == "rejected" else ACTION_CONNECTION,
            outcome=refusal.outcome,
            detail=detail,
        )
    )


def _association_detail(assoc: Any) -> dict[str, Any]:
    # The called AE title the peer asked for (ours is assoc.acceptor.ae_title).
    request = assoc.requestor.primitive
    called = getattr(request, "called_ae_title", None) or assoc.acceptor.ae_title
    return {
        "calling_ae": str(assoc.requestor.ae_title or "").strip(),
        "called_ae": str(called or "").strip(),
        "peer_address": assoc.requestor.address,
        "peer_port": assoc.requestor.port,
    }


def handle_accepted(event: Any, ctx: HandlerContext) -> None:
    """Audit an accepted association."""
    _audit(
        ctx,
        actor=peer_actor(event.assoc),
        action=ACTION_ASSOCIATION,
        outcome="accepted",
        detail=_association_detail(event.assoc),
    )


def handle_rejected(event: Any, ctx: HandlerContext) -> None:
    """Audit a rejected association with the reason we gave."""
    detail = _association_detail(event.assoc)
    allowed = ctx.allowed_calling_aets
    if ctx.ae_title and detail["called_ae"] != ctx.ae_title:
        detail["reason"] = REJECT_REASON_CALLED_AE
    elif allowed and detail["calling_ae"] not in allowed:
        detail["reason"] = REJECT_REASON_CALLING_AE
    else:
        detail["reason"] = REJECT_REASON_LIMIT
    log.warning("association from %s rejected: %s", peer_actor(event.assoc), detail["reason"])
    _audit(
        ctx,
        actor=peer_actor(event.assoc),
        action=ACTION_ASSOCIATION,
        outcome="rejected",
        detail=detail,
    )


def handle_aborted(event: Any, ctx: HandlerContext) -> None:
    """Audit an aborted association with why, when we know it."""
    assoc = event.assoc
    detail = _association_detail(assoc)
    reason = getattr(assoc, ABORT_REASON_ATTR, None)
    if reason is None:
        reason = ABORT_REASON_IDLE if assoc.dul.idle_timer_expired() else ABORT_REASON_PEER
    detail["reason"] = reason
    log.warning("association with %s aborted: %s", peer_actor(assoc), reason)
    _audit(
        ctx, actor=peer_actor(assoc), action=ACTION_ASSOCIATION, outcome="aborted", detail=detail
    )


def handle_conn_close(event: Any, ctx: HandlerContext) -> None:
    """A closed connection may have left a partial transfer behind: sweep stale ones."""
    try:
        ctx.storage.sweep_temp(idle_s=ctx.stale_temp_s)
    except OSError as exc:
        log.warning("could not sweep %s: %s", ctx.storage.tmp_dir, exc)


def handle_echo(event: Any, ctx: HandlerContext) -> int:
    """C-ECHO: we are alive."""
    return statuses.SUCCESS


def handle_store(event: Any, ctx: HandlerContext) -> int:
    """C-STORE: check, store durably, commit, and only then answer Success."""
    if ctx.in_flight.draining.is_set():
        # Shutting down: the sender keeps the instance and retries elsewhere or later.
        return statuses.OUT_OF_RESOURCES
    with ctx.in_flight.track():
        return _store(event, ctx)


def _store(event: Any, ctx: HandlerContext) -> int:
    actor = peer_actor(event.assoc)
    req = event.request
    context = event.context
    rq_sop_uid = str(req.AffectedSOPInstanceUID or "")
    tmp: Path | None = None
    try:
        ctx.storage.check_free_space()
        tmp = ctx.storage.adopt_temp(Path(event.dataset_path))
        if str(req.AffectedSOPClassUID) != context.abstract_syntax:
            raise SOPClassMismatch(
                f"Affected SOP Class UID {req.AffectedSOPClassUID} is not the presentation "
                f"context's {context.abstract_syntax}"
            )
        received = received_file(tmp)
        if received is not None and received.write_error is not None:
            raise received.write_error  # the file is incomplete: never inspect or keep it
        meta, warnings = inspect_received(
            tmp,
            context.transfer_syntax,
            context.abstract_syntax,
            digest=received.digest() if received is not None else None,
        )
        if meta.sop_instance_uid != rq_sop_uid.rstrip("\x00").strip():
            raise CannotUnderstand(
                f"SOPInstanceUID {meta.sop_instance_uid} differs from the request's "
                f"Affected SOP Instance UID {rq_sop_uid[:64]!r}"
            )
        staged, tmp = tmp, None  # the ingestor consumes it
        result = ctx.ingestor.ingest(
            staged,
            meta,
            actor=actor,
            calling_ae=str(event.assoc.requestor.ae_title or "").strip()[:16] or None,
            warnings=tuple(warnings),
        )
        log.info(
            "stored %s from %s: %s (instance %d v%d)",
            meta.sop_instance_uid,
            actor,
            result.outcome,
            result.instance_id,
            result.version,
        )
        return statuses.SUCCESS
    except StorageFull as exc:
        return _refuse(ctx, actor, rq_sop_uid, statuses.OUT_OF_RESOURCES, str(exc))
    except (DatabaseUnavailable, SQLAlchemyError) as exc:
        # Nothing to audit into: the sender retries once the database is back.
        log.error("C-STORE %s from %s: %s", rq_sop_uid[:64], actor, exc)
        return statuses.OUT_OF_RESOURCES
    except OSError as exc:
        # A full disk mid-transfer, an I/O error: the sender keeps the instance and retries.
        return _refuse(ctx, actor, rq_sop_uid, statuses.OUT_OF_RESOURCES, f"storage error: {exc}")
    except (CannotUnderstand, InvalidUID) as exc:
        return _refuse(ctx, actor, rq_sop_uid, statuses.CANNOT_UNDERSTAND, str(exc))
    except SOPClassMismatch as exc:
        return _refuse(ctx, actor, rq_sop_uid, statuses.DATASET_DOES_NOT_MATCH_SOP_CLASS, str(exc))
    finally:
        ctx.storage.discard(tmp)


def _refuse(ctx: HandlerContext, actor: str, sop_uid: str, status: int, reason: str) -> int:
    log.warning(
        "C-STORE %s from %s refused %s: %s", sop_uid[:64], actor, statuses.describe(status), reason
    )
    _audit(
        ctx,
        actor=actor,
        action="store",
        outcome="refused",
        entity_type=ENTITY_INSTANCE,
        entity_id=sop_uid[:128] or None,
        detail={
            "status": f"0x{status:04X}",
            "status_name": statuses.NAMES[status],
            "reason": reason,
        },
    )
    return status


class Listener:
    """The listening AE with its handlers; :meth:`start` returns, :meth:`stop` drains."""

    def __init__(
        self,
        config: ListenerConfig,
        db: Database,
        storage: Storage,
        ingestor: Ingestor,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self.config = config
        self.ssl_context = ssl_context
        self.ctx = HandlerContext(
            db=db,
            storage=storage,
            ingestor=ingestor,
            allowed_calling_aets=tuple(a.strip() for a in config.allowed_calling_aets),
            audit=AuditBacklog(db),
            ae_title=config.ae_title.strip(),
            stale_temp_s=2 * max(config.network_timeout_s, config.dimse_timeout_s),
        )
        self._ae: _ListenerAE | None = None
        self._server: GatedServer | None = None

    @property
    def serving(self) -> bool:
        """True between :meth:`start` and :meth:`stop` (the port is bound)."""
        return self._server is not None

    @property
    def address(self) -> tuple[str, int]:
        if self._server is None:
            raise RuntimeError("listener is not started")
        host, port = self._server.server_address[:2]
        return str(host), int(port)

    def build_ae(self) -> _ListenerAE:
        c = self.config
        ae = _ListenerAE(ae_title=c.ae_title)
        ae.receive_dir = self.ctx.storage.tmp_dir
        ae.maximum_associations = c.max_associations
        ae.acse_timeout = c.acse_timeout_s
        ae.dimse_timeout = c.dimse_timeout_s
        ae.network_timeout = c.network_timeout_s
        ae.maximum_pdu_size = c.maximum_pdu_size
        ae.require_calling_aet = list(self.ctx.allowed_calling_aets)
        ae.require_called_aet = True
        ae.add_supported_context(VERIFICATION_SOP_CLASS)
        for sop_class in STORAGE_SOP_CLASSES:
            ae.add_supported_context(sop_class, list(TRANSFER_SYNTAXES))
        return ae

    def start(self) -> None:
        """Open the storage, settle what a crash left, bind the port and serve.

        Raises :class:`~pacs_classifier.errors.ConfigError` (one line, naming the key)
        when the storage folder cannot be used or the address cannot be listened on.
        """
        try:
            self.ctx.storage.open()
        except OSError as exc:
            raise ConfigError(
                f"storage.root: cannot use {self.ctx.storage.root}: {exc.strerror or exc}"
            ) from None
        # Before serving: no ingest of ours is under way, so every marker is a leftover.
        self.ctx.ingestor.recover_pending(actor=ACTOR_LISTENER)
        configure_pynetdicom()
        self._ae = self.build_ae()
        handlers: list[Any] = [
            (evt.EVT_C_ECHO, handle_echo, [self.ctx]),
            (evt.EVT_C_STORE, handle_store, [self.ctx]),
            (evt.EVT_ACCEPTED, handle_accepted, [self.ctx]),
            (evt.EVT_REJECTED, handle_rejected, [self.ctx]),
            (evt.EVT_ABORTED, handle_aborted, [self.ctx]),
            (evt.EVT_CONN_CLOSE, handle_conn_close, [self.ctx]),
        ]
        c = self.config
        self.ctx.audit.start()
        # AE.start_server, with our front door (receive/gate.py) as the server class.
        try:
            server = self._ae.make_server(
                (c.host, c.port),
                ssl_context=self.ssl_context,
                evt_handlers=handlers,
                server_class=GatedServer,
            )
        except OSError as exc:  # in use, not an address of this host, unresolvable
            self.ctx.audit.stop()
            raise ConfigError(
                f"listener.host/port: cannot listen on {c.host}:{c.port}: {exc.strerror or exc}"
            ) from None
        assert isinstance(server, GatedServer)
        server.configure(
            GateLimits(
                max_connections=c.max_connections,
                max_connections_per_peer=c.max_connections_per_peer,
                handshake_timeout_s=c.handshake_timeout_s,
                network_timeout_s=c.network_timeout_s,
            ),
            report=lambda refusal: report_refusal(self.ctx, refusal),
            refuse_new=lambda: self.ctx.audit.full,
        )
        threading.Thread(target=server.serve_forever, name="listener-accept", daemon=True).start()
        self._ae._servers.append(server)
        self._server = server
        host, port = self.address
        log.info(
            "listening on %s:%d as %s (TLS %s)",
            host,
            port,
            self.config.ae_title,
            "on" if self.ssl_context else "off",
        )

    def stop(self, grace_s: float = 30.0) -> None:
        """Stop accepting, let in-flight C-STOREs finish, then close the associations."""
        if self._server is None:
            return
        server, self._server = self._server, None
        self.ctx.in_flight.draining.set()
        server.shutdown()
        assocs = list(server.active_associations)
        if not self.ctx.in_flight.wait_idle(grace_s):
            log.warning("C-STOREs still running after %.0f s; closing anyway", grace_s)
        for assoc in assocs:
            if assoc.is_alive():
                setattr(assoc, ABORT_REASON_ATTR, ABORT_REASON_STOPPING)
                assoc.abort()
        deadline = time.monotonic() + 5
        for assoc in assocs:
            assoc.join(max(0.0, deadline - time.monotonic()))
        # Transfers cut short by the aborts leave partial files; nothing writes any more.
        self.ctx.storage.sweep_temp()
        self.ctx.audit.stop()
        log.info("listener stopped")
