"""``classify PATH... [--record] [--model DIR]``: classify files now, one row each.

Each row: the file, then its label and calibrated probability of PNEUMONIA, or
``not_assessed`` and the reason code. DICOM files go through the same eligibility check
and normalisation as received ones; JPEG/PNG files (no metadata) only through the
normalisation. ``--record`` stores the DICOM files as if they had been received (file,
instance row, job, audit) and classifies them through the queue, so they appear in the
reports; ``--model DIR`` uses a bundle folder instead of the registry's active model.
"""

from __future__ import annotations

import argparse
import getpass
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pacs_classifier.db.models import JobState
from pacs_classifier.errors import NotAssessable, PermanentError
from pacs_classifier.report.queries import Result, render
from pacs_classifier.wiring import App, load_app

ORDER = 50


@dataclass(frozen=True)
class Row:
    file: str
    label: str
    probability: float | None
    reason: str | None = None


def register(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser(
        "classify", help="classify DICOM or image files now and print one row each"
    )
    p.add_argument("paths", nargs="+", metavar="PATH", type=Path)
    p.add_argument(
        "--record", action="store_true", help="also store them as if received (DICOM only)"
    )
    p.add_argument("--model", type=Path, metavar="DIR", help="a bundle instead of the active model")
    p.add_argument("--format", choices=("table", "csv", "json"), default="table")
    p.set_defaults(func=run_classify)


def run_classify(args: argparse.Namespace) -> int:
    missing = [str(p) for p in args.paths if not p.is_file()]
    if missing:
        raise PermanentError(f"not a file: {missing[0]}")
    if args.record and args.model:
        raise PermanentError("--record classifies with the active model; drop --model")
    with load_app(args) as app:
        rows = record(app, args.paths) if args.record else classify_now(app, args.paths, args.model)
    result = Result(
        ["file", "label", "probability", "reason"],
        [
            (r.file, r.label, None if r.probability is None else round(r.probability, 4), r.reason)
            for r in rows
        ],
    )
    print(render(result, args.format))
    return 0


def classify_now(app: App, paths: list[Path], model_dir: Path | None) -> list[Row]:
    """Classify in this process, storing nothing."""
    import numpy as np

    from pacs_classifier.model.ood import read_ood
    from pacs_classifier.model.runtime import load_predictor
    from pacs_classifier.preprocess import reasons, serving_tensor
    from pacs_classifier.record.predictions import label_for

    if model_dir is None:
        from pacs_classifier.model.registry import active_model

        with app.checked_db().session() as session:
            active = active_model(session)
            if active is None:
                raise PermanentError("no active model: register one, or pass --model DIR")
            model_dir = Path(active.path)
    predictor = load_predictor(model_dir, app.config.model.runtime)
    size, threshold = predictor.info.image_size, predictor.info.threshold
    # The worker's out-of-distribution check too, so a file gets here what it gets in service.
    ood = read_ood(predictor.info)
    rules = app.config.eligibility
    rows: list[Row] = []
    for path in paths:
        try:
            tensor = serving_tensor(path, size, rules=rules)
        except NotAssessable as exc:
            rows.append(Row(str(path), JobState.NOT_ASSESSED.value, None, exc.reason))
            continue
        out = predictor.infer(np.expand_dims(tensor, 0))
        features = out.features
        if ood is not None and features is not None and ood.score(features)[0] > ood.threshold:
            reason = reasons.OUT_OF_DISTRIBUTION
            rows.append(Row(str(path), JobState.NOT_ASSESSED.value, None, reason))
            continue
        p = float(out.probability[0])
        rows.append(Row(str(path), str(label_for(p, threshold)), p))
    return rows


def record(app: App, paths: list[Path]) -> list[Row]:
    """Store each DICOM file as received, then classify its job through the queue."""
    from sqlalchemy import select

    from pacs_classifier.db.models import Job, Prediction
    from pacs_classifier.queue.jobs import OPEN_STATES

    db = app.checked_db()
    storage = app.storage
    storage.ensure_dirs()  # never sweep: a listener may be receiving into the same root
    ingestor = app.ingestor()
    actor = f"cli:{getpass.getuser()}"
    stored: dict[str, int | None] = {}
    for path in paths:
        tmp, meta, warnings = _as_received(path, storage)
        result = ingestor.ingest(tmp, meta, actor=actor, calling_ae=None, warnings=warnings)
        stored[str(path)] = result.job_id
    job_ids = [j for j in stored.values() if j is not None]
    if job_ids:

        def ended() -> bool:
            with db.session() as session:
                states = session.execute(select(Job.state).where(Job.id.in_(job_ids))).scalars()
                return all(s not in OPEN_STATES for s in states)

        app.worker(job_ids=job_ids).drain(until=ended)
    rows: list[Row] = []
    with db.session() as session:
        for file, job_id in stored.items():
            if job_id is None:
                rows.append(Row(file, "duplicate", None, "already stored"))
                continue
            job = session.get(Job, job_id)
            pred = session.execute(
                select(Prediction).where(Prediction.job_id == job_id)
            ).scalar_one_or_none()
            if pred is not None:
                rows.append(Row(file, str(pred.label), pred.probability))
            else:
                rows.append(
                    Row(file, job.state.value if job else "?", None, job.reason if job else None)
                )
    return rows


def _as_received(path: Path, storage: Any) -> tuple[Path, Any, tuple[str, ...]]:
    """A Part 10 copy in the storage's temporary folder, its metadata and its UID
    warnings, as C-STORE has them."""
    from pydicom.uid import UID

    from pacs_classifier.preprocess.decode import read_dataset, sniff
    from pacs_classifier.receive.inspect import CannotUnderstand, inspect_received

    if sniff(path) != "dicom":
        raise PermanentError(f"{path}: --record stores DICOM files only")
    ds = read_dataset(path)
    tmp = storage.new_temp_path()
    ds.save_as(tmp, enforce_file_format=True)
    syntax = str(ds.file_meta.TransferSyntaxUID)
    try:
        meta, warnings = inspect_received(tmp, syntax, str(UID(ds.SOPClassUID)))
    except CannotUnderstand as exc:
        storage.discard(tmp)
        raise PermanentError(f"{path}: {exc}") from None
    return tmp, meta, tuple(warnings)
