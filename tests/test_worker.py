"""The worker on both databases: real files, a real model, every outcome recorded."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import numpy.typing as npt
from pipeline_support import (
    Bundles,
    add_instances,
    all_jobs_ended,
    drain_jobs,
    make_config,
    wait_for,
)
from sqlalchemy import func, select

from pacs_classifier.db.engine import Database
from pacs_classifier.db.models import AuditEvent, Job, JobState, Label, Model, Prediction
from pacs_classifier.model.registry import activate_version, register_bundle
from pacs_classifier.model.runtime import Inference, Predictor, load_predictor
from pacs_classifier.preprocess import reasons
from pacs_classifier.wiring import App

CHEST = sorted(
    [
        "chest_cr_mono1_10bit_no_file_meta.dcm",
        "chest_cr_mono1_15bit_explicit_le.dcm",
        "chest_cr_mono1_15bit_j2k_lossless.dcm",
        "chest_dx_mono2_8bit_implicit_le.dcm",
        "chest_sc_mono2_8bit_jpeg_baseline.dcm",
    ]
)
OTHER = ["dental_cr_mono1_jpeg_lossless_modality_lut.dcm", "leg_cr_mono1_10bit_j2k_lossless.dcm"]


class CountingLoader:
    """The real loader, counting how often a model is loaded."""

    def __init__(self) -> None:
        self.loaded: list[str] = []

    def __call__(self, path: str, runtime: str) -> Predictor:
        self.loaded.append(Path(path).name)
        return load_predictor(path, runtime)


def _jobs_by_instance(db: Database) -> dict[int, Job]:
    with db.session() as s:
        return {j.instance_id: j for j in s.execute(select(Job)).scalars()}


def test_worker_classifies_chests_and_marks_the_rest_not_assessed(
    database: Database, tmp_path: Path, dicom_dir: Path, tiny_bundles: Bundles
) -> None:
    config = make_config(tmp_path, database.url)
    register_bundle(database, tiny_bundles.v1, config.model_dir, actor="test", activate=True)
    chest = add_instances(database, [dicom_dir / n for n in CHEST])
    other = add_instances(database, [dicom_dir / n for n in OTHER])
    loader = CountingLoader()
    drain_jobs(config, loader=loader)

    jobs = _jobs_by_instance(database)
    assert {jobs[i].state for i in chest} == {JobState.DONE}
    for i in other:
        assert jobs[i].state == JobState.NOT_ASSESSED
        assert jobs[i].reason in reasons.ALL
    assert jobs[other[1]].reason == reasons.BODY_PART  # the leg says EXTREMITY
    with database.session() as s:
        preds = list(s.execute(select(Prediction)).scalars())
        v1 = s.execute(select(Model).where(Model.version == "tiny-v1")).scalar_one()
        audited = dict(
            s.execute(
                select(AuditEvent.entity_id, AuditEvent.outcome).where(
                    AuditEvent.action == "job.classify", AuditEvent.entity_type == "instance"
                )
            ).all()
        )
    assert sorted(p.instance_id for p in preds) == chest
    assert {(p.model_id, p.label, p.threshold, p.run_id) for p in preds} == {
        (v1.id, Label.NORMAL, 1.0, None)
    }
    assert all(0.0 <= p.probability <= 1.0 for p in preds)
    assert audited == {str(i): "done" for i in chest} | {str(i): "not_assessed" for i in other}
    assert loader.loaded == ["tiny-v1"]


def test_activating_another_model_makes_the_next_jobs_use_it(
    sqlite_url: str, tmp_path: Path, dicom_dir: Path, tiny_bundles: Bundles
) -> None:
    # One database is enough here: test_scheduler switches models on both.
    database = Database(sqlite_url)
    config = make_config(tmp_path, database.url)
    register_bundle(database, tiny_bundles.v1, config.model_dir, actor="test", activate=True)
    register_bundle(database, tiny_bundles.v2, config.model_dir, actor="test")
    loader = CountingLoader()
    with App(config) as app:
        worker = app.worker(loader=loader)
        first = add_instances(database, [dicom_dir / CHEST[0]] * 3)
        worker.drain(until=lambda: all_jobs_ended(database), timeout_s=120)
        activate_version(database, "tiny-v2", actor="test")
        second = add_instances(database, [dicom_dir / CHEST[0]] * 3)
        worker.drain(until=lambda: all_jobs_ended(database), timeout_s=120)

    with database.session() as s:
        rows = s.execute(
            select(Prediction.instance_id, Model.version, Prediction.label).join(
                Model, Model.id == Prediction.model_id
            )
        ).all()
    by_instance = {i: (v, lab) for i, v, lab in rows}
    assert len(rows) == 6
    assert {by_instance[i] for i in first} == {("tiny-v1", Label.NORMAL)}
    assert {by_instance[i] for i in second} == {("tiny-v2", Label.PNEUMONIA)}
    assert loader.loaded == ["tiny-v1", "tiny-v2"]


def test_unreadable_file_is_retried_then_failed(
    database: Database, tmp_path: Path, dicom_dir: Path, tiny_bundles: Bundles
) -> None:
    config = make_config(tmp_path, database.url, worker={"max_attempts": 2, "retry_backoff_s": 0.0})
    register_bundle(database, tiny_bundles.v1, config.model_dir, actor="test", activate=True)
    gone = tmp_path / "gone.dcm"
    gone.write_bytes((dicom_dir / CHEST[0]).read_bytes())
    (instance_id,) = add_instances(database, [gone])
    gone.unlink()  # the stored file vanished: an OSError, worth retrying
    drain_jobs(config, timeout_s=60)
    job = _jobs_by_instance(database)[instance_id]
    assert (job.state, job.attempts) == (JobState.FAILED, 2)
    assert job.reason is not None and job.reason.startswith("FileNotFoundError")
    with database.session() as s:
        outcomes = list(
            s.execute(
                select(AuditEvent.outcome)
                .where(
                    AuditEvent.entity_type == "instance", AuditEvent.entity_id == str(instance_id)
                )
                .order_by(AuditEvent.id)
            ).scalars()
        )
        assert s.scalar(select(func.count()).select_from(Prediction)) == 0
    assert outcomes == ["retry", "failed"]


def test_no_active_model_leaves_jobs_queued(
    database: Database, tmp_path: Path, dicom_dir: Path
) -> None:
    config = make_config(tmp_path, database.url)
    add_instances(database, [dicom_dir / CHEST[0]] * 4)
    loader = CountingLoader()
    with App(config) as app:
        app.worker(loader=loader).drain(until=lambda: False, timeout_s=0.5)
    with database.session() as s:
        states = set(s.execute(select(Job.state)).scalars())
    assert states == {JobState.QUEUED}
    assert loader.loaded == []


class SlowPredictor:
    """The real predictor, each batch taking ``delay_s`` longer: a busy model."""

    def __init__(self, inner: Predictor, delay_s: float) -> None:
        self._inner = inner
        self.info = inner.info
        self.runtime = inner.runtime
        self.delay_s = delay_s
        self.batch_sizes: list[int] = []

    def infer(self, batch: npt.NDArray[np.float32]) -> Inference:
        self.batch_sizes.append(len(batch))
        time.sleep(self.delay_s)
        return self._inner.infer(batch)

    def predict(self, batch: npt.NDArray[np.float32]) -> npt.NDArray[np.float64]:
        return self.infer(batch).probability

    def raw_predict(self, batch: npt.NDArray[np.float32]) -> npt.NDArray[np.float64]:
        return self._inner.raw_predict(batch)


def test_batches_fill_while_the_model_is_busy_and_a_lone_image_goes_at_once(
    sqlite_url: str, tmp_path: Path, dicom_dir: Path, tiny_bundles: Bundles
) -> None:
    database = Database(sqlite_url)
    config = make_config(
        tmp_path,
        database.url,
        worker={"batch_size": 8, "max_batch_wait_ms": 20_000, "poll_interval_ms": 20},
    )
    register_bundle(database, tiny_bundles.v1, config.model_dir, actor="test", activate=True)
    predictors: list[SlowPredictor] = []

    def slow_loader(path: str, runtime: str) -> Predictor:
        predictors.append(SlowPredictor(load_predictor(path, runtime), delay_s=2.0))
        return predictors[-1]

    with App(config) as app:
        worker = app.worker(loader=slow_loader)
        stop = threading.Event()
        thread = threading.Thread(target=worker.run, args=(stop,), daemon=True)
        thread.start()
        try:
            add_instances(database, [dicom_dir / CHEST[0]])
            # The lone image goes to the idle model at once, not after 20 s waiting for
            # company (15 s: loading the model, on a loaded machine).
            wait_for(lambda: bool(predictors and predictors[0].batch_sizes), 15, "first batch")
            for _ in range(6):  # arrive one by one while the model is busy with the first
                add_instances(database, [dicom_dir / CHEST[0]])
                time.sleep(0.05)
            wait_for(lambda: all_jobs_ended(database), 60, "every job ended")
        finally:
            stop.set()
            thread.join(timeout=30)
    assert predictors[0].batch_sizes == [1, 6]
    assert worker.stats.done == 7
