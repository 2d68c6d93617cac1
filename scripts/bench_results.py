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
P. (only with ``--phases`` naming it) as B with the sender off: the worker's own share,
   planning the batch's SR rows in the prediction's transaction (a few statements per
   batch; the objects are named in each job's existing audit event);
D. with ``sc_overlay = "all"``, classification first, then each render and each send
   timed on its own: milliseconds per SR, per overlay, per C-STORE.

The images are queued all at once (a backlog), so ``[results] max_defer_s`` (default
60 s) holds rendering and sending back until the backlog is classified, or until the
oldest result has waited that long; ``--max-defer-s 0`` measures them competing.
Images/s run from queueing to the last job's recorded end; CPU ms per image are the
process's (every thread) over the same span, and hardly depend on the machine's load.
Phases A, (P,) B, C alternate ``--rounds`` times so drift in the machine's load touches all;
ratios are of medians. ``--phases AB`` runs the baseline and B alone (C and D render
Grad-CAM overlays, seconds each on a loaded machine).

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
from datetime import datetime
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


def classify(
    db: Database, config: Config, files: Sequence[Path], worker: Worker
) -> tuple[float, float]:
    """Images/s of the worker over ``files`` (queued all at once, the backlog case), and
    the process's CPU milliseconds per image meanwhile (all threads: the sender's too).

    From queueing to the moment the last job was recorded ended (its ``updated_at``),
    not to when the drain loop noticed: that loop looks every 0.2 s, and whatever else
    runs then (the sender starting on the results) would count as classification time.
    """
    from sqlalchemy import func, select

    def ended() -> bool:
        with db.read_session() as s:
            return not s.scalar(
                select(func.count()).where(Job.state.in_([JobState.QUEUED, JobState.RUNNING]))
            )

    worker.config = config
    start = utcnow()
    cpu = _cpu_seconds()
    ids = add_jobs(db, files)
    worker.drain(until=ended, timeout_s=3600)
    cpu_ms = (_cpu_seconds() - cpu) * 1000 / len(files)
    with db.read_session() as s:
        last = s.scalar(select(func.max(Job.updated_at)).where(Job.instance_id.in_(ids)))
    if last is None:
        raise RuntimeError("no job of this phase ended")
    return len(files) / (last - start).total_seconds(), cpu_ms


def _cpu_seconds() -> float:
    """User and system CPU time of this process (every thread), in seconds.

    Unlike the images/s it hardly depends on what else runs on the machine.
    """
    import resource

    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def rendered_before_last_job(db: Database, since: datetime) -> int:
    """Result objects rendered while classification jobs were still running (deferring
    should keep this 0 during a backlog shorter than ``max_defer_s``)."""
    from sqlalchemy import func, select

    with db.read_session() as s:
        last = s.scalar(select(func.max(Job.updated_at)))
        return int(
            s.scalar(
                select(func.count()).where(
                    ResultObject.state == JobState.DONE,
                    ResultObject.updated_at >= since,
                    ResultObject.updated_at < last,
                )
            )
            or 0
        )


def with_sender(
    db: Database, config: Config, files: Sequence[Path], worker: Worker, sender_on: bool
) -> tuple[float, float]:
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
        began = utcnow()
        rate = classify(db, config, files, worker)
        early = rendered_before_last_job(db, began)
        if early:
            log.warning("%d result object(s) rendered before the backlog was classified", early)
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
    every_phase = {
        "A": off,
        "P": make_config(work, scp_port, sr=True, overlay="off", max_defer_s=args.max_defer_s),
        "B": make_config(work, scp_port, sr=True, overlay="off", max_defer_s=args.max_defer_s),
        "C": make_config(
            work, scp_port, sr=True, overlay="positives", max_defer_s=args.max_defer_s
        ),
    }
    phases = {k: v for k, v in every_phase.items() if k in args.phases or k == "A"}
    app = App(off)
    worker = app.worker()
    # Warm-up: the model loads on the first batch; not measured.
    classify(db, off, generate_chest_files(work / "warm", 4, size, seed=99), worker)
    rates: dict[str, list[float]] = {name: [] for name in phases}
    cpu_ms: dict[str, list[float]] = {name: [] for name in phases}
    for r in range(args.rounds):
        for n, (name, config) in enumerate(phases.items()):
            files = generate_chest_files(work / f"{name}{r}", args.count, size, seed=10 * r + n)
            rate, cpu = with_sender(db, config, files, worker, name not in ("A", "P"))
            rates[name].append(rate)
            cpu_ms[name].append(cpu)
    # D: per-object costs, each render and send timed on its own.
    render_ms: dict[str, list[float]] = {"sr": [], "sc": []}
    send_ms: dict[str, list[float]] = {"sr": [], "sc": []}
    if "D" in args.phases:
        every = make_config(work, scp_port, sr=True, overlay="all")
        d = generate_chest_files(work / "d", max(4, args.count // 4), size, seed=1000)
        classify(db, every, d, worker)
        render_ms, send_ms = per_object_costs(db, ResultsWorker(db, every))
    scp.shutdown()
    app.close()
    db.dispose()
    base = statistics.median(rates["A"])
    base_cpu = statistics.median(cpu_ms["A"])
    print(f"machine: {machine()}; {load_average()}")
    print(f"model: {described}, {row.image_size} px, keras runtime; images {size}² px")
    print(f"max_defer_s = {args.max_defer_s}; {args.count} images per phase and round")
    labels = {
        "A": "SR off, overlay off",
        "P": "SR on, overlay off, sender off",
        "B": "SR on, overlay off, sender on",
        "C": "SR on, overlay positives, sender on",
    }
    for name, label in labels.items():
        if name not in rates:
            continue
        ratio = statistics.median(rates[name]) / base
        cpu_ratio = statistics.median(cpu_ms[name]) / base_cpu
        print(f"{name}  {label:<36} images/s: {_fmt(rates[name])}  (median / A: {ratio:.3f})")
        print(f"   {'':<36} CPU ms/image: {_fmt(cpu_ms[name], 0)}  (median / A: {cpu_ratio:.3f})")
    for kind, label in ((ResultKind.SR, "SR"), (ResultKind.SC, "Grad-CAM overlay")):
        if not render_ms[str(kind)]:
            continue
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


def _fmt(values: list[float], digits: int = 2) -> str:
    return ", ".join(f"{v:.{digits}f}" for v in values)


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
    parser.add_argument(
        "--phases",
        default="ABCD",
        help="which phases to run (A always runs; AB for the SPEC §11 ratio alone; P: SR on "
        "with the sender off, the worker's own share of the cost)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    with tempfile.TemporaryDirectory(prefix="bench-results-") as tmp:
        run(args, Path(tmp))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
