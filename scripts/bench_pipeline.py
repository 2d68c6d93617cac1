"""The pipeline in one run: ingest only, end to end, latency under load, stages, backfill.

Generates chest radiographs (CR, MONOCHROME2, 12 bits in 16, CHEST, PA, ``--size``²
pixels, distinct SOP Instance UIDs), registers a model on SQLite in a temporary folder,
sends with dcmtk's ``storescu`` (``TCP_NODELAY=1``) and reads the rest from the database:

1. *ingest only*: a listener-only ``serve`` (its own database) takes ``--count`` files on
   one association: files/s of ``storescu`` (each C-STORE is answered after the commit);
2. *end to end*: the default ``serve --roles listener,worker`` (one process per role,
   under the supervisor) after a few warm-up images (the worker loads the model on its
   first batch): the same number of files in a burst, images/s from the first
   ``instances.received_at`` to the last ``predictions.created_at``, and its ratio to 1;
3. *latency*: ``--steady-count`` images at 5 images/s and as many at 80 % of the ingest
   rate (``--rate R``: one rate instead), one association per image, receive → first
   prediction per instance, p50 / p95 / max;
4. *stages*: the worker's stop line (decoding and normalising each file, on one of its
   decode threads; inferring; recording) per image; the CPU time per image of each role
   process and of the ``storescu`` senders (``/proc/PID/stat``, ``getrusage``), in the
   burst and in the ingest-only run, and the end-to-end rate their total allows on the
   cores there are; the RSS of each role process after the warm-up and at the end;
5. *backfill*: ``pacs-classifier reclassify --all`` over every stored instance (what the
   nightly run does, and an archive backfill) against decode + normalise + inference of
   the same files in one thread of this process, and the raw inference images/s.

The model: ``--bundle PATH`` if given, else with ``--inception 299`` the full InceptionV3
at 299² as ``bench_inference.py`` builds it, else the reference bundle at
``models/reference`` when it exists, else a tiny 75 px InceptionV3 bundle built on the
spot (random weights; the speed of the plumbing, not of a real model). Runtimes other
than ``keras`` need the export that registration can do: it runs here (with its parity
check) unless ``--runtime keras``.

    nice -n 10 .venv/bin/python scripts/bench_pipeline.py --count 300 --steady-count 150
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import platform
import re
import resource
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ComputedRadiographyImageStorage, ExplicitVRLittleEndian, generate_uid
from sqlalchemy import func, select

from pacs_classifier.config import WorkerConfig
from pacs_classifier.db.engine import Database
from pacs_classifier.db.models import Instance, Job, JobState, Prediction, utcnow

REPO = Path(__file__).resolve().parents[1]
REFERENCE = REPO / "models" / "reference"
AE_TITLE = "PNEUMONIA_AI"
TINY_SIZE = 75

log = logging.getLogger("bench_pipeline")


# ---------------------------------------------------------------------- shared helpers


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def subprocess_env() -> dict[str, str]:
    """Environment for ``serve`` and dcmtk: no config from outside, no Nagle stalls."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("PACS_CLASSIFIER__") and k != "PACS_CLASSIFIER_CONFIG"
    }
    env.update({"TF_CPP_MIN_LOG_LEVEL": "2", "TCP_NODELAY": "1", "PYTHONUNBUFFERED": "1"})
    return env


def load_average() -> str:
    one, five, fifteen = os.getloadavg()
    return f"load average {one:.2f}, {five:.2f}, {fifteen:.2f}"


def machine() -> str:
    """CPU model and count, for the record."""
    model = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{platform.machine()}, {os.cpu_count()} CPUs, {model}"


def _shared_chest_images() -> list[Path]:
    """Real chest radiographs (the training JPEGs of ../shared), when they are here."""
    shared = Path(os.environ.get("PACS_CLASSIFIER_SHARED", Path(__file__).parents[2] / "shared"))
    folder = shared / "data" / "cxr224" / "train"
    return (
        sorted((folder / "NORMAL").glob("*.jpeg"))[:10]
        + sorted((folder / "PNEUMONIA").glob("*.jpeg"))[:10]
    )


