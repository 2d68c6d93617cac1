"""The DICOM pixel pipeline on synthetic data sets written to disk and read back.

Each test builds a pydicom Dataset with a FileMetaDataset, writes it to tmp_path, and
checks single pixel values of the [0, 1] image (before any resize) or the reason code of
the refusal. Expected values are worked out by hand from the PS3.3 formulas.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from numpy.typing import NDArray
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.pixels.processing import convert_color_space
from pydicom.sequence import Sequence
from pydicom.uid import (
    ComputedRadiographyImageStorage,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLSLossless,
    RLELossless,
    generate_uid,
)

from pacs_classifier.config import EligibilityConfig
from pacs_classifier.errors import NotAssessable
from pacs_classifier.preprocess import dataset_to_unit, normalize_file, reasons
from pacs_classifier.preprocess.pixels import to_unit


def make_ds(
    pixels: NDArray[Any],
    *,
    photometric: str = "MONOCHROME2",
    bits_stored: int | None = None,
    **attrs: Any,
) -> Dataset:
    """A CR chest data set holding ``pixels`` uncompressed (explicit VR little endian)."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ComputedRadiographyImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.BodyPartExamined, ds.ViewPosition = "CR", "CHEST", "PA"
    colour = photometric not in ("MONOCHROME1", "MONOCHROME2")
    ds.Rows, ds.Columns = pixels.shape[:2] if colour else pixels.shape[-2:]
    ds.SamplesPerPixel = 3 if colour else 1
    if colour:
        ds.PlanarConfiguration = 0
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = pixels.dtype.itemsize * 8
    ds.BitsStored = bits_stored or ds.BitsAllocated
    ds.HighBit = ds.BitsStored - 1
    ds.PixelRepresentation = 1 if pixels.dtype.kind == "i" else 0
    ds.PixelData = np.ascontiguousarray(pixels).tobytes()
    for keyword, value in attrs.items():
        setattr(ds, keyword, value)
    return ds


def save(ds: Dataset, tmp_path: Path, name: str = "x.dcm") -> Path:
    path = tmp_path / name
    ds.save_as(path, enforce_file_format=True)
    return path


def unit_of(ds: Dataset, tmp_path: Path) -> NDArray[np.float32]:
    """Write, read back (as the worker would), and normalise to [0, 1] at full size."""
    return dataset_to_unit(pydicom.dcmread(save(ds, tmp_path)))


def reason_of(ds: Dataset, tmp_path: Path, rules: EligibilityConfig | None = None) -> str:
    with pytest.raises(NotAssessable) as info:
        normalize_file(save(ds, tmp_path), rules=rules)
    assert info.value.reason in reasons.ALL
    return info.value.reason


def ramp(rows: int = 256, cols: int = 256, top: int = 4095) -> NDArray[np.uint16]:
    return (np.arange(rows * cols, dtype=np.float64).reshape(rows, cols) % (top + 1)).astype(
        np.uint16
    )


# --- bit depths and signedness -----------------------------------------------------------


def test_12_bit_window_and_unused_high_bits(tmp_path: Path) -> None:
    pixels = ramp(top=4095)
    pixels[0, 0] = 0xF123  # an overlay bit pattern above High Bit: the value is 0x123
    ds = make_ds(pixels, bits_stored=12, WindowCenter=2048, WindowWidth=4096)
    unit = unit_of(ds, tmp_path)
    # PS3.3 C.11.2.1.2.1 LINEAR: (x - (c - 0.5)) / (w - 1) + 0.5
    assert unit[0, 0] == pytest.approx((0x123 - 2047.5) / 4095 + 0.5, abs=1e-6)
    assert unit[0, 1] == pytest.approx((1 - 2047.5) / 4095 + 0.5, abs=1e-6)
    assert unit[0, 4095 % 256] == pytest.approx((255 - 2047.5) / 4095 + 0.5, abs=1e-6)


def test_16_bit_unsigned_full_range_window(tmp_path: Path) -> None:
    pixels = np.zeros((256, 256), dtype=np.uint16)
    pixels[1, 1], pixels[2, 2] = 65535, 40000
    ds = make_ds(pixels, WindowCenter=32768, WindowWidth=65536)
    unit = unit_of(ds, tmp_path)
    assert unit[0, 0] == pytest.approx((0 - 32767.5) / 65535 + 0.5, abs=1e-6)
    assert unit[1, 1] == pytest.approx(1.0, abs=1e-6)
    assert unit[2, 2] == pytest.approx((40000 - 32767.5) / 65535 + 0.5, abs=1e-6)


