"""Check a received data set without decoding pixels, and read what the database needs.

pydicom is deliberately lenient: it reads a truncated data set or garbage bytes without
complaint. A gateway must not acknowledge those, so :func:`check_structure` walks the
element headers of the encoded data set (PS3.5 §7.1 and §7.5) and refuses anything whose
lengths, value representations, delimiters or tag order do not add up. Pixel data is
skipped by its length, never decoded.
"""

from __future__ import annotations

import hashlib
import mmap
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydicom import dcmread
from pydicom.errors import InvalidDicomError
from pydicom.multival import MultiValue
from pydicom.uid import DeflatedExplicitVRLittleEndian, ImplicitVRLittleEndian

from pacs_classifier.errors import PermanentError
from pacs_classifier.store.ingest import InstanceMeta
from pacs_classifier.store.storage import InvalidUID, check_uid


class CannotUnderstand(PermanentError):
    """The data set cannot be parsed (answered 0xC000)."""


class SOPClassMismatch(PermanentError):
    """The data set's SOP Class is not the presentation context's (answered 0xA900)."""


_ITEM = 0xFFFEE000
_ITEM_DELIM = 0xFFFEE00D
_SEQ_DELIM = 0xFFFEE0DD
_PIXEL_DATA = 0x7FE00010
_UNDEFINED = 0xFFFFFFFF
_MAX_DEPTH = 32
# PS3.5 Table 7.1-1: these VRs have a reserved 2 bytes and a 4-byte length.
_LONG_VRS = frozenset(b"OB OD OF OL OV OW SQ SV UC UN UR UT UV".split())
_SHORT_VRS = frozenset(b"AE AS AT CS DA DS DT FD FL IS LO LT PN SH SL SS ST TM UI UL US".split())
_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")
_TAG = struct.Struct("<HH")

#: Attributes read into the ``instances`` row; nothing else is parsed.
_HEADER_TAGS = [
    "SOPClassUID",
    "SOPInstanceUID",
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "AccessionNumber",
    "PatientID",
    "StudyDate",
    "Modality",
    "BodyPartExamined",
    "ViewPosition",
]


class _Walker:
    """Walks element headers of one little-endian data set (PS3.5 §7.1, §7.5)."""

    def __init__(self, buf: Any, implicit: bool) -> None:
        self.buf = buf
        self.implicit = implicit

    def fail(self, pos: int, why: str) -> CannotUnderstand:
        return CannotUnderstand(f"data set cannot be parsed at byte {pos}: {why}")

    def tag_at(self, pos: int, end: int) -> tuple[int, int]:
        if pos + 8 > end:
            raise self.fail(pos, "truncated element header")
        group, elem = _TAG.unpack_from(self.buf, pos)
        return (group << 16) | elem, _U32.unpack_from(self.buf, pos + 4)[0]

    def dataset(self, pos: int, end: int, depth: int, in_item: bool) -> int:
        """Walk elements until ``end`` (or an item delimiter when ``in_item``)."""
        if depth > _MAX_DEPTH:
            raise self.fail(pos, "sequences nested too deeply")
        last_tag = -1
        while pos < end:
            tag, _ = self.tag_at(pos, end)
            if tag == _ITEM_DELIM and in_item:
                return pos + 8
            if tag in (_ITEM, _ITEM_DELIM, _SEQ_DELIM):
                raise self.fail(pos, f"unexpected delimiter ({tag >> 16:04X},{tag & 0xFFFF:04X})")
            if tag <= last_tag:
                raise self.fail(pos, f"tag ({tag >> 16:04X},{tag & 0xFFFF:04X}) out of order")
            last_tag = tag
            pos = self.element(pos, end, tag, depth)
        if in_item:
            raise self.fail(pos, "item ends without its delimiter")
        return pos

    def element(self, pos: int, end: int, tag: int, depth: int) -> int:
        vr = b"" if self.implicit else bytes(self.buf[pos + 4 : pos + 6])
        if self.implicit:
            length: int = _U32.unpack_from(self.buf, pos + 4)[0]
            pos += 8
        elif vr in _LONG_VRS:
            if pos + 12 > end:
                raise self.fail(pos, "truncated element header")
            length = _U32.unpack_from(self.buf, pos + 8)[0]
            pos += 12
        elif vr in _SHORT_VRS:
            length = _U16.unpack_from(self.buf, pos + 6)[0]
            pos += 8
        else:
            raise self.fail(pos, f"invalid value representation {vr!r}")
        if length != _UNDEFINED:
            if pos + length > end:
                raise self.fail(pos, f"value of {length} bytes runs past the end")
            if vr == b"SQ":
                self.items(pos, pos + length, depth + 1, fragments=False, delimited=False)
            return pos + length
        if not self.implicit and vr not in (b"SQ", b"UN", b"OB", b"OW"):
            raise self.fail(pos, f"undefined length on VR {vr!r}")
        # Undefined length: a sequence, or encapsulated pixel data (PS3.5 A.4). A UN
        # sequence of undefined length is encoded implicit VR inside (PS3.5 §6.2.2).
        saved = self.implicit
        self.implicit = self.implicit or vr == b"UN"
        try:
            return self.items(pos, end, depth + 1, fragments=tag == _PIXEL_DATA, delimited=True)
        finally:
            self.implicit = saved

    def items(self, pos: int, end: int, depth: int, *, fragments: bool, delimited: bool) -> int:
        while pos < end or delimited:
            tag, length = self.tag_at(pos, end)
            if tag == _SEQ_DELIM and delimited:
                return pos + 8
            if tag != _ITEM:
                raise self.fail(
                    pos, f"expected an item, found ({tag >> 16:04X},{tag & 0xFFFF:04X})"
                )
            pos += 8
            if length == _UNDEFINED:
                if fragments:
                    raise self.fail(pos, "pixel data fragment of undefined length")
                pos = self.dataset(pos, end, depth, in_item=True)
                continue
            if pos + length > end:
                raise self.fail(pos, f"item of {length} bytes runs past the end")
            if not fragments:
                self.dataset(pos, pos + length, depth, in_item=False)
            pos += length
        return pos