def _base_images(size: int, rng: np.random.Generator) -> list[npt.NDArray[np.uint16]]:
    """12-bit ``size``² images: real chest radiographs scaled up, else a synthetic field.

    The worker's out-of-distribution check refuses the synthetic field (it is no
    radiograph), so without ../shared every measured image ends not assessed and the
    figures are those of decode, normalisation, inference and the check, not of a result.
    """
    from PIL import Image

    sources = _shared_chest_images()
    if sources:
        out = []
        for path in sources:
            with Image.open(path) as im:
                grey = np.asarray(im.convert("L").resize((size, size), Image.Resampling.BILINEAR))
            noise = rng.normal(0, 8, (size, size))
            out.append(np.clip(grey.astype(np.float32) * 16 + noise, 0, 4095).astype(np.uint16))
        return out
    print("no ../shared chest images: synthetic fields, which end out_of_distribution", flush=True)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    field = 2600 - 900 * ((xx - 0.5) ** 2 + (yy - 0.45) ** 2)
    for cx in (0.32, 0.68):
        field -= 1200 * (((xx - cx) / 0.16) ** 2 + ((yy - 0.5) / 0.3) ** 2 < 1)
    noise = rng.normal(0, 60, (size, size)).astype(np.float32)
    return [np.clip(field + noise, 0, 4095).astype(np.uint16)]


def generate_chest_files(folder: Path, count: int, size: int, *, seed: int = 0) -> list[Path]:
    """``count`` eligible chest radiographs: CR, MONOCHROME2, 12 bits in 16, CHEST, PA.

    Each has its own SOP Instance UID and one pixel that differs, so no two files have the
    same digest. The images are real chest radiographs of ../shared scaled up to ``size``
    (so the window, the reduction and the out-of-distribution check do real work), taken
    in turn.
    """
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    bases = _base_images(size, rng)
    study = generate_uid()
    paths = []
    for i in range(count):
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.SOPClassUID = ComputedRadiographyImageStorage
        ds.SOPInstanceUID = generate_uid()
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, generate_uid()
        ds.PatientID, ds.AccessionNumber, ds.StudyDate = f"BENCH{i:05d}", f"B{i:06d}", "20240101"
        ds.Modality, ds.BodyPartExamined, ds.ViewPosition = "CR", "CHEST", "PA"
        ds.Rows = ds.Columns = size
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 12, 11
        ds.PixelRepresentation, ds.SamplesPerPixel = 0, 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        pixels = bases[i % len(bases)].copy()
        pixels[0, 0] = i % 4096
        pixels[0, 1] = i // 4096
        ds.PixelData = pixels.tobytes()
        path = folder / f"{seed:03d}-{i:05d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def write_config(
    work: Path, *, port: int, runtime: str, batch_size: int | None, log_level: str = "INFO"
) -> Path:
    """A config for ``serve`` with everything under ``work``; worker keys at their defaults
    unless ``batch_size`` is given."""
    worker = f"batch_size = {batch_size}\n" if batch_size else ""
    text = (
        f'[database]\nurl = "sqlite:///{work}/pacs.sqlite3"\n\n'
        f'[storage]\nroot = "{work}/dicom"\nmin_free_mb = 1\n\n'
        f'[listener]\nae_title = "{AE_TITLE}"\nhost = "127.0.0.1"\nport = {port}\n\n'
        f'[model]\ndir = "{work}/models"\nruntime = "{runtime}"\n\n'
        f"[worker]\n{worker}\n"
        "[scheduler]\nenabled = false\n\n"
        f'[logging]\nlevel = "{log_level}"\n'
    )
    path = work / "config.toml"
    path.write_text(text, encoding="utf-8")
    return path


def database_url(work: Path) -> str:
    return f"sqlite:///{work}/pacs.sqlite3"


