"""Hostile files and arguments: one clear outcome, fast, never a traceback."""

from __future__ import annotations

import logging
import os
import random
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate, generate_fragmented_frames

from pacs_classifier.errors import NotAssessable
from pacs_classifier.preprocess import dataset_to_unit, integrity, normalize_file, reasons
from pacs_classifier.preprocess.decode import decode_pixels, read_dataset

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.filterwarnings(
    "ignore:Expected implicit VR",
    "ignore:Expected explicit VR",
    "ignore:VR lookup failed",
    "ignore:Invalid value for VR UI",
)


def test_a_zero_filled_file_is_undecodable_at_once(tmp_path: Path) -> None:
    path = tmp_path / "zeros.dcm"
    with path.open("wb") as f:
        f.truncate(512 << 20)  # 512 MiB of zeros (sparse: costs no disk)
    t0 = time.monotonic()
    with pytest.raises(NotAssessable) as info:
        normalize_file(path, image_size=75)
    assert info.value.reason == reasons.UNDECODABLE
    assert time.monotonic() - t0 < 1.0


@pytest.mark.parametrize("seed", range(5))
def test_dicm_followed_by_random_bytes_is_undecodable(tmp_path: Path, seed: int) -> None:
    noise = random.Random(seed).randbytes(100_000)
    for name, data in (("bare", b"DICM" + noise), ("preamble", b"\0" * 128 + b"DICM" + noise)):
        path = tmp_path / f"{name}.dcm"
        path.write_bytes(data)
        with pytest.raises(NotAssessable) as info:
            normalize_file(path, image_size=75)
        assert info.value.reason == reasons.UNDECODABLE, (name, str(info.value))


@pytest.mark.parametrize(
    "bound",
    [
        ["--since", "0001-01-01T00:00:00+14:00"],
        ["--since", "9999-12-31T23:59:59-12:00"],
        ["--until", "0001-01-01T00:00:00+14:00"],
        ["--until", "9999-12-31T23:59:59-12:00"],
    ],
)
def test_report_with_a_bound_beyond_the_calendar_in_utc(
    tmp_path: Path, sqlite_url: str, bound: list[str]
) -> None:
    """Such bounds mean "from the beginning" or "to the end": an answer, not a traceback."""
    config = tmp_path / "config.toml"
    config.write_text(f'[database]\nurl = "{sqlite_url}"\n', encoding="utf-8")
    cli = [sys.executable, "-m", "pacs_classifier", "--config", str(config)]
    proc = subprocess.run(
        [*cli, "report", "daily_volume", *bound],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert "Traceback" not in proc.stderr
    assert proc.returncode == 0, proc.stderr


# ------------------------------------------------------------------ damaged codestreams


def _with_frame(path: Path, damage: Callable[[bytes], bytes]) -> Dataset:
    ds = dcmread(path)
    frame = b"".join(next(generate_fragmented_frames(ds.PixelData, number_of_frames=1)))
    ds.PixelData = encapsulate([damage(frame)])
    return ds


def _zeroed(frame: bytes) -> bytes:
    n = len(frame) // 3
    return frame[:n] + bytes(2000) + frame[n + 2000 :]


@pytest.mark.parametrize(
    ("name", "damage", "reason"),
    [
        ("chest_sc_mono2_8bit_jpeg_baseline.dcm", lambda f: f[: len(f) // 2], "corrupt_image"),
        ("chest_sc_mono2_8bit_jpeg_baseline.dcm", lambda f: f[: len(f) * 9 // 10], "corrupt_image"),
        ("chest_sc_mono2_8bit_jpeg_baseline.dcm", _zeroed, "corrupt_image"),
        # openjpeg refuses a cut J2K stream: not classified either, as undecodable.
        ("chest_cr_mono1_15bit_j2k_lossless.dcm", lambda f: f[: len(f) * 9 // 10], "undecodable"),
    ],
)
def test_damaged_codestreams_that_still_decode_are_not_classified(
    dicom_dir: Path, name: str, damage: Callable[[bytes], bytes], reason: str
) -> None:
    ds = _with_frame(dicom_dir / name, damage)
    with pytest.raises(NotAssessable) as info:
        dataset_to_unit(ds)
    assert info.value.reason == reason, str(info.value)


def test_a_failed_decode_is_one_log_line_not_tracebacks(
    dicom_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Cut inside the code-blocks but with the end marker put back: every decoder fails.
    ds = _with_frame(
        dicom_dir / "chest_cr_mono1_15bit_j2k_lossless.dcm",
        lambda f: f[: len(f) // 2] + b"\xff\xd9",
    )
    with caplog.at_level(logging.DEBUG), pytest.raises(NotAssessable) as info:
        dataset_to_unit(ds)
    assert info.value.reason == reasons.UNDECODABLE
    assert [r for r in caplog.records if r.exc_info] == []


def test_the_sample_files_pass_the_integrity_checks(dicom_dir: Path) -> None:
    for path in sorted(dicom_dir.glob("*.dcm")):
        ds = read_dataset(path)
        integrity.check_codestream(ds)
        integrity.check_decoded(decode_pixels(ds), ds)


def test_pixel_values_beyond_bits_stored_are_corrupt(dicom_dir: Path) -> None:
    """pydicom masks native data to Bits Stored; a codec's output is not masked."""
    ds = dcmread(dicom_dir / "chest_cr_mono1_15bit_j2k_lossless.dcm")
    arr = ds.pixel_array.copy()
    arr[100, 100] = 1 << 15  # one value past 15 bits, as a damaged code-block can give
    with pytest.raises(NotAssessable) as info:
        integrity.check_decoded(arr, ds)
    assert info.value.reason == reasons.CORRUPT_IMAGE
