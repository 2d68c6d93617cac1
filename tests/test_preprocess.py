"""normalize_file on the real files of ../shared/data/dicom and cxr224 (SPEC §6, §9)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
from numpy.typing import NDArray
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

from pacs_classifier.errors import NotAssessable
from pacs_classifier.preprocess import normalize_file, reasons, unit_to_tensor

pytestmark = pytest.mark.shared

CHEST_FILES = [
    "chest_cr_mono1_10bit_no_file_meta.dcm",
    "chest_cr_mono1_15bit_explicit_le.dcm",
    "chest_cr_mono1_15bit_j2k_lossless.dcm",
    "chest_dx_mono2_8bit_implicit_le.dcm",
    "chest_sc_mono2_8bit_jpeg_baseline.dcm",
]


def region(x: NDArray[np.float32], rows: tuple[float, float], cols: tuple[float, float]) -> float:
    """Mean of channel 0 over a region given in fractions of the tensor's side."""
    n = x.shape[0]
    return float(
        x[int(rows[0] * n) : int(rows[1] * n), int(cols[0] * n) : int(cols[1] * n), 0].mean()
    )


@pytest.mark.parametrize("name", CHEST_FILES)
def test_chest_tensor_shape_range_and_polarity(dicom_dir: Path, name: str) -> None:
    x = normalize_file(dicom_dir / name)
    assert x.shape == (299, 299, 3)
    assert x.dtype == np.float32
    assert x.min() >= -1.0 and x.max() <= 1.0
    assert np.array_equal(x[..., 0], x[..., 1]) and np.array_equal(x[..., 0], x[..., 2])
    # Lungs dark, spine/mediastinum bright, for MONOCHROME1 and MONOCHROME2 alike.
    left_lung = region(x, (0.3, 0.5), (0.2, 0.35))
    right_lung = region(x, (0.3, 0.5), (0.65, 0.8))
    spine = region(x, (0.3, 0.5), (0.46, 0.54))
    assert left_lung < spine - 0.3
    assert right_lung < spine - 0.3


def test_uncompressed_and_jpeg2000_lossless_give_identical_tensors(dicom_dir: Path) -> None:
    raw = normalize_file(dicom_dir / "chest_cr_mono1_15bit_explicit_le.dcm")
    j2k = normalize_file(dicom_dir / "chest_cr_mono1_15bit_j2k_lossless.dcm")
    assert np.array_equal(raw, j2k)


def test_rg1_window_maps_single_pixels(dicom_dir: Path) -> None:
    """RG1 is MONOCHROME1 with window 15000/30000 (LINEAR): a stored value x becomes
    1 - clip((x - 14999.5) / 29999 + 0.5) before resizing; check that on a 1:1 crop."""
    from pacs_classifier.preprocess import dataset_to_unit

    ds = pydicom.dcmread(dicom_dir / "chest_cr_mono1_15bit_explicit_le.dcm")
    unit = dataset_to_unit(ds)
    stored = ds.pixel_array
    for r, c in [(0, 0), (977, 920), (1500, 300), (1954, 1840)]:
        expected = 1.0 - min(max((float(stored[r, c]) - 14999.5) / 29999 + 0.5, 0.0), 1.0)
        assert unit[r, c] == pytest.approx(expected, abs=1e-6)


def test_no_file_meta_file_is_read_with_fallback(dicom_dir: Path) -> None:
    x = normalize_file(dicom_dir / "chest_cr_mono1_10bit_no_file_meta.dcm", image_size=64)
    assert x.shape == (64, 64, 3)


def first_jpeg(cxr_dir: Path) -> Path:
    return sorted((cxr_dir / "NORMAL").glob("*.jpeg"))[0]