def wait_until(predicate: Callable[[], bool], timeout_s: float, what: str) -> None:
    """Poll ``predicate`` every 0.2 s; raise TimeoutError naming ``what``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    raise TimeoutError(f"timed out after {timeout_s:.0f} s waiting for {what}")


class Serve:
    """A ``pacs-classifier serve`` subprocess with its output in a log file."""

    def __init__(self, config: Path, roles: str, log_path: Path) -> None:
        self.log_path = log_path
        cli = [sys.executable, "-m", "pacs_classifier", "--config", str(config)]
        with log_path.open("ab") as out:
            self.proc = subprocess.Popen(
                [*cli, "serve", "--roles", roles],
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=REPO,
                env=subprocess_env(),
            )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def check_alive(self) -> None:
        if self.proc.poll() is not None:
            tail = self.log_path.read_text(errors="replace")[-3000:]
            raise RuntimeError(f"serve exited with {self.proc.returncode}:\n{tail}")

    def wait_listening(self, port: int, timeout_s: float = 120) -> None:
        def up() -> bool:
            self.check_alive()
            with socket.socket() as s:
                return s.connect_ex(("127.0.0.1", port)) == 0

        wait_until(up, timeout_s, f"serve to listen on port {port}")

    def stop(self, timeout_s: float = 120) -> int:
        """SIGTERM, as an operator would; SIGKILL if it does not exit in time."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        return self.proc.wait(30)


def build_tiny_bundle(out: Path) -> Path:
    """A real InceptionV3 classifier at 75 px with random weights (plumbing speed only)."""
    import keras

    from pacs_classifier.model.bundle import write_metadata, write_model_files
    from pacs_classifier.model.metadata import BundleMetadata, Threshold
    from pacs_classifier.train.model import BaseWeights, build_base, build_classifier, cut_base

    keras.utils.set_random_seed(7)
    base = cut_base(build_base(BaseWeights.parse("none"), TINY_SIZE), "mixed10")
    model = build_classifier(base, TINY_SIZE, "symmetric")
    files = write_model_files(model, out)
    write_metadata(
        out,
        BundleMetadata(
            version="bench-tiny-75",
            created_at=utcnow(),
            image_size=TINY_SIZE,
            threshold=Threshold(value=0.5, rule="benchmark"),
            files=files,
        ),
    )
    return out


def choose_bundle(bundle: Path | None, work: Path, inception: int = 0) -> tuple[Path, str]:
    """(bundle folder, description): ``--bundle``, else a full InceptionV3 at ``inception``
    px when asked, else models/reference, else a tiny one."""
    if bundle is not None:
        return bundle, f"--bundle {bundle}"
    if inception:
        from bench_inference import build_inception_bundle

        weights = build_inception_bundle(work / "inception-bundle", inception)
        return work / "inception-bundle", f"InceptionV3 {inception}² ({weights})"
    if (REFERENCE / "metadata.json").is_file():
        return REFERENCE, "reference bundle (models/reference)"
    return build_tiny_bundle(work / "tiny-bundle"), "tiny 75 px bundle, random weights"


def prepare_database(work: Path, bundle: Path, runtime: str) -> tuple[str, int]:
    """Migrate a fresh SQLite database and register + activate ``bundle``.

    Returns the registered copy's path and its image size. The export to ONNX / int8
    (with parity) runs unless the runtime is ``keras``, as ``auto`` needs its record.
    """
    from pacs_classifier.db.migrate import upgrade
    from pacs_classifier.model.registry import register_bundle

    url = database_url(work)
    upgrade(url)
    db = Database(url)
    try:
        row = register_bundle(
            db, bundle, work / "models", actor="bench", activate=True, export=runtime != "keras"
        )
        return row.path, row.image_size
    finally:
        db.dispose()


def resolved_runtime(model_path: str, runtime: str) -> str:
    """The runtime ``auto`` resolves to for this registered bundle (as the worker loads it)."""
    if runtime != "auto":
        return runtime
    from pacs_classifier.model.bundle import read_bundle
    from pacs_classifier.model.runtime import auto_choice, read_runtimes

    return auto_choice(read_runtimes(read_bundle(model_path)))


