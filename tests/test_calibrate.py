"""``model calibrate`` and ``model compare``: local acceptance on a site's labelled sample.

Real parts: radiographs of the shared data set wrapped as CR DICOM and ingested as the
listener stores them (file, instance row, job, audit), the committed reference bundle
served by the runtime the worker loads, SQLite and PostgreSQL. The model is loaded once
per module (a caching loader around the real ``load_predictor``).
"""

from __future__ import annotations

import dataclasses
import io
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest
from PIL import Image
from pipeline_support import all_jobs_ended, make_config, write_config_file
from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ComputedRadiographyImageStorage, ExplicitVRLittleEndian, generate_uid
from sqlalchemy import select
from web_support import register_reference

from pacs_classifier import cli
from pacs_classifier.config import AcceptanceConfig, Config
from pacs_classifier.db.audit import verify_chain
from pacs_classifier.db.engine import Database
from pacs_classifier.db.models import AuditEvent, Model, Prediction
from pacs_classifier.model import site as site_module
from pacs_classifier.model.bundle import MODEL_FILES, read_bundle
from pacs_classifier.model.registry import activate_version
from pacs_classifier.model.runtime import Inference, Predictor, calibrate, load_predictor
from pacs_classifier.model.site import (
    ACCEPTANCE_FILE,
    PredictorLoader,
    SampleError,
    SampleTooSmall,
    assess,
    calibrate_site,
    cases_needed,
    compare_versions,
    lower_bound,
    read_labels_csv,
    site_version,
)
from pacs_classifier.model.validation_scores import read_validation_scores
from pacs_classifier.receive.inspect import inspect_received
from pacs_classifier.store.ingest import Ingestor
from pacs_classifier.store.storage import Storage
from pacs_classifier.wiring import App

PER_CLASS = 10
LEG = "leg_cr_mono1_10bit_j2k_lossless.dcm"
#: Floors a 10 + 10 sample can clear (the shipped ones need more cases).
LENIENT = {"sensitivity_floor": 0.6, "specificity_floor": 0.2}


# --------------------------------------------------------------------------- pure parts


def test_clopper_pearson_bounds_and_the_cases_they_need() -> None:
    # Exact bounds: all 10 of 10 → 0.025^(1/10); 0 successes → 0.
    assert lower_bound(10, 10, 0.95) == pytest.approx(0.025 ** (1 / 10), rel=1e-9)
    assert lower_bound(0, 10, 0.95) == 0.0
    assert lower_bound(97, 100, 0.95) == pytest.approx(0.9148, abs=1e-4)
    # Keeping 97 % of positives, a lower bound of 0.90 needs 70 positives from then on.
    need = cases_needed(lambda n: np.ceil(0.97 * n - 1e-9).astype(np.int64), 0.90, 0.95)
    assert need == 70
    assert lower_bound(68, 70, 0.95) >= 0.90  # ceil(0.97 × 70) = 68
    # A rate under the floor: no sample size helps.
    assert cases_needed(lambda n: np.floor(0.45 * n).astype(np.int64), 0.5, 0.95) is None


def test_a_calibrated_version_is_named_after_the_original() -> None:
    when = datetime(2026, 12, 2, 21, 30, 5, tzinfo=UTC)
    assert site_version("ref-1", when) == "ref-1-site-20261202-213005"
    assert site_version("ref-1-site-20261101-080000", when) == "ref-1-site-20261202-213005"


