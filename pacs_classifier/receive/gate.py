"""The listener's front door: connection caps, deadlines, and the A-ASSOCIATE-RQ read first.

pynetdicom gives every accepted TCP connection two threads (the association and its
DUL) before a byte is read, counts them against ``maximum_associations``, and reads a
PDU with no deadline; with TLS it runs the handshake in the accept thread. One port
scanner, a crashed modality's half-open connections or a peer that announces a 4 GiB
PDU and stalls could lock every real sender out. :class:`GatedServer` replaces that
front door (see ``docs/threat-model.md``):

- At accept, in the accept thread and without I/O: at most
  ``max_connections_per_peer`` open connections per IP address (the new one is closed)
  and ``max_connections`` in all; when full, the oldest connection that has not yet
  sent its A-ASSOCIATE-RQ is closed to make room, so a flood of idle connections
  cannot keep a real peer out for longer than its own request takes.
- In the connection's own thread: the TLS handshake and the complete A-ASSOCIATE-RQ
  within ``handshake_timeout_s`` of the connect, the PDU type and length checked before
  anything is allocated, and the AE titles checked byte by byte (PS3.8 Table 9-11,
  PS3.5 §6.2 AE): a NUL, a backslash, a control character or 0xFF gets A-ASSOCIATE-RJ,
  not the A-ABORT that pynetdicom's decoder would give, and is audited.
- Only then does pynetdicom get the connection, with the request already decoded, so a
  connection costs its two association threads only once it is a real association.

Pre-association refusals are reported through :attr:`GatedServer.report` (the
listener audits them through its backlog, never blocking this thread), at most once a
minute per peer and reason; each event's ``count`` says how many connections it stands
for, and a count left over when a peer goes quiet is reported when its minute is up.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import ssl
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Final

from pynetdicom import evt
from pynetdicom.transport import RequestHandler, ThreadedAssociationServer

from pacs_classifier.receive.transport import ABORT_INVALID_PDU, recv_until

log = logging.getLogger(__name__)

#: PS3.8 §9.3.2: A-ASSOCIATE-RQ is PDU type 0x01; its fixed part is 68 bytes.
PDU_ASSOCIATE_RQ: Final = 0x01
_ASSOCIATE_RQ_FIXED: Final = 68
#: An A-ASSOCIATE-RQ proposing every SOP class we know in every transfer syntax is a
#: few hundred KiB; a length beyond this is not a request we would ever accept.
MAX_ASSOCIATE_RQ_BYTES: Final = 1 << 20
_HEADER = struct.Struct(">BBL")
#: PS3.8 §9.3.4 A-ASSOCIATE-RJ: result, source and reason/diag.
RJ_PERMANENT: Final = 0x01
RJ_TRANSIENT: Final = 0x02
RJ_SOURCE_USER: Final = 0x01
RJ_SOURCE_PROVIDER_PRESENTATION: Final = 0x03
RJ_CALLING_AE_NOT_RECOGNISED: Final = 0x03
RJ_CALLED_AE_NOT_RECOGNISED: Final = 0x07
RJ_LOCAL_LIMIT_EXCEEDED: Final = 0x02
#: A refusal of one peer for one reason is reported at most this often.
REPORT_EVERY_S: Final = 60.0

REASON_PEER_CAP = "too many connections from this address"
REASON_TOTAL_CAP = "too many connections"
REASON_EVICTED = "closed to make room: no A-ASSOCIATE-RQ yet"
REASON_HANDSHAKE_TIMEOUT = "no complete A-ASSOCIATE-RQ within the handshake timeout"
REASON_AUDIT_BACKLOG = "audit trail cannot be written"


@dataclass(frozen=True)
class GateLimits:
    """The ``[listener]`` keys this module enforces."""

    max_connections: int
    max_connections_per_peer: int
    handshake_timeout_s: float
    network_timeout_s: float


@dataclass(frozen=True)
class Refusal:
    """A connection that never became an association, as reported to the audit trail."""

    peer: str
    outcome: str  # "refused" | "rejected" | "aborted"
    reason: str
    detail: dict[str, Any] = field(default_factory=dict)
    #: The calling AE title, when the request had a valid one (the audit actor).
    calling_ae: str | None = None


class _Dropped(Exception):
    """A connection that ends before pynetdicom sees it; ``reason`` None: quietly."""

    def __init__(
        self,
        reason: str | None,
        outcome: str = "aborted",
        actor_ae: str | None = None,
        **detail: Any,
    ) -> None:
        super().__init__(reason or "closed")
        self.reason = reason
        self.outcome = outcome
        self.actor_ae = actor_ae
        self.detail = detail


@dataclass
class _Conn:
    peer: str
    opened: float
    sock: socket.socket
    assoc: Any = None
    #: Past the A-ASSOCIATE-RQ (handed to pynetdicom) or given up.
    settled: bool = False
    #: Closed by :meth:`GatedServer.verify_request` to make room (reported there).
    evicted: bool = False

    def alive(self) -> bool:
        return not self.settled or (self.assoc is not None and self.assoc.is_alive())

    def cut(self) -> None:
        """Make the connection's thread give up now (any thread may call this)."""
        # The base method: an SSLSocket's own shutdown would change its state under the
        # thread that owns it. OSError: already closed by its owner.
        with contextlib.suppress(OSError):
            socket.socket.shutdown(self.sock, socket.SHUT_RDWR)