def test_signed_with_negative_intercept(tmp_path: Path) -> None:
    pixels = np.zeros((256, 256), dtype=np.int16)
    pixels[0, 0], pixels[0, 1], pixels[0, 2] = 1064, -1000, 1300
    ds = make_ds(pixels, RescaleSlope=1, RescaleIntercept=-1024, WindowCenter=40, WindowWidth=400)
    unit = unit_of(ds, tmp_path)
    assert unit[0, 0] == pytest.approx((40 - 39.5) / 399 + 0.5, abs=1e-6)  # HU 40
    assert unit[0, 1] == 0.0  # HU -2024, below the window
    assert unit[0, 2] == 1.0  # HU 276, above it


def test_signed_12_bit_is_sign_extended(tmp_path: Path) -> None:
    raw = np.zeros((256, 256), dtype=np.int16)
    raw[0, 0] = 0x0FFB  # -5 in 12-bit two's complement, high bits left clear
    raw[0, 1] = 5
    ds = make_ds(raw, bits_stored=12, WindowCenter=0.5, WindowWidth=21)
    unit = unit_of(ds, tmp_path)
    assert unit[0, 0] == pytest.approx((-5 - 0.0) / 20 + 0.5, abs=1e-6)
    assert unit[0, 1] == pytest.approx((5 - 0.0) / 20 + 0.5, abs=1e-6)


# --- VOI ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("function", "at_1000", "at_1050", "at_900"),
    [
        ("LINEAR", (1000 - 999.5) / 199 + 0.5, (1050 - 999.5) / 199 + 0.5, 0.0),
        ("LINEAR_EXACT", 0.5, 0.75, 0.0),
        ("SIGMOID", 0.5, 1 / (1 + np.exp(-1.0)), 1 / (1 + np.exp(2.0))),
    ],
)
def test_each_voi_lut_function(
    tmp_path: Path, function: str, at_1000: float, at_1050: float, at_900: float
) -> None:
    pixels = ramp(top=2000)
    pixels[0, :3] = (1000, 1050, 900)
    ds = make_ds(pixels, WindowCenter=1000, WindowWidth=200, VOILUTFunction=function)
    unit = unit_of(ds, tmp_path)
    assert unit[0, 0] == pytest.approx(at_1000, abs=1e-6)
    assert unit[0, 1] == pytest.approx(at_1050, abs=1e-6)
    assert unit[0, 2] == pytest.approx(at_900, abs=1e-6)


def lut_item(first: int, bits: int, data: NDArray[Any]) -> Dataset:
    item = Dataset()
    item.add(DataElement(0x00283002, "US", [len(data), first, bits]))
    item.add(DataElement(0x00283006, "US", [int(v) for v in data]))
    return item


def test_voi_lut_sequence_wins_over_window(tmp_path: Path) -> None:
    pixels = ramp(top=4095)
    pixels[0, :4] = (1000, 3000, 50, 5000)
    table = np.minimum(np.arange(4096) * 2, 4095)
    ds = make_ds(pixels, WindowCenter=10, WindowWidth=2)  # a window that would saturate
    ds.VOILUTSequence = Sequence([lut_item(100, 12, table)])
    unit = unit_of(ds, tmp_path)
    # PS3.3 C.11.2.1.1: y = LUT[x - first]; outside the table, its first or last entry.
    assert unit[0, 0] == pytest.approx(table[900] / 4095, abs=1e-6)
    assert unit[0, 1] == pytest.approx(1.0, abs=1e-6)
    assert unit[0, 2] == pytest.approx(table[0] / 4095, abs=1e-6)
    assert unit[0, 3] == pytest.approx(1.0, abs=1e-6)


def test_modality_lut_sequence(tmp_path: Path) -> None:
    pixels = ramp(top=4095)
    pixels[0, :2] = (0, 4095)
    ds = make_ds(pixels, bits_stored=12, WindowCenter=2048, WindowWidth=4096)
    ds.ModalityLUTSequence = Sequence([lut_item(0, 12, 4095 - np.arange(4096))])
    unit = unit_of(ds, tmp_path)
    assert unit[0, 0] == pytest.approx(1.0, abs=1e-6)  # 0 → 4095 → top of the window
    assert unit[0, 1] == pytest.approx((0 - 2047.5) / 4095 + 0.5, abs=1e-6)


