"""The listener's receive path: ReceiveFile, the socket reader, and their use by a real SCP."""

from __future__ import annotations

import errno
import gc
import hashlib
import io
import os
import re
import socket
import tempfile
import threading
import time
import types
import weakref
from pathlib import Path
from typing import Any

import pytest
from pydicom.dataset import FileMetaDataset
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import ComputedRadiographyImageStorage, ExplicitVRLittleEndian, generate_uid
from test_listener import (
    assert_all_stored,
    audit_outcomes,
    make_config,
    running,
    send,
    small_instance,
)

from pacs_classifier.errors import PermanentError
from pacs_classifier.receive import inspect as inspect_module
from pacs_classifier.receive import listener as listener_module
from pacs_classifier.receive import statuses, transport
from pacs_classifier.receive.inspect import FileLayout, StreamDigest, inspect_received
from pacs_classifier.receive.transport import ReceiveFile
from pacs_classifier.store.storage import TMP_PREFIX


def file_meta_bytes() -> bytes:
    """Preamble, DICM and a file meta group, as pynetdicom writes them (three writes)."""
    fm = FileMetaDataset()
    fm.MediaStorageSOPClassUID = ComputedRadiographyImageStorage
    fm.MediaStorageSOPInstanceUID = generate_uid()
    fm.TransferSyntaxUID = ExplicitVRLittleEndian
    buf = io.BytesIO()
    write_file_meta_info(buf, fm)  # type: ignore[arg-type]
    return buf.getvalue()


def write_like_pynetdicom(rf: ReceiveFile, meta: bytes, body: bytes, fragment: int) -> None:
    rf.write(b"\x00" * 128)
    rf.write(b"DICM")
    rf.write(meta)
    for start in range(0, len(body), fragment):
        rf.write(body[start : start + fragment])
        rf.file.flush()


@pytest.mark.parametrize("fragment", [1, 7, 4096, 1 << 20])
def test_receive_file_hashes_the_data_set_as_written(tmp_path: Path, fragment: int) -> None:
    meta = file_meta_bytes()
    body = bytes(range(256)) * 9000  # 2.3 MB: crosses the write-back step twice
    rf = ReceiveFile(str(tmp_path), "rx-", ".dcm")
    write_like_pynetdicom(rf, meta, body if fragment > 1 else body[:5000], fragment)
    rf.close()
    data = Path(rf.name).read_bytes()
    expected_body = body if fragment > 1 else body[:5000]
    assert data == b"\x00" * 128 + b"DICM" + meta + expected_body
    digest = rf.digest()
    assert digest == StreamDigest(
        FileLayout(132 + len(meta), len(data)), hashlib.sha256(expected_body).hexdigest()
    )
    assert Path(rf.name).parent == tmp_path and Path(rf.name).name.startswith("rx-")


def test_receive_file_meta_split_over_many_writes(tmp_path: Path) -> None:
    """The header may arrive a byte at a time; the offset is read once it is complete."""
    whole = b"\x00" * 128 + b"DICM" + file_meta_bytes()
    body = b"dataset bytes" * 100
    rf = ReceiveFile(str(tmp_path), "rx-", ".dcm")
    for i in range(len(whole)):
        rf.write(whole[i : i + 1])
    rf.write(body)
    rf.close()
    digest = rf.digest()
    assert digest is not None
    assert digest.layout.dataset_offset == len(whole)
    assert digest.sha256 == hashlib.sha256(body).hexdigest()


@pytest.mark.parametrize(
    "head",
    [
        b"\x00" * 128 + b"DICX" + b"\x02\x00\x00\x00UL\x04\x00\x10\x00\x00\x00",
        b"\x00" * 128 + b"DICM" + b"\x02\x00\x01\x00OB\x00\x00\x02\x00\x00\x00",
        b"\x00" * 128 + b"DICM" + b"\x02\x00\x00\x00UL\x04\x00\xff\xff\xff\x7f",
    ],
    ids=["no-DICM", "no-group-length", "absurd-group-length"],
)
def test_receive_file_without_a_part10_header_keeps_no_digest(tmp_path: Path, head: bytes) -> None:
    rf = ReceiveFile(str(tmp_path), "rx-", ".dcm")
    rf.write(head + b"x" * 1000)
    rf.close()
    assert rf.digest() is None
    assert Path(rf.name).read_bytes() == head + b"x" * 1000


