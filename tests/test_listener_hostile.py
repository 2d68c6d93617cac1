"""The listener against a hostile network, on loopback: junk connections, stalls, bombs.

Junk comes from other loopback addresses (127.0.0.2, ...) so that the per-peer cap and
the total cap are both exercised while the real peer connects from 127.0.0.1.
"""

from __future__ import annotations

import io
import multiprocessing
import os
import socket
import ssl
import subprocess
import sys
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import ComputedRadiographyImageStorage, DeflatedExplicitVRLittleEndian
from pynetdicom import AE, _config
from pynetdicom.pdu import A_ASSOCIATE_RQ
from pynetdicom.pdu_primitives import A_ASSOCIATE, MaximumLengthNotification
from pynetdicom.presentation import build_context
from sqlalchemy import create_engine, select, text
from sqlalchemy.engine import make_url
from test_listener import (
    CALLED,
    STORESCU_PROPOSE,
    audit_outcomes,
    encoded_body,
    make_config,
    make_pki,
    read_for_sending,
    running,
    send,
    shared_files,
    small_instance,
)

from pacs_classifier.db.audit import verify_chain
from pacs_classifier.db.models import Instance
from pacs_classifier.receive import gate, statuses
from pacs_classifier.receive.gate import REASON_EVICTED, REASON_HANDSHAKE_TIMEOUT

pytestmark = [
    pytest.mark.filterwarnings("ignore:The value length"),
    pytest.mark.filterwarnings("ignore:Invalid value for VR UI"),
]

#: A PDU header announcing an A-ASSOCIATE-RQ of 4 GiB.
STALL_HEADER = bytes.fromhex("0100FFFFFFFF")


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


@contextmanager
def peak_rss() -> Iterator[list[float]]:
    """Sample this process's RSS every 10 ms; yields [peak] filled in at exit."""
    result = [0.0]
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            result[0] = max(result[0], rss_mb())
            stop.wait(0.01)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    try:
        yield result
    finally:
        stop.set()
        t.join()


def wait_for(check: Callable[[], bool], timeout_s: float, what: str | Callable[[], str]) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(
                f"not within {timeout_s} s: {what if isinstance(what, str) else what()}"
            )
        time.sleep(0.05)


def associate_rq(calling: bytes = b"GOODPACS", called: bytes = CALLED.encode()) -> bytes:
    """A real A-ASSOCIATE-RQ (pynetdicom's encoder) with AE title fields set byte for byte."""
    primitive = A_ASSOCIATE()
    primitive.application_context_name = "1.2.840.10008.3.1.1.1"
    primitive.calling_ae_title = "PLACEHOLDER"
    primitive.called_ae_title = CALLED
    cx = build_context(ComputedRadiographyImageStorage)
    cx.context_id = 1
    primitive.presentation_context_definition_list = [cx]
    max_length = MaximumLengthNotification()
    max_length.maximum_length_received = 16384
    primitive.user_information = [max_length]
    pdu = A_ASSOCIATE_RQ()
    pdu.from_primitive(primitive)
    raw = bytearray(pdu.encode())
    raw[10:26] = called.ljust(16, b" ")[:16]
    raw[26:42] = calling.ljust(16, b" ")[:16]
    return bytes(raw)


def connect_from(address: str, port: int) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=5, source_address=(address, 0))
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return s