def test_no_voi_uses_a_robust_percentile_window(tmp_path: Path) -> None:
    rng = np.random.default_rng(7)
    pixels = rng.integers(1000, 3001, size=(512, 512)).astype(np.uint16)
    pixels[:4, :4] = 65000  # a burned-in marker must not set the window
    ds = make_ds(pixels)
    unit = unit_of(ds, tmp_path)
    assert unit[0, 0] == 1.0
    middle = np.argwhere(pixels == 2000)[0]
    assert unit[tuple(middle)] == pytest.approx(0.5, abs=0.01)
    assert float(np.mean(unit[8:, 8:])) == pytest.approx(0.5, abs=0.01)


def test_monochrome1_is_inverted(tmp_path: Path) -> None:
    pixels = ramp(top=4095)
    pixels[0, :2] = (0, 4095)
    mono2 = unit_of(make_ds(pixels, WindowCenter=2048, WindowWidth=4096), tmp_path)
    mono1 = unit_of(
        make_ds(pixels, photometric="MONOCHROME1", WindowCenter=2048, WindowWidth=4096),
        tmp_path,
    )
    assert np.allclose(mono1, 1.0 - mono2, atol=1e-6)
    assert mono1[0, 0] == pytest.approx(1.0, abs=1e-6)  # stored minimum is white


@pytest.mark.parametrize("photometric", ["MONOCHROME1", "MONOCHROME2"])
@pytest.mark.parametrize(
    "window",
    [
        {"WindowCenter": 1500, "WindowWidth": 900},
        {"WindowCenter": 1500, "WindowWidth": 900, "VOILUTFunction": "LINEAR_EXACT"},
        {},
    ],
)
def test_fused_path_equals_step_by_step(photometric: str, window: dict[str, Any]) -> None:
    rng = np.random.default_rng(3)
    pixels = rng.integers(0, 4096, size=(300, 200)).astype(np.uint16)
    ds = make_ds(pixels, photometric=photometric, RescaleSlope=0.5, RescaleIntercept=-100, **window)
    fused = to_unit(pixels, ds)
    stepwise = to_unit(pixels, ds, fused=False)
    assert np.allclose(fused, stepwise, atol=2e-6)


# --- padding -----------------------------------------------------------------------------


def test_pixel_padding_value_is_black_and_out_of_the_window(tmp_path: Path) -> None:
    rng = np.random.default_rng(5)
    pixels = rng.integers(1000, 2001, size=(256, 256)).astype(np.uint16)
    pixels[:, :64] = 0  # padding: a quarter of the image
    pixels[100, 100] = 1500
    ds = make_ds(pixels, photometric="MONOCHROME1")
    ds.add(DataElement(0x00280120, "US", 0))
    unit = unit_of(ds, tmp_path)
    assert np.all(unit[:, :64] == 0.0)  # black, although MONOCHROME1 would make it white
    # The window spans 1000..2000 (the padding is not in it): 1500 is mid-grey.
    assert unit[100, 100] == pytest.approx(0.5, abs=0.01)


def test_pixel_padding_range(tmp_path: Path) -> None:
    pixels = ramp(top=4095)
    pixels[0, :3] = (3, 10, 11)
    ds = make_ds(pixels, WindowCenter=2048, WindowWidth=4096)
    ds.add(DataElement(0x00280120, "US", 10))
    ds.add(DataElement(0x00280121, "US", 0))  # the limit may be below the value
    unit = unit_of(ds, tmp_path)
    assert unit[0, 0] == 0.0 and unit[0, 1] == 0.0
    assert unit[0, 2] == pytest.approx((11 - 2047.5) / 4095 + 0.5, abs=1e-6)


# --- colour ------------------------------------------------------------------------------


