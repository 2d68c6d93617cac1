"""Memory: a worker's and a listener's resident memory over many images and associations.

Issue #7's target: < 50 MB growth after warm-up over 10,000 classified images and over
10,000 associations. Each part runs ``pacs-classifier serve`` as a subprocess on SQLite in
a temporary folder and reads ``VmRSS`` (and the thread count) from ``/proc/PID/status``:

- *worker*: ``--pool`` chest radiographs are sent once through a listener-only ``serve``;
  then ``serve --roles worker`` classifies them, and reclassification runs over all of
  them (the code path of ``reclassify --all``) are started one after the other until
  ``--images`` predictions exist. RSS is sampled every ``--sample-every`` images.
- *listener*: ``serve --roles listener`` takes ``--associations`` associations from a
  pynetdicom peer in this process (or dcmtk with ``--peer dcmtk``), each one C-ECHO or,
  every second one, one C-STORE of a small CR file with a new SOP Instance UID, released
  normally. RSS is sampled every ``--sample-every`` associations.

Growth is measured on the samples after the warm-up (``--warmup`` images or associations;
by default a fifth of the work, at most 1,000): the median of their last quarter minus
the median of their first quarter, since one reading swings with the batch in flight;
the peak is given against the same start.

    nice -n 10 .venv/bin/python scripts/bench_memory.py --images 10000 --associations 10000
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from bench_pipeline import (
    AE_TITLE,
    Serve,
    choose_bundle,
    database_url,
    free_port,
    generate_chest_files,
    load_average,
    machine,
    prepare_database,
    resolved_runtime,
    storescu,
    subprocess_env,
    write_config,
)
from sqlalchemy import func, select

from pacs_classifier.db.engine import Database
from pacs_classifier.db.models import Prediction, RunTrigger

MB = 1024 * 1024
VERIFICATION = "1.2.840.10008.1.1"  # PS3.4 A.4: the Verification SOP Class (C-ECHO)

log = logging.getLogger("bench_memory")


@dataclass(frozen=True)
class Sample:
    """One reading of a process: after ``done`` units of work."""

    done: int
    rss: int
    threads: int


@dataclass
class Series:
    """Samples of one process, and what they say about growth."""

    what: str
    unit: str
    warmup: int
    samples: list[Sample] = field(default_factory=list)

    def add(self, done: int, pid: int) -> Sample:
        rss, threads = read_status(pid)
        sample = Sample(done, rss, threads)
        self.samples.append(sample)
        print(
            f"  {self.what}: {done:>6} {self.unit}: RSS {rss / MB:7.1f} MB, {threads} threads",
            flush=True,
        )
        return sample

    def summary(self) -> str:
        """A table row: growth is the median of the last quarter of the samples after the
        warm-up minus the median of the first quarter (one reading swings with the batch
        in flight), the peak is against the same start."""
        after = [s for s in self.samples if s.done >= self.warmup] or self.samples[-1:]
        quarter = max(1, len(after) // 4)
        base = statistics.median(s.rss for s in after[:quarter])
        end = statistics.median(s.rss for s in after[-quarter:])
        peak = max(s.rss for s in after)
        first, last = self.samples[0], self.samples[-1]
        return (
            f"| {self.what} | {last.done} {self.unit} | {first.rss / MB:.1f} "
            f"| {base / MB:.1f} (from {after[0].done}) | {end / MB:.1f} "
            f"| {(end - base) / MB:+.1f} | {(peak - base) / MB:+.1f} "
            f"| {first.threads} → {last.threads} |"
        )


def read_status(pid: int) -> tuple[int, int]:
    """(resident bytes, threads) of ``pid`` from /proc."""
    rss = threads = 0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            rss = int(line.split()[1]) * 1024
        elif line.startswith("Threads:"):
            threads = int(line.split()[1])
    return rss, threads


# ---------------------------------------------------------------------- worker


def prediction_count(db: Database) -> int:
    with db.session() as session:
        return int(session.scalar(select(func.count(Prediction.id))) or 0)


def worker_memory(args: argparse.Namespace, work: Path) -> Series:
    """Classify ``--pool`` images, then reclassify them all until ``--images`` are done."""
    from pacs_classifier.reclassify import run_finished, start_run

    bundle, described = choose_bundle(args.bundle, work, args.inception)
    print(f"worker: model {described}", flush=True)
    model_path, image_size = prepare_database(work, bundle, args.runtime)
    runtime = resolved_runtime(model_path, args.runtime)
    print(f"worker: runtime {args.runtime} → {runtime}, {image_size}²", flush=True)
    files = generate_chest_files(work / "send", args.pool, args.size)
    port = free_port()
    config = write_config(work, port=port, runtime=args.runtime, batch_size=args.batch_size)
    db = Database(database_url(work))
    listener = Serve(config, "listener", work / "listener.log")
    try:
        listener.wait_listening(port)
        storescu(port, files)
    finally:
        listener.stop()
    series = Series(f"worker ({runtime}, {image_size}²)", "images", warmup_of(args, args.images))
    every = sample_every_of(args, args.images)
    worker = Serve(config, "worker", work / "worker.log")
    try:
        run_id: int | None = None
        next_sample = 0
        while True:
            worker.check_alive()
            done = prediction_count(db)
            if done >= next_sample:
                series.add(done, worker.pid)
                next_sample = (done // every + 1) * every
            if done >= args.images:
                break
            initial_done = run_id is None and done >= len(files)
            if initial_done or (run_id is not None and run_finished(db, run_id)):
                run_id = start_run(db, trigger=RunTrigger.CLI, actor="bench", all_instances=True)
            time.sleep(0.2)
        series.add(prediction_count(db), worker.pid)
    finally:
        worker.stop()
        db.dispose()
    return series


# ---------------------------------------------------------------------- listener


def small_dataset_file(folder: Path) -> Path:
    """A 256² CR file (~130 KB): small enough that the association dominates the cost."""
    return generate_chest_files(folder, 1, 256, seed=1)[0]


def pynetdicom_peer(port: int, template: Path) -> Callable[[int], None]:
    """One association per call: C-ECHO, or C-STORE of ``template`` with a new UID."""
    import pydicom
    from pydicom.uid import ComputedRadiographyImageStorage, generate_uid
    from pynetdicom import AE

    ds = pydicom.dcmread(template)
    ae = AE(ae_title="BENCH")
    ae.add_requested_context(VERIFICATION)
    ae.add_requested_context(ComputedRadiographyImageStorage, ds.file_meta.TransferSyntaxUID)

    def associate(n: int) -> None:
        assoc = ae.associate("127.0.0.1", port, ae_title=AE_TITLE)
        if not assoc.is_established:
            raise RuntimeError(f"association {n} was not established")
        try:
            if n % 2:
                ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
                status = assoc.send_c_store(ds)
            else:
                status = assoc.send_c_echo()
            if not status or status.Status != 0:
                raise RuntimeError(f"association {n}: status {status!r}")
        finally:
            assoc.release()

    return associate


def dcmtk_peer(port: int, template: Path, folder: Path) -> Callable[[int], None]:
    """One ``echoscu`` or ``storescu`` process per association (an independent peer)."""
    import pydicom
    from pydicom.uid import generate_uid

    ds = pydicom.dcmread(template)
    env = subprocess_env()
    target = ["-aet", "BENCH", "-aec", AE_TITLE, "127.0.0.1", str(port)]

    def associate(n: int) -> None:
        if n % 2:
            ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
            path = folder / "store.dcm"
            ds.save_as(path, enforce_file_format=True)
            cmd = ["storescu", *target, str(path)]
        else:
            cmd = ["echoscu", *target]
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
        if done.returncode != 0 or "E:" in done.stderr:
            raise RuntimeError(f"association {n}: {done.stderr[-1000:]}")

    return associate


def listener_memory(args: argparse.Namespace, work: Path) -> Series:
    """``--associations`` associations against a listener-only ``serve``."""
    from pacs_classifier.db.migrate import upgrade

    upgrade(database_url(work))
    port = free_port()
    config = write_config(work, port=port, runtime="keras", batch_size=None)
    template = small_dataset_file(work / "small")
    if args.peer == "dcmtk":
        associate = dcmtk_peer(port, template, work / "small")
    else:
        associate = pynetdicom_peer(port, template)
    series = Series("listener", "associations", warmup_of(args, args.associations))
    every = sample_every_of(args, args.associations)
    listener = Serve(config, "listener", work / "listener.log")
    try:
        listener.wait_listening(port)
        started = time.monotonic()
        for n in range(args.associations):
            if n % every == 0:
                listener.check_alive()
                series.add(n, listener.pid)
            associate(n)
        time.sleep(1.0)  # let the last association's thread end before the last reading
        series.add(args.associations, listener.pid)
        rate = args.associations / (time.monotonic() - started)
        print(f"  listener: {rate:.1f} associations/s", flush=True)
    finally:
        listener.stop()
    return series


# ---------------------------------------------------------------------- main


def warmup_of(args: argparse.Namespace, total: int) -> int:
    """``--warmup``, or by default the first fifth of the work, at most 1,000."""
    return int(args.warmup) if args.warmup is not None else min(1000, total // 5)


def sample_every_of(args: argparse.Namespace, total: int) -> int:
    """``--sample-every``, or by default a tenth of the work, at most 500."""
    if args.sample_every is not None:
        return int(args.sample_every)
    return max(1, min(500, total // 10))


def in_folder(fn: Callable[[argparse.Namespace, Path], Series], args: argparse.Namespace) -> Series:
    with tempfile.TemporaryDirectory(prefix="bench-memory-") as tmp:
        return fn(args, Path(tmp))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--images", type=int, default=10_000, help="predictions (0: skip)")
    parser.add_argument("--associations", type=int, default=10_000, help="0: skip")
    parser.add_argument("--pool", type=int, default=200, help="distinct images reclassified")
    parser.add_argument("--size", type=int, default=2048, help="rows = columns of each image")
    parser.add_argument(
        "--warmup", type=int, help="images / associations (default: min(1000, a fifth))"
    )
    parser.add_argument(
        "--sample-every", type=int, help="images / associations (default: min(500, a tenth))"
    )
    parser.add_argument(
        "--runtime", default="auto", choices=("auto", "keras", "onnx", "tflite-int8")
    )
    parser.add_argument("--bundle", type=Path, help="model bundle (default: models/reference)")
    parser.add_argument(
        "--inception", type=int, default=0, metavar="PX", help="the full InceptionV3 at PX²"
    )
    parser.add_argument("--batch-size", type=int, help="worker batch_size (default: config's)")
    parser.add_argument("--peer", choices=("pynetdicom", "dcmtk"), default="pynetdicom")
    args = parser.parse_args(argv)
    if args.pool < 1 or (args.sample_every is not None and args.sample_every < 1):
        parser.error("--sample-every and --pool must be at least 1")
    logging.basicConfig(level=logging.WARNING)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # before TensorFlow is imported
    print(f"machine: {machine()}")
    print(f"before: {load_average()}", flush=True)
    results = []
    if args.images:
        results.append(in_folder(worker_memory, args))
    if args.associations:
        results.append(in_folder(listener_memory, args))
    print(f"after: {load_average()}\n")
    print(
        "| process | work | first RSS (MB) | after warm-up (MB) | at end (MB) "
        "| growth (MB) | peak − warm-up (MB) | threads |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for series in results:
        print(series.summary())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
