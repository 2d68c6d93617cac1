"""Hostile files and arguments: one clear outcome, fast, never a traceback."""

from __future__ import annotations

import os
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pacs_classifier.errors import NotAssessable
from pacs_classifier.preprocess import normalize_file, reasons

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.filterwarnings(
    "ignore:Expected implicit VR", "ignore:Expected explicit VR"
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
        timeout=60,
        check=False,
    )
    assert "Traceback" not in proc.stderr
    assert proc.returncode == 0, proc.stderr
