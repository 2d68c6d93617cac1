"""Helpers shared by the queue, worker, reclassification and end-to-end tests.

Real parts only: bundles are real Keras models written in the real bundle format, and
instance rows point at real DICOM files.
"""

from __future__ import annotations

import hashlib
import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import func, select

from pacs_classifier.config import Config, config_from_mapping
from pacs_classifier.db.engine import Database
from pacs_classifier.db.models import Instance, Job, JobKind, JobState, utcnow
from pacs_classifier.queue.jobs import enqueue

REPO = Path(__file__).resolve().parents[1]
IMAGE_SIZE = 75


@dataclass(frozen=True)
class Bundles:
    """Two versions of one tiny model: v1 says NORMAL for everything, v2 PNEUMONIA."""

    v1: Path
    v2: Path


def build_bundles(out: Path) -> Bundles:
    """A real InceptionV3 classifier at 75 px, written twice with opposite thresholds.

    The thresholds (1.0 and 0.0) make every label of v1 NORMAL and every label of v2
    PNEUMONIA, so a test knows exactly which labels change between them.
    """
    import keras

    from pacs_classifier.model.bundle import write_metadata, write_model_files
    from pacs_classifier.model.metadata import BundleMetadata, Threshold
    from pacs_classifier.train.model import BaseWeights, build_base, build_classifier, cut_base

    keras.utils.set_random_seed(7)
    base = cut_base(build_base(BaseWeights.parse("none"), IMAGE_SIZE), "mixed10")
    model = build_classifier(base, IMAGE_SIZE, "symmetric")
    paths = {}
    for version, threshold in (("tiny-v1", 1.0), ("tiny-v2", 0.0)):
        folder = out / version
        files = write_model_files(model, folder)
        write_metadata(
            folder,
            BundleMetadata(
                version=version,
                created_at=utcnow(),
                image_size=IMAGE_SIZE,
                threshold=Threshold(value=threshold, rule="fixed by the test"),
                files=files,
            ),
        )
        paths[version] = folder
    return Bundles(paths["tiny-v1"], paths["tiny-v2"])


def make_config(tmp: Path, db_url: str, **sections: dict[str, Any]) -> Config:
    """A config for tests: storage and models under ``tmp``, fast polling."""
    raw: dict[str, Any] = {
        "database": {"url": db_url},
        "storage": {"root": str(tmp / "dicom"), "min_free_mb": 1},
        "model": {"dir": str(tmp / "models")},
        "worker": {"batch_size": 8, "max_batch_wait_ms": 50, "poll_interval_ms": 50},
        "listener": {"port": free_port()},
        "web": {"port": free_port()},
    }
    for name, values in sections.items():
        raw.setdefault(name, {}).update(values)
    return config_from_mapping(raw, base_dir=tmp)


def add_instances(
    db: Database,
    files: Sequence[Path],
    *,
    study_uid: str | None = None,
    kind: JobKind = JobKind.CLASSIFY,
    with_jobs: bool = True,
) -> list[int]:
    """Instance rows for real files (as the listener would write them), each with a job."""
    ids = []
    with db.session() as session:
        for n, file in enumerate(files):
            data = file.read_bytes()
            row = Instance(
                sop_instance_uid=f"2.25.{uuid.uuid4().int}",
                study_instance_uid=study_uid or f"2.25.{uuid.uuid4().int}",
                series_instance_uid=f"2.25.{uuid.uuid4().int}",
                sop_class_uid="1.2.840.10008.5.1.4.1.1.1",
                accession_number=f"ACC{n:05d}",
                patient_id=f"PID{n:05d}",
                study_date="20240101",
                modality="CR",
                calling_ae="TEST",
                received_at=utcnow(),
                file_path=str(file),
                file_sha256=hashlib.sha256(data + str(n).encode()).hexdigest(),
                file_size=len(data),
            )
            session.add(row)
            session.flush()
            if with_jobs:
                enqueue(session, row.id, kind=kind)
            ids.append(row.id)
    return ids


def job_states(db: Database) -> dict[str, int]:
    with db.session() as session:
        rows = session.execute(select(Job.state, func.count()).group_by(Job.state)).all()
    return {str(s): int(n) for s, n in rows}


def wait_for(
    predicate: Callable[[], bool], timeout_s: float, what: str, interval_s: float = 0.2
) -> None:
    """Poll until ``predicate()`` is true; fail with ``what`` after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(interval_s)
    raise AssertionError(f"timed out after {timeout_s:.0f}s waiting for {what}")


def drain_jobs(config: Config, *, timeout_s: float = 120, **worker_args: Any) -> None:
    """Work the queue with a worker as the wiring builds it until every job has ended."""
    from pacs_classifier.wiring import App

    with App(config) as app:
        app.worker(**worker_args).drain(until=lambda: all_jobs_ended(app.db), timeout_s=timeout_s)


def all_jobs_ended(db: Database) -> bool:
    states = job_states(db)
    return not states.get(JobState.QUEUED, 0) and not states.get(JobState.RUNNING, 0)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def write_config_file(path: Path, config: Config) -> Path:
    """The TOML form of the keys tests set (enough for a ``serve`` subprocess)."""
    c = config
    text = f"""
[database]
url = "{c.database.url}"

[storage]
root = "{c.storage.root}"
min_free_mb = {c.storage.min_free_mb}

[listener]
ae_title = "{c.listener.ae_title}"
host = "{c.listener.host}"
port = {c.listener.port}

[model]
dir = "{c.model.dir}"
runtime = "{c.model.runtime}"

[worker]
batch_size = {c.worker.batch_size}
max_batch_wait_ms = {c.worker.max_batch_wait_ms}
max_attempts = {c.worker.max_attempts}
lease_seconds = {c.worker.lease_seconds}
poll_interval_ms = {c.worker.poll_interval_ms}
retry_backoff_s = {c.worker.retry_backoff_s}

[scheduler]
enabled = {str(c.scheduler.enabled).lower()}
reclassify_cron = "{c.scheduler.reclassify_cron}"
timezone = "{c.scheduler.timezone}"
misfire_grace_s = {c.scheduler.misfire_grace_s}

[results]
sr = {str(c.results.sr).lower()}
sr_not_assessed = {str(c.results.sr_not_assessed).lower()}
sc_overlay = "{c.results.sc_overlay}"

[web]
host = "{c.web.host}"
port = {c.web.port}

[logging]
level = "INFO"
"""
    path.write_text(text, encoding="utf-8")
    return path


def cli(config_path: Path, *args: str, timeout_s: float = 120) -> subprocess.CompletedProcess[str]:
    """Run ``pacs-classifier`` in a subprocess and return what it printed."""
    return subprocess.run(
        [sys.executable, "-m", "pacs_classifier", "--config", str(config_path), *args],
        capture_output=True,
        text=True,
        timeout=timeout_s,
        cwd=REPO,
        env=subprocess_env(),
        check=False,
    )


def start_cli(config_path: Path, *args: str, log: Path) -> subprocess.Popen[bytes]:
    """Start ``pacs-classifier`` in the background, output to ``log``."""
    out = log.open("ab")
    return subprocess.Popen(
        [sys.executable, "-m", "pacs_classifier", "--config", str(config_path), *args],
        stdout=out,
        stderr=subprocess.STDOUT,
        cwd=REPO,
        env=subprocess_env(),
    )


def subprocess_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update({"TF_CPP_MIN_LOG_LEVEL": "2", "TCP_NODELAY": "1", "PYTHONUNBUFFERED": "1"})
    env.pop("PACS_CLASSIFIER_CONFIG", None)
    return env
