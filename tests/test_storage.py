"""Durable storage and the ingest transaction, on a real file system and real databases."""

from __future__ import annotations

import hashlib
import io
import threading
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    UID,
    ComputedRadiographyImageStorage,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    generate_uid,
)
from sqlalchemy import event, select, text
from sqlalchemy.orm import Session

from pacs_classifier.db.audit import verify_chain
from pacs_classifier.db.engine import Database
from pacs_classifier.db.models import AuditEvent, Instance, Job, JobKind, JobState
from pacs_classifier.errors import DatabaseUnavailable, StorageFull
from pacs_classifier.receive.inspect import (
    CannotUnderstand,
    SOPClassMismatch,
    check_structure,
    inspect_received,
)
from pacs_classifier.store.ingest import ACTION_RECOVER, Ingestor, IngestOutcome, IngestResult
from pacs_classifier.store.storage import TMP_PREFIX, InvalidUID, Storage, check_uid


def make_dataset(sop_uid: str | None = None, *, seed: int = 0) -> Dataset:
    """A small, valid CR instance with a sequence and pixel data."""
    ds = Dataset()
    ds.SOPClassUID = ComputedRadiographyImageStorage
    ds.SOPInstanceUID = sop_uid or generate_uid()
    ds.StudyInstanceUID = "1.2.826.0.1.3680043.8.498.1"
    ds.SeriesInstanceUID = "1.2.826.0.1.3680043.8.498.1.1"
    ds.PatientID = "P1"
    ds.AccessionNumber = "A1"
    ds.StudyDate = "20240101"
    ds.Modality = "CR"
    ds.BodyPartExamined = "CHEST"
    ds.ViewPosition = "PA"
    item = Dataset()
    item.CodeValue = "X"
    ds.ProcedureCodeSequence = [item]
    ds.Rows = ds.Columns = 8
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.PixelData = bytes((seed + i) % 256 for i in range(64))
    return ds


def encode(ds: Dataset, transfer_syntax: str = ExplicitVRLittleEndian) -> bytes:
    """The data set as a receiver's Part 10 file (preamble, file meta, data set)."""
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = UID(transfer_syntax)
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def dataset_bytes(part10: bytes) -> bytes:
    group_length = int.from_bytes(part10[140:144], "little")
    return part10[144 + group_length :]


@pytest.fixture
def storage(tmp_path: Path) -> Storage:
    s = Storage(tmp_path / "dicom", min_free_mb=0)
    s.open()
    return s


# ------------------------------------------------------------------ UIDs and paths


@pytest.mark.parametrize(
    "value",
    ["", "1.2.3/../../x", "../etc", "1.2.a", "1..2", ".1.2", "1.2.", "1" * 65, "1.2 .3", None],
)
def test_bad_uids_are_refused(value: str | None) -> None:
    with pytest.raises(InvalidUID):
        check_uid(value, "SOPInstanceUID")


def test_good_uid_and_leading_zero_warning() -> None:
    assert check_uid("1.2.840.10008.1.2", "X").leading_zero is False
    assert check_uid("1.2.0.3\x00", "X").uid == "1.2.0.3"
    checked = check_uid("1.2.03.4", "X")
    assert checked.leading_zero is True
    assert check_uid("1" * 64, "X").uid == "1" * 64


def test_final_path_stays_under_root(storage: Storage) -> None:
    path = storage.final_path("1.2", "1.2.3", "1.2.3.4", "ab" * 32)
    assert path == storage.root / "1.2" / "1.2.3" / f"1.2.3.4.{'ab' * 8}.dcm"
    with pytest.raises(InvalidUID):
        storage.final_path("1.2", "1.2.3", "1.2.3/../../x", "ab" * 32)


def test_open_removes_only_orphan_temporaries(tmp_path: Path) -> None:
    s = Storage(tmp_path / "dicom", min_free_mb=0)
    s.tmp_dir.mkdir(parents=True)
    (s.tmp_dir / f"{TMP_PREFIX}crashed.part").write_bytes(b"x")
    (s.tmp_dir / "not-ours.txt").write_bytes(b"y")
    assert s.open() == 1
    assert sorted(p.name for p in s.tmp_dir.iterdir()) == ["not-ours.txt"]


