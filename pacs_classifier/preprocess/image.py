"""JPEG and PNG files (the training data) to a [0, 1] grey image.

They enter the DICOM pipeline at the [0, 1] step (SPEC §6): Pillow decodes (its libjpeg
build is deterministic: the same file gives the same pixels on every run), colour becomes
BT.601 luminance with the very function used for RGB DICOM, and the full 8-bit range is
the window, exactly as for an 8-bit MONOCHROME2 data set without a VOI.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray
from PIL import Image

from pacs_classifier.config import EligibilityConfig
from pacs_classifier.errors import NotAssessable
from pacs_classifier.preprocess import reasons
from pacs_classifier.preprocess.decode import MIN_SIDE_PX, WORKING_BYTES_PER_SAMPLE
from pacs_classifier.preprocess.pixels import display_to_unit, rgb_to_luminance

FORMATS = ("JPEG", "PNG")
_GREY_MODES = {"L": 8, "I;16": 16, "I;16L": 16, "I;16B": 16}
_COLOUR_MODES = ("RGB", "RGBA", "RGBX")


def read_unit(path: Path, rules: EligibilityConfig) -> NDArray[np.float32]:
    """Decode a JPEG/PNG file to a 2-D float32 image in [0, 1]."""
    try:
        with Image.open(path, formats=FORMATS) as im:
            _check_size(im, path, rules)
            pixels, bits = _grey_pixels(im, path)
    except NotAssessable:
        raise
    except Image.DecompressionBombError as exc:
        raise NotAssessable(reasons.TOO_LARGE, f"{path.name}: {exc}") from exc
    except (OSError, ValueError, SyntaxError) as exc:  # truncated or corrupt stream
        raise NotAssessable(reasons.UNDECODABLE, f"{path.name} cannot be decoded: {exc}") from exc
    return display_to_unit(pixels, bits)


def _check_size(im: Image.Image, path: Path, rules: EligibilityConfig) -> None:
    cols, rows = im.size
    if rows * cols * WORKING_BYTES_PER_SAMPLE > rules.max_decoded_mb * 2**20:
        raise NotAssessable(
            reasons.TOO_LARGE,
            f"{path.name}: {rows} x {cols} pixels exceed the {rules.max_decoded_mb} MB budget",
        )
    if min(rows, cols) < MIN_SIDE_PX:
        raise NotAssessable(
            reasons.TOO_SMALL, f"{path.name}: {rows} x {cols} pixels is under {MIN_SIDE_PX} a side"
        )
    if getattr(im, "n_frames", 1) > 1:
        raise NotAssessable(reasons.MULTI_FRAME, f"{path.name} is an animated image")


def _grey_pixels(im: Image.Image, path: Path) -> tuple[NDArray[Any], int]:
    """The decoded samples as grey values and their bit depth."""
    mode = im.mode
    if mode in ("1", "P", "PA"):
        im = im.convert("RGB")
        mode = "RGB"
    if mode in _GREY_MODES:
        return np.asarray(im), _GREY_MODES[mode]
    if mode == "LA":
        return np.asarray(im)[..., 0], 8
    if mode in _COLOUR_MODES:
        return rgb_to_luminance(np.asarray(im)), 8
    raise NotAssessable(
        reasons.UNSUPPORTED_PHOTOMETRIC, f"{path.name}: image mode {mode} is not supported"
    )
