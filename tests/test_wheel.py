"""A regular, non-editable install works: build the wheel, install it, use it.

The wheel is installed on its own (``--no-deps``) into a fresh virtual environment whose
site-packages holds nothing else; the dependencies are reached through a ``.pth`` line
that appends this interpreter's site-packages *after* it. A fully clean install downloads
TensorFlow and friends (~2 GB unpacked), which takes minutes: too long for every CI run,
and it tests pip more than it tests us (see docs/DEVELOPING.md for the numbers). A
``--system-site-packages`` venv would not do: made from inside a venv it sees the base
interpreter's packages, not this venv's.

What it proves: the package runs from site-packages alone, without the checkout beside
it: ``--help``, ``db upgrade`` (the Alembic scripts are package data), ``model register
--reference`` (so is the reference model) and ``classify`` on a DICOM and a JPEG sample.
"""

from __future__ import annotations

import os
import site
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow


def _env() -> dict[str, str]:
    # Nothing of the checkout may leak in: no PYTHONPATH, no configuration from outside.
    return {
        k: v
        for k, v in os.environ.items()
        if k != "PYTHONPATH" and not k.startswith("PACS_CLASSIFIER")
    }


def _run(cmd: list[str], cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        cmd, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=timeout, check=False
    )


def _ok(proc: subprocess.CompletedProcess[str]) -> str:
    assert proc.returncode == 0, f"{proc.args}: {proc.stderr[-3000:]}"
    assert "Traceback" not in proc.stderr, proc.stderr
    return proc.stdout


def test_wheel_installs_and_runs_without_the_checkout(tmp_path: Path, dicom_dir: Path) -> None:
    dist = tmp_path / "dist"
    _ok(
        _run(
            [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(dist), str(REPO)],
            cwd=tmp_path,
        )
    )
    (wheel,) = dist.glob("pacs_classifier-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert "pacs_classifier/db/migrations/env.py" in names
    assert "pacs_classifier/db/migrations/versions/0001_initial_schema.py" in names
    assert "pacs_classifier/reference_model/weights.npz" in names

    venv = tmp_path / "venv"
    _ok(_run([sys.executable, "-m", "venv", "--without-pip", str(venv)], cwd=tmp_path))
    python = venv / "bin" / "python"
    _ok(
        _run(
            [
                *(sys.executable, "-m", "pip", "--python", str(python)),
                *("install", "-q", "--no-deps", "--no-index", str(wheel)),
            ],
            cwd=tmp_path,
        )
    )
    # Only after pip is done (it must not see, let alone touch, this venv's packages).
    ours = Path(sysconfig.get_path("purelib", vars={"base": str(venv), "platbase": str(venv)}))
    (ours / "_deps_from_test_env.pth").write_text(
        "\n".join(site.getsitepackages()) + "\n", encoding="utf-8"
    )

    work = tmp_path / "site"
    work.mkdir()
    where = _ok(
        _run([str(python), "-c", "import pacs_classifier; print(pacs_classifier.__file__)"], work)
    )
    assert Path(where.strip()).is_relative_to(ours), where

    cli = str(venv / "bin" / "pacs-classifier")
    helptext = _ok(_run([cli, "--help"], work))
    for command in ("db", "serve", "model", "classify"):
        assert command in helptext
    (work / "config.toml").write_text(
        '[database]\nurl = "sqlite:///pacs.sqlite3"\n'
        '[storage]\nroot = "dicom"\nmin_free_mb = 1\n'
        '[model]\ndir = "models"\n',
        encoding="utf-8",
    )
    _ok(_run([cli, "db", "upgrade"], work))
    assert (work / "pacs.sqlite3").is_file()
    registered = _ok(
        _run([cli, "model", "register", "--reference", "--activate", "--no-export"], work)
    )
    assert "active" in registered

    jpeg = sorted((ours / "pacs_classifier" / "demo_data" / "incoming").glob("*.jpeg"))[0]
    dicom = dicom_dir / "chest_dx_mono2_8bit_implicit_le.dcm"
    proc = _run([cli, "classify", "--format", "csv", str(dicom), str(jpeg)], work)
    out = _ok(proc)
    rows = out.strip().splitlines()
    assert rows[0] == "file,label,probability,reason"
    assert len(rows) == 3
    for row in rows[1:]:
        _file, label, probability, _reason = row.split(",")
        assert label in ("PNEUMONIA", "NORMAL"), row
        assert 0.0 <= float(probability) <= 1.0