def check_structure(buf: Any, implicit: bool) -> None:
    """Raise :class:`CannotUnderstand` unless ``buf`` is a well-formed data set."""
    if len(buf) < 8:
        raise CannotUnderstand("data set is empty or shorter than one element")
    _Walker(buf, implicit).dataset(0, len(buf), 0, in_item=False)


#: Preamble (128 bytes), "DICM" and the (0002,0000) UL group length element (12 bytes).
PART10_HEAD = 144


@dataclass(frozen=True)
class FileLayout:
    """Where the data set starts in a Part 10 file written by the receiver."""

    dataset_offset: int
    file_size: int


@dataclass(frozen=True)
class StreamDigest:
    """The data set's SHA-256, taken as the file was written (``receive.transport``)."""

    layout: FileLayout
    sha256: str


def part10_layout(buf: Any) -> FileLayout:
    """Find the data set after the preamble and the file meta group (PS3.10 §7.1)."""
    if len(buf) < PART10_HEAD or bytes(buf[128:132]) != b"DICM":
        raise CannotUnderstand("received file has no DICM prefix")
    group, elem = _TAG.unpack_from(buf, 132)
    if (group, elem) != (0x0002, 0x0000) or bytes(buf[136:138]) != b"UL":
        raise CannotUnderstand("received file has no file meta group length")
    group_length = _U32.unpack_from(buf, 140)[0]
    return FileLayout(PART10_HEAD + group_length, len(buf))


def _text(ds: Any, keyword: str, limit: int) -> str | None:
    value = ds.get(keyword)
    if value is None or value == "":
        return None
    if isinstance(value, MultiValue):
        # The value as encoded (PS3.5 §6.4: backslash-separated), not Python's list text.
        value = "\\".join(str(v) for v in value)
    return str(value).strip()[:limit] or None


