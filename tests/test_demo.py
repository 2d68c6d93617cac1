"""The README's first command runs `pacs-classifier demo`: it must keep working end to end."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from sqlalchemy import create_engine, text

from pacs_classifier.model.bundle import read_bundle

REPO = Path(__file__).resolve().parents[1]


def test_demo_trains_serves_the_reference_model_and_prints_reports(tmp_path: Path) -> None:
    workdir = tmp_path / "demo"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pacs_classifier",
            "demo",
            "--workdir",
            str(workdir),
            "--image-size",
            "75",
            "--epochs",
            "1",
            "--weights",
            "none",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    reference = read_bundle(REPO / "models" / "reference", verify=False).version
    assert f"(active model {reference})" in out
    for section in (
        "== v_latest_predictions",
        "== report daily_volume",
        "== report turnaround",
        "== report unclassified",
        "== report audit_trail",
        "== results back to the PACS",
    ):
        assert section in out
    assert "status 0x0000" in out
    # The results name the file each instance was sent from, beside the deciding threshold.
    assert f"model {reference}: PNEUMONIA when probability >= threshold 0." in out
    results = out.split("== v_latest_predictions")[1].split("== report")[0]
    assert "normal_IM-" in results and "pneumonia_person" in results
    assert "validation AUC" in out
    assert proc.stderr == "", proc.stderr  # no log lines, no library chatter
    assert "0xa700" not in out.lower()  # no C-STORE was refused for want of resources
    assert " SR  DEMO_PACS (done)  kept at " in out
    received = list((workdir / "pacs").glob("*.dcm"))
    assert len(received) >= 6  # an SR per classified instance, plus the overlays

    (db_file,) = workdir.rglob("*.sqlite3")
    engine = create_engine(f"sqlite:///{db_file}")
    try:
        with engine.connect() as conn:
            states: dict[str, int] = dict(
                conn.execute(text("SELECT state, COUNT(*) FROM jobs GROUP BY state")).all()
            )
            versions = {
                row[0]
                for row in conn.execute(
                    text("SELECT DISTINCT model_version FROM v_latest_predictions")
                )
            }
            n_instances = conn.execute(text("SELECT COUNT(*) FROM instances")).scalar_one()
    finally:
        engine.dispose()
    # every received instance ended; nothing queued, running or failed
    assert set(states) <= {"done", "not_assessed"}
    assert sum(states.values()) == n_instances >= 6
    assert states["done"] >= 6
    assert versions == {reference}
