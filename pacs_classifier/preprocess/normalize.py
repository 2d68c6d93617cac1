"""normalize_file: any supported file to an InceptionV3 input tensor (SPEC §6, §9).

One path for training and serving: DICOM → (decode.py) stored values → (pixels.py) [0, 1]
grey; JPEG/PNG → (image.py) [0, 1] grey; both → (tensor.py) resize, pad, 3 channels,
[-1, 1]. There is no other implementation to drift from.
"""

from __future__ import annotations

from os import PathLike
from pathlib import Path

import numpy as np
from numpy.typing import NDArray
from pydicom.dataset import Dataset

from pacs_classifier.config import EligibilityConfig
from pacs_classifier.errors import NotAssessable
from pacs_classifier.preprocess import decode, image, integrity, pixels, reasons
from pacs_classifier.preprocess.tensor import check_image_size, unit_to_tensor


def normalize_file(
    path: str | PathLike[str], image_size: int = 299, *, rules: EligibilityConfig | None = None
) -> NDArray[np.float32]:
    """A DICOM, JPEG or PNG file → float32 (image_size, image_size, 3) in [-1, 1].

    The kind is told by content (``decode.sniff``), not by name. Raises
    ``NotAssessable(reason)`` for input that cannot become a grey radiograph tensor (codes
    in ``preprocess.reasons``); ``rules.max_decoded_mb`` bounds the decoded size. The
    clinical eligibility (modality, body part, ``min_short_side_px``) is
    ``check_eligibility``'s: the trainer feeds 224² JPEGs through here. OSError (a
    missing or unreadable file) propagates unchanged.
    """
    check_image_size(image_size)
    return unit_to_tensor(file_to_unit(path, rules=rules), image_size)


def file_to_unit(
    path: str | PathLike[str], *, rules: EligibilityConfig | None = None
) -> NDArray[np.float32]:
    """The [0, 1] grey stage of :func:`normalize_file` (before resize and padding).

    The shift stress suite re-renders images here, where DICOM and JPEG meet.
    """
    rules = rules or EligibilityConfig()
    file = Path(path)
    if decode.sniff(file) == "image":
        return image.read_unit(file, rules)
    return dataset_to_unit(decode.read_dataset(file), rules)


def serving_tensor(
    path: str | PathLike[str], image_size: int, *, rules: EligibilityConfig
) -> NDArray[np.float32]:
    """The serving step for one stored or given file, written once for the worker and
    ``classify``: a DICOM file's eligibility (metadata) first, then its pixels; a
    JPEG/PNG, which has no metadata, only its pixels. Raises ``NotAssessable(reason)``."""
    from pacs_classifier.preprocess.eligibility import check_eligibility

    file = Path(path)
    if decode.sniff(file) == "image":
        return normalize_file(file, image_size, rules=rules)
    ds = decode.read_dataset(file)
    reason = check_eligibility(ds, rules)
    if reason is not None:
        raise NotAssessable(reason)
    return normalize_dataset(ds, image_size, rules=rules)


def normalize_dataset(
    ds: Dataset, image_size: int = 299, *, rules: EligibilityConfig | None = None
) -> NDArray[np.float32]:
    """As :func:`normalize_file`, for a data set already read (e.g. by the worker)."""
    return unit_to_tensor(dataset_to_unit(ds, rules), image_size)


def dataset_to_unit(ds: Dataset, rules: EligibilityConfig | None = None) -> NDArray[np.float32]:
    """Decode and normalise a data set's pixels to a 2-D float32 image in [0, 1]."""
    rules = rules or EligibilityConfig()
    decode.ensure_transfer_syntax(ds)
    decode.check_pixels(ds, rules)
    stored = decode.decode_pixels(ds)
    # A stream no decoder reads is undecodable (above); these catch one that decodes anyway.
    integrity.check_codestream(ds)
    integrity.check_decoded(stored, ds)
    try:
        return pixels.to_unit(stored, ds)
    except ValueError as exc:  # a malformed LUT or window, named in the message
        raise NotAssessable(reasons.UNDECODABLE, str(exc)) from exc
