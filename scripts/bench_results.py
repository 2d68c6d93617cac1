"""The extra work of results back to the PACS: SR, Grad-CAM overlay and send, per image.

In one process, on SQLite in a temporary folder, with the reference bundle (or
``--bundle``) on the ``keras`` runtime, ``--count`` generated chest radiographs per phase:

A. the worker classifies with ``[results] sr = false, sc_overlay = "off"``: the baseline
   images/s;
B. the same with ``sr = true`` (overlay off) and the ``sender`` role running in the same
   process at the same time (render and send threads, as ``serve`` runs by default),
   sending to a pynetdicom Storage SCP on loopback: the images/s that SPEC §11 asks to
   stay within 10 % of A;
C. as B with ``sc_overlay = "positives"``;
D. with ``sc_overlay = "all"``, classification first, then each render and each send
   timed on its own: milliseconds per SR, per overlay, per C-STORE.

The images are queued all at once (a backlog), so ``[results] max_defer_s`` (default
60 s) holds rendering and sending back until the backlog is classified, or until the
oldest result has waited that long; ``--max-defer-s 0`` measures them competing.
Phases A, B, C alternate ``--rounds`` times so drift in the machine's load touches all;
ratios are of medians.

    nice -n 10 .venv/bin/python scripts/bench_results.py --count 24 --rounds 2
"""

from __future__ import annotations

import argparse
import logging
import statistics
import tempfile
import threading
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench_pipeline import choose_bundle, generate_chest_files, load_average, machine

from pacs_classifier.config import Config, config_from_mapping
from pacs_classifier.db.engine import Database
from pacs_classifier.db.models import (
    Instance,
    Job,
    JobKind,
    JobState,
    ResultKind,
    ResultObject,
    SendJob,
    utcnow,
)
from pacs_classifier.results.outbound import COMPREHENSIVE_3D_SR, SECONDARY_CAPTURE
from pacs_classifier.results.role import ResultsWorker
from pacs_classifier.wiring import App
from pacs_classifier.worker import Worker

log = logging.getLogger("bench_results")


def storage_scp(port: int) -> Any:
    """A pynetdicom Storage SCP that accepts every SR and SC and keeps nothing."""
    from pynetdicom import AE, evt

    ae = AE(ae_title="BENCH_PACS")
    ae.add_supported_context(COMPREHENSIVE_3D_SR)
    ae.add_supported_context(SECONDARY_CAPTURE)
    return ae.start_server(
        ("127.0.0.1", port),
        block=False,
        evt_handlers=[(evt.EVT_C_STORE, lambda event: 0x0000)],
    )


def make_config(
    work: Path, scp_port: int, *, sr: bool, overlay: str, max_defer_s: float = 60.0
) -> Config:
    return config_from_mapping(
        {
            "database": {"url": f"sqlite:///{work}/pacs.sqlite3"},
            "storage": {"root": str(work / "dicom"), "min_free_mb": 1},
            "model": {"dir": str(work / "models"), "runtime": "keras"},
            "worker": {"max_batch_wait_ms": 50, "poll_interval_ms": 50},
            "scheduler": {"enabled": False},
            "results": {
                "sr": sr,
                "sc_overlay": overlay,
                "poll_interval_ms": 50,
                "max_defer_s": max_defer_s,
            },
            "destinations": [{"ae_title": "BENCH_PACS", "host": "127.0.0.1", "port": scp_port}],
        },
        base_dir=work,
    )


def add_jobs(db: Database, files: Sequence[Path]) -> list[int]:
    """Instance rows and classify jobs for ``files`` (as the listener would write them)."""
    import pydicom

    ids = []
    with db.session() as s:
        for f in files:
            ds = pydicom.dcmread(f, stop_before_pixels=True)
            row = Instance(
                sop_instance_uid=str(ds.SOPInstanceUID),
                study_instance_uid=str(ds.StudyInstanceUID),
                series_instance_uid=str(ds.SeriesInstanceUID),
                sop_class_uid=str(ds.SOPClassUID),
                patient_id=str(ds.PatientID),
                accession_number=str(ds.AccessionNumber),
                study_date=str(ds.StudyDate),
                modality="CR",
                received_at=utcnow(),
                file_path=str(f),
                file_sha256=uuid.uuid4().hex * 2,
                file_size=f.stat().st_size,
            )
            s.add(row)
            s.flush()
            s.add(Job(instance_id=row.id, kind=JobKind.CLASSIFY, state=JobState.QUEUED))
            ids.append(row.id)
    return ids


def classify(db: Database, config: Config, files: Sequence[Path], worker: Worker) -> float:
    """Images/s of the worker over ``files`` (queued all at once, the backlog case)."""
    from sqlalchemy import func, select

    def ended() -> bool:
        with db.read_session() as s:
            return not s.scalar(
                select(func.count()).where(Job.state.in_([JobState.QUEUED, JobState.RUNNING]))
            )

    worker.config = config
    add_jobs(db, files)
    start = time.perf_counter()
    worker.drain(until=ended, timeout_s=3600)
    return len(files) / (time.perf_counter() - start)


