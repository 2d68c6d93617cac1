"""Reading DICOM files and decoding their pixel data, with every failure a reason code.

Decoding is pydicom's, with the pylibjpeg plugins (JPEG, JPEG-LS, JPEG 2000, RLE) and
pyjpegls installed as ordinary dependencies (SPEC §4). Before any pixel is decoded,
:func:`check_pixels` refuses what cannot or should not be decoded from the header alone:
a 1 MB JPEG 2000 stream can claim 60,000² pixels.
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from typing import Any, Final, Literal

import numpy as np
import pydicom
from numpy.typing import NDArray
from pydicom.dataset import Dataset
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from pacs_classifier.config import EligibilityConfig
from pacs_classifier.errors import NotAssessable
from pacs_classifier.preprocess import reasons
from pacs_classifier.preprocess.pixels import COLOUR, MONOCHROME

log = logging.getLogger(__name__)


class _NoDecoderTracebacks(logging.Filter):
    """pydicom logs each failed decoder plugin with its traceback; we raise one line.

    ``decode_pixels`` turns the failure into ``NotAssessable`` whose message names every
    plugin's error, and the worker logs that as one line: the tracebacks (two per
    corrupt image, dozens in a batch of bad files) say nothing more.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return record.exc_info is None


logging.getLogger("pydicom.pixels.decoders.base").addFilter(_NoDecoderTracebacks())

# Below this many pixels on a side there is no image to resample, whatever the configured
# clinical minimum (``eligibility.min_short_side_px``, applied by check_eligibility).
MIN_SIDE_PX: Final = 32
# The float32 working copy dominates memory: 4 bytes per sample, whatever Bits Allocated.
WORKING_BYTES_PER_SAMPLE: Final = 4

_JPEG_MAGIC: Final = b"\xff\xd8\xff"
_PNG_MAGIC: Final = b"\x89PNG\r\n\x1a\n"
# Groups a data set without preamble can start with: file meta, identifying, or the
# group length / command group of ACR-NEMA files.
_FIRST_GROUPS: Final = (0x0000, 0x0002, 0x0008)


def sniff(path: Path) -> Literal["dicom", "image"]:
    """Tell a DICOM file from a JPEG/PNG by content, not by name.

    DICOM: "DICM" at offset 128 (PS3.10 7.1), or a data set from offset 0 without
    preamble (old ACR-NEMA style). Image: the JPEG or PNG signature. Anything else is
    ``undecodable``. OSError (a missing file) propagates: that is not the image's fault.
    """
    with open(path, "rb") as fh:
        head = fh.read(132)
        size = os.fstat(fh.fileno()).st_size
    if len(head) == 132 and head[128:132] == b"DICM":
        return "dicom"
    if head.startswith((_JPEG_MAGIC, _PNG_MAGIC)):
        return "image"
    if len(head) >= 8 and int.from_bytes(head[0:2], "little") in _FIRST_GROUPS:
        # PS3.5 §7.1: an explicit VR (two upper-case letters) or an implicit 4-byte
        # length that fits the file. Zero bytes would "parse" as (0000,0000) elements of
        # length 0, half a second per MiB, into an empty data set.
        vr = head[4:6]
        length = int.from_bytes(head[4:8], "little")
        if (vr.isalpha() and vr.isupper()) or 0 < length <= size:
            return "dicom"
    raise NotAssessable(
        reasons.UNDECODABLE,
        f"{path.name} is neither DICOM (no 'DICM' at offset 128, no data set at offset 0) "
        "nor a JPEG or PNG image",
    )


def read_dataset(path: Path) -> Dataset:
    """Read a DICOM file; one without a file meta header gets its transfer syntax guessed.

    pydicom works out implicit/explicit VR from the first elements; a file without file
    meta (ACR-NEMA style, or a bare data set) has no (0002,0010) Transfer Syntax UID, so
    the one pydicom read it with is recorded there, with a warning in the log.
    """
    try:
        ds = pydicom.dcmread(path, force=True)
        # pydicom converts elements lazily: a corrupt one would raise later, anywhere.
        # Walk them all now (the pixel data is not decoded, only held).
        ds.walk(lambda _ds, _elem: None)
    except OSError:
        raise
    except Exception as exc:  # pydicom raises many types for a corrupt stream
        raise NotAssessable(
            reasons.UNDECODABLE, f"{path.name} cannot be parsed as DICOM: {exc}"
        ) from exc
    if "SOPClassUID" not in ds and "PixelData" not in ds:
        # Random bytes after "DICM" parse as a few odd elements; no image has neither.
        raise NotAssessable(
            reasons.UNDECODABLE,
            f"{path.name}: neither (0008,0016) SOP Class UID nor (7FE0,0010) Pixel Data",
        )
    ensure_transfer_syntax(ds, path.name)
    return ds


def ensure_transfer_syntax(ds: Dataset, name: str = "data set") -> None:
    """Set (0002,0010) from the encoding the data set was read with, where it is missing."""
    if "TransferSyntaxUID" in ds.get("file_meta", Dataset()):
        return
    implicit, little = getattr(ds, "original_encoding", (True, True))
    if little is False:
        raise NotAssessable(
            reasons.UNDECODABLE, f"{name}: big endian data without file meta is not supported"
        )
    syntax = ImplicitVRLittleEndian if implicit is not False else ExplicitVRLittleEndian
    log.warning("%s has no file meta header; reading it as %s", name, syntax.name)
    ds.ensure_file_meta()
    ds.file_meta.TransferSyntaxUID = syntax