def storescu(port: int, files: Sequence[Path], *, wait: bool = True) -> subprocess.Popen[bytes]:
    """Send ``files`` on one association with dcmtk; wait for it unless ``wait`` is False."""
    proc = subprocess.Popen(
        ["storescu", "-aet", "BENCH", "-aec", AE_TITLE, "127.0.0.1", str(port)]
        + [str(f) for f in files],
        env=subprocess_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    if wait:
        check_storescu(proc)
    return proc


def check_storescu(proc: subprocess.Popen[bytes]) -> None:
    _, err = proc.communicate(timeout=600)
    text = err.decode(errors="replace")
    if proc.returncode != 0 or "E:" in text:
        raise RuntimeError(f"storescu failed ({proc.returncode}): {text[-2000:]}")


# ---------------------------------------------------------------------- measurements


@dataclass(frozen=True)
class Timing:
    """What the database says about the measured instances."""

    count: int
    predicted: int
    first_received: float
    last_predicted: float
    latencies: list[float]

    @property
    def images_per_s(self) -> float:
        span = self.last_predicted - self.first_received
        return self.predicted / span if span > 0 else math.nan


def max_instance_id(db: Database) -> int:
    with db.session() as session:
        return int(session.scalar(select(func.max(Instance.id))) or 0)


def ended_count(db: Database, after_id: int) -> int:
    """Jobs of instances with id > ``after_id`` that have ended (a result or not)."""
    with db.session() as session:
        return int(
            session.scalar(
                select(func.count())
                .select_from(Job)
                .where(
                    Job.instance_id > after_id,
                    Job.state.in_([JobState.DONE, JobState.NOT_ASSESSED, JobState.FAILED]),
                )
            )
            or 0
        )


def unfinished_jobs(db: Database, after_id: int) -> dict[str, int]:
    """Job states other than done of the measured instances (not_assessed, failed, …)."""
    with db.session() as session:
        rows = session.execute(
            select(Job.state, func.count())
            .where(Job.instance_id > after_id, Job.state != JobState.DONE)
            .group_by(Job.state)
        ).all()
    return {str(state): int(n) for state, n in rows}


def timing(db: Database, after_id: int) -> Timing:
    """Receive → first prediction of every instance with id > ``after_id``."""
    with db.session() as session:
        rows = session.execute(
            select(Instance.received_at, func.min(Prediction.created_at))
            .outerjoin(Prediction, Prediction.instance_id == Instance.id)
            .where(Instance.id > after_id)
            .group_by(Instance.id, Instance.received_at)
        ).all()
    received = [r[0].timestamp() for r in rows]
    pairs = [(r[0].timestamp(), r[1].timestamp()) for r in rows if r[1] is not None]
    return Timing(
        count=len(rows),
        predicted=len(pairs),
        first_received=min(received) if received else math.nan,
        last_predicted=max(p for _, p in pairs) if pairs else math.nan,
        latencies=sorted(p - r for r, p in pairs),
    )


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (what a report of n values can honestly claim)."""
    if not sorted_values:
        return math.nan
    rank = max(1, math.ceil(q / 100 * len(sorted_values)))
    return sorted_values[rank - 1]


def raw_inference(
    model_path: str, runtime: str, files: Sequence[Path], batch: int, images: int, rounds: int
) -> tuple[float, float, str]:
    """(median, best) images/s of ``predict`` on batches of ``batch``, and the runtime used."""
    from pacs_classifier.model.runtime import load_predictor
    from pacs_classifier.preprocess import normalize_dataset
    from pacs_classifier.preprocess.decode import read_dataset

    predictor = load_predictor(model_path, runtime)
    size = predictor.info.image_size
    tensors = [normalize_dataset(read_dataset(f), size) for f in files[:batch]]
    pool = np.stack(tensors).astype(np.float32)
    x = np.ascontiguousarray(np.resize(pool, (images, *pool.shape[1:])), dtype=np.float32)
    predictor.predict(x[:batch])  # warm-up: tracing, allocation
    times = []
    for _ in range(rounds):
        started = time.perf_counter()
        for i in range(0, images, batch):
            predictor.predict(x[i : i + batch])
        times.append(time.perf_counter() - started)
    return images / statistics.median(times), images / min(times), type(predictor).__name__


# ---------------------------------------------------------------------- the run

#: The worker's stop line (worker.py): its counters and where its time went.
WORKER_STOPPED = re.compile(
    r"worker \S+ stopped: (\d+) done, (\d+) not assessed, (\d+) failed; in (\d+) batch\(es\) "
    r"decode ([\d.]+) thread-s, infer ([\d.]+) s, record ([\d.]+) s \((\d+) decode thread"
)
ROLE_STARTED = re.compile(r"role (\w+) (?:started|restarted) \(pid (\d+)\)")


#: Associations a steady sender keeps open at most: below the listener's default
#: ``max_associations`` (10), which refuses more with "Local Limit Exceeded".
MAX_IN_FLIGHT = 6


def send_steady(port: int, files: Sequence[Path], rate: float) -> float:
    """One association per file, started every 1/``rate`` s (later when
    :data:`MAX_IN_FLIGHT` are still open); returns the achieved rate."""
    started = time.monotonic()
    running: list[subprocess.Popen[bytes]] = []
    for i, f in enumerate(files):
        delay = started + i / rate - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        while len(running) >= MAX_IN_FLIGHT:
            check_storescu(running.pop(0))
        running.append(storescu(port, [f], wait=False))
    for proc in running:
        check_storescu(proc)
    span = time.monotonic() - started
    return len(files) / span if span > 0 else math.nan


def rss_mb(pid: int) -> float:
    """Resident memory of a process (``VmRSS``), in MB; NaN when it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return math.nan


def cpu_s(pid: int) -> float:
    """User + system CPU seconds a process has used (``/proc/PID/stat``); NaN when gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return math.nan
    # After the command name: state is field 3 of stat(5), utime 14 and stime 15.
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def children_cpu_s() -> float:
    """CPU seconds of this process's waited-for children (the ``storescu`` senders)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def role_pids(log_path: Path) -> dict[str, int]:
    """The supervisor's latest pid of each role, from its log."""
    return {r: int(p) for r, p in ROLE_STARTED.findall(log_path.read_text(errors="replace"))}


@dataclass(frozen=True)
class Stages:
    """The worker's stop line: images done and seconds per stage."""

    done: int
    batches: int
    decode_s: float
    infer_s: float
    record_s: float
    threads: int

    def per_image_ms(self, seconds: float) -> float:
        return 1000 * seconds / self.done if self.done else math.nan


def worker_stages(log_path: Path) -> Stages | None:
    found = WORKER_STOPPED.findall(log_path.read_text(errors="replace"))
    if not found:
        return None
    done, _na, _failed, batches, prep, infer, record, threads = found[-1]
    return Stages(int(done), int(batches), float(prep), float(infer), float(record), int(threads))


@dataclass(frozen=True)
class IngestOnly:
    """The listener alone: its rate and the CPU per file of it and of the sender."""

    files_per_s: float
    listener_cpu_ms: float
    sender_cpu_ms: float


def ingest_only(args: argparse.Namespace, work: Path, files: Sequence[Path]) -> IngestOnly:
    """Files/s of a listener-only ``serve`` taking ``files`` on one association."""
    from pacs_classifier.db.migrate import upgrade

    work.mkdir()
    upgrade(database_url(work))
    port = free_port()
    config = write_config(work, port=port, runtime=args.runtime, batch_size=args.batch_size)
    serve = Serve(config, "listener", work / "serve.log")
    try:
        serve.wait_listening(port)
        storescu(port, files[:2])  # first association: imports, first file
        cpu, sender = cpu_s(serve.pid), children_cpu_s()
        started = time.monotonic()
        storescu(port, files[2:])
        n = len(files) - 2
        return IngestOnly(
            n / (time.monotonic() - started),
            1000 * (cpu_s(serve.pid) - cpu) / n,
            1000 * (children_cpu_s() - sender) / n,
        )
    finally:
        serve.stop()


@dataclass
class Phase:
    """One measured load on the supervised ``serve``."""

    name: str
    send_rate: float
    timing: Timing
    #: CPU milliseconds per image of each role process and of the senders, from the first
    #: byte sent to the last job ended.
    cpu_ms: dict[str, float]


def measure(
    db: Database,
    serve: Serve,
    port: int,
    files: Sequence[Path],
    rate: float,
    name: str,
    pids: dict[str, int],
) -> Phase:
    """Send ``files`` (burst when ``rate`` is 0) and wait for their predictions."""
    cutoff = max_instance_id(db)
    cpu = {role: cpu_s(pid) for role, pid in pids.items()} | {"senders": children_cpu_s()}
    started = time.monotonic()
    if rate > 0:
        send_rate = send_steady(port, files, rate)
    else:
        storescu(port, files)
        send_rate = len(files) / (time.monotonic() - started)

    def finished() -> bool:
        serve.check_alive()
        return ended_count(db, cutoff) >= len(files)

    wait_until(finished, 120 + 5 * len(files), f"the predictions of {name}")
    after = {role: cpu_s(pid) for role, pid in pids.items()} | {"senders": children_cpu_s()}
    cpu_ms = {role: 1000 * (after[role] - cpu[role]) / len(files) for role in cpu}
    other = unfinished_jobs(db, cutoff)
    if other:
        print(f"{name}: jobs not done: {other} (see {serve.log_path})", flush=True)
    return Phase(name, send_rate, timing(db, cutoff), cpu_ms)


def reclassify_all(config: Path, db: Database) -> tuple[int, float]:
    """(instances, seconds) of ``pacs-classifier reclassify --all``, the nightly path."""
    before = max_instance_id(db)
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "pacs_classifier", "--config", str(config), "reclassify", "--all"],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=subprocess_env(),
        check=False,
    )
    seconds = time.monotonic() - started
    if done.returncode != 0:
        raise RuntimeError(f"reclassify failed: {done.stderr[-2000:]}")
    return before, seconds