def check_ae_bytes(raw: bytes) -> str | None:
    """Why a 16-byte AE title field is not a valid AE value (PS3.5 §6.2), or ``None``.

    Leading and trailing spaces are not significant (PS3.8 Table 9-11); every other
    byte must be a printable ASCII character other than backslash.
    """
    if not raw.strip(b" "):
        return "only spaces"
    for byte in raw:
        if byte < 0x20 or byte > 0x7E:
            return f"byte 0x{byte:02X} is not a printable ASCII character"
        if byte == 0x5C:
            return "contains a backslash"
    return None


def printable_ae(raw: bytes) -> str:
    """An AE title field as text for logs and audit details, control bytes escaped."""
    return raw.decode("latin-1").encode("unicode_escape").decode("ascii").strip()


def rj_pdu(result: int, source: int, reason: int) -> bytes:
    """An A-ASSOCIATE-RJ PDU (PS3.8 §9.3.4)."""
    return _HEADER.pack(0x03, 0, 4) + bytes((0, result, source, reason))


def _send_quietly(sock: socket.socket, data: bytes) -> None:
    """Best effort, two seconds at most: the peer may be gone, or not reading."""
    try:
        sock.settimeout(2.0)
        sock.sendall(data)
    except OSError:
        pass  # the refusal is reported all the same


class _PrefetchedHandler(RequestHandler):
    """pynetdicom's request handler, given the A-ASSOCIATE-RQ already read and checked."""

    def __init__(
        self, request: socket.socket, client_address: Any, server: GatedServer, pdu: bytes
    ) -> None:
        self.pdu = pdu
        self.assoc: Any = None
        super().__init__(request, client_address, server)

    def handle(self) -> None:
        assoc = self._create_association()
        dul = assoc.dul
        # What DULServiceProvider._read_pdu_data does with a received PDU; the socket
        # queued Evt5 (transport connection open) already, so the DUL sees the usual order.
        pdu, event = dul._decode_pdu(bytearray(self.pdu))
        evt.trigger(assoc, evt.EVT_CONN_OPEN, {"address": self.client_address})
        dul._recv_pdu.put(pdu)
        dul.event_queue.put(event)
        self.assoc = assoc
        assoc.start()


