"""How the listener's pynetdicom receives: bounded, hashed and written back as it goes.

:func:`configure_pynetdicom` changes pynetdicom process-wide before the listener binds its
port. ``STORE_RECV_CHUNKED_DATASET`` is public configuration: a data set is streamed into
a file, never held whole in memory. The rest replaces pynetdicom 3.0 internals, each for a
reason recorded in ``docs/benchmarks.md`` ("pynetdicom patches: kept or dropped"):

- ``pdu-reader``: ``DULServiceProvider._read_pdu_data`` (:func:`_read_pdu_data`) bounds
  each PDU: its length is checked against what we announced before a byte of it is read
  (a P-DATA-TF no longer than our Maximum Length, PS3.8 §D.1; any other PDU at most
  1 MiB), and the whole PDU must arrive within ``network_timeout_s`` of its first byte.
  pynetdicom reads with no deadline: a peer announcing 4 GiB and stalling held its
  association, and a 256 MiB P-DATA-TF was buffered whole. A breach aborts the
  association (A-ABORT, reason "invalid PDU parameter value"), recorded on the
  association as :data:`ABORT_REASON_ATTR` for the listener's audit event. It reads with
  ``recv_into`` into one buffer (:func:`recv_until`), where pynetdicom reads 4 KiB per
  ``recv()`` into a growing ``bytearray`` (about 2,000 calls per 8 MB instance).
- ``receive-file``: the chunked data set goes to a :class:`ReceiveFile` in
  ``<storage.root>/.tmp`` rather than pynetdicom's ``NamedTemporaryFile`` in the system's
  temporary folder: the final rename stays on one file system, a restart finds and
  deletes what a crash left, the data set is SHA-256 hashed while it arrives (the handler
  need not read 8 MB back), and its pages are handed to the disk every
  :data:`WRITEBACK_BYTES` (``sync_file_range``), so the fsync before Success waits for
  the tail only.
- ``lenient-uid``: :func:`lenient_uid` as pynetdicom's UI validator, so an over-long UID
  in a request gets a status and an audit event from our handler instead of an abort.

They lean on internals no release promises to keep. :func:`pynetdicom_drift` lists what no
longer matches the pynetdicom they were written for (:data:`PYNETDICOM_SUPPORTED`, the
pin in ``pyproject.toml``); :func:`configure_pynetdicom` refuses to start on any, and
``tests/test_transport.py`` fails with the same list.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import hashlib
import logging
import os
import re
import struct
import tempfile
import threading
import time
import uuid
import weakref
from collections.abc import Collection
from pathlib import Path
from typing import Any, Final, cast

from pynetdicom import _config, dimse_messages
from pynetdicom.dul import DULServiceProvider
from pynetdicom.transport import AssociationSocket

from pacs_classifier.errors import PermanentError
from pacs_classifier.receive.inspect import (
    PART10_HEAD,
    CannotUnderstand,
    FileLayout,
    StreamDigest,
    part10_layout,
)
from pacs_classifier.store.storage import TMP_PREFIX

log = logging.getLogger(__name__)

#: Start the disk write of every this many received bytes (``sync_file_range``).
WRITEBACK_BYTES = 1 << 20
#: Larger than any real file meta; a header claiming more is not waited for.
_MAX_META_LENGTH = 1 << 16

_SYNC_FILE_RANGE_WRITE = 2


def _load_sync_file_range() -> Any:
    """glibc's ``sync_file_range(2)``, or ``None`` where there is none (not Linux)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        fn = libc.sync_file_range
    except (OSError, AttributeError, TypeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


_sync_file_range = _load_sync_file_range()
#: ``os.write``, named here so that a test can fill the disk in the middle of a transfer.
_os_write = os.write


class ReceiveFile:
    """One C-STORE's data set as pynetdicom writes it: unbuffered, hashed, written back.

    pynetdicom writes the preamble, ``DICM`` and the file meta first, then each P-DATA
    fragment of the data set, calling ``write`` and ``file.flush``. The SHA-256 covers the
    bytes after the file meta (the meta differs by receiver; see
    :class:`~pacs_classifier.store.ingest.InstanceMeta`); :attr:`dataset_offset` says where
    that is, read from the meta group length as the bytes went by. If they do not look
    like a Part 10 header, no digest is kept and the handler hashes the file itself.

    A failed write (a full disk, an I/O error) is kept in :attr:`write_error` rather than
    raised into pynetdicom, which would abort the association: the rest of the data set
    is read and dropped, and the handler answers it with a status (0xA700).
    """

    def __init__(self, directory: str | None, prefix: str, suffix: str) -> None:
        self._fd: int | None = None
        self._size = 0
        self._submitted = 0
        self._head = bytearray()
        self._hash = hashlib.sha256()
        #: Where the data set starts; ``None`` until known, ``-1`` if it cannot be told.
        self.dataset_offset: int | None = None
        #: The first error writing this file; the file is incomplete when set.
        self.write_error: OSError | None = None
        try:
            self._fd, self.name = tempfile.mkstemp(suffix=suffix, prefix=prefix, dir=directory)
        except OSError as exc:
            # No file (a full disk, a read-only folder): drop the data set like a failed
            # write, under a name that exists nowhere, so the handler can refuse it.
            self.write_error = exc
            self.name = os.path.join(
                directory or tempfile.gettempdir(), f"{prefix}{uuid.uuid4().hex}-failed{suffix}"
            )
            log.error("cannot create a receive file in %s: %s", directory, exc)

    @property
    def file(self) -> ReceiveFile:
        """pynetdicom calls ``.file.flush()`` after each fragment (a property: no cycle)."""
        return self

    @property
    def size(self) -> int:
        return self._size

    def digest(self) -> StreamDigest | None:
        """SHA-256 of the bytes after the file meta, if the header was understood."""
        if self.write_error is not None or self.dataset_offset is None or self.dataset_offset < 0:
            return None
        return StreamDigest(FileLayout(self.dataset_offset, self._size), self._hash.hexdigest())

    def write(self, data: bytes | bytearray | memoryview) -> int:
        view = memoryview(data).cast("B")
        total = len(view)
        if self.write_error is not None:
            return total  # dropped: the handler refuses this data set
        if self._fd is None:
            raise ValueError("write to a closed receive file")
        try:
            done = 0
            while done < total:
                done += _os_write(self._fd, view[done:])
        except OSError as exc:
            self.write_error = exc
            log.error("cannot write %s, dropping the rest of its data set: %s", self.name, exc)
            return total
        self._hash_bytes(view)
        self._size += total
        if _sync_file_range is not None and self._size - self._submitted >= WRITEBACK_BYTES:
            # Asynchronous: starts the write of the dirty pages and returns.
            _sync_file_range(
                self._fd, self._submitted, self._size - self._submitted, _SYNC_FILE_RANGE_WRITE
            )
            self._submitted = self._size
        return total

    def _hash_bytes(self, view: memoryview) -> None:
        offset = self.dataset_offset
        if offset is not None:
            if offset >= 0:
                self._hash.update(view)
            return
        self._head += view
        if len(self._head) < PART10_HEAD:
            return
        try:
            offset = part10_layout(self._head).dataset_offset
        except CannotUnderstand:
            offset = -1
        if offset - PART10_HEAD > _MAX_META_LENGTH:
            offset = -1  # not waited for
        if offset < 0:
            self.dataset_offset = -1
            self._head = bytearray()
        elif len(self._head) >= offset:
            self.dataset_offset = offset
            self._hash.update(memoryview(self._head)[offset:])
            self._head = bytearray()
        # else the meta is still arriving: the next write completes it.

    def flush(self) -> None:
        """Nothing is buffered here."""

    def close(self) -> None:
        fd, self._fd = getattr(self, "_fd", None), None
        if fd is not None:
            os.close(fd)

    def __del__(self) -> None:
        self.close()


#: The receive files of data sets not yet handled, by path: the handler finds its digest
#: here. Weak: an entry goes when pynetdicom drops the file (handled or aborted).
_RECEIVING: weakref.WeakValueDictionary[str, ReceiveFile] = weakref.WeakValueDictionary()
_RECEIVING_LOCK = threading.Lock()


def received_file(path: Path | str) -> ReceiveFile | None:
    """The :class:`ReceiveFile` that wrote ``path``, while pynetdicom still holds it."""
    with _RECEIVING_LOCK:
        return _RECEIVING.get(str(path))


def _receive_temp_file(*args: Any, **kwargs: Any) -> Any:
    """pynetdicom's temporary file for a chunked C-STORE, created in our ``.tmp`` folder.

    pynetdicom opens it from the association's DUL thread; routing it to the AE's
    storage folder keeps the final rename on one file system and lets a restart find
    and delete what a crash left behind. An AE without a ``receive_dir`` (a client's,
    in the same process) gets pynetdicom's usual file.
    """
    thread = threading.current_thread()
    assoc = getattr(thread, "assoc", thread)
    receive_dir = getattr(getattr(assoc, "ae", None), "receive_dir", None)
    if receive_dir is None:
        return tempfile.NamedTemporaryFile(*args, **kwargs)
    received = ReceiveFile(str(receive_dir), TMP_PREFIX, kwargs.get("suffix", ""))
    with _RECEIVING_LOCK:
        _RECEIVING[received.name] = received
    return received


#: PS3.8 §9.3.1: the PDU types there are; P-DATA-TF is 0x04.
_PDU_TYPES: Final = frozenset(range(0x01, 0x08))
_PDU_P_DATA: Final = 0x04
#: Any PDU but P-DATA-TF: an A-ASSOCIATE-AC or -RQ is a few KiB, the rest 4 bytes.
MAX_CONTROL_PDU_BYTES: Final = 1 << 20
#: A P-DATA-TF when we announced no Maximum Length (``maximum_pdu_size = 0``).
MAX_UNLIMITED_PDU_BYTES: Final = 64 << 20
#: The association attribute that says why we aborted it (audited by the listener).
ABORT_REASON_ATTR: Final = "pacs_abort_reason"
_PDU_HEADER = struct.Struct(">BBL")
#: A-ABORT (PS3.8 §9.3.8) from the service provider, reason "invalid PDU parameter value".
ABORT_INVALID_PDU: Final = _PDU_HEADER.pack(0x07, 0, 4) + bytes((0, 0, 0x02, 0x06))


def pdu_limit(assoc: Any, pdu_type: int) -> int:
    """The longest PDU of ``pdu_type`` we read on ``assoc``: what we told the peer."""
    if pdu_type != _PDU_P_DATA:
        return MAX_CONTROL_PDU_BYTES
    local = assoc.acceptor if assoc.is_acceptor else assoc.requestor
    maximum = int(local.maximum_length or 0)
    return maximum if maximum > 0 else MAX_UNLIMITED_PDU_BYTES


def recv_until(sock: Any, n: int, deadline: float | None) -> bytearray:
    """``n`` bytes, fewer if the peer closes; :class:`TimeoutError` at ``deadline``."""
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    try:
        while got < n:
            if deadline is not None:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(f"{got} of {n} bytes before the deadline")
                sock.settimeout(remaining)
            count = sock.recv_into(view[got:])
            if not count:
                break
            got += count
    finally:
        view.release()
    del buf[got:]
    return buf


def _abort_connection(dul: DULServiceProvider, reason: str) -> None:
    """Tell the peer (A-ABORT), close the connection, and say why on the association."""
    assoc = dul.assoc
    setattr(assoc, ABORT_REASON_ATTR, reason)
    log.warning(
        "aborting the association with %s: %s",
        getattr(assoc.requestor if assoc.is_acceptor else assoc.acceptor, "address", "?"),
        reason,
    )
    assoc_sock = cast(AssociationSocket, dul.socket)
    sock = cast(Any, assoc_sock.socket)
    if sock is not None:
        try:
            sock.settimeout(2.0)
            sock.sendall(ABORT_INVALID_PDU)
        except OSError:
            pass  # the peer is gone or not reading; closing is what matters
    assoc_sock.close()  # queues Evt17: the state machine ends the association


def _read_pdu_data(self: DULServiceProvider) -> None:
    """Read one PDU, bounded in size and time; queue its event as pynetdicom's does."""
    assoc_sock = cast(AssociationSocket, self.socket)
    sock = cast(Any, assoc_sock.socket)
    if sock is None:
        self.event_queue.put("Evt17")  # Evt17: transport connection closed
        return
    timeout = self.assoc.network_timeout
    # The DUL calls this once the socket is readable: the PDU has begun to arrive.
    deadline = None if timeout is None else time.monotonic() + float(timeout)
    try:
        header = recv_until(sock, 6, deadline)
        if len(header) < 6:
            self.event_queue.put("Evt17")
            return
        pdu_type, _, length = _PDU_HEADER.unpack(header)
        if pdu_type not in _PDU_TYPES:
            log.warning("unknown PDU type 0x%02X received", pdu_type)
            self.event_queue.put("Evt19")  # Evt19: unrecognised PDU, the FSM aborts
            return
        limit = pdu_limit(self.assoc, pdu_type)
        if length > limit:
            _abort_connection(
                self, f"PDU type 0x{pdu_type:02X} of {length} bytes refused unread (limit {limit})"
            )
            return
        body = recv_until(sock, length, deadline)
    except TimeoutError:
        _abort_connection(self, f"a PDU took longer than network_timeout_s ({timeout} s)")
        return
    except OSError as exc:
        log.info("connection closed while reading a PDU: %s", exc)
        self.event_queue.put("Evt17")
        return
    if len(body) < length:
        log.info("connection closed inside a PDU (%d of %d bytes)", len(body), length)
        self.event_queue.put("Evt17")
        return
    try:
        pdu, event = self._decode_pdu(header + body)
    except Exception as exc:  # as pynetdicom: any decoding error is Evt19
        log.warning("undecodable PDU type 0x%02X: %s", pdu_type, exc)
        self.event_queue.put("Evt19")
        return
    self.event_queue.put(event)
    self._recv_pdu.put(pdu)


#: Longer than any UID field a PDU can carry sensibly; a value beyond it is refused.
_MAX_UID_TEXT = 1024


def lenient_uid(value: str) -> tuple[bool, str]:
    """pynetdicom's UI validator, lenient: a bad UID in a request gets a status from us.

    pynetdicom's own refuses a UID over 64 characters while it decodes the DIMSE
    command set, and the exception aborts the association with no status and nothing
    audited. Accepted here, the request reaches the C-STORE handler, whose UID checks
    (``store.storage.check_uid``) answer 0xC000 and audit the reason.
    """
    if len(value) > _MAX_UID_TEXT:
        return False, f"must not exceed {_MAX_UID_TEXT} characters"
    return True, ""


#: The pynetdicom releases these replacements were written for and measured with
#: (``pyproject.toml`` pins the same range).
PYNETDICOM_SUPPORTED: Final = ((3, 0, 4), (3, 1))
PYNETDICOM_SUPPORTED_TEXT: Final = ">=3.0.4,<3.1"

# pynetdicom's own versions of what we replace, as imported (before any replacement).
_ORIGINAL_READ_PDU_DATA: Final = getattr(DULServiceProvider, "_read_pdu_data", None)
_ORIGINAL_TEMP_FILE: Final = getattr(dimse_messages, "NamedTemporaryFile", None)
_ORIGINAL_UI_VALIDATOR: Final = _config.VALIDATORS.get("UI")

#: (name, pynetdicom's object, the start of the signature it had) for every internal we
#: call or replace; ``None`` signature: checked for presence only.
_INTERNALS: Final = (
    ("DULServiceProvider._read_pdu_data", _ORIGINAL_READ_PDU_DATA, "(self) -> None"),
    (
        "DULServiceProvider._decode_pdu",
        getattr(DULServiceProvider, "_decode_pdu", None),
        "(self, bytestream: bytearray) -> tuple[",
    ),
    ("AssociationSocket.close", getattr(AssociationSocket, "close", None), "(self) -> None"),
    ("_config.VALIDATORS['UI']", _ORIGINAL_UI_VALIDATOR, "(value: pydicom.uid.UID) -> tuple"),
    ("dimse_messages.NamedTemporaryFile", _ORIGINAL_TEMP_FILE, None),
)
#: Source text that must still be there: (module or class, what it says, why we need it).
_SOURCE_MARKERS: Final = (
    (DULServiceProvider, "self._read_pdu_data()", "the DUL's reactor calls the PDU reader"),
    (DULServiceProvider, "self.event_queue", "the reader queues the PDU's event there"),
    (DULServiceProvider, "self._recv_pdu", "the reader (and receive/gate.py) queue the PDU there"),
    (AssociationSocket, "self.socket", "the reader reads the connection's socket"),
    (
        dimse_messages,
        'NamedTemporaryFile(delete=False, mode="wb", suffix=".dcm")',
        "a chunked C-STORE opens its file through this module name (ReceiveFile)",
    ),
    (dimse_messages, "._data_set_file.write(", "ReceiveFile is written with write()"),
)


def pynetdicom_drift() -> list[str]:
    """What differs from the pynetdicom internals :func:`configure_pynetdicom` relies on;
    empty when nothing does. Each entry names the internal and what to re-check."""
    import importlib.metadata
    import inspect

    problems = []
    installed = importlib.metadata.version("pynetdicom")
    parts = tuple(int(p) for p in re.findall(r"\d+", installed)[:3])
    low, high = PYNETDICOM_SUPPORTED
    if not low <= parts < high:
        problems.append(
            f"pynetdicom {installed} is outside {PYNETDICOM_SUPPORTED_TEXT}, the range the "
            "patches in receive/transport.py were written and measured for"
        )
    for name, obj, expected in _INTERNALS:
        if obj is None:
            problems.append(f"{name} is gone")
            continue
        if expected is None:
            continue
        try:
            signature = str(inspect.signature(obj))
        except (TypeError, ValueError):
            signature = "?"
        if not signature.startswith(expected):
            problems.append(f"{name} is now {signature}, was {expected}…")
    for owner, marker, why in _SOURCE_MARKERS:
        try:
            source = inspect.getsource(owner)
        except (OSError, TypeError):
            problems.append(f"the source of {owner.__name__} cannot be read to check: {why}")
            continue
        if marker not in source:
            problems.append(f"{owner.__name__} no longer contains {marker!r} ({why})")
    if not hasattr(_config, "STORE_RECV_CHUNKED_DATASET"):
        problems.append("_config.STORE_RECV_CHUNKED_DATASET is gone")
    return problems


#: The replacements, by name: ``configure_pynetdicom(skip=...)`` leaves some out (for
#: ``scripts/bench_ingest.py``, which measures what each is worth).
PATCHES: Final = ("pdu-reader", "receive-file", "lenient-uid")


def configure_pynetdicom(*, skip: Collection[str] = ()) -> None:
    """Apply the module's settings (process-wide, idempotent).

    Raises :class:`~pacs_classifier.errors.PermanentError` when the installed pynetdicom
    is not the one they were written for (:func:`pynetdicom_drift`): a replaced method
    that pynetdicom renamed would otherwise leave the listener silently unbounded.
    """
    unknown = set(skip) - set(PATCHES)
    if unknown:
        raise ValueError(f"unknown pynetdicom patch(es): {', '.join(sorted(unknown))}")
    problems = pynetdicom_drift()
    if problems:
        raise PermanentError(
            "the listener cannot use this pynetdicom: "
            + "; ".join(problems)
            + " (see docs/DEVELOPING.md, pynetdicom)"
        )
    _config.STORE_RECV_CHUNKED_DATASET = True
    if "lenient-uid" not in skip:
        _config.VALIDATORS["UI"] = lenient_uid
    if "receive-file" not in skip:
        # pynetdicom names NamedTemporaryFile in its module; its default folder would be
        # the system's, another file system perhaps, and never cleaned after a crash.
        setattr(dimse_messages, "NamedTemporaryFile", _receive_temp_file)  # noqa: B010
    if "pdu-reader" not in skip:
        setattr(DULServiceProvider, "_read_pdu_data", _read_pdu_data)  # noqa: B010