def two_colours(rows: int = 256, cols: int = 256) -> NDArray[np.uint8]:
    rgb = np.zeros((rows, cols, 3), dtype=np.uint8)
    rgb[:, : cols // 2] = (200, 40, 10)
    rgb[:, cols // 2 :] = (30, 220, 90)
    return rgb


def luminance(colour: tuple[int, int, int]) -> float:
    return (0.299 * colour[0] + 0.587 * colour[1] + 0.114 * colour[2]) / 255


def test_rgb_becomes_bt601_luminance(tmp_path: Path) -> None:
    unit = unit_of(make_ds(two_colours(), photometric="RGB"), tmp_path)
    assert unit.shape == (256, 256)
    assert unit[5, 5] == pytest.approx(luminance((200, 40, 10)), abs=1e-6)
    assert unit[5, 200] == pytest.approx(luminance((30, 220, 90)), abs=1e-6)


def test_ybr_full_422_becomes_luminance(tmp_path: Path) -> None:
    rgb = two_colours()
    ybr = convert_color_space(rgb, "RGB", "YBR_FULL")
    # Native YBR_FULL_422 (PS3.3 C.7.6.3.1.2): Y1 Y2 Cb Cr for each pair of pixels.
    pairs = ybr.reshape(256, 128, 2, 3)
    packed = np.stack(
        [pairs[:, :, 0, 0], pairs[:, :, 1, 0], pairs[:, :, 0, 1], pairs[:, :, 0, 2]], axis=-1
    )
    ds = make_ds(rgb, photometric="YBR_FULL_422")
    ds.PixelData = packed.astype(np.uint8).tobytes()
    unit = unit_of(ds, tmp_path)
    # YBR → RGB → Y rounds twice: within 1.5 grey levels of the exact luminance.
    assert unit[5, 5] == pytest.approx(luminance((200, 40, 10)), abs=1.5 / 255)
    assert unit[5, 200] == pytest.approx(luminance((30, 220, 90)), abs=1.5 / 255)


# --- refusals ----------------------------------------------------------------------------


def test_one_by_one_image_is_too_small(tmp_path: Path) -> None:
    assert reason_of(make_ds(np.array([[7]], dtype=np.uint16)), tmp_path) == reasons.TOO_SMALL


def test_missing_pixel_data(tmp_path: Path) -> None:
    ds = make_ds(ramp())
    del ds.PixelData
    assert reason_of(ds, tmp_path) == reasons.NO_PIXEL_DATA


@pytest.mark.parametrize("rows", [255, 257])
def test_rows_disagreeing_with_data_length(tmp_path: Path, rows: int) -> None:
    ds = make_ds(ramp())
    ds.Rows = rows
    assert reason_of(ds, tmp_path) == reasons.BAD_DIMENSIONS


def test_zero_columns_is_bad_dimensions(tmp_path: Path) -> None:
    ds = make_ds(ramp())
    ds.Columns = 0
    assert reason_of(ds, tmp_path) == reasons.BAD_DIMENSIONS


def test_multi_frame_is_refused(tmp_path: Path) -> None:
    frames = np.stack([ramp(), ramp()])
    ds = make_ds(frames, NumberOfFrames=2)
    assert reason_of(ds, tmp_path) == reasons.MULTI_FRAME


def test_palette_colour_is_unsupported(tmp_path: Path) -> None:
    ds = make_ds(ramp(top=255).astype(np.uint8), photometric="PALETTE COLOR")
    ds.SamplesPerPixel = 1
    assert reason_of(ds, tmp_path) == reasons.UNSUPPORTED_PHOTOMETRIC


def test_memory_budget(tmp_path: Path) -> None:
    ds = make_ds(ramp(1024, 1024))  # 4 MiB as float32
    rules = EligibilityConfig(max_decoded_mb=3)
    assert reason_of(ds, tmp_path, rules) == reasons.TOO_LARGE
    assert normalize_file(save(ds, tmp_path), rules=EligibilityConfig(max_decoded_mb=5)).shape


def test_corrupt_compressed_stream_is_undecodable(tmp_path: Path) -> None:
    ds = make_ds(ramp(), bits_stored=12, WindowCenter=2048, WindowWidth=4096)
    ds.compress(JPEG2000Lossless)
    data = bytearray(ds.PixelData)
    data[40:] = bytes(len(data) - 40)  # keep the item header, zero the codestream
    ds.PixelData = bytes(data)
    assert reason_of(ds, tmp_path) == reasons.UNDECODABLE


# --- transfer syntaxes -------------------------------------------------------------------


@pytest.mark.parametrize(
    "syntax",
    [
        ImplicitVRLittleEndian,
        DeflatedExplicitVRLittleEndian,
        RLELossless,
        JPEGLSLossless,
        JPEG2000Lossless,
    ],
    ids=lambda uid: uid.name,
)
def test_lossless_transfer_syntaxes_give_identical_tensors(tmp_path: Path, syntax: Any) -> None:
    rng = np.random.default_rng(11)
    pixels = rng.integers(0, 4096, size=(300, 260)).astype(np.uint16)
    native = make_ds(pixels, bits_stored=12, photometric="MONOCHROME1")
    expected = normalize_file(save(native, tmp_path, "native.dcm"), image_size=64)
    other = make_ds(pixels, bits_stored=12, photometric="MONOCHROME1")
    if syntax.is_encapsulated:
        other.compress(syntax)
    else:
        other.file_meta.TransferSyntaxUID = syntax
    path = save(other, tmp_path, "other.dcm")
    assert pydicom.dcmread(path).file_meta.TransferSyntaxUID == syntax
    assert np.array_equal(normalize_file(path, image_size=64), expected)