def test_assess_says_how_many_more_cases_of_each_class() -> None:
    from pacs_classifier.config import AcceptanceConfig

    y = np.array([1] * 12 + [0] * 8)
    p = np.array([0.9] * 12 + [0.1] * 6 + [0.8] * 2)
    a = assess(y, p, 0.5, 0.97, AcceptanceConfig())
    assert not a.ok
    assert (a.positives, a.negatives) == (12, 8)
    assert a.specificity == pytest.approx(0.75)
    line = a.refusal()
    assert "\n" not in line
    assert a.negatives_needed is not None
    assert f"add at least {70 - 12} PNEUMONIA and {a.negatives_needed - 8} NORMAL" in line
    low_spec = assess(
        y, np.array([0.9] * 12 + [0.1] * 2 + [0.8] * 6), 0.5, 0.97, AcceptanceConfig()
    )
    assert low_spec.negatives_needed is None
    assert "more cases will not help" in low_spec.refusal()
    # No NORMAL case at all: refused, and told the least it takes (all correct: "at least").
    only_pos = assess(y[:12], p[:12], 0.5, 0.97, AcceptanceConfig())
    assert not only_pos.ok and only_pos.negatives_needed == 6
    assert "add at least 58 PNEUMONIA and 6 NORMAL cases" in only_pos.refusal()


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("uid,diagnosis\n1.2.3,NORMAL\n", "must name the columns sop_instance_uid and label"),
        ("sop_instance_uid,label\n1.2.3,maybe\n", "line 2: label must be PNEUMONIA or NORMAL"),
        ("sop_instance_uid,label\n1.2.3,NORMAL\n1.2.3,NORMAL\n", "line 3: 1.2.3 is listed twice"),
        ("sop_instance_uid,label\n\n", "no labelled instances"),
    ],
)
def test_bad_labels_csv_gets_one_clear_line(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "labels.csv"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(SampleError, match=message):
        read_labels_csv(path)


def test_labels_csv_takes_extra_columns_a_bom_and_lower_case(tmp_path: Path) -> None:
    path = tmp_path / "labels.csv"
    path.write_text(
        "\ufeffaccession,Label,SOP_Instance_UID\nA1,pneumonia,1.2.3\nA2, Normal ,1.2.4\n",
        encoding="utf-8",
    )
    assert read_labels_csv(path) == [(2, "1.2.3", 1), (3, "1.2.4", 0)]


# --------------------------------------------------------------------------- the site


def _cr(jpeg: Path) -> Dataset:
    """A chest CR holding a shared radiograph at twice its size (256 px is the minimum)."""
    with Image.open(jpeg) as im:
        grey = np.asarray(im.convert("L"))
    pixels = np.kron(grey, np.ones((2, 2), dtype=np.uint8))
    ds = Dataset()
    ds.SOPClassUID = ComputedRadiographyImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.PatientID = f"SITE-{jpeg.stem}"
    ds.AccessionNumber = jpeg.stem[-16:]
    ds.StudyDate = "20261201"
    ds.Modality = "CR"
    ds.BodyPartExamined = "CHEST"
    ds.ViewPosition = "PA"
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    ds.PixelData = pixels.tobytes()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return ds


@dataclass(frozen=True)
class SiteFiles:
    """Part 10 bytes of the site's studies, with their UIDs and labels."""

    studies: list[tuple[str, str, bytes]]  # (SOP Instance UID, label, Part 10 bytes)
    folder: Path  # a small labelled folder of the same kind of images


@pytest.fixture(scope="module")
def site_files(
    cxr_dir: Path, dicom_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> SiteFiles:
    folder = tmp_path_factory.mktemp("labelled")
    studies = []
    for label in ("PNEUMONIA", "NORMAL"):
        jpegs = sorted((cxr_dir / label).glob("*.jpeg"))
        for jpeg in jpegs[:PER_CLASS]:
            ds = _cr(jpeg)
            buf = io.BytesIO()
            ds.save_as(buf, enforce_file_format=True)
            studies.append((str(ds.SOPInstanceUID), label, buf.getvalue()))
        (folder / label).mkdir()
        for jpeg in jpegs[PER_CLASS : PER_CLASS + 3]:
            (folder / label / jpeg.name).write_bytes(jpeg.read_bytes())
    # A leg, labelled by mistake: the serving path does not assess it, nor does acceptance.
    leg = (dicom_dir / LEG).read_bytes()
    studies.append(
        (str(dcmread(io.BytesIO(leg), stop_before_pixels=True).SOPInstanceUID), "NORMAL", leg)
    )
    return SiteFiles(studies, folder)


@pytest.fixture(scope="module")
def loader() -> Iterator[PredictorLoader]:
    """The real ``load_predictor``, each model loaded once for the module."""
    cache: dict[tuple[str, str], Predictor] = {}

    def load(path: str, runtime: str) -> Predictor:
        key = (read_bundle(path, verify=False).sha256, runtime)
        if key not in cache:
            cache[key] = load_predictor(path, runtime)
        return LoadedAs(cache[key], path)

    yield load
    cache.clear()


class LoadedAs:
    """A cached model under the bundle it was asked for (same model files, that bundle's
    calibration): what ``load_predictor`` on that folder serves, without loading it again."""

    def __init__(self, inner: Predictor, path: str) -> None:
        self._inner = inner
        self.info = read_bundle(path)
        self.runtime = inner.runtime

    def raw_predict(self, batch: npt.NDArray[np.float32]) -> npt.NDArray[np.float64]:
        return self._inner.raw_predict(batch)

    def predict(self, batch: npt.NDArray[np.float32]) -> npt.NDArray[np.float64]:
        return calibrate(self.raw_predict(batch), *self.info.calibration)

    def infer(self, batch: npt.NDArray[np.float32]) -> Inference:
        return Inference(self.predict(batch), self._inner.infer(batch).features)


@dataclass
class Site:
    db: Database
    config: Config
    reference: str
    labels: Path
    uids: dict[str, str]  # SOP Instance UID → label


@pytest.fixture
def site(db_url: str, tmp_path: Path, site_files: SiteFiles) -> Iterator[Site]:
    """The site's studies received and stored, the reference model active, a labels CSV."""
    config = make_config(tmp_path, db_url, acceptance=LENIENT)
    db = Database(db_url)
    storage = Storage(config.storage_root, 0)
    storage.open()
    ingestor = Ingestor(db, storage)
    for _uid, _label, raw in site_files.studies:
        tmp = storage.write_temp(raw)
        ds = dcmread(tmp, stop_before_pixels=True)
        meta, warnings = inspect_received(
            tmp, str(ds.file_meta.TransferSyntaxUID), str(ds.SOPClassUID)
        )
        ingestor.ingest(
            tmp,
            meta,
            actor="ae:SITEPACS@127.0.0.1",
            calling_ae="SITEPACS",
            warnings=tuple(warnings),
        )
    reference = register_reference(db, config.model_dir).version
    labels = tmp_path / "labels.csv"
    labels.write_text(
        "sop_instance_uid,label\n"
        + "".join(f"{uid},{label}\n" for uid, label, _ in site_files.studies),
        encoding="utf-8",
    )
    try:
        yield Site(db, config, reference, labels, {u: lab for u, lab, _ in site_files.studies})
    finally:
        db.dispose()


def _events(db: Database, action: str) -> list[AuditEvent]:
    with db.session() as s:
        return list(
            s.execute(
                select(AuditEvent).where(AuditEvent.action == action).order_by(AuditEvent.id)
            ).scalars()
        )


def test_calibrate_registers_a_derived_version_that_serves_what_was_evaluated(
    site: Site, loader: PredictorLoader
) -> None:
    done = calibrate_site(
        site.db, site.config, site.reference, site.labels, actor="cli:physicist", loader=loader
    )
    fit = done.fit
    # Through the serving path: the leg is not assessed (body part), as in service.
    assert fit.scores.not_assessed == {"body_part": 1}
    assert (fit.scores.positives, fit.scores.negatives) == (PER_CLASS, PER_CLASS)
    assert fit.after.metrics["sensitivity"] >= fit.target_sensitivity == 0.97
    assert fit.adequacy.ok
    assert fit.before.metrics["ci95"]["auc"][0] <= fit.before.metrics["auc"]

    # A new version, registered and NOT active: activation stays a separate step.
    with site.db.session() as s:
        rows = {m.version: m for m in s.execute(select(Model)).scalars()}
        assert rows[site.reference].active and not rows[done.version].active
        assert rows[done.version].threshold == pytest.approx(fit.after.threshold)
    source, new = read_bundle(rows[site.reference].path), read_bundle(done.path)
    assert new.sha256 == source.sha256  # the same model files
    for name in MODEL_FILES:
        assert (done.path / name).read_bytes() == (source.path / name).read_bytes()
    assert new.calibration == pytest.approx((fit.after.temperature, fit.after.bias))
    meta = new.metadata
    assert meta.derived_from is not None and meta.derived_from.version == site.reference
    acceptance = meta.site_acceptance
    assert acceptance is not None
    assert acceptance.sample.positives == acceptance.sample.negatives == PER_CLASS
    assert acceptance.sample.not_assessed == {"body_part": 1}
    assert acceptance.before.threshold == pytest.approx(source.threshold)
    assert acceptance.after.metrics.sensitivity == fit.after.metrics["sensitivity"]
    assert acceptance.bounds.method == "Clopper-Pearson (exact)"
    # The drift report's reference: the site sample, as the new version serves it.
    reference_scores = read_validation_scores(done.path)
    assert reference_scores is not None
    assert list(reference_scores.labels) == list(fit.scores.y)
    p_new = calibrate(fit.scores.raw, fit.after.temperature, fit.after.bias)
    assert reference_scores.probabilities == pytest.approx(p_new, abs=1e-6)
    card = (done.path / ACCEPTANCE_FILE).read_text(encoding="utf-8")
    assert f"from `{site.reference}`: the same model files" in card
    assert f"| {done.version} | {fit.after.threshold:.4f} |" in card

    # The audit trail: one model.calibrate event on the new model, chain intact.
    (event,) = _events(site.db, "model.calibrate")
    assert event.outcome == "ok" and event.actor == "cli:physicist"
    assert event.detail["derived_from"] == site.reference
    assert event.detail["sample"]["sha256"] == acceptance.sample.sha256
    with site.db.session() as s:
        assert event.entity_id == str(rows[done.version].id)
        assert verify_chain(s).ok

    # The report: both versions, as each serves, on the same sample, give the same numbers
    # as the calibration measured.
    scores, (before, after) = compare_versions(
        site.db, site.config, [site.reference, done.version], site.labels, loader=loader
    )
    assert scores.n == 2 * PER_CLASS
    assert before.metrics == fit.before.metrics and after.metrics == fit.after.metrics

    # Activated, the worker's probabilities are the evaluated ones.
    activate_version(site.db, done.version, actor="cli:physicist")
    app = App(site.config)
    try:
        app.worker(loader=loader).drain(until=lambda: all_jobs_ended(site.db), timeout_s=120)
    finally:
        app.close()
    p_after = calibrate(scores.raw, fit.after.temperature, fit.after.bias)
    with site.db.session() as s:
        served = s.execute(
            select(Prediction.probability).order_by(Prediction.instance_id)
        ).scalars()
        assert np.asarray(list(served)) == pytest.approx(p_after, abs=1e-6)


def test_too_small_sample_is_refused_audited_and_registers_nothing(
    site: Site, loader: PredictorLoader
) -> None:
    # A UID the site never stored: one line naming it, before the model is even loaded.
    unknown = site.labels.with_name("unknown.csv")
    unknown.write_text("sop_instance_uid,label\n1.2.826.0.1.3680043.8.498.9,NORMAL\n")
    with pytest.raises(SampleError, match=r"line 2: no stored instance has UID 1\.2\.826"):
        calibrate_site(site.db, site.config, site.reference, unknown, actor="cli:x", loader=loader)
    strict = dataclasses.replace(site.config, acceptance=AcceptanceConfig())
    with pytest.raises(SampleTooSmall) as info:
        calibrate_site(
            site.db, strict, site.reference, site.labels, actor="cli:physicist", loader=loader
        )
    a = info.value.adequacy
    assert (a.positives, a.negatives) == (PER_CLASS, PER_CLASS)
    assert a.sensitivity_lower < 0.90 and a.positives_needed == 70
    assert f"add at least {70 - PER_CLASS} PNEUMONIA" in str(info.value)
    (event,) = _events(site.db, "model.calibrate")
    assert event.outcome == "refused"
    assert event.detail["bounds"]["positives_needed"] == 70
    with site.db.session() as s:
        assert [m.version for m in s.execute(select(Model)).scalars()] == [site.reference]
    assert sorted(p.name for p in site.config.model_dir.iterdir()) == [site.reference]


def test_cli_refuses_in_one_line_and_compares_on_a_labelled_folder(
    sqlite_url: str,
    tmp_path: Path,
    site_files: SiteFiles,
    loader: PredictorLoader,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The commands load bundles through the same loader, with the model cached.
    monkeypatch.setattr(site_module, "load_predictor", loader)
    config = make_config(tmp_path, sqlite_url)
    db = Database(sqlite_url)
    try:
        version = register_reference(db, config.model_dir).version
    finally:
        db.dispose()
    cfg = write_config_file(tmp_path / "config.toml", config)
    folder = str(site_files.folder)
    assert (
        cli.main(
            ["--config", str(cfg), "model", "calibrate", "--model", version, "--labels", folder]
        )
        == 2
    )
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "sample too small" in err and "add at least" in err
    assert cli.main(["--config", str(cfg), "model", "compare", version, "--labels", folder]) == 0
    out = capsys.readouterr().out
    assert "6 assessed (3 PNEUMONIA, 3 NORMAL)" in out
    assert version in out.splitlines()[-1]
