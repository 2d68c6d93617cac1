"""Fuzz the receive-side parser with mutated real files (hypothesis).

``inspect_received`` is what the listener runs on every data set a peer sends, before
anything is stored. On any mutation of a real file it must answer (metadata) or refuse
(:class:`CannotUnderstand`, :class:`SOPClassMismatch`), in bounded time and memory:
never another exception, a hang or a large allocation.

Bounded for CI (``FUZZ_EXAMPLES``, default 60); ``scripts/fuzz_receive.py`` runs it
longer.
"""

from __future__ import annotations

import io
import os
import resource
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydicom import dcmread
from pydicom.dataset import FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset, write_file_meta_info
from pydicom.uid import UID, DeflatedExplicitVRLittleEndian, ImplicitVRLittleEndian

from pacs_classifier.receive.inspect import CannotUnderstand, SOPClassMismatch, inspect_received

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "60"))
#: One example may take this long on a loaded CI machine; a hang would take forever.
EXAMPLE_SECONDS = 5.0

pytestmark = pytest.mark.filterwarnings("ignore")  # pydicom warns about what we mutate


@dataclass(frozen=True)
class Seed:
    name: str
    meta: bytes  # preamble, DICM and the file meta, as the receiver writes them
    body: bytes  # the data set as the sender encoded it
    transfer_syntax: str
    sop_class: str


def _meta(sop_class: str, sop_instance: str, ts: str) -> bytes:
    fm = FileMetaDataset()
    fm.MediaStorageSOPClassUID = UID(sop_class)
    fm.MediaStorageSOPInstanceUID = UID(sop_instance)
    fm.TransferSyntaxUID = UID(ts)
    buf = io.BytesIO()
    buf.write(b"\x00" * 128 + b"DICM")
    write_file_meta_info(buf, fm)  # type: ignore[arg-type]
    return buf.getvalue()


def load_seeds(dicom_dir: Path) -> list[Seed]:
    seeds = []
    for path in sorted(dicom_dir.glob("*.dcm")):
        ds = dcmread(path, force=True)
        ts = str(ds.file_meta.get("TransferSyntaxUID", ImplicitVRLittleEndian))
        data = path.read_bytes()
        if data[128:132] == b"DICM":
            group_length = int.from_bytes(data[140:144], "little")
            body = data[144 + group_length :]
        else:
            body = data
        meta = _meta(ds.SOPClassUID, ds.SOPInstanceUID, ts)
        seeds.append(Seed(path.name, meta, body, ts, str(ds.SOPClassUID)))
        if "implicit" in path.name:
            # The same data set deflated (PS3.5 §A.5): the inflater is fuzzed too.
            fp = DicomBytesIO()
            fp.is_little_endian, fp.is_implicit_VR = True, False
            write_dataset(fp, ds)
            deflater = zlib.compressobj(6, zlib.DEFLATED, -zlib.MAX_WBITS)
            deflated = deflater.compress(fp.getvalue()) + deflater.flush()
            meta = _meta(ds.SOPClassUID, ds.SOPInstanceUID, DeflatedExplicitVRLittleEndian)
            seeds.append(
                Seed(
                    f"{path.name} (deflated)",
                    meta,
                    deflated,
                    DeflatedExplicitVRLittleEndian,
                    str(ds.SOPClassUID),
                )
            )
    return seeds


_LENGTHS = [0, 1, 0xFFFF, 0x7FFFFFFF, 0xFFFFFFFE, 0xFFFFFFFF]


@st.composite
def mutated(draw: st.DrawFn, seeds: list[Seed]) -> tuple[Seed, bytes]:
    seed = draw(st.sampled_from(seeds))
    body = bytearray(seed.body)
    # Most structure is in the first KiBs; pixel data is skipped by its length.
    position = st.one_of(
        st.integers(0, min(len(body), 4096)), st.integers(0, max(len(body) - 1, 0))
    )
    for _ in range(draw(st.integers(1, 6))):
        if not body:
            break
        pos = min(draw(position), len(body) - 1)
        op = draw(st.sampled_from(["flip", "length", "insert", "delete", "truncate"]))
        if op == "flip":
            body[pos] = draw(st.integers(0, 255))
        elif op == "length":  # a 16- or 32-bit length field set to a hostile value
            value = (
                draw(st.sampled_from(_LENGTHS))
                if draw(st.booleans())
                else draw(st.integers(0, 0xFFFFFFFF))
            )
            body[pos : pos + 4] = value.to_bytes(4, "little")
        elif op == "insert":
            body[pos:pos] = draw(st.binary(min_size=1, max_size=64))
        elif op == "delete":
            del body[pos : pos + draw(st.integers(1, 64))]
        else:
            del body[pos:]
    return seed, bytes(body)


@pytest.fixture(scope="module")
def seeds(dicom_dir: Path) -> list[Seed]:
    found = load_seeds(dicom_dir)
    assert found, f"no seed files in {dicom_dir}"
    return found


def test_inspect_received_survives_mutated_real_files(
    seeds: list[Seed], tmp_path_factory: pytest.TempPathFactory
) -> None:
    folder = tmp_path_factory.mktemp("fuzz")
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    answered: list[str] = []

    @settings(
        max_examples=EXAMPLES,
        deadline=None,  # timed below, with a margin for a loaded machine
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(mutated(seeds))
    def check(case: tuple[Seed, bytes]) -> None:
        seed, body = case
        path = folder / "received.dcm"
        path.write_bytes(seed.meta + body)
        t0 = time.monotonic()
        try:
            inspect_received(path, seed.transfer_syntax, seed.sop_class)
            answered.append("stored")
        except (CannotUnderstand, SOPClassMismatch):
            answered.append("refused")
        took = time.monotonic() - t0
        assert took < EXAMPLE_SECONDS, f"{seed.name}: {took:.1f} s"

    check()
    grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak_before) / 1024
    assert grown_mb < 300, f"peak RSS grew by {grown_mb:.0f} MB"
    assert "refused" in answered  # the mutations do reach the checks