class Junk:
    """Stalled connections (a 4 GiB PDU header, then nothing) and 1-byte/s senders.

    A connection the listener closes is opened again, so the pressure lasts.
    """

    def __init__(self, port: int, stalled: int, slow: int, sources: list[str]) -> None:
        self.port = port
        self.plan = [("stall", sources[i % len(sources)]) for i in range(stalled)]
        self.plan += [("slow", sources[i % len(sources)]) for i in range(slow)]
        self.socks: list[socket.socket | None] = [None] * len(self.plan)
        self.sent = [0] * len(self.plan)
        self.reopened = 0
        self.rounds = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._payload = associate_rq()

    def __enter__(self) -> Junk:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)
        for s in self.socks:
            if s is not None:
                s.close()

    def _open(self, i: int) -> None:
        kind, source = self.plan[i]
        try:
            s = connect_from(source, self.port)
            if kind == "stall":
                s.sendall(STALL_HEADER)
            s.setblocking(False)
        except OSError:
            return  # refused by a cap: try again next round
        self.socks[i] = s
        self.sent[i] = 0

    def _run(self) -> None:
        while not self._stop.is_set():
            for i, (kind, _) in enumerate(self.plan):
                s = self.socks[i]
                if s is None:
                    self._open(i)
                    continue
                try:
                    if kind == "slow":  # one byte of a real request per second
                        s.send(self._payload[self.sent[i] % len(self._payload) :][:1])
                        self.sent[i] += 1
                    elif s.recv(1) == b"":
                        raise ConnectionResetError
                except BlockingIOError:
                    pass
                except OSError:
                    s.close()
                    self.socks[i] = None
                    self.reopened += 1
            self.rounds += 1
            self._stop.wait(1.0)


def _junk_main(
    port: int, stalled: int, slow: int, sources: list[str], stop: Any, reopened: Any, ready: Any
) -> None:
    with Junk(port, stalled, slow, sources) as junk:
        while not stop.wait(0.2):
            reopened.value = junk.reopened
            if junk.rounds >= 3:  # every connection opened, and closed ones opened again
                ready.set()


@contextmanager
def junk_process(port: int, stalled: int, slow: int, sources: list[str]) -> Iterator[Any]:
    """:class:`Junk` in a process of its own, as an attacker is: not in the listener's GIL."""
    ctx = multiprocessing.get_context("spawn")
    stop, ready, reopened = ctx.Event(), ctx.Event(), ctx.Value("i", 0)
    args = (port, stalled, slow, sources, stop, reopened, ready)
    proc = ctx.Process(target=_junk_main, args=args)
    proc.start()
    try:
        assert ready.wait(120), "the junk process did not start"
        yield reopened
    finally:
        stop.set()
        proc.join(15)
        if proc.is_alive():
            proc.kill()
            proc.join()


def dcmtk_run(tool: str, *args: str, timeout: float = 30) -> tuple[int, float, str]:
    env = {**os.environ, "TCP_NODELAY": "1"}
    t0 = time.monotonic()
    proc = subprocess.run(
        [tool, *args], env=env, capture_output=True, text=True, timeout=timeout, check=False
    )
    return proc.returncode, time.monotonic() - t0, proc.stderr


def test_stalled_and_slow_connections_leave_room_for_a_real_peer(
    tmp_path: Path, sqlite_url: str, dicom_dir: Path, dcmtk: dict[str, str]
) -> None:
    config = make_config(tmp_path, sqlite_url)  # the shipped defaults for every cap
    path = min(shared_files(dicom_dir), key=lambda p: p.stat().st_size)
    ts = str(read_for_sending(path).file_meta.TransferSyntaxUID)
    propose = STORESCU_PROPOSE.get(ts, "-x=")
    sources = [f"127.0.0.{i}" for i in range(2, 14)]
    with running(config) as (app, listener):
        port = listener.address[1]
        common = ["-aet", "DCMTK", "-aec", CALLED, "127.0.0.1", str(port)]
        rc, _, err = dcmtk_run(dcmtk["echoscu"], *common)  # warm up, then the baseline
        assert rc == 0, err
        time.sleep(0.5)
        threads0, rss0 = threading.active_count(), rss_mb()
        with junk_process(port, stalled=12, slow=200, sources=sources) as reopened:
            server = listener._server
            assert server is not None
            open_, pending = server.open_connections()
            assert pending <= open_ <= config.listener.max_connections
            rc, took, err = dcmtk_run(dcmtk["echoscu"], *common)
            assert rc == 0, err
            assert took < 5, f"C-ECHO took {took:.1f} s"
            rc, took, err = dcmtk_run(dcmtk["storescu"], propose, *common, str(path))
            assert rc == 0 and "Store Failed" not in err, err
            assert took < 5, f"C-STORE took {took:.1f} s"
            assert reopened.value > 0  # the caps closed some of them
            busy_threads = threading.active_count()
        # The junk is gone: threads and memory come back.
        wait_for(
            lambda: threading.active_count() <= threads0 + 2,
            15,
            f"threads back to {threads0} (were {busy_threads} under load)",
        )
        assert rss_mb() - rss0 < 50
        with app.db.session() as s:
            assert s.execute(select(Instance.id)).scalars().all() != []
        wait_for(lambda: bool(audit_outcomes(app.db, "connection")), 5, "audited")
        reasons = {d["reason"] for _, _, d in audit_outcomes(app.db, "connection")}
        assert REASON_EVICTED in reasons or "too many connections from this address" in reasons


