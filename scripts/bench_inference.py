"""Benchmark: images/s of each serving runtime, against Keras ``model.predict``, in one run.

For each model the bundle is exported exactly as registration does it
(``infer.export.export_runtimes``: ONNX float32 and dynamic-range int8 TFLite, with their
parity check), then each runtime classifies the same images, one ``predict`` call per
batch, as the worker does:

- ``model.predict``: Keras's own loop (the baseline every ratio is against);
- ``tf.function``: the fixed-signature function the ``keras`` runtime serves;
- ``onnx``: ONNX Runtime, float32, one thread per core;
- ``tflite-int8``: LiteRT with XNNPACK, dynamic-range int8 weights.

Models: InceptionV3 at 299² with the ImageNet base weights from
``../shared/weights/inception_v3_notop.weights.h5`` when present (random otherwise: the
speed is the same) and the classifier head on top; and the bundle at ``models/reference``
(224², the trained model, parity on its validation split) when it exists. Run:

    nice -n 10 .venv/bin/python scripts/bench_inference.py [--images 48 --rounds 3]
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from pacs_classifier.db.models import utcnow
from pacs_classifier.model.bundle import read_bundle, write_metadata, write_model_files
from pacs_classifier.model.export import export_runtimes, parity_inputs
from pacs_classifier.model.metadata import BundleMetadata, Threshold
from pacs_classifier.model.runtime import (
    EXPORTED_FILES,
    KerasPredictor,
    OnnxPredictor,
    TfliteInt8Predictor,
    read_verified,
)

REPO = Path(__file__).resolve().parents[1]
WEIGHTS = REPO.parent / "shared" / "weights" / "inception_v3_notop.weights.h5"
REFERENCE = REPO / "models" / "reference"
RUNTIMES = ("model.predict", "tf.function", "onnx", "tflite-int8")

Batch = npt.NDArray[np.float32]


def build_inception_bundle(out: Path, size: int = 299) -> str:
    """A bundle of InceptionV3 (full base, mixed10) + the classifier head at ``size``."""
    import keras

    from pacs_classifier.train.model import BaseWeights, build_base, build_classifier

    keras.utils.set_random_seed(0)
    setting = str(WEIGHTS) if WEIGHTS.is_file() else "none"
    model = build_classifier(build_base(BaseWeights.parse(setting), size), size, "symmetric")
    files = write_model_files(model, out)
    write_metadata(
        out,
        BundleMetadata(
            version=f"bench-inception-{size}",
            created_at=utcnow(),
            image_size=size,
            threshold=Threshold(value=0.5, rule="benchmark"),
            files=files,
        ),
    )
    return "ImageNet base weights + random head" if setting != "none" else "random weights"


def rate(fn: Callable[[Batch], Any], x: Batch, batch: int, rounds: int) -> tuple[float, float]:
    """(median, best) images/s over ``rounds`` passes of ``x`` in batches of ``batch``."""
    fn(x[:batch])  # warm-up: tracing, interpreter resize, Keras's own set-up
    times = []
    for _ in range(rounds):
        started = time.perf_counter()
        for i in range(0, len(x), batch):
            fn(x[i : i + batch])
        times.append(time.perf_counter() - started)
    return len(x) / statistics.median(times), len(x) / min(times)


def bench_bundle(
    label: str, path: Path, batches: Sequence[int], images: int, rounds: int, max_images: int
) -> list[str]:
    started = time.perf_counter()
    record = export_runtimes(path, max_images=max_images, force=True)
    print(f"\n## {label}: exported in {time.perf_counter() - started:.0f} s")
    print(f"parity inputs: {record['parity_inputs']}")
    for name, entry in record["runtimes"].items():
        print(f"  {name}: usable={entry['usable']} parity={entry.get('parity') or entry['error']}")
    info = read_bundle(path)
    keras_pred = KerasPredictor(info)
    model = keras_pred.model
    fns: dict[str, Callable[[Batch], Any]] = {
        "model.predict": lambda xb: model.predict(xb, batch_size=len(xb), verbose=0),
        "tf.function": keras_pred.predict,
    }
    classes: dict[str, type[OnnxPredictor] | type[TfliteInt8Predictor]] = {
        "onnx": OnnxPredictor,
        "tflite-int8": TfliteInt8Predictor,
    }
    for name, cls in classes.items():
        entry = record["runtimes"][name]
        if "sha256" in entry:  # timed even when parity refused it, and said so
            data = read_verified(path / EXPORTED_FILES[name], entry["sha256"])
            fns[name] = cls(info, data).predict
    pool = parity_inputs(info, images).x
    x = np.ascontiguousarray(np.resize(pool, (images, *pool.shape[1:])), dtype=np.float32)
    rows = []
    for batch in batches:
        base = None
        for name in RUNTIMES:
            if name not in fns:
                rows.append(f"| {label} | {batch} | {name} | export failed | | |")
                continue
            median, best = rate(fns[name], x, batch, rounds)
            base = base or median
            refused = name in classes and not record["runtimes"][name]["usable"]
            note = " (failed parity)" if refused else ""
            rows.append(
                f"| {label} | {batch} | {name}{note} | {median:.1f} | {best:.1f} "
                f"| {median / base:.2f}× |"
            )
            print(rows[-1], flush=True)
    return rows


def load() -> str:
    one, five, fifteen = os.getloadavg()
    return f"load average {one:.2f}, {five:.2f}, {fifteen:.2f}"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 16])
    parser.add_argument("--images", type=int, default=48, help="images per timed round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max-images", type=int, default=300, help="parity images (export)")
    parser.add_argument("--size", type=int, default=299, help="InceptionV3 input size")
    parser.add_argument("--reference", type=Path, default=REFERENCE)
    parser.add_argument("--skip-inception", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    import onnxruntime
    import tensorflow as tf

    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"{_cpu_model()}; tensorflow {tf.__version__}, onnxruntime {onnxruntime.__version__}"
    )
    print(f"before: {load()}")
    rows = [
        "| model | batch | runtime | images/s (median) | best | vs model.predict |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    with tempfile.TemporaryDirectory(prefix="bench-inference-") as tmp:
        if not args.skip_inception:
            folder = Path(tmp) / "inception"
            weights = build_inception_bundle(folder, args.size)
            rows += bench_bundle(
                f"InceptionV3 {args.size}² ({weights})",
                folder,
                args.batches,
                args.images,
                args.rounds,
                args.max_images,
            )
        if (args.reference / "metadata.json").is_file():
            copy = Path(tmp) / "reference"  # the export writes into the folder: not the lead's
            shutil.copytree(args.reference, copy)
            size = read_bundle(copy).image_size
            rows += bench_bundle(
                f"reference bundle {size}²",
                copy,
                args.batches,
                args.images,
                args.rounds,
                args.max_images,
            )
        else:
            print(f"\n{args.reference}: no bundle there, skipped")
    print(f"after: {load()}\n")
    print("\n".join(rows))
    return 0


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"


if __name__ == "__main__":
    raise SystemExit(main())
