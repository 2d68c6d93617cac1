"""Reason codes for input that is not classified: the one place they are spelled.

Each code is stored in ``jobs.reason`` and shown in reports (SPEC §4, §9), so a code is
public once released: add new ones, never rename.
"""

from __future__ import annotations

from typing import Final

# Eligibility: what the image is (check_eligibility, metadata only).
MODALITY: Final = "modality"
BODY_PART: Final = "body_part"
VIEW_POSITION: Final = "view_position"
NOT_A_CHEST_RADIOGRAPH: Final = "not_a_chest_radiograph"
MULTI_FRAME: Final = "multi_frame"
TOO_SMALL: Final = "too_small"

# Technical: whether the pixels can become a tensor (normalize_file).
NO_PIXEL_DATA: Final = "no_pixel_data"
UNDECODABLE: Final = "undecodable"
UNSUPPORTED_PHOTOMETRIC: Final = "unsupported_photometric"
TOO_LARGE: Final = "too_large"
BAD_DIMENSIONS: Final = "bad_dimensions"
#: Decodes, but the codestream was damaged: truncated, or pixels no valid image has
#: (preprocess/integrity.py).
CORRUPT_IMAGE: Final = "corrupt_image"

# Content: what the model sees (the worker, after inference).
#: The model's own features of the image lie far from those of its training chest
#: radiographs (model/ood.py): a non-chest image whose metadata did not say so, or a
#: picture that is no radiograph at all.
OUT_OF_DISTRIBUTION: Final = "out_of_distribution"

# Provenance: what the instance is, whatever its pixels.
#: An object this daemon made (SR, Grad-CAM overlay) that came back to its listener.
OWN_OUTPUT: Final = "own_output"

ALL: Final[frozenset[str]] = frozenset(
    {
        MODALITY,
        BODY_PART,
        VIEW_POSITION,
        NOT_A_CHEST_RADIOGRAPH,
        MULTI_FRAME,
        TOO_SMALL,
        NO_PIXEL_DATA,
        UNDECODABLE,
        UNSUPPORTED_PHOTOMETRIC,
        TOO_LARGE,
        BAD_DIMENSIONS,
        CORRUPT_IMAGE,
        OUT_OF_DISTRIBUTION,
        OWN_OUTPUT,
    }
)