def test_handshake_deadline_and_network_timeout_close_silent_peers(
    tmp_path: Path, sqlite_url: str
) -> None:
    config = make_config(tmp_path, sqlite_url, handshake_timeout_s=1, network_timeout_s=1)
    with running(config) as (app, listener):
        port = listener.address[1]
        idle = connect_from("127.0.0.2", port)
        stalled = connect_from("127.0.0.3", port)
        stalled.sendall(STALL_HEADER)
        t0 = time.monotonic()
        for s in (idle, stalled):
            s.settimeout(5)
            assert s.recv(100) == b""  # closed by the listener
        assert time.monotonic() - t0 < 3
        # An association that goes silent mid-PDU, then one that goes silent between PDUs.
        ae = AE(ae_title="SILENT")
        ae.add_requested_context(ComputedRadiographyImageStorage)
        assoc = ae.associate("127.0.0.1", port, ae_title=CALLED)
        assert assoc.is_established
        assert assoc.dul.socket is not None
        raw = assoc.dul.socket.socket
        assert raw is not None
        raw.sendall(bytes.fromhex("040000001000") + b"\x00" * 100)  # 4 KiB P-DATA, 100 B sent
        wait_for(lambda: assoc.is_aborted, 5, "the stalled association aborted")
        assoc2 = ae.associate("127.0.0.1", port, ae_title=CALLED)
        assert assoc2.is_established
        wait_for(lambda: assoc2.is_aborted, 5, "the idle association aborted")
        wait_for(lambda: len(audit_outcomes(app.db, "connection")) >= 2, 5, "audited")
        refused = audit_outcomes(app.db, "connection")
        assert {(a, o, d["reason"]) for a, o, d in refused} == {
            ("ae:?@127.0.0.2", "aborted", REASON_HANDSHAKE_TIMEOUT),
            ("ae:?@127.0.0.3", "aborted", "A-ASSOCIATE-RQ of 4294967295 bytes refused unread"),
        }
        wait_for(
            lambda: [o for _, o, _ in audit_outcomes(app.db, "association")].count("aborted") == 2,
            5,
            "aborts audited",
        )
        aborted = [
            d["reason"] for _, o, d in audit_outcomes(app.db, "association") if o == "aborted"
        ]
        # Mid-PDU, the PDU deadline and pynetdicom's idle timer race; either ends it in time.
        assert len(aborted) == 2
        assert set(aborted) <= {
            "a PDU took longer than network_timeout_s (1.0 s)",
            "no PDU within network_timeout_s",
        }


def test_tls_clients_are_served_beside_a_silent_tcp_connection(
    tmp_path: Path, sqlite_url: str
) -> None:
    pki = tmp_path / "pki"
    pki.mkdir()
    make_pki(pki)
    tls = {
        "enabled": True,
        "cert": str(pki / "server.pem"),
        "key": str(pki / "server.key"),
        "ca": str(pki / "ca.pem"),
    }
    config = make_config(tmp_path, sqlite_url, tls=tls)
    client = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(pki / "ca.pem"))
    client.load_cert_chain(str(pki / "client.pem"), str(pki / "client.key"))
    with running(config) as (_app, listener):
        port = listener.address[1]
        silent = [connect_from("127.0.0.2", port) for _ in range(3)]
        try:
            t0 = time.monotonic()
            assert send(port, [small_instance()], ssl_context=client) == [statuses.SUCCESS]
            assert time.monotonic() - t0 < 5
        finally:
            for s in silent:
                s.close()