def test_free_space_watermark(tmp_path: Path) -> None:
    s = Storage(tmp_path, min_free_mb=10**12)
    with pytest.raises(StorageFull, match="min_free_mb"):
        s.check_free_space()
    Storage(tmp_path, min_free_mb=0).check_free_space()


def test_commit_file_is_atomic_rename(storage: Storage) -> None:
    tmp = storage.write_temp(b"hello")
    final = storage.final_path("1.2", "1.3", "1.4", "cd" * 32)
    storage.commit_file(tmp, final)
    assert final.read_bytes() == b"hello"
    assert not tmp.exists()
    storage.remove_final(final)
    assert not final.exists()


def test_intent_marker_names_its_file_and_foreign_names_are_ignored(storage: Storage) -> None:
    uid = "1" * 64
    final = storage.final_path(uid, uid, uid, "0123456789" * 7)  # the longest name
    marker = storage.write_intent(final)
    assert marker.parent == storage.pending_dir and marker.stat().st_size == 0
    assert len(marker.name) <= 255
    assert storage.write_intent(final) == marker  # announcing twice is harmless
    other = storage.write_intent(storage.final_path("1.2", "1.2.3", "1.2.3.4", "ab" * 32))
    for foreign in ("notes.txt", "1.2_1.3.intent", "1.2_.._1.4.abababababababab.dcm.intent"):
        (storage.pending_dir / foreign).touch()
    intents = storage.pending_intents()
    assert [(i.marker, i.final, i.sop_instance_uid) for i in intents] == [
        (other, storage.root / "1.2" / "1.2.3" / f"1.2.3.4.{'ab' * 8}.dcm", "1.2.3.4"),
        (marker, final, uid),
    ]
    assert intents[1].file_path == storage.relative(final)
    storage.clear_intent(marker)
    assert [i.marker for i in storage.pending_intents()] == [other]


# ------------------------------------------------------------------ data set checks