def inspect_received(
    path: Path,
    transfer_syntax: str,
    expected_sop_class: str,
    *,
    digest: StreamDigest | None = None,
) -> tuple[InstanceMeta, list[str]]:
    """Validate the received Part 10 file at ``path`` and describe it.

    Returns the instance's metadata (with the SHA-256 of the data set as received,
    without the file meta) and the names of UIDs that carry a leading zero.
    ``digest``, taken while the file was written, saves reading it all again; it is used
    only if it describes the same layout as the file now has.
    Raises :class:`CannotUnderstand` or :class:`SOPClassMismatch`.
    """
    with path.open("rb") as f:
        size = path.stat().st_size
        if size == 0:
            raise CannotUnderstand("received file is empty")
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            layout = part10_layout(mm)
            view = memoryview(mm)
            try:
                body = view[layout.dataset_offset :]
                if digest is not None and digest.layout == layout:
                    sha256 = digest.sha256
                else:
                    sha256 = hashlib.sha256(body).hexdigest()
                _check_encoded(body, transfer_syntax)
            finally:
                body.release()
                view.release()
    try:
        ds = dcmread(path, stop_before_pixels=True, specific_tags=_HEADER_TAGS)
    except (InvalidDicomError, ValueError, EOFError, struct.error, zlib.error) as exc:
        raise CannotUnderstand(f"data set cannot be parsed: {exc}") from None
    try:
        return _describe(ds, transfer_syntax, expected_sop_class, sha256, layout.file_size)
    except InvalidUID as exc:
        raise CannotUnderstand(str(exc)) from None


#: The largest data set a deflated transfer syntax may inflate to. A single CR, DX or
#: Secondary Capture image is tens of MiB; a "deflate bomb" (1 MB that inflates to GiB
#: of zeros) is refused before anything of that size is held.
MAX_INFLATED_BYTES = 256 << 20
_INFLATE_CHUNK = 1 << 20


def inflated_size(body: Any, limit: int = MAX_INFLATED_BYTES) -> int:
    """The inflated size of a deflated data set (PS3.5 §A.5), counted in constant memory.

    Raises :class:`CannotUnderstand` for a stream that is corrupt, truncated, or larger
    than ``limit`` once inflated (counting stops there).
    """
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    size = 0
    data: Any = body
    try:
        while not inflater.eof:
            out = inflater.decompress(data, _INFLATE_CHUNK)
            size += len(out)
            if size > limit:
                raise CannotUnderstand(f"deflated data set inflates to more than {limit >> 20} MiB")
            data = inflater.unconsumed_tail
            if not out and not data:
                break  # input used up before the end of the stream
    except zlib.error as exc:
        raise CannotUnderstand(f"deflated data set cannot be inflated: {exc}") from None
    if not inflater.eof:
        raise CannotUnderstand("deflated data set is truncated")
    return size


def _check_encoded(body: memoryview, transfer_syntax: str) -> None:
    if transfer_syntax == DeflatedExplicitVRLittleEndian:
        # Count first, in constant memory: only a data set within the limit is inflated.
        inflated_size(body)
        try:
            data = zlib.decompressobj(-zlib.MAX_WBITS).decompress(body)
        except zlib.error as exc:
            raise CannotUnderstand(f"deflated data set cannot be inflated: {exc}") from None
        check_structure(data, implicit=False)
    else:
        check_structure(body, implicit=transfer_syntax == ImplicitVRLittleEndian)


def _describe(
    ds: Any, transfer_syntax: str, expected_sop_class: str, sha256: str, file_size: int
) -> tuple[InstanceMeta, list[str]]:
    warnings: list[str] = []
    uids: dict[str, str] = {}
    for keyword in ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID"):
        if keyword not in ds:
            raise InvalidUID(f"{keyword} is missing")
        checked = check_uid(ds[keyword].value, keyword)
        uids[keyword] = checked.uid
        if checked.leading_zero:
            warnings.append(keyword)
    if uids["SOPClassUID"] != expected_sop_class:
        raise SOPClassMismatch(
            f"SOPClassUID {uids['SOPClassUID']} does not match the presentation context's "
            f"{expected_sop_class}"
        )
    meta = InstanceMeta(
        sop_class_uid=uids["SOPClassUID"],
        sop_instance_uid=uids["SOPInstanceUID"],
        study_instance_uid=uids["StudyInstanceUID"],
        series_instance_uid=uids["SeriesInstanceUID"],
        accession_number=_text(ds, "AccessionNumber", 64),
        patient_id=_text(ds, "PatientID", 64),
        study_date=_text(ds, "StudyDate", 8),
        modality=_text(ds, "Modality", 16),
        body_part=_text(ds, "BodyPartExamined", 64),
        view_position=_text(ds, "ViewPosition", 16),
        transfer_syntax_uid=transfer_syntax,
        sha256=sha256,
        file_size=file_size,
    )
    return meta, warnings