def _oversized_pdu(port: int) -> Any:
    ae = AE(ae_title="BIGPDU")
    ae.add_requested_context(ComputedRadiographyImageStorage)
    assoc = ae.associate("127.0.0.1", port, ae_title=CALLED)
    assert assoc.is_established
    assert assoc.dul.socket is not None
    raw = assoc.dul.socket.socket
    assert raw is not None
    # A 256 MiB P-DATA-TF after we announced 128 KiB: refused from its header.
    raw.sendall(bytes.fromhex("040010000000"))
    try:
        for _ in range(64):
            raw.sendall(b"\x00" * (1 << 20))
    except OSError:
        pass  # closed by the listener, as it should
    wait_for(lambda: assoc.is_aborted, 5, "the association aborted")
    return assoc


def deflate_bomb(path: Path, inflated_mib: int) -> None:
    """A deflated CR file whose pixel data inflates to ``inflated_mib`` MiB of zeros."""
    ds = small_instance()
    del ds.PixelData
    head = encoded_body(ds)
    # (7FE0,0010) OB, explicit VR: tag, VR, 2 reserved bytes, 4-byte length.
    length = inflated_mib << 20
    head += bytes.fromhex("E07F1000") + b"OB\x00\x00" + length.to_bytes(4, "little")
    deflater = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    parts = [deflater.compress(head)]
    zeros = b"\x00" * (1 << 20)
    parts += [deflater.compress(zeros) for _ in range(inflated_mib)]
    parts.append(deflater.flush())
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    buf = io.BytesIO()
    buf.write(b"\x00" * 128 + b"DICM")
    write_file_meta_info(buf, meta)  # type: ignore[arg-type]
    data = buf.getvalue() + b"".join(parts)
    path.write_bytes(data)


def test_oversized_pdu_and_deflate_bomb_keep_memory_bounded(
    tmp_path: Path, sqlite_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)
    bomb = tmp_path / "bomb.dcm"
    deflate_bomb(bomb, 1024)
    assert bomb.stat().st_size < 2 << 20
    config = make_config(tmp_path, sqlite_url)
    with running(config) as (app, listener):
        port = listener.address[1]
        rss0 = rss_mb()
        with peak_rss() as peak:
            _oversized_pdu(port)
            ae = AE(ae_title="BOMBER")
            ae.add_requested_context(
                ComputedRadiographyImageStorage, DeflatedExplicitVRLittleEndian
            )
            assoc = ae.associate("127.0.0.1", port, ae_title=CALLED)
            assert assoc.is_established
            status = assoc.send_c_store(bomb)
            assoc.release()
        assert int(status.Status) == statuses.CANNOT_UNDERSTAND
        assert peak[0] - rss0 < 300, f"RSS grew by {peak[0] - rss0:.0f} MB"
        refused = [d["reason"] for _, o, d in audit_outcomes(app.db, "store") if o == "refused"]
        assert refused == ["deflated data set inflates to more than 256 MiB"]
        aborted = [
            d["reason"] for _, o, d in audit_outcomes(app.db, "association") if o == "aborted"
        ]
        assert aborted == ["PDU type 0x04 of 268435456 bytes refused unread (limit 131072)"]


# ------------------------------------------------------------------ AE titles, UIDs