@pytest.mark.parametrize("ts", [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
def test_structure_accepts_valid_and_refuses_truncated(ts: str) -> None:
    body = dataset_bytes(encode(make_dataset(), ts))
    implicit = ts == ImplicitVRLittleEndian
    check_structure(body, implicit)
    for cut in (1, 7, 40, len(body) // 2):
        with pytest.raises(CannotUnderstand):
            check_structure(body[:-cut], implicit)


def test_structure_refuses_garbage() -> None:
    with pytest.raises(CannotUnderstand):
        check_structure(b"garbage!" * 100, implicit=False)
    with pytest.raises(CannotUnderstand):
        check_structure(b"garbage!" * 100, implicit=True)


def test_structure_of_every_shared_file(dicom_dir: Path) -> None:
    for path in sorted(dicom_dir.glob("*.dcm")):
        ds = dcmread(path, force=True)
        ts = ds.file_meta.get("TransferSyntaxUID", ImplicitVRLittleEndian)
        raw = path.read_bytes()
        body = dataset_bytes(raw) if raw[128:132] == b"DICM" else raw
        check_structure(body, implicit=ts == ImplicitVRLittleEndian)
        with pytest.raises(CannotUnderstand):
            check_structure(body[: len(body) - 3], implicit=ts == ImplicitVRLittleEndian)


@pytest.mark.filterwarnings("ignore:Invalid value for VR UI")
def test_inspect_reads_header_and_hashes_without_meta(tmp_path: Path) -> None:
    ds = make_dataset("1.2.3.04")
    raw = encode(ds)
    path = tmp_path / "x.dcm"
    path.write_bytes(raw)
    meta, warnings = inspect_received(path, ExplicitVRLittleEndian, ComputedRadiographyImageStorage)
    assert meta.sha256 == hashlib.sha256(dataset_bytes(raw)).hexdigest()
    assert (meta.modality, meta.body_part, meta.view_position) == ("CR", "CHEST", "PA")
    assert meta.file_size == len(raw)
    assert warnings == ["SOPInstanceUID"]
    with pytest.raises(SOPClassMismatch):
        inspect_received(path, ExplicitVRLittleEndian, "1.2.840.10008.5.1.4.1.1.7")


def test_inspect_deflated(tmp_path: Path) -> None:
    raw = encode(make_dataset(), DeflatedExplicitVRLittleEndian)
    path = tmp_path / "d.dcm"
    path.write_bytes(raw)
    meta, _ = inspect_received(
        path, DeflatedExplicitVRLittleEndian, ComputedRadiographyImageStorage
    )
    assert meta.sop_class_uid == ComputedRadiographyImageStorage
    body = dataset_bytes(raw)
    path.write_bytes(raw[: len(raw) - len(body)] + body[: len(body) // 2])
    with pytest.raises(CannotUnderstand):
        inspect_received(path, DeflatedExplicitVRLittleEndian, ComputedRadiographyImageStorage)
    assert zlib.decompressobj(-zlib.MAX_WBITS).decompress(body)  # the bytes really deflate


# ------------------------------------------------------------------ ingest transaction


def _ingest(
    storage: Storage, db: Database, ds: Dataset, tmp_path: Path
) -> tuple[Path, IngestResult]:
    raw = encode(ds)
    tmp = storage.write_temp(raw)
    meta, warnings = inspect_received(tmp, ExplicitVRLittleEndian, ds.SOPClassUID)
    result = Ingestor(db, storage).ingest(
        tmp, meta, actor="ae:TEST@127.0.0.1", calling_ae="TEST", warnings=tuple(warnings)
    )
    return tmp, result


def test_ingest_store_duplicate_and_new_version(
    storage: Storage, database: Database, tmp_path: Path
) -> None:
    uid = "1.2.826.0.1.3680043.8.498.77"
    tmp, first = _ingest(storage, database, make_dataset(uid, seed=1), tmp_path)
    assert not tmp.exists()
    _, dup = _ingest(storage, database, make_dataset(uid, seed=1), tmp_path)
    _, second = _ingest(storage, database, make_dataset(uid, seed=2), tmp_path)
    assert [r.outcome for r in (first, dup, second)] == [
        IngestOutcome.STORED,
        IngestOutcome.DUPLICATE,
        IngestOutcome.NEW_VERSION,
    ]
    with database.session() as s:
        rows = s.execute(select(Instance).order_by(Instance.id)).scalars().all()
        assert [r.version for r in rows] == [1, 2]
        for row in rows:
            data = (storage.root / row.file_path).read_bytes()
            assert hashlib.sha256(dataset_bytes(data)).hexdigest() == row.file_sha256
        jobs = s.execute(select(Job)).scalars().all()
        assert sorted(j.instance_id for j in jobs) == [rows[0].id, rows[1].id]
        assert {(j.kind, j.state) for j in jobs} == {(JobKind.CLASSIFY, JobState.QUEUED)}
        outcomes = s.execute(select(AuditEvent.outcome).order_by(AuditEvent.id)).scalars().all()
        assert outcomes == ["stored", "duplicate", "new_version"]
        assert verify_chain(s).ok
    assert list(storage.tmp_dir.iterdir()) == []
    assert list(storage.pending_dir.iterdir()) == []  # every marker dropped after its commit


def test_failed_commit_leaves_no_file(storage: Storage, database: Database, tmp_path: Path) -> None:
    """A row the database refuses after the rename: the file is removed again."""
    with database.engine.begin() as conn:
        if database.dialect == "sqlite":
            conn.execute(
                text(
                    "CREATE TRIGGER refuse BEFORE INSERT ON instances "
                    "BEGIN SELECT RAISE(ABORT, 'refused by test'); END"
                )
            )
        else:
            conn.execute(
                text(
                    "CREATE FUNCTION refuse() RETURNS trigger LANGUAGE plpgsql AS "
                    "$$ BEGIN RAISE EXCEPTION 'refused by test'; END $$"
                )
            )
            conn.execute(
                text(
                    "CREATE TRIGGER refuse BEFORE INSERT ON instances "
                    "FOR EACH ROW EXECUTE FUNCTION refuse()"
                )
            )
    with pytest.raises(Exception, match="refused by test"):
        _ingest(storage, database, make_dataset(), tmp_path)
    assert [p for p in storage.root.rglob("*") if p.is_file()] == []
    with database.session() as s:
        assert s.execute(select(Instance)).first() is None
        assert s.execute(select(AuditEvent)).first() is None


# ------------------------------------------------------------------ crash windows


@contextmanager
def commit_acknowledgement_lost(database: Database, *, then_unreachable: bool) -> Iterator[None]:
    """The next COMMIT really commits, then raises, as a connection lost during COMMIT does.

    With ``then_unreachable``, every transaction begun after it fails too (the database
    went away), so whether the row was committed cannot be checked.
    """
    state = {"committed": False}

    def after_commit(session: Session) -> None:
        if session.get_bind() is database.engine and not state["committed"]:
            state["committed"] = True
            raise DatabaseUnavailable("database connection lost: server closed the connection")

    def after_begin(session: Session, *_: Any) -> None:
        if then_unreachable and state["committed"] and session.get_bind() is database.engine:
            raise DatabaseUnavailable("database unavailable: connection refused")

    event.listen(Session, "after_commit", after_commit)
    event.listen(Session, "after_begin", after_begin)
    try:
        yield
    finally:
        event.remove(Session, "after_commit", after_commit)
        event.remove(Session, "after_begin", after_begin)
    assert state["committed"], "no COMMIT happened"


def test_lost_commit_acknowledgement_keeps_the_committed_file(
    storage: Storage, database: Database, tmp_path: Path
) -> None:
    """The row is committed but the commit raised: the file stays, and it counts as stored."""
    ds = make_dataset()
    with commit_acknowledgement_lost(database, then_unreachable=False):
        _, result = _ingest(storage, database, ds, tmp_path)
    assert result.outcome == IngestOutcome.STORED
    with database.session() as s:
        row = s.execute(select(Instance)).scalar_one()
        job = s.execute(select(Job)).scalar_one()
    assert (result.instance_id, result.job_id) == (row.id, job.id)
    data = (storage.root / row.file_path).read_bytes()
    assert hashlib.sha256(dataset_bytes(data)).hexdigest() == row.file_sha256
    assert result.file_path == storage.root / row.file_path
    assert list(storage.pending_dir.iterdir()) == []
    assert list(storage.tmp_dir.iterdir()) == []


def test_unknown_commit_outcome_keeps_file_and_marker_for_recovery(
    storage: Storage, database: Database, tmp_path: Path
) -> None:
    """Commit raised and the database is gone: keep both; start-up recovery settles them."""
    with (
        commit_acknowledgement_lost(database, then_unreachable=True),
        pytest.raises(DatabaseUnavailable, match="connection lost"),
    ):
        _ingest(storage, database, make_dataset(), tmp_path)
    with database.session() as s:
        row = s.execute(select(Instance)).scalar_one()
    final = storage.root / row.file_path
    assert final.is_file()
    assert [i.file_path for i in storage.pending_intents()] == [row.file_path]
    recovery = Ingestor(database, storage).recover_pending(actor="listener")
    assert (recovery.kept, recovery.removed, recovery.unsettled) == ([row.file_path], [], [])
    assert final.is_file()
    assert list(storage.pending_dir.iterdir()) == []
    with database.session() as s:
        actions = s.execute(select(AuditEvent.action)).scalars().all()
    assert actions == ["store"]  # a committed file is not a recovery


def test_failed_commit_does_not_remove_a_concurrent_identical_instance(
    storage: Storage, database: Database, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A's row is refused after its rename; B stores the identical data set meanwhile.

    Both rename to the same final path. A's clean-up holds the ingest lock from its
    "no row" check to its unlink, so B waits and renames afterwards: B's committed row
    keeps its file. Without the lock B fits in that window and loses the file.
    """
    ds = make_dataset()
    raw = encode(ds)
    tmp_a, tmp_b = storage.write_temp(raw), storage.write_temp(raw)
    meta, _ = inspect_received(tmp_a, ExplicitVRLittleEndian, ds.SOPClassUID)
    a, b = Ingestor(database, storage), Ingestor(database, storage)

    def refuse_row(*_args: Any, **_kwargs: Any) -> IngestResult:
        raise DatabaseUnavailable("database unavailable: refused by test")

    monkeypatch.setattr(a, "_record_new", refuse_row)
    b_results: list[IngestResult] = []
    real_remove = storage.remove_final

    def remove_while_b_tries(final: Path) -> None:
        b_thread = threading.Thread(
            target=lambda: b_results.append(b.ingest(tmp_b, meta, actor="b", calling_ae="B"))
        )
        b_thread.start()
        b_thread.join(timeout=2)  # B blocks on the lock until A's clean-up commits
        real_remove(final)
        removals.append(b_thread)

    removals: list[threading.Thread] = []
    monkeypatch.setattr(storage, "remove_final", remove_while_b_tries)
    with pytest.raises(DatabaseUnavailable, match="refused by test"):
        a.ingest(tmp_a, meta, actor="a", calling_ae="A")
    (b_thread,) = removals
    b_thread.join(timeout=60)
    assert not b_thread.is_alive()
    (result,) = b_results
    assert result.outcome == IngestOutcome.STORED
    with database.session() as s:
        row = s.execute(select(Instance)).scalar_one()
    data = (storage.root / row.file_path).read_bytes()
    assert hashlib.sha256(dataset_bytes(data)).hexdigest() == row.file_sha256
    assert list(storage.pending_dir.iterdir()) == []
    assert list(storage.tmp_dir.iterdir()) == []


def test_recover_pending_removes_only_unreferenced_files(
    storage: Storage, database: Database, tmp_path: Path
) -> None:
    """Markers left by crashes: before the rename, after it, and after the commit."""
    _, stored = _ingest(storage, database, make_dataset(), tmp_path)
    before = stored.file_path.stat()
    storage.write_intent(stored.file_path)  # crashed after the commit, marker not dropped
    # Crashed after the rename, before the commit: the file has its final name, no row.
    orphan_ds = make_dataset()
    orphan_tmp = storage.write_temp(encode(orphan_ds))
    meta, _ = inspect_received(orphan_tmp, ExplicitVRLittleEndian, orphan_ds.SOPClassUID)
    orphan = storage.final_path(
        meta.study_instance_uid, meta.series_instance_uid, meta.sop_instance_uid, meta.sha256
    )
    storage.write_intent(orphan)
    storage.commit_file(orphan_tmp, orphan)
    # Crashed after the marker, before the rename: no file at all.
    never = storage.final_path("1.2", "1.2.3", "1.2.3.4", "ef" * 32)
    storage.write_intent(never)
    (storage.pending_dir / "notes.txt").write_text("not ours")

    recovery = Ingestor(database, storage).recover_pending(actor="listener")

    assert sorted(recovery.removed) == sorted([storage.relative(orphan), storage.relative(never)])
    assert recovery.kept == [storage.relative(stored.file_path)]
    assert not orphan.exists() and not never.exists()
    after = stored.file_path.stat()
    assert (after.st_ino, after.st_mtime_ns, after.st_size) == (
        before.st_ino,
        before.st_mtime_ns,
        before.st_size,
    )
    assert [p.name for p in storage.pending_dir.iterdir()] == ["notes.txt"]
    with database.session() as s:
        events = s.execute(
            select(AuditEvent).where(AuditEvent.action == ACTION_RECOVER).order_by(AuditEvent.id)
        ).scalars()
        recovered = {
            (e.actor, e.outcome, e.entity_id, e.detail["file_path"], e.detail["file_existed"])
            for e in events
        }
        assert verify_chain(s).ok
    assert recovered == {
        ("listener", "removed", meta.sop_instance_uid, storage.relative(orphan), True),
        ("listener", "removed", "1.2.3.4", storage.relative(never), False),
    }
    assert Ingestor(database, storage).recover_pending(actor="listener").removed == []