def test_dropped_receive_file_closes_without_the_cycle_collector(tmp_path: Path) -> None:
    """An aborted transfer's file is closed (and leaves the registry) as soon as pynetdicom
    drops it: no reference cycle keeps its descriptor open until a gc pass."""
    rf = ReceiveFile(str(tmp_path), TMP_PREFIX, ".dcm")
    fd = rf._fd
    assert fd is not None
    ref = weakref.ref(rf)
    gc.disable()
    try:
        del rf
        assert ref() is None
    finally:
        gc.enable()
    with pytest.raises(OSError):
        os.fstat(fd)


def test_inspect_trusts_a_stream_digest_only_for_the_same_layout(tmp_path: Path) -> None:
    ds = small_instance()
    path = tmp_path / "x.dcm"
    ds.save_as(path, enforce_file_format=True)
    real, _ = inspect_received(path, ExplicitVRLittleEndian, ComputedRadiographyImageStorage)
    data = path.read_bytes()
    offset = 144 + int.from_bytes(data[140:144], "little")
    assert real.sha256 == hashlib.sha256(data[offset:]).hexdigest()

    same = StreamDigest(FileLayout(offset, len(data)), "f" * 64)
    meta, _ = inspect_received(
        path, ExplicitVRLittleEndian, ComputedRadiographyImageStorage, digest=same
    )
    assert meta.sha256 == "f" * 64
    # A file that changed size since (or a digest of another file) is not trusted.
    other = StreamDigest(FileLayout(offset, len(data) - 1), "f" * 64)
    meta, _ = inspect_received(
        path, ExplicitVRLittleEndian, ComputedRadiographyImageStorage, digest=other
    )
    assert meta.sha256 == real.sha256


def test_recv_until_reads_exactly_what_is_asked_across_many_segments() -> None:
    a, b = socket.socketpair()
    payload = bytes(range(256)) * 4000

    def send_in_pieces() -> None:
        for i in range(0, len(payload), 999):
            b.sendall(payload[i : i + 999])

    sender = threading.Thread(target=send_in_pieces)
    sender.start()
    try:
        first = transport.recv_until(a, 6, None)
        rest = transport.recv_until(a, len(payload) - 6, time.monotonic() + 30)
    finally:
        sender.join()
        a.close()
        b.close()
    assert isinstance(first, bytearray) and isinstance(rest, bytearray)
    assert bytes(first + rest) == payload


def test_recv_until_returns_short_on_close_and_stops_at_the_deadline() -> None:
    a, b = socket.socketpair()
    payload = b"abcdefgh" * 700
    b.sendall(payload)
    b.close()
    try:
        got = transport.recv_until(a, 10_000, None)  # the peer promised more than it sent
    finally:
        a.close()
    assert bytes(got) == payload
    a, b = socket.socketpair()
    b.sendall(b"abc")  # and then nothing: a stalled peer
    started = time.monotonic()
    try:
        with pytest.raises(TimeoutError):
            transport.recv_until(a, 10, started + 0.2)
    finally:
        a.close()
        b.close()
    assert time.monotonic() - started < 2


def test_pynetdicom_internals_are_those_the_patches_were_written_for() -> None:
    """Fails on a pynetdicom upgrade that touches what receive/transport.py replaces."""
    problems = transport.pynetdicom_drift()
    assert not problems, (
        "pynetdicom changed under receive/transport.py's replacements:\n  "
        + "\n  ".join(problems)
        + "\nRe-check transport._read_pdu_data against DULServiceProvider._read_pdu_data, "
        "ReceiveFile against dimse_messages' chunked C-STORE, receive/gate.py's "
        "GatedRequestHandler, then run tests/test_transport.py, "
        "tests/test_listener_hostile.py and scripts/bench_ingest.py, and move "
        "PYNETDICOM_SUPPORTED with the pin in pyproject.toml."
    )
    pyproject = Path(__file__).resolve().parents[1] / "pyproject.toml"
    pin = re.search(r'"pynetdicom([^"]*)"', pyproject.read_text())
    assert pin is not None and pin.group(1) == transport.PYNETDICOM_SUPPORTED_TEXT