def with_sender(
    db: Database, config: Config, files: Sequence[Path], worker: Worker, sender_on: bool
) -> float:
    """Images/s of ``classify`` with the sender's threads running beside it (when on)."""
    if not sender_on:
        return classify(db, config, files, worker)
    sender = ResultsWorker(db, config)
    stop = threading.Event()
    threads = [
        threading.Thread(target=sender.run_render, args=(stop,)),
        threading.Thread(target=sender.run_send, args=(stop,)),
    ]
    for t in threads:
        t.start()
    try:
        rate = classify(db, config, files, worker)
        sender.drain(timeout_s=3600)  # what is left after classification, not measured
    finally:
        stop.set()
        for t in threads:
            t.join()
    return rate


def run(args: argparse.Namespace, work: Path) -> None:
    from pacs_classifier.db.migrate import upgrade
    from pacs_classifier.model.registry import register_bundle

    bundle, described = choose_bundle(args.bundle, work)
    scp_port = _free_port()
    scp = storage_scp(scp_port)
    off = make_config(work, scp_port, sr=False, overlay="off")
    upgrade(off.database_url)
    db = Database(off.database_url)
    row = register_bundle(db, bundle, off.model_dir, actor="bench", activate=True)
    size = args.size
    phases = {
        "A": off,
        "B": make_config(work, scp_port, sr=True, overlay="off", max_defer_s=args.max_defer_s),
        "C": make_config(
            work, scp_port, sr=True, overlay="positives", max_defer_s=args.max_defer_s
        ),
    }
    app = App(off)
    worker = app.worker()
    # Warm-up: the model loads on the first batch; not measured.
    classify(db, off, generate_chest_files(work / "warm", 4, size, seed=99), worker)
    rates: dict[str, list[float]] = {name: [] for name in phases}
    for r in range(args.rounds):
        for n, (name, config) in enumerate(phases.items()):
            files = generate_chest_files(work / f"{name}{r}", args.count, size, seed=10 * r + n)
            rates[name].append(with_sender(db, config, files, worker, name != "A"))
    # D: per-object costs, each render and send timed on its own.
    every = make_config(work, scp_port, sr=True, overlay="all")
    d = generate_chest_files(work / "d", max(4, args.count // 4), size, seed=1000)
    classify(db, every, d, worker)
    render_ms, send_ms = per_object_costs(db, ResultsWorker(db, every))
    scp.shutdown()
    app.close()
    db.dispose()
    base = statistics.median(rates["A"])
    print(f"machine: {machine()}; {load_average()}")
    print(f"model: {described}, {row.image_size} px, keras runtime; images {size}² px")
    print(f"max_defer_s = {args.max_defer_s}; {args.count} images per phase and round")
    labels = {
        "A": "SR off, overlay off",
        "B": "SR on, overlay off, sender on",
        "C": "SR on, overlay positives, sender on",
    }
    for name, label in labels.items():
        ratio = statistics.median(rates[name]) / base
        print(f"{name}  {label:<36} images/s: {_fmt(rates[name])}  (median / A: {ratio:.3f})")
    for kind, label in ((ResultKind.SR, "SR"), (ResultKind.SC, "Grad-CAM overlay")):
        print(
            f"render {label:<17} ms/object: {_ms(render_ms[str(kind)])}   "
            f"C-STORE ms/object: {_ms(send_ms[str(kind)])}"
        )


def per_object_costs(
    db: Database, results: ResultsWorker
) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Milliseconds of each render and each C-STORE, by kind, one object at a time."""
    from sqlalchemy import select

    render_ms: dict[str, list[float]] = {"sr": [], "sc": []}
    send_ms: dict[str, list[float]] = {"sr": [], "sc": []}

    while True:
        with db.read_session() as s:
            kind = s.scalar(
                select(ResultObject.kind)
                .where(ResultObject.state == JobState.QUEUED)
                .order_by(ResultObject.id)
                .limit(1)
            )
        if kind is None:
            break
        t0 = time.perf_counter()
        results.render_once()
        render_ms[str(kind)].append((time.perf_counter() - t0) * 1000)
    while True:
        with db.read_session() as s:
            kind = s.scalar(
                select(ResultObject.kind)
                .join(SendJob, SendJob.object_id == ResultObject.id)
                .where(SendJob.state == JobState.QUEUED)
                .order_by(SendJob.id)
                .limit(1)
            )
        if kind is None:
            break
        t0 = time.perf_counter()
        results.send_once()
        send_ms[str(kind)].append((time.perf_counter() - t0) * 1000)
    return render_ms, send_ms


def _fmt(values: list[float]) -> str:
    return ", ".join(f"{v:.2f}" for v in values)


def _ms(values: list[float]) -> str:
    if not values:
        return "-"
    return f"median {statistics.median(values):.0f} (n={len(values)}, max {max(values):.0f})"


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--count", type=int, default=24, help="images per phase and round")
    parser.add_argument("--rounds", type=int, default=2, help="A/B rounds")
    parser.add_argument("--size", type=int, default=1024, help="generated image side (px)")
    parser.add_argument("--bundle", type=Path, help="model bundle (default: models/reference)")
    parser.add_argument(
        "--max-defer-s", type=float, default=60.0, help="[results] max_defer_s for B and C"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    with tempfile.TemporaryDirectory(prefix="bench-results-") as tmp:
        run(args, Path(tmp))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