def check_pixels(ds: Dataset, rules: EligibilityConfig) -> None:
    """Refuse, from the header alone, pixel data that cannot become one grey image.

    Reasons: no_pixel_data, bad_dimensions, multi_frame, unsupported_photometric,
    undecodable (encodings this code does not handle), too_large (more than
    ``rules.max_decoded_mb`` once decoded), too_small (under MIN_SIDE_PX).
    """
    if "PixelData" not in ds:
        other = [k for k in ("FloatPixelData", "DoubleFloatPixelData") if k in ds]
        if other:
            raise NotAssessable(reasons.UNDECODABLE, f"{other[0]} (float pixels) unsupported")
        raise NotAssessable(reasons.NO_PIXEL_DATA, "the data set has no (7FE0,0010) Pixel Data")
    rows, cols = _positive(ds, "Rows"), _positive(ds, "Columns")
    if rows is None or cols is None:
        raise NotAssessable(
            reasons.BAD_DIMENSIONS,
            f"(0028,0010) Rows {ds.get('Rows')!r} / (0028,0011) Columns {ds.get('Columns')!r} "
            "must both be positive",
        )
    frames = number_of_frames(ds)
    if frames > 1:
        raise NotAssessable(
            reasons.MULTI_FRAME, f"(0028,0008) Number of Frames is {frames}; one image expected"
        )
    photometric = str(ds.get("PhotometricInterpretation") or "").strip().upper()
    samples = int(ds.get("SamplesPerPixel") or 1)
    if not (photometric in MONOCHROME and samples == 1) and not (
        photometric in COLOUR and samples == 3
    ):
        raise NotAssessable(
            reasons.UNSUPPORTED_PHOTOMETRIC,
            f"(0028,0004) Photometric Interpretation {photometric!r} with "
            f"(0028,0002) Samples per Pixel {samples} is not supported",
        )
    allocated = int(ds.get("BitsAllocated") or 0)
    stored = int(ds.get("BitsStored") or allocated)
    if allocated not in (8, 16, 32) or not 1 <= stored <= allocated:
        raise NotAssessable(
            reasons.UNDECODABLE,
            f"(0028,0100) Bits Allocated {allocated} / (0028,0101) Bits Stored {stored} "
            "not supported",
        )
    needed = rows * cols * samples * frames * WORKING_BYTES_PER_SAMPLE
    if needed > rules.max_decoded_mb * 2**20:
        raise NotAssessable(
            reasons.TOO_LARGE,
            f"{rows} x {cols} x {samples} samples need {needed / 2**20:.0f} MB decoded, over "
            f"the {rules.max_decoded_mb} MB budget (eligibility.max_decoded_mb)",
        )
    if min(rows, cols) < MIN_SIDE_PX:
        raise NotAssessable(
            reasons.TOO_SMALL, f"{rows} x {cols} pixels is under {MIN_SIDE_PX} on a side"
        )
    _check_native_length(ds, rows, cols, samples, frames, allocated, photometric)


def _positive(ds: Dataset, keyword: str) -> int | None:
    value = ds.get(keyword)
    try:
        number = int(value) if value is not None else 0
    except (TypeError, ValueError):
        return None
    return number if number > 0 else None


def number_of_frames(ds: Dataset) -> int:
    """(0028,0008) Number of Frames, 1 where absent or unreadable (PS3.3 C.7.6.6)."""
    try:
        return max(1, int(ds.get("NumberOfFrames") or 1))
    except (TypeError, ValueError):
        return 1


def _check_native_length(
    ds: Dataset, rows: int, cols: int, samples: int, frames: int, allocated: int, pi: str
) -> None:
    """Uncompressed data must be as long as the header says (PS3.5 8.1.1, 8.2)."""
    syntax = UID(str(ds.file_meta.get("TransferSyntaxUID", ImplicitVRLittleEndian)))
    if syntax.is_encapsulated:
        return  # the codec checks its own stream against Rows/Columns
    per_pixel = samples * allocated / 8
    if pi == "YBR_FULL_422":
        per_pixel = per_pixel * 2 / 3  # two Y per Cb/Cr pair, PS3.3 C.7.6.3.1.2
    expected = math.ceil(rows * cols * frames * per_pixel)
    actual = len(ds.PixelData)
    # One trailing byte pads odd lengths to even (PS3.5 8.1.1).
    if actual not in (expected, expected + expected % 2):
        raise NotAssessable(
            reasons.BAD_DIMENSIONS,
            f"(0028,0010) Rows {rows} x (0028,0011) Columns {cols} x {samples} samples of "
            f"{allocated} bits need {expected} bytes, (7FE0,0010) Pixel Data has {actual}",
        )


def decode_pixels(ds: Dataset) -> NDArray[Any]:
    """Decode the (single-frame) pixel data: (rows, cols) grey or (rows, cols, 3) RGB."""
    syntax = ds.file_meta.get("TransferSyntaxUID", "unknown")
    try:
        arr: NDArray[Any] = ds.pixel_array
    except Exception as exc:  # codecs raise anything from ValueError to RuntimeError
        name = getattr(syntax, "name", str(syntax))
        raise NotAssessable(
            reasons.UNDECODABLE, f"cannot decode (7FE0,0010) Pixel Data ({name}): {exc}"
        ) from exc
    expected = (int(ds.Rows), int(ds.Columns))
    samples = int(ds.get("SamplesPerPixel") or 1)
    shape = expected if samples == 1 else (*expected, 3)
    if arr.shape != shape:
        raise NotAssessable(
            reasons.BAD_DIMENSIONS, f"decoded pixels have shape {arr.shape}, header says {shape}"
        )
    return np.asarray(arr)