def raw_decode_and_inference(
    model_path: str, runtime: str, files: Sequence[Path], batch: int
) -> tuple[float, float, float]:
    """(decode + normalise ms per image, inference ms per image, images/s of the two in
    series) over ``files``, in this process, one thread: the floor of the stored-file path."""
    from pacs_classifier.model.runtime import load_predictor
    from pacs_classifier.preprocess import normalize_dataset
    from pacs_classifier.preprocess.decode import read_dataset

    predictor = load_predictor(model_path, runtime)
    size = predictor.info.image_size
    started = time.perf_counter()
    tensors = [normalize_dataset(read_dataset(f), size) for f in files]
    decode_s = time.perf_counter() - started
    x = np.stack(tensors).astype(np.float32)
    predictor.predict(x[:batch])  # warm-up
    started = time.perf_counter()
    for i in range(0, len(x), batch):
        predictor.predict(x[i : i + batch])
    infer_s = time.perf_counter() - started
    n = len(files)
    return 1000 * decode_s / n, 1000 * infer_s / n, n / (decode_s + infer_s)


def run(args: argparse.Namespace, work: Path) -> int:
    bundle, described = choose_bundle(args.bundle, work, args.inception)
    print(f"model: {described}", flush=True)
    started = time.perf_counter()
    model_path, image_size = prepare_database(work, bundle, args.runtime)
    print(f"registered ({image_size}²) in {time.perf_counter() - started:.0f} s", flush=True)
    files = generate_chest_files(work / "send", args.count + args.warmup, args.size)
    warm, burst = files[: args.warmup], files[args.warmup :]
    batch = args.batch_size or WorkerConfig().batch_size
    print(f"before: {load_average()}", flush=True)

    alone = ingest_only(args, work / "ingest", burst)
    ingest = alone.files_per_s
    print(f"ingest only: {ingest:.1f} files/s", flush=True)
    rates = [args.rate] if args.rate > 0 else [5.0, round(0.8 * ingest, 1)]
    steady = [
        generate_chest_files(work / f"steady{n}", args.steady_count, args.size, seed=n + 1)
        for n in range(len(rates))
    ]

    port = free_port()
    config = write_config(work, port=port, runtime=args.runtime, batch_size=args.batch_size)
    db = Database(database_url(work))
    serve = Serve(config, "listener,worker", work / "serve.log")
    phases: list[Phase] = []
    rss: dict[str, tuple[float, float]] = {}
    after_load = "not measured"
    try:
        serve.wait_listening(port)
        if warm:  # the worker loads the model on its first batch: not part of the numbers
            storescu(port, warm)

            def warmed() -> bool:
                serve.check_alive()
                return ended_count(db, 0) >= len(warm)

            wait_until(warmed, 600, "the warm-up predictions")
        pids = role_pids(serve.log_path)
        first_rss = {role: rss_mb(pid) for role, pid in pids.items()}
        phases.append(measure(db, serve, port, burst, 0.0, "burst", pids))
        for rate, group in zip(rates, steady, strict=True):
            phases.append(measure(db, serve, port, group, rate, f"steady {rate:g}/s", pids))
        rss = {role: (first_rss[role], rss_mb(pid)) for role, pid in pids.items()}
        after_load = load_average()
    finally:
        code = serve.stop()
    print(f"after: {after_load}; serve exited with {code}", flush=True)
    stages = worker_stages(serve.log_path)

    with db.session() as session:
        stored = int(session.scalar(select(func.count()).select_from(Instance)) or 0)
    _, reclassify_s = reclassify_all(config, db)
    db.dispose()
    sample = burst[: min(len(burst), 64)]
    decode_ms, infer_ms, raw_series = raw_decode_and_inference(
        model_path, args.runtime, sample, batch
    )
    infer_images = batch * max(2, math.ceil(min(len(burst), 64) / batch))
    median, best, runtime_class = raw_inference(
        model_path, args.runtime, burst, batch, infer_images, args.rounds
    )
    report(
        args,
        ingest=alone,
        phases=phases,
        stages=stages,
        rss=rss,
        batch=batch,
        inference=(median, best, runtime_class),
        infer_images=infer_images,
        reclassify=(stored, reclassify_s),
        raw=(decode_ms, infer_ms, raw_series),
    )
    return 0 if all(p.timing.predicted == p.timing.count for p in phases) else 1