def test_wrong_called_ae_is_rejected_and_audited(tmp_path: Path, sqlite_url: str) -> None:
    config = make_config(tmp_path, sqlite_url)
    with running(config) as (app, listener):
        ae = AE(ae_title="MODALITY")
        ae.add_requested_context(ComputedRadiographyImageStorage)
        assoc = ae.associate("127.0.0.1", listener.address[1], ae_title="WRONG_AE")
        assert assoc.is_rejected
        assert assoc.acceptor.primitive is not None
        assert assoc.acceptor.primitive.diagnostic == 7  # called AE title not recognised
        # pynetdicom sends the A-ASSOCIATE-RJ before its EVT_REJECTED handlers run.
        wait_for(lambda: bool(audit_outcomes(app.db, "association")), 5, "audited")
        events = audit_outcomes(app.db, "association")
        assert [(a, o, d["reason"], d["called_ae"]) for a, o, d in events] == [
            ("ae:MODALITY@127.0.0.1", "rejected", "called AE title not recognised", "WRONG_AE")
        ]


@pytest.mark.parametrize(
    ("calling", "why"),
    [
        (b"BAD\x00AE", "byte 0x00 is not a printable ASCII character"),
        (b"BAD\\AE", "contains a backslash"),
        (b" " * 16, "only spaces"),
        (b"\xff" * 8, "byte 0xFF is not a printable ASCII character"),
        (b"GOODPACS\r\n", "byte 0x0D is not a printable ASCII character"),
    ],
)
def test_malformed_calling_ae_gets_a_rejection_and_an_audit_event(
    tmp_path: Path, sqlite_url: str, calling: bytes, why: str
) -> None:
    config = make_config(tmp_path, sqlite_url)
    with running(config) as (app, listener):
        with connect_from("127.0.0.1", listener.address[1]) as s:
            s.sendall(associate_rq(calling=calling))
            reply = s.recv(100)
        # A-ASSOCIATE-RJ, rejected-permanent, service-user, calling AE title not recognised.
        assert reply == bytes.fromhex("03000000000400010103")
        wait_for(lambda: bool(audit_outcomes(app.db, "association")), 5, "audited")
        ((actor, outcome, detail),) = audit_outcomes(app.db, "association")
        assert (actor, outcome) == ("ae:?@127.0.0.1", "rejected")
        assert detail["reason"] == f"calling AE title is not a valid AE value: {why}"


def test_request_uid_over_64_characters_gets_a_status_and_an_audit_event(
    tmp_path: Path, sqlite_url: str
) -> None:
    config = make_config(tmp_path, sqlite_url)
    long_uid = "1.2." + "3" * 70
    with running(config) as (app, listener):
        assert send(listener.address[1], [small_instance(long_uid)]) == [statuses.CANNOT_UNDERSTAND]
        ((_, outcome, detail),) = audit_outcomes(app.db, "store")
        assert outcome == "refused"
        assert detail["reason"] == "SOPInstanceUID is longer than 64 characters (74)"


def test_multi_valued_patient_id_is_stored_as_the_dicom_value(
    tmp_path: Path, sqlite_url: str
) -> None:
    config = make_config(tmp_path, sqlite_url)
    ds: Dataset = small_instance()
    ds.PatientID = ["", "12345"]  # encoded "\12345": two values, the first empty
    with running(config) as (app, listener):
        assert send(listener.address[1], [ds]) == [statuses.SUCCESS]
        with app.db.session() as s:
            assert s.execute(select(Instance.patient_id)).scalar_one() == "\\12345"


# ------------------------------------------------------------------ serve start-up


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ({}, "listener.host/port: cannot listen on 127.0.0.1:{port}: Address already in use"),
        (
            {"PACS_CLASSIFIER__LISTENER__HOST": "192.0.2.1"},  # TEST-NET-1: not ours
            "listener.host/port: cannot listen on 192.0.2.1:{port}: Cannot assign requested",
        ),
        (
            {"PACS_CLASSIFIER__LISTENER__HOST": "no-such-host.invalid"},
            "listener.host/port: cannot listen on no-such-host.invalid:{port}: ",
        ),
        (
            {"PACS_CLASSIFIER__STORAGE__ROOT": "/proc/pacs"},
            "storage.root: cannot use /proc/pacs: ",
        ),
        ({"PACS_CLASSIFIER__LISTENER__HOST": '""'}, "listener.host: must not be empty"),
    ],
)
def test_serve_start_up_failures_are_one_line(
    tmp_path: Path, sqlite_url: str, override: dict[str, str], expected: str
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = tmp_path / "config.toml"
        config.write_text(
            f'[database]\nurl = "{sqlite_url}"\n[storage]\nroot = "dicom"\nmin_free_mb = 0\n'
            f"[listener]\nport = {port}\n"
        )
        env = {**os.environ, **override}
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "pacs_classifier",
                "--config",
                str(config),
                "serve",
                "--roles",
                "listener",
            ],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith(f"pacs-classifier: error: {expected.format(port=port)}"), lines


