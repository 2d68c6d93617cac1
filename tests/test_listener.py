"""The DICOM listener with real peers on loopback: pynetdicom and dcmtk as senders."""

from __future__ import annotations

import hashlib
import io
import os
import socket
import ssl
import subprocess
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset, write_file_meta_info
from pydicom.uid import (
    JPEG2000,
    UID,
    ComputedRadiographyImageStorage,
    CTImageStorage,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
    SecondaryCaptureImageStorage,
    generate_uid,
)
from pynetdicom import AE, _config
from sqlalchemy import create_engine, func, select, text
from sqlalchemy.engine import make_url

from pacs_classifier.config import Config, config_from_mapping
from pacs_classifier.db.audit import verify_chain
from pacs_classifier.db.engine import Database
from pacs_classifier.db.models import AuditEvent, Instance, Job, JobKind
from pacs_classifier.receive import statuses
from pacs_classifier.receive.listener import Listener
from pacs_classifier.wiring import App

# Malformed inputs are the point of some tests; pydicom warns about them on the way.
pytestmark = [
    pytest.mark.filterwarnings("ignore:Invalid value for VR UI"),
    pytest.mark.filterwarnings("ignore:Expected explicit VR"),
]

CALLED = "PNEUMONIA_AI"
#: storescu's option to propose a compressed transfer syntax as it is.
STORESCU_PROPOSE: dict[str, str] = {
    JPEG2000Lossless: "-xv",
    JPEG2000: "-xw",
    JPEGBaseline8Bit: "-xy",
    JPEGExtended12Bit: "-xx",
    JPEGLosslessSV1: "-xs",
    JPEGLSLossless: "-xt",
    JPEGLSNearLossless: "-xu",
    RLELossless: "-xr",
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def make_config(tmp_path: Path, db_url: str, **listener: Any) -> Config:
    raw: dict[str, Any] = {
        "database": {"url": db_url},
        "storage": {"root": str(tmp_path / "dicom"), "min_free_mb": 0},
        "listener": {"port": free_port(), "ae_title": CALLED, **listener},
    }
    return config_from_mapping(raw, base_dir=tmp_path)


@contextmanager
def running(config: Config) -> Iterator[tuple[App, Listener]]:
    app = App(config)
    listener = app.listener()
    listener.start()
    try:
        yield app, listener
    finally:
        listener.stop(grace_s=10)
        app.close()


def small_instance(
    sop_uid: str | None = None, *, sop_class: str = ComputedRadiographyImageStorage, seed: int = 0
) -> Dataset:
    ds = Dataset()
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_uid or generate_uid()
    ds.StudyInstanceUID = "1.2.826.0.1.3680043.8.498.10"
    ds.SeriesInstanceUID = "1.2.826.0.1.3680043.8.498.10.1"
    ds.PatientID = "TEST"
    ds.Modality = "CR"
    ds.Rows = ds.Columns = 8
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.PixelData = bytes((seed + i) % 256 for i in range(64))
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return ds


def read_for_sending(path: Path) -> Dataset:
    ds = dcmread(path, force=True)
    if "TransferSyntaxUID" not in ds.file_meta:
        # A bare data set (no file meta) is implicit VR little endian (PS3.5 §A.1).
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    return ds


def shared_files(dicom_dir: Path) -> list[Path]:
    return sorted(dicom_dir.glob("*.dcm"))


def send(
    port: int,
    items: Sequence[Dataset | Path],
    *,
    calling: str = "SENDER",
    ssl_context: ssl.SSLContext | None = None,
) -> list[int]:
    """One association sending ``items`` (data sets, or raw files sent byte for byte)."""
    ae = AE(ae_title=calling)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    contexts: set[tuple[str, str]] = set()
    for item in items:
        if isinstance(item, Path):
            meta = dcmread(item, stop_before_pixels=True, force=True).file_meta
            contexts.add((meta.MediaStorageSOPClassUID, meta.TransferSyntaxUID))
        else:
            contexts.add((item.SOPClassUID, item.file_meta.TransferSyntaxUID))
    for sop_class, ts in sorted(contexts):
        ae.add_requested_context(sop_class, ts)
    tls_args = (ssl_context, "localhost") if ssl_context else None
    assoc = ae.associate("127.0.0.1", port, ae_title=CALLED, tls_args=tls_args)
    if not assoc.is_established:
        raise ConnectionRefusedError("association not established")
    result = []
    try:
        for item in items:
            status = assoc.send_c_store(item)
            result.append(int(status.Status) if "Status" in status else -1)
    finally:
        assoc.release()
    return result


def dataset_part(data: bytes) -> bytes:
    group_length = int.from_bytes(data[140:144], "little")
    return data[144 + group_length :]


def assert_all_stored(db: Database, root: Path, sop_uids: set[str]) -> None:
    """Each instance: one row whose SHA-256 matches its file, one classify job; no temps."""
    with db.session() as s:
        rows = s.execute(select(Instance)).scalars().all()
        assert {r.sop_instance_uid for r in rows} == sop_uids
        assert len(rows) == len(sop_uids)
        for row in rows:
            data = (root / row.file_path).read_bytes()
            assert hashlib.sha256(dataset_part(data)).hexdigest() == row.file_sha256
            assert row.file_size == len(data)
        jobs = s.execute(select(Job.instance_id, Job.kind)).all()
        assert sorted(j.instance_id for j in jobs) == sorted(r.id for r in rows)
        assert {j.kind for j in jobs} <= {JobKind.CLASSIFY}
        assert verify_chain(s).ok
    files = [p for p in root.rglob("*.dcm") if ".tmp" not in p.parts]
    assert len(files) == len(sop_uids)
    assert list((root / ".tmp").iterdir()) == []


def audit_outcomes(db: Database, action: str) -> list[tuple[str, str, dict[str, Any]]]:
    with db.session() as s:
        rows = s.execute(
            select(AuditEvent.actor, AuditEvent.outcome, AuditEvent.detail)
            .where(AuditEvent.action == action)
            .order_by(AuditEvent.id)
        ).all()
    return [(r.actor, r.outcome, r.detail) for r in rows]


def raw_part10(meta_ds: Dataset, body: bytes) -> bytes:
    """A Part 10 file with chosen file meta and arbitrary data set bytes."""
    fm = FileMetaDataset()
    fm.MediaStorageSOPClassUID = meta_ds.SOPClassUID
    fm.MediaStorageSOPInstanceUID = meta_ds.SOPInstanceUID
    fm.TransferSyntaxUID = ExplicitVRLittleEndian
    buf = io.BytesIO()
    buf.write(b"\x00" * 128 + b"DICM")
    write_file_meta_info(buf, fm)  # type: ignore[arg-type]
    return buf.getvalue() + body


def encoded_body(ds: Dataset) -> bytes:
    """The data set alone, explicit VR little endian, as a sender puts it on the wire."""
    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, False
    write_dataset(fp, ds)
    return fp.getvalue()


# ------------------------------------------------------------------ every shared file


def test_pynetdicom_scu_stores_every_shared_file(
    tmp_path: Path, db_url: str, dicom_dir: Path
) -> None:
    config = make_config(tmp_path, db_url)
    files = shared_files(dicom_dir)
    datasets = [read_for_sending(p) for p in files]
    with running(config) as (app, listener):
        statuses_ = send(listener.address[1], datasets)
        again = send(listener.address[1], datasets[:2])  # identical re-send
        assert statuses_ == [statuses.SUCCESS] * len(files)
        assert again == [statuses.SUCCESS] * 2
        assert_all_stored(app.db, config.storage_root, {str(d.SOPInstanceUID) for d in datasets})
        outcomes = [o for _, o, _ in audit_outcomes(app.db, "store")]
        assert outcomes.count("stored") == len(files)
        assert outcomes.count("duplicate") == 2
        actors = {a for a, _, _ in audit_outcomes(app.db, "association")}
        assert actors == {"ae:SENDER@127.0.0.1"}


def test_dcmtk_storescu_and_echoscu(
    tmp_path: Path, db_url: str, dicom_dir: Path, dcmtk: dict[str, str]
) -> None:
    config = make_config(tmp_path, db_url)
    files = shared_files(dicom_dir)
    env = {**os.environ, "TCP_NODELAY": "1"}
    with running(config) as (app, listener):
        port = str(listener.address[1])
        common = ["-aet", "DCMTK", "-aec", CALLED, "127.0.0.1", port]
        echo = subprocess.run(
            [dcmtk["echoscu"], *common], env=env, capture_output=True, check=False
        )
        assert echo.returncode == 0, echo.stderr
        # storescu proposes one compressed transfer syntax per run: one run per syntax.
        groups: dict[str, list[str]] = {}
        for path in files:
            ts = str(read_for_sending(path).file_meta.TransferSyntaxUID)
            groups.setdefault(STORESCU_PROPOSE.get(ts, "-x="), []).append(str(path))
        for option, paths in groups.items():
            store = subprocess.run(
                [dcmtk["storescu"], option, *common, *paths],
                env=env,
                capture_output=True,
                text=True,
                check=False,
                timeout=120,
            )
            assert store.returncode == 0, store.stderr
            assert "Store Failed" not in store.stderr
        uids = {str(read_for_sending(p).SOPInstanceUID) for p in files}
        assert_all_stored(app.db, config.storage_root, uids)


# ------------------------------------------------------------------ refusals


def test_malformed_inputs_get_their_status_and_leave_nothing(
    tmp_path: Path, sqlite_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Send files byte for byte so the listener sees exactly the malformed bytes.
    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)
    config = make_config(tmp_path, sqlite_url)
    good = small_instance()
    body = encoded_body(good)
    no_uid = small_instance()
    del no_uid.SOPInstanceUID
    path_uid = small_instance()
    path_uid.SOPInstanceUID = "1.2.3/../../x"
    wrong_class = small_instance(sop_class=SecondaryCaptureImageStorage)
    cases = {
        "truncated": (raw_part10(good, body[:-20]), statuses.CANNOT_UNDERSTAND),
        "garbage": (raw_part10(good, b"\x07garbage" * 64), statuses.CANNOT_UNDERSTAND),
        "no_sop_instance_uid": (
            raw_part10(good, encoded_body(no_uid)),
            statuses.CANNOT_UNDERSTAND,
        ),
        "path_uid": (
            raw_part10(small_instance(), encoded_body(path_uid)),
            statuses.CANNOT_UNDERSTAND,
        ),
        "sop_class_mismatch": (
            raw_part10(small_instance(), encoded_body(wrong_class)),
            statuses.DATASET_DOES_NOT_MATCH_SOP_CLASS,
        ),
    }
    with running(config) as (app, listener):
        port = listener.address[1]
        for name, (data, expected) in cases.items():
            path = tmp_path / f"{name}.dcm"
            path.write_bytes(data)
            assert send(port, [path]) == [expected], name
        with app.db.session() as s:
            assert s.execute(select(func.count(Instance.id))).scalar_one() == 0
        assert [p for p in config.storage_root.rglob("*") if p.is_file()] == []
        refused = audit_outcomes(app.db, "store")
        assert [o for _, o, _ in refused] == ["refused"] * len(cases)
        assert [d["status"][:6] for _, _, d in refused] == [f"0x{e:04X}" for _, e in cases.values()]
        # The listener keeps serving.
        ok = tmp_path / "good.dcm"
        ok.write_bytes(raw_part10(good, body))
        assert send(port, [ok]) == [statuses.SUCCESS]
        assert_all_stored(app.db, config.storage_root, {str(good.SOPInstanceUID)})


def test_unsupported_sop_class_is_refused_at_negotiation(tmp_path: Path, sqlite_url: str) -> None:
    with running(make_config(tmp_path, sqlite_url)) as (_, listener):
        ae = AE(ae_title="SENDER")
        ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
        ae.add_requested_context("1.2.840.10008.1.1")  # Verification
        assoc = ae.associate("127.0.0.1", listener.address[1], ae_title=CALLED)
        try:
            assert assoc.is_established
            accepted = [cx.abstract_syntax for cx in assoc.accepted_contexts]
            assert accepted == ["1.2.840.10008.1.1"]
            assert [cx.abstract_syntax for cx in assoc.rejected_contexts] == [CTImageStorage]
        finally:
            assoc.release()


def test_disk_below_watermark_answers_out_of_resources(tmp_path: Path, sqlite_url: str) -> None:
    config = make_config(tmp_path, sqlite_url)
    config = replace(config, storage=replace(config.storage, min_free_mb=10**9))
    ds = small_instance()
    with running(config) as (app, listener):
        assert send(listener.address[1], [ds]) == [statuses.OUT_OF_RESOURCES]
        with app.db.session() as s:
            assert s.execute(select(func.count(Instance.id))).scalar_one() == 0
        assert [d["status"][:6] for _, _, d in audit_outcomes(app.db, "store")] == ["0xA700"]
        app.storage.min_free_mb = 0  # space freed
        assert send(listener.address[1], [ds]) == [statuses.SUCCESS]
        assert_all_stored(app.db, config.storage_root, {str(ds.SOPInstanceUID)})


def test_database_down_answers_out_of_resources_then_recovers(tmp_path: Path, pg_url: str) -> None:
    """PostgreSQL refuses connections to the database: 0xA700, nothing left behind."""
    config = make_config(tmp_path, pg_url)
    name = make_url(pg_url).database
    admin = create_engine(make_url(pg_url).set(database="postgres"), isolation_level="AUTOCOMMIT")
    ds = small_instance()

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
                assert send(listener.address[1], [ds]) == [statuses.OUT_OF_RESOURCES]
                assert [p for p in config.storage_root.rglob("*") if p.is_file()] == []
            finally:
                set_connections(True)
            assert send(listener.address[1], [ds]) == [statuses.SUCCESS]
            assert_all_stored(app.db, config.storage_root, {str(ds.SOPInstanceUID)})
    finally:
        admin.dispose()


# ------------------------------------------------------------------ concurrency


def test_concurrent_associations(tmp_path: Path, db_url: str) -> None:
    config = make_config(tmp_path, db_url, max_associations=10)
    per_assoc, n_assoc = 50, 10
    batches = [
        [small_instance(seed=a * per_assoc + i) for i in range(per_assoc)] for a in range(n_assoc)
    ]
    results: dict[int, list[int]] = {}
    errors: list[BaseException] = []

    def worker(index: int, port: int) -> None:
        try:
            results[index] = send(port, batches[index], calling=f"MOD{index}")
        except BaseException as exc:  # reported below, in the test's thread
            errors.append(exc)

    with running(config) as (app, listener):
        threads = [
            threading.Thread(target=worker, args=(i, listener.address[1])) for i in range(n_assoc)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        assert errors == []
        assert all(results[i] == [statuses.SUCCESS] * per_assoc for i in range(n_assoc))
        uids = {str(ds.SOPInstanceUID) for batch in batches for ds in batch}
        assert_all_stored(app.db, config.storage_root, uids)


# ------------------------------------------------------------------ access control


def test_unlisted_calling_ae_is_rejected_and_audited(tmp_path: Path, sqlite_url: str) -> None:
    config = make_config(tmp_path, sqlite_url, allowed_calling_aets=["MODALITY1"])
    with running(config) as (app, listener):
        ae = AE(ae_title="STRANGER")
        ae.add_requested_context(ComputedRadiographyImageStorage, ExplicitVRLittleEndian)
        assoc = ae.associate("127.0.0.1", listener.address[1], ae_title=CALLED)
        assert assoc.is_rejected
        primitive = assoc.acceptor.primitive
        assert primitive is not None
        assert primitive.diagnostic == 3  # calling AE title not recognised
        assert send(listener.address[1], [small_instance()], calling="MODALITY1") == [0]
        events = audit_outcomes(app.db, "association")
        assert [(a, o) for a, o, _ in events] == [
            ("ae:STRANGER@127.0.0.1", "rejected"),
            ("ae:MODALITY1@127.0.0.1", "accepted"),
        ]
        assert events[0][2]["reason"] == "calling AE title not recognised"
        assert events[0][2]["peer_address"] == "127.0.0.1"


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True)


def make_pki(d: Path) -> dict[str, Path]:
    """A CA, a server certificate for localhost and a client certificate, via openssl."""
    _openssl(
        "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=test-ca",
        "-keyout", str(d / "ca.key"), "-out", str(d / "ca.pem"),
    )  # fmt: skip
    for name in ("server", "client"):
        _openssl(
            "req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=localhost",
            "-keyout", str(d / f"{name}.key"), "-out", str(d / f"{name}.csr"),
        )  # fmt: skip
        ext = d / f"{name}.ext"
        ext.write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
        _openssl(
            "x509", "-req", "-in", str(d / f"{name}.csr"), "-CA", str(d / "ca.pem"),
            "-CAkey", str(d / "ca.key"), "-CAcreateserial", "-days", "2",
            "-extfile", str(ext), "-out", str(d / f"{name}.pem"),
        )  # fmt: skip
    return {p.stem + p.suffix: p for p in d.iterdir()}


def test_tls_requires_a_client_certificate_from_the_ca(tmp_path: Path, sqlite_url: str) -> None:
    pki = tmp_path / "pki"
    pki.mkdir()
    make_pki(pki)
    tls = {
        "enabled": True,
        "cert": str(pki / "server.pem"),
        "key": str(pki / "server.key"),
        "ca": str(pki / "ca.pem"),
        "require_client_cert": True,
    }
    config = make_config(tmp_path, sqlite_url, tls=tls)
    client = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(pki / "ca.pem"))
    client.load_cert_chain(str(pki / "client.pem"), str(pki / "client.key"))
    anonymous = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(pki / "ca.pem"))
    ds = small_instance()
    with running(config) as (app, listener):
        port = listener.address[1]
        assert send(port, [ds], ssl_context=client) == [statuses.SUCCESS]
        with pytest.raises(ConnectionRefusedError):
            send(port, [small_instance()], ssl_context=anonymous)
        with pytest.raises(ConnectionRefusedError):
            send(port, [small_instance()])  # plain TCP to a TLS port
        assert_all_stored(app.db, config.storage_root, {str(ds.SOPInstanceUID)})


def test_uid_refusal_reason_is_audited(tmp_path: Path, sqlite_url: str) -> None:
    """A leading zero is accepted with a warning event; the audit names the attribute."""
    config = make_config(tmp_path, sqlite_url)
    ds = small_instance("1.2.826.0.1.3680043.8.498.099")
    with running(config) as (app, listener):
        assert send(listener.address[1], [ds]) == [statuses.SUCCESS]
        warnings = audit_outcomes(app.db, "uid_leading_zero")
        assert [(o, d["attributes"]) for _, o, d in warnings] == [("warning", ["SOPInstanceUID"])]
        assert_all_stored(app.db, config.storage_root, {str(UID(ds.SOPInstanceUID))})