def report(
    args: argparse.Namespace,
    *,
    ingest: IngestOnly,
    phases: Sequence[Phase],
    stages: Stages | None,
    rss: dict[str, tuple[float, float]],
    batch: int,
    inference: tuple[float, float, str],
    infer_images: int,
    reclassify: tuple[int, float],
    raw: tuple[float, float, float],
) -> None:
    median, best, runtime_class = inference
    burst = phases[0].timing
    burst_cpu = phases[0].cpu_ms
    cores = len(os.sched_getaffinity(0))
    total_cpu = sum(burst_cpu.values())
    rate = ingest.files_per_s
    rows = [
        (
            "images (size)",
            f"{burst.count} burst + {args.steady_count} per steady rate ({args.size}²)",
        ),
        ("runtime", f"{args.runtime} → {runtime_class}, batch_size {batch}"),
        ("ingest only (listener alone, storescu, one association)", f"{rate:.1f} files/s"),
        (
            "end to end, burst (first receive → last prediction)",
            f"{burst.images_per_s:.1f} images/s",
        ),
        ("end to end / ingest only", f"{burst.images_per_s / rate:.2f}"),
        (
            "CPU per file, ingest only: listener / storescu",
            f"{ingest.listener_cpu_ms:.0f} / {ingest.sender_cpu_ms:.0f} ms",
        ),
        (
            "CPU per image, burst: " + " / ".join(burst_cpu) + " = total",
            " / ".join(f"{v:.0f}" for v in burst_cpu.values()) + f" = {total_cpu:.0f} ms",
        ),
        (
            f"end to end that total allows on {cores} cores (cores × 1000 / total)",
            f"{cores * 1000 / total_cpu:.1f} images/s",
        ),
    ]
    for p in phases:
        lat = p.timing.latencies
        rows.append(
            (
                f"receive → result p50 / p95 / max, {p.name} (sent at {p.send_rate:.1f}/s)",
                f"{percentile(lat, 50):.2f} / {percentile(lat, 95):.2f} / "
                f"{(lat[-1] if lat else math.nan):.2f} s",
            )
        )
    if stages is not None:
        rows += [
            ("listener, per file (1 / ingest only)", f"{1000 / rate:.0f} ms"),
            (
                f"worker decode + normalise per image (per thread; {stages.threads} threads)",
                f"{stages.per_image_ms(stages.decode_s):.0f} ms",
            ),
            ("worker inference per image", f"{stages.per_image_ms(stages.infer_s):.0f} ms"),
            ("worker record per image", f"{stages.per_image_ms(stages.record_s):.1f} ms"),
            (
                "worker batches (mean size)",
                f"{stages.batches} ({stages.done / max(stages.batches, 1):.1f})",
            ),
        ]
    for role, (first, last) in sorted(rss.items()):
        rows.append(
            (f"RSS of the {role} process, after warm-up → end", f"{first:.0f} → {last:.0f} MB")
        )
    stored, seconds = reclassify
    decode_ms, infer_ms, raw_series = raw
    rows += [
        (
            "raw inference, same model and runtime",
            f"{median:.1f} images/s (best {best:.1f}; {infer_images} images × {args.rounds})",
        ),
        ("end to end / raw inference", f"{burst.images_per_s / median:.2f}"),
        (
            f"reclassify --all over the {stored} stored files (process start included)",
            f"{stored / seconds:.1f} images/s ({seconds:.1f} s)",
        ),
        (
            "raw decode + normalise, then inference, one thread, same files",
            f"{raw_series:.1f} images/s ({decode_ms:.0f} + {infer_ms:.0f} ms per image)",
        ),
    ]
    width = max(len(k) for k, _ in rows)
    print()
    print(f"| {'measure':<{width}} | value |")
    print(f"| {'-' * width} | --- |")
    for key, value in rows:
        print(f"| {key:<{width}} | {value} |")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--count", type=int, default=300, help="images of the burst")
    parser.add_argument("--warmup", type=int, default=4, help="images sent before measuring")
    parser.add_argument(
        "--rate",
        type=float,
        default=0.0,
        help="one steady rate (images/s, one association each) instead of 5/s and 80 %% "
        "of the ingest-only rate",
    )
    parser.add_argument(
        "--steady-count", type=int, default=60, help="images sent at each steady rate"
    )
    parser.add_argument(
        "--runtime", default="auto", choices=("auto", "keras", "onnx", "tflite-int8")
    )
    parser.add_argument("--size", type=int, default=2048, help="rows = columns of each image")
    parser.add_argument("--bundle", type=Path, help="model bundle (default: models/reference)")
    parser.add_argument(
        "--inception",
        type=int,
        default=0,
        metavar="PX",
        help="instead of models/reference: the full InceptionV3 at PX² (ImageNet base "
        "weights from ../shared/weights, random head), as bench_inference builds it",
    )
    parser.add_argument("--batch-size", type=int, help="worker batch_size (default: config's)")
    parser.add_argument("--rounds", type=int, default=3, help="raw inference rounds")
    parser.add_argument("--keep", action="store_true", help="keep the work folder")
    args = parser.parse_args(argv)
    if args.size < 256:
        parser.error(
            f"--size must be at least 256 (eligibility's min_short_side_px); got {args.size}"
        )
    logging.basicConfig(level=logging.WARNING)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # before TensorFlow is imported
    print(f"machine: {machine()}; {load_average()}")
    if args.keep:
        work = Path(tempfile.mkdtemp(prefix="bench-pipeline-"))
        print(f"work folder: {work}")
        return run(args, work)
    with tempfile.TemporaryDirectory(prefix="bench-pipeline-") as tmp:
        return run(args, Path(tmp))


if __name__ == "__main__":
    raise SystemExit(main())