def wrap_pixels(path: Path, pixels: NDArray[np.uint8], photometric: str) -> Path:
    """A Secondary Capture DICOM holding exactly these 8-bit pixels, uncompressed."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "CR"
    ds.Rows, ds.Columns = pixels.shape[:2]
    ds.SamplesPerPixel = 3 if pixels.ndim == 3 else 1
    ds.PhotometricInterpretation = photometric
    if pixels.ndim == 3:
        ds.PlanarConfiguration = 0
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    ds.PixelData = np.ascontiguousarray(pixels).tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


def test_jpeg_and_dicom_wrapping_its_pixels_give_the_same_tensor(
    cxr_dir: Path, tmp_path: Path
) -> None:
    jpeg = first_jpeg(cxr_dir)
    with Image.open(jpeg) as im:
        rgb = np.asarray(im.convert("RGB"))
    dicom = wrap_pixels(tmp_path / "wrapped.dcm", rgb, "RGB")
    from_jpeg = normalize_file(jpeg)
    assert from_jpeg.shape == (299, 299, 3)
    assert np.array_equal(from_jpeg, normalize_file(dicom))


def test_grey_png_and_monochrome2_dicom_give_the_same_tensor(cxr_dir: Path, tmp_path: Path) -> None:
    with Image.open(first_jpeg(cxr_dir)) as im:
        grey = np.asarray(im.convert("L"))
    png = tmp_path / "grey.png"
    Image.fromarray(grey).save(png)
    dicom = wrap_pixels(tmp_path / "grey.dcm", grey, "MONOCHROME2")
    from_png = normalize_file(png, image_size=128)
    assert np.array_equal(from_png, normalize_file(dicom, image_size=128))
    # An 8-bit grey value v comes out as v/255 → 2v/255 - 1 where no resize mixes pixels.
    one_to_one = normalize_file(png, image_size=grey.shape[0])
    assert one_to_one[10, 10, 0] == pytest.approx(2 * grey[10, 10] / 255 - 1, abs=1e-6)


def test_content_sniffing_ignores_the_file_name(cxr_dir: Path, tmp_path: Path) -> None:
    disguised = tmp_path / "image.dcm"
    disguised.write_bytes(first_jpeg(cxr_dir).read_bytes())
    assert np.array_equal(normalize_file(disguised), normalize_file(first_jpeg(cxr_dir)))


def test_garbage_is_undecodable(tmp_path: Path) -> None:
    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"hello, this is not an image" * 10)
    with pytest.raises(NotAssessable) as info:
        normalize_file(junk)
    assert info.value.reason == reasons.UNDECODABLE


def test_truncated_jpeg_is_undecodable(cxr_dir: Path, tmp_path: Path) -> None:
    data = first_jpeg(cxr_dir).read_bytes()
    cut = tmp_path / "cut.jpeg"
    cut.write_bytes(data[: len(data) // 3])
    with pytest.raises(NotAssessable) as info:
        normalize_file(cut)
    assert info.value.reason == reasons.UNDECODABLE


def test_unit_to_tensor_pads_centred_with_black() -> None:
    unit = np.full((100, 50), 0.5, dtype=np.float32)
    x = unit_to_tensor(unit, 20)
    assert x.shape == (20, 20, 3)
    # 100x50 → 20x10, centred: columns 5..14 hold the image, the rest is black (-1).
    assert np.all(x[:, :5] == -1.0) and np.all(x[:, 15:] == -1.0)
    assert np.allclose(x[:, 5:15], 0.0, atol=1e-6)


def test_unit_to_tensor_area_average_and_enlarge() -> None:
    checker = np.indices((64, 64)).sum(axis=0) % 2  # alternating 0/1 pixels
    x = unit_to_tensor(checker.astype(np.float32), 8)
    # Each output pixel averages 8x8 inputs: exactly half white, no aliasing.
    assert np.allclose(x, 0.0, atol=1e-6)
    ramp = np.linspace(0, 1, 4, dtype=np.float32)[None, :].repeat(4, axis=0)
    big = unit_to_tensor(ramp, 16)
    assert big[0, 0, 0] == pytest.approx(-1.0) and big[0, -1, 0] == pytest.approx(1.0)
    assert np.all(np.diff(big[0, :, 0]) >= 0)


def test_unit_to_tensor_rejects_bad_image_size() -> None:
    with pytest.raises(ValueError, match="Received: image_size=0"):
        unit_to_tensor(np.zeros((4, 4), np.float32), 0)


def test_dental_modality_lut_sequence_is_applied(dicom_dir: Path) -> None:
    """JPEG Lossless P14 decode plus a real Modality LUT Sequence (PS3.3 C.11.1): the
    result equals normalising the looked-up values with no LUT, and differs from
    ignoring the LUT."""
    from pacs_classifier.preprocess import dataset_to_unit
    from pacs_classifier.preprocess.pixels import to_unit

    ds = pydicom.dcmread(dicom_dir / "dental_cr_mono1_jpeg_lossless_modality_lut.dcm")
    unit = dataset_to_unit(ds)
    stored = ds.pixel_array
    table = np.frombuffer(ds.ModalityLUTSequence[0].LUTData, dtype="<u2")
    plain = Dataset()
    plain.PhotometricInterpretation = "MONOCHROME1"
    plain.BitsAllocated, plain.BitsStored, plain.PixelRepresentation = 16, 10, 0
    assert np.allclose(unit, to_unit(table[stored], plain), atol=1e-6)
    assert not np.allclose(unit, to_unit(stored, plain), atol=0.01)


def test_leg_decodes_although_not_eligible(dicom_dir: Path) -> None:
    x = normalize_file(dicom_dir / "leg_cr_mono1_10bit_j2k_lossless.dcm", image_size=64)
    assert x.shape == (64, 64, 3) and -1.0 <= x.min() < x.max() <= 1.0
