"""check_eligibility: metadata-only decisions on the real files and on built data sets."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.dataset import Dataset

from pacs_classifier.config import EligibilityConfig
from pacs_classifier.preprocess import check_eligibility, reasons

CHEST_FILES = [
    "chest_cr_mono1_10bit_no_file_meta.dcm",
    "chest_cr_mono1_15bit_explicit_le.dcm",
    "chest_cr_mono1_15bit_j2k_lossless.dcm",
    "chest_dx_mono2_8bit_implicit_le.dcm",
    "chest_sc_mono2_8bit_jpeg_baseline.dcm",
]


def header(dicom_dir: Path, name: str) -> Dataset:
    """The header only: eligibility must not need the pixel data."""
    return pydicom.dcmread(dicom_dir / name, stop_before_pixels=True, force=True)


@pytest.mark.shared
@pytest.mark.parametrize("name", CHEST_FILES)
def test_real_chest_files_are_eligible(dicom_dir: Path, name: str) -> None:
    ds = header(dicom_dir, name)
    assert "PixelData" not in ds
    assert check_eligibility(ds) is None


@pytest.mark.shared
def test_dental_panoramic_is_not_a_chest_radiograph(dicom_dir: Path) -> None:
    ds = header(dicom_dir, "dental_cr_mono1_jpeg_lossless_modality_lut.dcm")
    # Modality CR and no body part: only its descriptions ("... TEETH") give it away.
    assert ds.Modality == "CR" and not ds.get("BodyPartExamined")
    assert check_eligibility(ds) == reasons.NOT_A_CHEST_RADIOGRAPH


@pytest.mark.shared
def test_leg_is_refused_by_body_part(dicom_dir: Path) -> None:
    ds = header(dicom_dir, "leg_cr_mono1_10bit_j2k_lossless.dcm")
    assert check_eligibility(ds) == reasons.BODY_PART
    # With EXTREMITY allowed, its descriptions ("[LOWER LEG]", "distal tibia") still refuse it.
    rules = EligibilityConfig(body_parts=("CHEST", "", "EXTREMITY"))
    assert check_eligibility(ds, rules) == reasons.NOT_A_CHEST_RADIOGRAPH


NOT_CHEST = reasons.NOT_A_CHEST_RADIOGRAPH


def chest(**attrs: Any) -> Dataset:
    ds = Dataset()
    ds.Modality, ds.BodyPartExamined, ds.ViewPosition = "DX", "CHEST", "PA"
    ds.Rows, ds.Columns = 2048, 2500
    for keyword, value in attrs.items():
        setattr(ds, keyword, value)
    return ds


@pytest.mark.parametrize(
    ("attrs", "reason"),
    [
        ({}, None),
        ({"Modality": "CT"}, reasons.MODALITY),
        ({"Modality": ""}, reasons.MODALITY),
        ({"BodyPartExamined": "ABDOMEN"}, reasons.BODY_PART),
        ({"BodyPartExamined": ""}, None),
        ({"BodyPartExamined": "Chest"}, None),  # case is not meaning
        ({"ViewPosition": "LL"}, reasons.VIEW_POSITION),
        ({"NumberOfFrames": 3}, reasons.MULTI_FRAME),
        ({"NumberOfFrames": 1}, None),
        ({"Rows": 255}, reasons.TOO_SMALL),
        ({"Rows": 1, "Columns": 1}, reasons.TOO_SMALL),
        ({"Rows": 256}, None),
        (
            {"BodyPartExamined": "", "StudyDescription": "OPG PANORAMIC"},
            reasons.NOT_A_CHEST_RADIOGRAPH,
        ),
        (
            {"BodyPartExamined": "", "SeriesDescription": "KNEE 2 VIEWS"},
            reasons.NOT_A_CHEST_RADIOGRAPH,
        ),
        # The coded Body Part Examined CHEST outweighs free text naming another region.
        ({"SeriesDescription": "KNEE 2 VIEWS"}, None),
        ({"StudyDescription": "CHEST AND ABDOMEN"}, None),  # names the chest: keep
        ({"StudyDescription": "No Finding"}, None),  # names nothing: decides nothing
        ({"StudyDescription": "HANDHELD PORTABLE"}, None),  # whole words, not substrings
        ({"ProtocolName": "THORAX PA"}, None),
    ],
)
# Devices send lower-case CS values; pydicom warns about them, which is what we test.
@pytest.mark.filterwarnings("ignore:Invalid value for VR CS")
def test_rules(attrs: dict[str, Any], reason: str | None) -> None:
    assert check_eligibility(chest(**attrs)) == reason


def test_rules_come_from_the_config() -> None:
    rules = EligibilityConfig(modalities=("CR",), min_short_side_px=4096)
    assert check_eligibility(chest(), rules) == reasons.MODALITY
    assert check_eligibility(chest(Modality="CR"), rules) == reasons.TOO_SMALL


def test_anatomic_region_code_meaning_counts() -> None:
    region = Dataset()
    region.CodeMeaning = "Hand"
    ds = chest(BodyPartExamined="")
    ds.AnatomicRegionSequence = [region]
    assert check_eligibility(ds) == reasons.NOT_A_CHEST_RADIOGRAPH


def test_missing_rows_is_bad_dimensions() -> None:
    ds = chest()
    del ds.Rows
    assert check_eligibility(ds) == reasons.BAD_DIMENSIONS


def test_reason_codes_are_the_documented_ones() -> None:
    assert {
        "modality", "body_part", "view_position", "too_small", "multi_frame",
        "not_a_chest_radiograph", "no_pixel_data", "undecodable",
        "unsupported_photometric", "too_large", "bad_dimensions", "corrupt_image", "own_output",
        "out_of_distribution",
    } == reasons.ALL  # fmt: skip
