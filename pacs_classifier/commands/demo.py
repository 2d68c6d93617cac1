"""``demo``: the whole path end to end on this machine, in a few minutes (SPEC §8).

1. trains a small model with the project's trainer on the sample shipped in
   ``pacs_classifier/demo_data/train`` (40 images) and registers it: a head on the frozen
   features of a middle InceptionV3 block (``--base-cut``), no fine-tuning: what 40 images
   can teach in a minute. The full-depth two-phase run it replaced took twice as long and
   scored validation AUC 0.24-0.44, worse than chance (issue #11; docs/benchmarks.md);
2. registers and activates the reference model (``models/reference``, shipped in the
   package as ``reference_model``) when it is there, otherwise activates the small model;
3. starts the daemon (listener and worker roles) on a free local port with SQLite in a
   temporary folder;
4. wraps the images of ``demo_data/incoming`` as CR chest DICOM files, adds the real DICOM
   samples of ``../shared/data/dicom`` when that folder is there, and sends them all over a
   real DICOM association (C-STORE);
5. waits for their results and prints them (file, SOP Instance UID, label, probability,
   beside the threshold that decides the label) and the reports;
6. renders the DICOM SR of each result and a Grad-CAM overlay of each PNEUMONIA result,
   sends them by C-STORE to a stand-in PACS (a Storage SCP in this process, ``DEMO_PACS``)
   and prints where each one went.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import socket
import tempfile
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pacs_classifier import REFERENCE_MODEL_DIR
from pacs_classifier.errors import PacsClassifierError, PermanentError

ORDER = 90

log = logging.getLogger(__name__)

PACKAGE_DIR = Path(__file__).resolve().parents[1]
DEMO_DATA = PACKAGE_DIR / "demo_data"
REPO_DIR = PACKAGE_DIR.parent
CR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.1"
CALLING_AE = "DEMO_SCU"
#: The stand-in PACS the demo sends its SRs and overlays to.
DEMO_PACS = "DEMO_PACS"
#: The shipped sample is 224 px; the default eligibility asks for 256 on the short side.
DEMO_MIN_SHORT_SIDE = 224


#: Where the small model's base is cut (see the module's docstring and docs/benchmarks.md).
DEMO_BASE_CUT = "mixed5"


@dataclass(frozen=True)
class DemoOptions:
    workdir: Path
    image_size: int
    epochs: int
    weights: str
    shared: Path | None
    base_cut: str = DEMO_BASE_CUT


def register(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser(
        "demo", help="train a small model, run the daemon, send DICOM files, print reports"
    )
    p.add_argument("--workdir", type=Path, help="keep everything here (default: a temp folder)")
    p.add_argument(
        "--keep", action="store_true", help="keep the temp folder (database, files, models)"
    )
    p.add_argument("--image-size", type=int, default=96, help="small model input size")
    p.add_argument("--epochs", type=int, default=15, help="epochs of the small model's head")
    p.add_argument(
        "--base-cut",
        default=DEMO_BASE_CUT,
        help=f"InceptionV3 block the small model's head sits on (default {DEMO_BASE_CUT})",
    )
    p.add_argument(
        "--weights",
        default="auto",
        help="base weights: auto (../shared's InceptionV3 file if present, else none), "
        "imagenet, none or a file",
    )
    p.set_defaults(func=run_demo)


def run_demo(args: argparse.Namespace) -> int:
    import pydicom  # noqa: F401 - both reset their loggers' levels on import: import first
    import pynetdicom  # noqa: F401

    # The demo prints its own account of each step (TensorFlow's is kept out by
    # pacs_classifier.logs for every command); keep the libraries' and roles' lines out.
    for name, level in (
        ("alembic", logging.WARNING),
        ("pynetdicom", logging.ERROR),
        ("pydicom", logging.ERROR),
        ("pacs_classifier.receive", logging.WARNING),
        ("pacs_classifier.preprocess", logging.ERROR),
        ("pacs_classifier.store", logging.ERROR),
        ("pacs_classifier.model", logging.WARNING),
        ("pacs_classifier.worker", logging.WARNING),
        ("pacs_classifier.train", logging.WARNING),
        ("pacs_classifier.results", logging.WARNING),  # the demo prints where each went
    ):
        logging.getLogger(name).setLevel(level)
    keep = args.keep or args.workdir is not None
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="pacs-demo-"))
    workdir.mkdir(parents=True, exist_ok=True)
    shared = _shared_dir()
    weights = args.weights
    if weights == "auto":
        candidate = shared / "weights" / "inception_v3_notop.weights.h5" if shared else None
        weights = str(candidate) if candidate and candidate.is_file() else "none"
    opts = DemoOptions(
        workdir.resolve(), args.image_size, args.epochs, weights, shared, args.base_cut
    )
    try:
        Demo(opts).run()
    finally:
        if keep:
            print(f"\neverything is kept in {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    return 0


def _shared_dir() -> Path | None:
    env = os.environ.get("PACS_CLASSIFIER_SHARED")
    candidate = Path(env) if env else REPO_DIR.parent / "shared"
    return candidate if (candidate / "data").is_dir() else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _say(text: str) -> None:
    print(f"\n== {text}", flush=True)


class Demo:
    """The demo's steps, in order; each prints what it did."""

    def __init__(self, opts: DemoOptions) -> None:
        from pacs_classifier.config import config_from_mapping

        self.opts = opts
        #: SOP Instance UID -> the name of the file it was sent from.
        self.sent: dict[str, str] = {}
        w = opts.workdir
        self.pacs_port = _free_port()
        self.config = config_from_mapping(
            {
                "database": {"url": f"sqlite:///{w / 'demo.sqlite3'}"},
                "storage": {"root": str(w / "dicom"), "min_free_mb": 50},
                "model": {"dir": str(w / "models")},
                "listener": {"port": _free_port(), "ae_title": "PNEUMONIA_AI"},
                "eligibility": {"min_short_side_px": DEMO_MIN_SHORT_SIDE},
                "worker": {"batch_size": 8, "max_batch_wait_ms": 200, "poll_interval_ms": 100},
                "scheduler": {"enabled": False},
                "results": {"sc_overlay": "positives", "retry_backoff_s": 1},
                "destinations": [
                    {"ae_title": DEMO_PACS, "host": "127.0.0.1", "port": self.pacs_port}
                ],
            },
            base_dir=w,
        )

    def run(self) -> None:
        from pacs_classifier.db import migrate
        from pacs_classifier.wiring import App

        started = time.monotonic()
        _say(f"database: {self.config.database_url}")
        migrate.upgrade(self.config.database_url)
        with App(self.config) as app:
            bundle = self.train()
            active = self.register(app, bundle)
            files = self.make_dicoms()
            stop = self.start_daemon(app)
            try:
                sent = self.send(files)
                self.wait(app, sent)
            finally:
                stop()
            self.print_reports(app)
            self.send_results(app)
            _say(f"demo finished in {time.monotonic() - started:.0f} s (active model {active})")

    # ------------------------------------------------------------------ steps

    def train(self) -> Path:
        from pacs_classifier.train.trainer import TrainOptions, train

        o = self.opts
        weights_name = Path(o.weights).name if o.weights not in ("none", "imagenet") else o.weights
        _say(
            f"training a small model on {DEMO_DATA / 'train'} (40 images, {o.image_size} px): "
            f"a head on the frozen base cut at {o.base_cut}, {o.epochs} epochs, "
            f"base weights {weights_name}"
        )
        t0 = time.monotonic()
        result = train(
            TrainOptions(
                data=DEMO_DATA / "train",
                out=o.workdir / "trained",
                weights=o.weights,
                image_size=o.image_size,
                epochs_frozen=o.epochs,
                epochs_finetune=0,
                base_cut=o.base_cut,
                lr_frozen=3e-3,
                batch_size=16,
                val_fraction=0.25,
                version=f"demo-{datetime.now(UTC):%Y%m%d-%H%M%S}",
                progress=False,
            )
        )
        final = result.final
        auc = final.auc if final.auc is not None else float("nan")
        print(
            f"trained {result.version} in {time.monotonic() - t0:.0f} s -> {result.out}\n"
            f"validation AUC {auc:.2f} on {final.n if final.n is not None else '?'} "
            "held-out images (a handful: this shows the path, it measures nothing)"
        )
        return result.out

    def register(self, app: Any, bundle: Path) -> str:
        from pacs_classifier.model.registry import register_bundle

        has_reference = (REFERENCE_MODEL_DIR / "metadata.json").is_file()
        small = register_bundle(
            app.db, bundle, self.config.model_dir, actor="demo", activate=not has_reference
        )
        print(f"registered {small.version}")
        if not has_reference:
            print(f"no reference model at {REFERENCE_MODEL_DIR}: the small model is active")
            return small.version
        ref = register_bundle(
            app.db, REFERENCE_MODEL_DIR, self.config.model_dir, actor="demo", activate=True
        )
        print(f"registered and activated the reference model {ref.version}")
        return ref.version

    def make_dicoms(self) -> list[Path]:
        out = self.opts.workdir / "outgoing"
        out.mkdir(exist_ok=True)
        files = [
            wrap_as_cr(jpeg, out / f"{jpeg.stem}.dcm", n)
            for n, jpeg in enumerate(sorted((DEMO_DATA / "incoming").glob("*.jpeg")))
        ]
        print(f"wrapped {len(files)} sample images as CR chest DICOM files")
        if self.opts.shared is not None and (self.opts.shared / "data" / "dicom").is_dir():
            real = sorted((self.opts.shared / "data" / "dicom").glob("*.dcm"))
            files += real
            print(f"plus {len(real)} real DICOM files from {self.opts.shared / 'data' / 'dicom'}")
        return files

    def start_daemon(self, app: Any) -> Any:
        from pacs_classifier.commands._roles import start_listener, start_worker

        stop_listener = start_listener(app)
        stop_worker = start_worker(app)
        host, port = app.running_listener.address
        _say(f"daemon listening as {self.config.listener.ae_title} on {host}:{port}")

        def stop() -> None:
            stop_worker()
            stop_listener()

        return stop

    def send(self, files: list[Path]) -> int:
        """One association, one C-STORE per file; returns how many were accepted."""
        from pynetdicom import AE

        from pacs_classifier.preprocess.decode import read_dataset

        datasets = [read_dataset(f) for f in files]
        ae = AE(ae_title=CALLING_AE)
        contexts = sorted(
            {(str(d.SOPClassUID), str(d.file_meta.TransferSyntaxUID)) for d in datasets}
        )
        for sop_class, syntax in contexts:
            ae.add_requested_context(sop_class, syntax)
        listener = self.config.listener
        _say(
            f"sending {len(files)} files over one association ({CALLING_AE} -> {listener.ae_title})"
        )
        assoc = ae.associate("127.0.0.1", listener.port, ae_title=listener.ae_title)
        if not assoc.is_established:
            raise PermanentError("the demo daemon refused the association")
        accepted = 0
        try:
            for path, ds in zip(files, datasets, strict=True):
                self.sent[str(ds.SOPInstanceUID)] = path.name
                status = assoc.send_c_store(ds)
                code = int(status.Status) if status else -1
                accepted += code == 0
                print(f"  C-STORE {path.name}: status 0x{code & 0xFFFF:04X}")
        finally:
            assoc.release()
        return accepted

    def wait(self, app: Any, sent: int, timeout_s: float = 600) -> None:
        from sqlalchemy import func, select

        from pacs_classifier.db.models import Job
        from pacs_classifier.queue.jobs import OPEN_STATES

        _say("waiting for the results")
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with app.db.session() as session:
                total = session.scalar(select(func.count()).select_from(Job)) or 0
                open_jobs = session.scalar(
                    select(func.count()).select_from(Job).where(Job.state.in_(OPEN_STATES))
                )
            if total >= sent and not open_jobs:
                print(f"all {total} jobs ended")
                return
            time.sleep(0.5)
        raise PacsClassifierError(f"results not ready after {timeout_s:.0f} s")

    def print_reports(self, app: Any) -> None:
        from sqlalchemy import text

        from pacs_classifier.report import queries
        from pacs_classifier.times import format_sql_time

        with app.db.session() as session:
            latest = session.execute(
                text(
                    "SELECT sop_instance_uid, label, probability, threshold, model_version, "
                    "classified_at FROM v_latest_predictions ORDER BY instance_id"
                )
            ).all()
            rows = queries.Result(
                ["file", "sop_instance_uid", "label", "probability", "classified_at"],
                [
                    (
                        self.sent.get(uid, "?"),
                        uid,
                        label,
                        f"{probability:.3f}",
                        format_sql_time(str(at), "seconds"),
                    )
                    for uid, label, probability, _, _, at in latest
                ],
            )
            _say("v_latest_predictions (one row per classified instance)")
            for threshold, version in sorted({(r[3], r[4]) for r in latest}):
                print(
                    f"model {version}: PNEUMONIA when probability >= threshold "
                    f"{threshold:.3f} (chosen on validation data), else NORMAL"
                )
            print(queries.render(rows, "table"))
            study = session.execute(
                text("SELECT study_instance_uid FROM instances ORDER BY id LIMIT 1")
            ).scalar_one_or_none()
            for name in ("daily_volume", "turnaround", "unclassified", "audit_trail"):
                report = queries.get(name)
                _say(f"report {name}: {report.title}")
                result = queries.run(session, report, study=study)
                print(queries.render(result, "table"))

    def send_results(self, app: Any) -> None:
        """Render SRs and overlays, send them to a stand-in PACS, say where they went."""
        from pynetdicom import AE, evt
        from sqlalchemy import select

        from pacs_classifier.db.models import Instance, ResultObject, SendJob
        from pacs_classifier.results.outbound import COMPREHENSIVE_3D_SR, SECONDARY_CAPTURE

        inbox = self.opts.workdir / "pacs"
        inbox.mkdir(exist_ok=True)

        def on_store(event: Any) -> int:
            ds = event.dataset
            ds.file_meta = event.file_meta
            ds.save_as(inbox / f"{ds.SOPInstanceUID}.dcm", enforce_file_format=True)
            return 0x0000

        ae = AE(ae_title=DEMO_PACS)
        ae.add_supported_context(COMPREHENSIVE_3D_SR)
        ae.add_supported_context(SECONDARY_CAPTURE)
        server = ae.start_server(
            ("127.0.0.1", self.pacs_port),
            block=False,
            evt_handlers=[(evt.EVT_C_STORE, on_store)],
        )
        if server is None:  # pragma: no cover - block=False always returns the server
            raise PermanentError("the stand-in PACS did not start")
        _say(
            f"results back to the PACS: SRs and overlays to {DEMO_PACS}@127.0.0.1:{self.pacs_port}"
        )
        try:
            app.results_worker().drain(timeout_s=600)
        finally:
            server.shutdown()
        with app.db.session() as session:
            rows = session.execute(
                select(Instance.accession_number, ResultObject, SendJob.state, SendJob.destination)
                .join(ResultObject, ResultObject.instance_id == Instance.id)
                .outerjoin(SendJob, SendJob.object_id == ResultObject.id)
                .order_by(ResultObject.id)
            ).all()
        root = self.config.storage_root
        for accession, obj, state, destination in rows:
            kept = root / obj.file_path if obj.file_path else None
            where = f"{destination} ({state})" if destination else "not sent"
            print(f"  {accession or '-':<12} {obj.kind.upper()}  {where}  kept at {kept}")
            if obj.kind == "sc" and kept is not None:
                print(f"  {'':<12}     overlay picture {kept.with_suffix('.png')}")
        print(f"the stand-in PACS received {len(list(inbox.glob('*.dcm')))} objects in {inbox}")


def wrap_as_cr(jpeg: Path, out: Path, n: int) -> Path:
    """An 8-bit grey CR chest PA data set around a JPEG's pixels (what a digitiser sends)."""
    import numpy as np
    from PIL import Image
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import UID, ExplicitVRLittleEndian, generate_uid

    pixels = np.asarray(Image.open(jpeg).convert("L"), dtype=np.uint8)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(CR_IMAGE_STORAGE)
    sop_instance_uid = generate_uid()
    meta.MediaStorageSOPInstanceUID = sop_instance_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = CR_IMAGE_STORAGE
    ds.SOPInstanceUID = sop_instance_uid
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.PatientID = f"DEMO{n:04d}"
    ds.AccessionNumber = f"DEMOACC{n:04d}"
    ds.StudyDate = datetime.now(UTC).strftime("%Y%m%d")
    ds.Modality = "CR"
    ds.BodyPartExamined = "CHEST"
    ds.ViewPosition = "PA"
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 8
    ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    ds.PixelData = pixels.tobytes()
    ds.save_as(out, enforce_file_format=True)
    return out
