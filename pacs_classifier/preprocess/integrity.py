"""Is a decoded image what its codestream was meant to be? Corruption that decodes anyway.

JPEG and JPEG 2000 decoders are forgiving: a codestream with zeroed or flipped bytes,
or cut short, often decodes without an error into an image that is partly grey blocks
or black rows, and such an image would be classified. An adversarial probe found 22 of
them. These checks end such instances ``not_assessed`` with reason ``corrupt_image``
(``preprocess.reasons.CORRUPT_IMAGE``). They are meant to be precise rather than
exhaustive (a radiograph with black padding must still be classified), so each one
tests something a real image cannot do:

- :func:`check_codestream`: the frame's codestream ends with its end marker, EOI
  ``FFD9`` (PS3.5 §8.2.1, ISO 10918-1 B.2.1; JPEG-LS ISO 14495-1 C.2.1) or EOC ``FFD9``
  (JPEG 2000, ISO 15444-1 A.4.4), trailing zero padding aside. Without it the
  codestream was truncated.
- :func:`check_decoded`, on the pixels of a compressed transfer syntax:
  - values outside what (0028,0101) Bits Stored and (0028,0103) Pixel Representation
    allow (PS3.3 C.7.6.3.1);
  - one value covering :data:`MAX_SINGLE_VALUE_FRACTION` of the image or more (a
    radiograph has anatomy, not one flat level);
  - the bottom :data:`MAX_CONSTANT_TAIL_FRACTION` of the rows or more all one value:
    a decoder that meets damage it cannot resynchronise past fills the rest of the
    image with one level, and a radiograph's anatomy does not stop three quarters of
    the way down with every row below it one exact value. Padding at the top, or a
    flat band that is not the image's tail, is not flagged.

Not caught: a few flipped bits in a JPEG scan (the blocks after them shift in level but
stay textured) or in a JPEG 2000 code-block (local noise). Measured on the sample
files: zeroed bytes and truncation are caught, bit flips mostly not; see
``tests/test_hostile_files.py``. A blockiness measure was tried and dropped: valid
JPEGs at quality 75 score as high as damaged ones.
"""

from __future__ import annotations

from typing import Any, Final

import numpy as np
from numpy.typing import NDArray
from pydicom.dataset import Dataset
from pydicom.encaps import generate_fragments
from pydicom.uid import (
    JPEG2000,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
)

from pacs_classifier.errors import NotAssessable
from pacs_classifier.preprocess import reasons

#: Codestreams that end with the marker FFD9 (EOI for JPEG and JPEG-LS, EOC for J2K).
_ENDS_WITH_FFD9: Final = frozenset(
    {
        JPEGBaseline8Bit,
        JPEGExtended12Bit,
        JPEGLossless,
        JPEGLosslessSV1,
        JPEGLSLossless,
        JPEGLSNearLossless,
        JPEG2000Lossless,
        JPEG2000,
    }
)
_END_MARKER: Final = b"\xff\xd9"
MAX_SINGLE_VALUE_FRACTION: Final = 0.9
MAX_CONSTANT_TAIL_FRACTION: Final = 0.25
#: Every n-th pixel each way is enough for the histogram of a large image.
_STRIDE: Final = 4


def _corrupt(why: str) -> NotAssessable:
    return NotAssessable(reasons.CORRUPT_IMAGE, why)


def check_codestream(ds: Dataset) -> None:
    """Raise ``corrupt_image`` if the (single) frame's codestream lacks its end marker."""
    syntax = ds.file_meta.get("TransferSyntaxUID")
    if syntax not in _ENDS_WITH_FFD9 or "PixelData" not in ds:
        return
    last = b""
    try:
        for fragment in generate_fragments(ds.PixelData):
            last = fragment
    except ValueError as exc:  # not encapsulated as PS3.5 A.4 says: the decoder will say
        raise NotAssessable(reasons.UNDECODABLE, f"(7FE0,0010) Pixel Data: {exc}") from exc
    if not last.rstrip(b"\x00").endswith(_END_MARKER):
        raise _corrupt(f"{syntax.name} codestream truncated: it does not end with the FFD9 marker")


def check_decoded(arr: NDArray[Any], ds: Dataset) -> None:
    """Raise ``corrupt_image`` for pixels no valid image of this header can have.

    Only for compressed transfer syntaxes: native pixel data has no codec to be damaged
    silently (its length is checked against the header, and pydicom masks it to Bits
    Stored).
    """
    syntax = ds.file_meta.get("TransferSyntaxUID")
    if arr.size == 0 or syntax is None or not syntax.is_compressed:
        return
    bits = int(ds.get("BitsStored") or ds.get("BitsAllocated") or 16)
    signed = int(ds.get("PixelRepresentation") or 0) == 1
    low, high = (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if signed else (0, (1 << bits) - 1)
    lo, hi = int(arr.min()), int(arr.max())
    if arr.dtype.kind in "iu" and (lo < low or hi > high):
        raise _corrupt(
            f"pixel values {lo}..{hi} outside the {low}..{high} that (0028,0101) Bits "
            f"Stored {bits} allows"
        )
    sample = arr[::_STRIDE, ::_STRIDE]
    _, counts = np.unique(sample, return_counts=True)
    share = float(counts.max()) / sample.size
    if share >= MAX_SINGLE_VALUE_FRACTION:
        raise _corrupt(f"one pixel value covers {share:.0%} of the image")
    tail = constant_tail(arr)
    if tail >= MAX_CONSTANT_TAIL_FRACTION:
        raise _corrupt(f"the bottom {tail:.0%} of the rows are all one value")


def constant_tail(arr: NDArray[Any]) -> float:
    """The fraction of rows, counted from the bottom, that all hold the last row's value."""
    flat = arr.reshape(arr.shape[0], -1)
    value = flat[-1, 0]
    same = (flat == value).all(axis=1)
    if not same[-1]:
        return 0.0
    first_other = np.flatnonzero(~same[::-1])
    run = int(first_other[0]) if first_other.size else len(same)
    return run / len(same)