# ------------------------------------------------------------------ audit backlog


def test_association_audit_waits_out_a_database_outage(tmp_path: Path, pg_url: str) -> None:
    """The database refuses connections while a peer associates: the event is kept, then written."""
    config = make_config(tmp_path, pg_url)
    name = make_url(pg_url).database
    admin = create_engine(make_url(pg_url).set(database="postgres"), isolation_level="AUTOCOMMIT")

    def set_connections(allowed: bool) -> None:
        with admin.connect() as conn:
            conn.execute(text(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS {str(allowed).lower()}'))
            if not allowed:
                conn.execute(
                    text(
                        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = :n"
                    ),
                    {"n": name},
                )

    try:
        with running(config) as (app, listener):
            set_connections(False)
            try:
                assert send(listener.address[1], [small_instance()], calling="DURING") == [
                    statuses.OUT_OF_RESOURCES
                ]
                assert listener.ctx.audit.pending >= 1
            finally:
                set_connections(True)
            wait_for(lambda: listener.ctx.audit.pending == 0, 10, "the backlog written")
            events = audit_outcomes(app.db, "association")
            assert [(a, o) for a, o, _ in events] == [("ae:DURING@127.0.0.1", "accepted")]
            assert "occurred_at" in events[0][2]  # written late: when it happened is kept
            with app.db.session() as s:
                assert verify_chain(s).ok
    finally:
        admin.dispose()


def test_a_full_audit_backlog_refuses_new_associations(tmp_path: Path, sqlite_url: str) -> None:
    config = make_config(tmp_path, sqlite_url)
    with running(config) as (_app, listener):
        listener.ctx.audit.capacity = 0  # as if events had piled up during an outage
        ae = AE(ae_title="MODALITY")
        ae.add_requested_context(ComputedRadiographyImageStorage)
        assoc = ae.associate("127.0.0.1", listener.address[1], ae_title=CALLED)
        assert assoc.is_rejected
        rj = assoc.acceptor.primitive
        assert rj is not None
        assert (rj.result, rj.result_source, rj.diagnostic) == (2, 3, 2)  # transient, limit


def test_refusals_are_audited_once_per_window_with_the_count_of_the_rest(
    tmp_path: Path, sqlite_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(gate, "REPORT_EVERY_S", 2.0)
    config = make_config(tmp_path, sqlite_url, max_connections_per_peer=2)
    with running(config) as (app, listener):
        port = listener.address[1]
        held = [connect_from("127.0.0.5", port) for _ in range(2)]
        refused = []
        for _ in range(4):
            s = connect_from("127.0.0.5", port)
            s.settimeout(5)
            assert s.recv(10) == b""  # closed at once
            refused.append(s)

        def reported() -> list[tuple[str, int]]:
            return [
                (d["reason"], d["count"])
                for _, o, d in audit_outcomes(app.db, "connection")
                if o == "refused"
            ]

        # The first at once; the others counted into the next event, written when the
        # window closes even if nothing else happens (a loaded machine may split them).
        wait_for(
            lambda: sum(n for _, n in reported()) == 4,
            15,
            lambda: f"every refusal counted: {audit_outcomes(app.db, 'connection')}",
        )
        events = reported()
        assert events[0] == (gate.REASON_PEER_CAP, 1)
        assert {reason for reason, _ in events} == {gate.REASON_PEER_CAP}
        assert len(events) < 4
        for s in held + refused:
            s.close()