def test_an_unsupported_pynetdicom_is_refused_before_anything_is_replaced(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import importlib.metadata

    from pynetdicom.dul import DULServiceProvider

    before = DULServiceProvider._read_pdu_data
    monkeypatch.setattr(importlib.metadata, "version", lambda name: "3.1.0")
    assert any(
        "pynetdicom 3.1.0 is outside >=3.0.4,<3.1" in p for p in transport.pynetdicom_drift()
    )
    with pytest.raises(PermanentError, match="the listener cannot use this pynetdicom"):
        transport.configure_pynetdicom()
    assert DULServiceProvider._read_pdu_data is before


def test_listener_stores_with_the_stream_digest(
    tmp_path: Path, sqlite_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The handler does not hash the file again: with hashing taken away from the
    inspection, a real association still stores every instance with the right SHA-256."""

    def no_hashing(*_args: object) -> object:
        raise AssertionError("the received file was hashed again")

    monkeypatch.setattr(inspect_module, "hashlib", types.SimpleNamespace(sha256=no_hashing))
    config = make_config(tmp_path, sqlite_url)
    items = [small_instance(seed=i) for i in range(5)]
    with running(config) as (app, listener):
        assert send(listener.address[1], items) == [statuses.SUCCESS] * 5
        assert_all_stored(
            app.db, config.path(config.storage.root), {str(d.SOPInstanceUID) for d in items}
        )


def test_disk_full_mid_transfer_answers_out_of_resources_and_keeps_the_association(
    tmp_path: Path, sqlite_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ENOSPC while the data set arrives: 0xA700, audited, nothing kept; then, with space
    again, the next instance on the same association is stored."""
    state = {"full": True}
    real_write = os.write

    def write(fd: int, data: bytes | memoryview) -> int:
        if state["full"]:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(fd, data)

    real_refuse = listener_module._refuse

    def refuse_then_free_space(*args: Any, **kwargs: Any) -> int:
        state["full"] = False  # the operator frees space after the first refusal
        return real_refuse(*args, **kwargs)

    monkeypatch.setattr(transport, "_os_write", write)
    monkeypatch.setattr(listener_module, "_refuse", refuse_then_free_space)
    config = make_config(tmp_path, sqlite_url)
    first, second = small_instance(seed=1), small_instance(seed=2)
    with running(config) as (app, listener):
        statuses_seen = send(listener.address[1], [first, second])
        assert statuses_seen == [statuses.OUT_OF_RESOURCES, statuses.SUCCESS]
        assert_all_stored(app.db, config.path(config.storage.root), {str(second.SOPInstanceUID)})
        refused = [d for _, outcome, d in audit_outcomes(app.db, "store") if outcome == "refused"]
        assert [d["status"] for d in refused] == ["0xA700"]
        assert "No space left on device" in refused[0]["reason"]


def test_receive_file_that_cannot_be_created_is_refused_not_aborted(
    tmp_path: Path, sqlite_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No space even for the temporary file: that instance gets 0xA700, the next one,
    on the same association, is stored."""
    real_mkstemp = tempfile.mkstemp
    calls = {"n": 0}

    def mkstemp(*args: Any, **kwargs: Any) -> tuple[int, str]:
        if kwargs.get("prefix") == TMP_PREFIX:  # a receive file: the first one fails
            calls["n"] += 1
            if calls["n"] == 1:
                raise OSError(errno.ENOSPC, "No space left on device")
        fd, name = real_mkstemp(*args, **kwargs)
        return fd, str(name)

    monkeypatch.setattr(tempfile, "mkstemp", mkstemp)
    config = make_config(tmp_path, sqlite_url)
    first, second = small_instance(seed=3), small_instance(seed=4)
    with running(config) as (app, listener):
        assert send(listener.address[1], [first, second]) == [
            statuses.OUT_OF_RESOURCES,
            statuses.SUCCESS,
        ]
        assert_all_stored(app.db, config.path(config.storage.root), {str(second.SOPInstanceUID)})
