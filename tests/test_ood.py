"""The image out-of-distribution check: fitting, the bundle file, and the worker's reason.

The end-to-end test serves the committed reference model (its ``ood.npz`` fitted by
``scripts/fit_ood.py``) through the real worker on both databases, with the shared DICOM
files: chest radiographs are classified, the dental panoramic whose descriptions and body
part were removed (metadata that lies) ends ``out_of_distribution``.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pipeline_support import Bundles, add_instances, drain_jobs, make_config
from sqlalchemy import select

from pacs_classifier import REFERENCE_MODEL_DIR
from pacs_classifier.db.engine import Database
from pacs_classifier.db.models import AuditEvent, Job, JobState, Prediction
from pacs_classifier.errors import ModelError
from pacs_classifier.model.bundle import read_bundle
from pacs_classifier.model.ood import OOD_FILE, fit_ood, read_ood, write_ood
from pacs_classifier.model.registry import register_bundle
from pacs_classifier.preprocess import reasons
from pacs_classifier.preprocess.eligibility import DESCRIPTION_KEYWORDS

#: Adult chest films the paediatric reference model still reads as in distribution (the
#: 15-bit CR of the shared set scores just above the threshold: docs/model-quality.md).
CHEST = [
    "chest_cr_mono1_10bit_no_file_meta.dcm",
    "chest_dx_mono2_8bit_implicit_le.dcm",
    "chest_sc_mono2_8bit_jpeg_baseline.dcm",
]
DENTAL = "dental_cr_mono1_jpeg_lossless_modality_lut.dcm"
#: Everything in the dental file that says what was imaged: what eligibility reads.
DESCRIPTIONS = DESCRIPTION_KEYWORDS


def _stripped_dental(dicom_dir: Path, out: Path) -> Path:
    ds = pydicom.dcmread(dicom_dir / DENTAL)
    for keyword in DESCRIPTIONS:
        if keyword in ds:
            delattr(ds, keyword)
    ds.save_as(out)
    return out


def test_reference_refuses_a_dental_panoramic_whose_metadata_says_nothing(
    database: Database, tmp_path: Path, dicom_dir: Path
) -> None:
    config = make_config(tmp_path, database.url)
    register_bundle(database, REFERENCE_MODEL_DIR, config.model_dir, actor="test", activate=True)
    chest = add_instances(database, [dicom_dir / n for n in CHEST])
    dental = add_instances(database, [dicom_dir / DENTAL])
    (stripped,) = add_instances(database, [_stripped_dental(dicom_dir, tmp_path / "pano.dcm")])
    drain_jobs(config, timeout_s=180)

    ood = read_ood(read_bundle(REFERENCE_MODEL_DIR))
    assert ood is not None
    with database.session() as s:
        jobs = {j.instance_id: j for j in s.execute(select(Job)).scalars()}
        predicted = set(s.execute(select(Prediction.instance_id)).scalars())
        event = s.execute(
            select(AuditEvent).where(
                AuditEvent.action == "job.classify", AuditEvent.entity_id == str(stripped)
            )
        ).scalar_one()
    assert {jobs[i].state for i in chest} == {JobState.DONE}
    assert predicted == set(chest)
    # The original still says TEETH: eligibility refuses it before any pixel is decoded.
    assert (jobs[dental[0]].state, jobs[dental[0]].reason) == (
        JobState.NOT_ASSESSED,
        reasons.NOT_A_CHEST_RADIOGRAPH,
    )
    assert (jobs[stripped].state, jobs[stripped].reason) == (
        JobState.NOT_ASSESSED,
        reasons.OUT_OF_DISTRIBUTION,
    )
    assert event.outcome == "not_assessed"
    assert event.detail["reason"] == reasons.OUT_OF_DISTRIBUTION
    assert event.detail["ood_score"] > event.detail["ood_threshold"] == round(ood.threshold, 4)


def test_bundle_without_ood_file_serves_as_before_and_says_so_once(
    sqlite_url: str,
    tmp_path: Path,
    dicom_dir: Path,
    tiny_bundles: Bundles,
    caplog: pytest.LogCaptureFixture,
) -> None:
    database = Database(sqlite_url)
    config = make_config(tmp_path, database.url, worker={"batch_size": 2})
    register_bundle(database, tiny_bundles.v1, config.model_dir, actor="test", activate=True)
    ids = add_instances(database, [dicom_dir / CHEST[0]] * 5)
    with caplog.at_level(logging.INFO, logger="pacs_classifier.worker"):
        drain_jobs(config)
    with database.session() as s:
        states = [j.state for j in s.execute(select(Job)).scalars()]
        predicted = sorted(s.execute(select(Prediction.instance_id)).scalars())
    assert states == [JobState.DONE] * 5 and predicted == ids  # three batches
    said = [r.getMessage() for r in caplog.records if OOD_FILE in r.getMessage()]
    assert said == ["model tiny-v1 has no ood.npz: the image out-of-distribution check is off"]
    database.dispose()


def test_fit_sets_the_threshold_on_validation_and_catches_what_is_far() -> None:
    rng = np.random.default_rng(0)
    scale = np.linspace(3.0, 0.1, 64)  # a few strong directions, many weak ones
    train = rng.normal(size=(600, 64)) * scale
    val = rng.normal(size=(1000, 64)) * scale
    model = fit_ood(train, val, "0" * 64, components=8)
    assert model.dims == (64, 8)
    assert model.validation_refused <= 0.005  # half the 1 % bound, by construction
    assert np.mean(model.refused(rng.normal(size=(2000, 64)) * scale)) <= 0.01
    # Far along a strong direction, or far in the weak ones the PCA dropped (there the
    # residual, not the Mahalanobis distance, sees it): both refused.
    along = np.zeros((1, 64))
    along[0, 0] = 30.0
    across = np.zeros((1, 64))
    across[0, 40:] = 20.0
    assert model.refused(np.vstack([along, across])).tolist() == [True, True]
    with pytest.raises(ModelError, match="features of width 64"):
        model.score(np.zeros((1, 32)))


def test_ood_file_of_another_model_is_refused(tiny_bundles: Bundles, tmp_path: Path) -> None:
    bundle = tmp_path / "tiny"
    shutil.copytree(tiny_bundles.v1, bundle)
    assert read_ood(read_bundle(bundle)) is None
    shutil.copy(REFERENCE_MODEL_DIR / OOD_FILE, bundle / OOD_FILE)
    with pytest.raises(ModelError, match="fitted for another model"):
        read_ood(read_bundle(bundle))
    rng = np.random.default_rng(1)
    info = read_bundle(bundle)
    write_ood(
        bundle / OOD_FILE,
        fit_ood(rng.normal(size=(50, 16)), rng.normal(size=(20, 16)), info.sha256),
    )
    assert read_ood(info) is not None


def test_classify_now_applies_the_check_as_the_worker_does(
    dicom_dir: Path, tmp_path: Path, sqlite_url: str
) -> None:
    from pacs_classifier.commands.classify import classify_now
    from pacs_classifier.wiring import App

    dental = _stripped_dental(dicom_dir, tmp_path / "pano.dcm")
    with App(make_config(tmp_path, sqlite_url)) as app:
        rows = classify_now(app, [dental, dicom_dir / CHEST[0]], REFERENCE_MODEL_DIR)
    assert rows[0].label == JobState.NOT_ASSESSED.value
    assert rows[0].reason == reasons.OUT_OF_DISTRIBUTION and rows[0].probability is None
    assert rows[1].label in ("PNEUMONIA", "NORMAL") and rows[1].probability is not None