class GatedServer(ThreadedAssociationServer):
    """pynetdicom's threaded server with the caps and deadlines described above.

    Built by ``AE.make_server(..., server_class=GatedServer)``; :meth:`configure` must
    be called before it serves.
    """

    daemon_threads = True
    block_on_close = False
    #: The listen backlog: pynetdicom's 5 drops a real peer's SYN during a connect flood.
    request_queue_size = 128

    limits: GateLimits
    report: Callable[[Refusal], None]
    #: True while new associations must be refused (the audit trail cannot keep up).
    refuse_new: Callable[[], bool]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        # Before pynetdicom's __init__ binds: a failed bind calls server_close.
        self._lock = threading.Lock()
        self._conns: list[_Conn] = []
        #: (peer, reason) -> (last reported at, refusals not reported since, outcome)
        self._reported: dict[tuple[str, str], tuple[float, int, str]] = {}
        super().__init__(*args, **kwargs)

    def configure(
        self,
        limits: GateLimits,
        report: Callable[[Refusal], None],
        refuse_new: Callable[[], bool] = lambda: False,
    ) -> None:
        self.limits = limits
        self.report = report
        self.refuse_new = refuse_new

    # ----------------------------------------------------------- accept thread

    def get_request(self) -> tuple[socket.socket, Any]:
        """Accept only: the TLS handshake happens in the connection's own thread."""
        assert self.socket is not None
        return self.socket.accept()

    def verify_request(self, request: Any, client_address: Any) -> bool:
        """Apply the caps; never blocks (no I/O but closing sockets)."""
        peer = str(client_address[0])
        victim: _Conn | None = None
        with self._lock:
            self._conns = [c for c in self._conns if c.alive()]
            from_peer = sum(1 for c in self._conns if c.peer == peer)
            if from_peer >= self.limits.max_connections_per_peer:
                refused = REASON_PEER_CAP
            elif len(self._conns) >= self.limits.max_connections:
                pending = [c for c in self._conns if not c.settled]
                if pending:
                    victim = min(pending, key=lambda c: c.opened)
                    victim.evicted = True
                    self._conns.remove(victim)
                    refused = ""
                else:
                    refused = REASON_TOTAL_CAP
            else:
                refused = ""
            if not refused:
                self._conns.append(_Conn(peer, time.monotonic(), request))
        if victim is not None:
            victim.cut()
            self._report(Refusal(victim.peer, "aborted", REASON_EVICTED))
        if refused:
            self._report(Refusal(peer, "refused", refused))
            return False
        return True

    def open_connections(self) -> tuple[int, int]:
        """(open connections, of which not yet associated), for tests and status."""
        with self._lock:
            live = [c for c in self._conns if c.alive()]
            return len(live), sum(1 for c in live if not c.settled)

    def _report(self, refusal: Refusal) -> None:
        """Log and report, at most once per :data:`REPORT_EVERY_S` per peer and reason."""
        key = (refusal.peer, refusal.reason)
        now = time.monotonic()
        with self._lock:
            since, skipped, _ = self._reported.get(key, (-REPORT_EVERY_S, 0, ""))
            if now - since < REPORT_EVERY_S:
                self._reported[key] = (since, skipped + 1, refusal.outcome)
                return
            self._reported[key] = (now, 0, refusal.outcome)
        self._emit(refusal, 1 + skipped)

    def _emit(self, refusal: Refusal, count: int) -> None:
        # count: how many connections this one event stands for (the audit's sum is exact).
        detail = {**refusal.detail, "count": count}
        log.warning(
            "connection from %s %s: %s%s",
            refusal.peer,
            refusal.outcome,
            refusal.reason,
            f" ({count} since the last report)" if count > 1 else "",
        )
        self.report(
            Refusal(refusal.peer, refusal.outcome, refusal.reason, detail, refusal.calling_ae)
        )

    def service_actions(self) -> None:
        """Between accepts (every 0.5 s): report the counts a quiet minute left unsaid."""
        super().service_actions()
        now = time.monotonic()
        due: list[tuple[str, str, str, int]] = []
        with self._lock:
            for (peer, reason), (since, skipped, outcome) in list(self._reported.items()):
                if now - since < REPORT_EVERY_S:
                    continue
                if skipped:
                    due.append((peer, reason, outcome, skipped))
                    self._reported[(peer, reason)] = (now, 0, outcome)
                else:
                    del self._reported[(peer, reason)]  # quiet for a minute: forget it
        for peer, reason, outcome, skipped in due:
            self._emit(Refusal(peer, outcome, reason), skipped)

    # ----------------------------------------------------------- connection thread

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        """TLS, then the A-ASSOCIATE-RQ by the deadline, then pynetdicom."""
        with self._lock:
            conn = next((c for c in self._conns if c.sock is request), None)
        if conn is None:  # evicted before this thread started
            self.shutdown_request(request)
            return
        try:
            sock, pdu = self._read_request(conn)
            try:
                handler = _PrefetchedHandler(sock, client_address, self, pdu)
            except Exception as exc:  # pynetdicom's decoder raises many types
                # pynetdicom answers an undecodable PDU with A-ABORT too (its Evt19).
                _send_quietly(sock, ABORT_INVALID_PDU)
                raise _Dropped(f"malformed A-ASSOCIATE-RQ: {exc}") from None
            conn.assoc = handler.assoc
        except _Dropped as exc:
            if conn.evicted:
                pass  # reported when it was closed
            elif exc.reason is not None:
                detail = {"called_ae": None, "calling_ae": None, **exc.detail}
                self._report(Refusal(conn.peer, exc.outcome, exc.reason, detail, exc.actor_ae))
            else:
                log.debug("connection from %s closed before a request", conn.peer)
        finally:
            conn.settled = True
            if conn.assoc is None:  # pynetdicom never got it: ours to close
                self.shutdown_request(conn.sock)

    def _read_request(self, conn: _Conn) -> tuple[socket.socket, bytes]:
        deadline = conn.opened + self.limits.handshake_timeout_s
        sock = conn.sock
        try:
            if self.ssl_context is not None:
                sock.settimeout(max(0.001, deadline - time.monotonic()))
                sock = self.ssl_context.wrap_socket(sock, server_side=True)
                conn.sock = sock
            header = recv_until(sock, 6, deadline)
            if not header:
                raise _Dropped(None)
            if len(header) < 6:
                raise _Dropped("closed inside a PDU header")
            pdu_type, _, length = _HEADER.unpack(header)
            if pdu_type != PDU_ASSOCIATE_RQ:
                raise _Dropped(f"not an A-ASSOCIATE-RQ (PDU type 0x{pdu_type:02X})")
            if not _ASSOCIATE_RQ_FIXED <= length <= MAX_ASSOCIATE_RQ_BYTES:
                raise _Dropped(f"A-ASSOCIATE-RQ of {length} bytes refused unread")
            body = recv_until(sock, length, deadline)
            if len(body) < length:
                raise _Dropped("closed inside the A-ASSOCIATE-RQ")
        except TimeoutError:
            raise _Dropped(REASON_HANDSHAKE_TIMEOUT) from None
        except ssl.SSLError as exc:
            raise _Dropped(f"TLS handshake failed: {exc.reason or exc}") from None
        except OSError as exc:
            raise _Dropped(f"connection error: {exc.strerror or exc}") from None
        pdu = bytes(header + body)
        self._check_titles(sock, pdu)
        sock.settimeout(self.limits.network_timeout_s)
        return sock, pdu

    def _check_titles(self, sock: socket.socket, pdu: bytes) -> None:
        """Refuse malformed AE titles and a full audit backlog with A-ASSOCIATE-RJ."""
        called, calling = pdu[10:26], pdu[26:42]
        names = {"called_ae": printable_ae(called), "calling_ae": printable_ae(calling)}
        rj: tuple[int, int, int] | None = None
        why = ""
        if (bad := check_ae_bytes(calling)) is not None:
            rj = (RJ_PERMANENT, RJ_SOURCE_USER, RJ_CALLING_AE_NOT_RECOGNISED)
            why = f"calling AE title is not a valid AE value: {bad}"
        elif (bad := check_ae_bytes(called)) is not None:
            rj = (RJ_PERMANENT, RJ_SOURCE_USER, RJ_CALLED_AE_NOT_RECOGNISED)
            why = f"called AE title is not a valid AE value: {bad}"
        elif self.refuse_new():
            rj = (RJ_TRANSIENT, RJ_SOURCE_PROVIDER_PRESENTATION, RJ_LOCAL_LIMIT_EXCEEDED)
            why = REASON_AUDIT_BACKLOG
        if rj is None:
            return
        _send_quietly(sock, rj_pdu(*rj))
        valid_calling = calling.decode("ascii").strip() if check_ae_bytes(calling) is None else None
        raise _Dropped(why, outcome="rejected", actor_ae=valid_calling, **names)

    def server_close(self) -> None:
        """Stop serving; connections still before their request are closed now."""
        with self._lock:
            pending = [c for c in self._conns if not c.settled]
        for conn in pending:
            conn.cut()
        super().server_close()
