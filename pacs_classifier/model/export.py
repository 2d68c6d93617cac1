"""Export a registered bundle to faster runtimes, each admitted only by a parity check.

At registration the Keras model (with the pooled features as its second output, see
:func:`pacs_classifier.model.runtime.with_features`) is converted to

- ``model.onnx``: ONNX Runtime, float32 (tf2onnx);
- ``model.int8.tflite``: LiteRT/TFLite with int8 weights (TensorFlow's converter, from a
  SavedModel of the same model): dynamic-range quantisation first; when that fails its
  parity check, static quantisation (weights and activations, calibrated on up to
  ``STATIC_CALIBRATION_IMAGES`` *training* images of the bundle's split, never on the
  parity images); the record says which (``quantisation``).

Each file is run on validation inputs beside the Keras model, and recorded as usable only
when it serves the probabilities that were evaluated:

- every runtime: max |Δprobability| against Keras ≤ its bound (calibrated probabilities,
  as served): ``MAX_FLOAT32_DELTA`` (1e-3) for ONNX, ``MAX_PROBABILITY_DELTA`` (0.02) for
  int8;
- int8 also: identical labels (at the bundle's threshold) on ≥ 99.5 % of the images and
  AUC within 0.002 of Keras's.

When the bundle has an out-of-distribution check (``ood.npz``), the record also compares
each runtime's OOD scores with Keras's on the parity inputs and on the synthetic set, for
information (``ood``): the check's threshold was set on Keras's features.

Parity inputs are the bundle's validation images: the ``val`` entries of ``split.json``,
relative to the dataset root the caller gives (``data_root``: ``model register --data DIR``
or ``[model] data_root``; the folder recorded in ``metadata.json`` is informational and
never read), normalised with ``normalize_file``, at most ``max_images`` spread evenly over
the sorted list. Without them, :func:`synthetic_inputs` is used, with a warning saying
why: its AUC is then taken against Keras's own labels (so Keras's AUC is 1 and the check
asks whether int8 ranks the images on the same side of the threshold); when Keras gives
one label only, the AUC is undefined and recorded as such.

The numbers, each file's SHA-256, and the images/s each runtime reached on the parity
inputs (batches of 8, after one warm-up batch) go to ``runtimes.json``; ``metadata.json``
is not touched, since its checksums identify the bundle. A failed export or parity check
is logged and recorded (``usable: false`` with the reason), never raised: registration
goes on with Keras, and a runtime that is not usable is never served.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from pacs_classifier.errors import ModelError, NotAssessable
from pacs_classifier.model.bundle import BundleInfo, read_bundle, sha256_file, split_images
from pacs_classifier.model.metrics import roc_auc
from pacs_classifier.model.ood import OodModel, read_ood
from pacs_classifier.model.runtime import (
    EXPORTED_FILES,
    MAX_PROBABILITY_DELTA,
    RUNTIMES_FILE,
    RUNTIMES_FORMAT,
    Inference,
    KerasPredictor,
    Predictor,
    auto_choice,
    default_threads,
    read_runtimes,
    read_verified,
    refusal,
)

log = logging.getLogger(__name__)

MAX_FLOAT32_DELTA = 1e-3
MIN_INT8_LABEL_AGREEMENT = 0.995
#: Training images that calibrate static int8 quantisation's activation ranges.
STATIC_CALIBRATION_IMAGES = 200
MAX_INT8_AUC_DELTA = 0.002
ONNX_OPSET = 17
SPEED_BATCH = 8
SYNTHETIC_DESCRIPTION = (
    "numpy default_rng(0), 32 grey images (one value in all 3 channels, as normalize_file "
    "gives), in [-1, 1]: 8 uniform noise, 8 blocky low-frequency noise, 8 linear ramps, "
    "8 two dark ellipses ('lungs') on a lighter noisy field"
)


@dataclass(frozen=True)
class ParityInputs:
    """Normalised images for the parity check, with true labels when they are known."""

    x: npt.NDArray[np.float32]
    labels: npt.NDArray[np.int64] | None
    source: dict[str, Any]


def export_runtimes(
    bundle: str | Path | BundleInfo,
    *,
    max_images: int = 300,
    runtimes: Sequence[str] = tuple(EXPORTED_FILES),
    threads: int | None = None,
    force: bool = False,
    data_root: Path | None = None,
    static_int8: bool = False,
) -> dict[str, Any]:
    """Export, check and record the faster runtimes of a (registered) bundle folder.

    ``static_int8``: when dynamic-range int8 fails its parity check, also try static int8
    (activations calibrated on training images under ``data_root``). Off by default: it
    costs minutes, and for the reference model it is further off than dynamic-range
    (max |Δp| 0.95 against 0.065, docs/benchmarks.md), since the equalisation layer does
    not survive 8-bit activations.

    ``data_root`` is the labelled dataset the bundle's ``split.json`` is relative to; its
    validation images are the parity inputs (synthetic ones without it). Returns the record
    written to ``runtimes.json``. An up-to-date record whose files still match their
    checksums is kept as it is unless ``force``.
    """
    info = bundle if isinstance(bundle, BundleInfo) else read_bundle(bundle)
    unknown = sorted(set(runtimes) - set(EXPORTED_FILES))
    if unknown:
        raise ModelError(f"cannot export runtime(s) {', '.join(unknown)}")
    if not force and (kept := _current_record(info, runtimes)) is not None:
        log.info("runtimes of %s already exported and intact", info.version)
        return kept
    log.info(
        "exporting %s to %s (each is checked against Keras; a minute or two)",
        info.version,
        ", ".join(runtimes),
    )
    keras_pred = KerasPredictor(info)
    inputs = parity_inputs(info, max_images, data_root=data_root)
    log.info("Keras reference on %d parity images", len(inputs.x))
    ref, keras_speed = _timed_predict(keras_pred, inputs.x)
    check = _ParityCheck(
        info, inputs, ref, _ood_reference(info, keras_pred, ref), threads, data_root, static_int8
    )
    record: dict[str, Any] = {
        "format": RUNTIMES_FORMAT,
        "bundle_sha256": info.sha256,
        "version": info.version,
        "created_at": datetime.now(UTC).isoformat(),
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "threads": threads or default_threads(),
        },
        "parity_inputs": inputs.source,
        "criteria": {
            "onnx": {"max_abs_delta_probability": MAX_FLOAT32_DELTA},
            "tflite-int8": {
                "max_abs_delta_probability": MAX_PROBABILITY_DELTA,
                "min_label_agreement": MIN_INT8_LABEL_AGREEMENT,
                "max_auc_delta": MAX_INT8_AUC_DELTA,
            },
        },
        "keras": {"images_per_s": keras_speed},
        "runtimes": {},
    }
    for name in runtimes:
        record["runtimes"][name] = _export_and_check(name, keras_pred.model, check)
    record["auto"] = auto_choice(record)
    _write_atomic(info.path / RUNTIMES_FILE, json.dumps(record, indent=2, sort_keys=True) + "\n")
    log.info(
        "runtimes of %s: %s; auto serves %s",
        info.version,
        ", ".join(
            f"{n} {'ok' if e['usable'] else 'refused'}" for n, e in record["runtimes"].items()
        ),
        record["auto"],
    )
    return record


def parity_inputs(
    info: BundleInfo, max_images: int = 300, *, data_root: Path | None = None
) -> ParityInputs:
    """The bundle's validation images under ``data_root`` when they can be read, else the
    synthetic set."""
    files, why = _validation_files(info, data_root)
    if files:
        picked = _spread(files, max_images)
        x, labels, skipped = _normalise(picked, info.image_size)
        if len(x) and len(set(labels)) == 2:
            return ParityInputs(
                np.stack(x),
                np.asarray(labels, dtype=np.int64),
                {
                    "source": "validation",
                    "data_root": str(data_root),
                    "val_images": len(files),
                    "max_images": max_images,
                    "count": len(x),
                    "skipped": skipped,
                },
            )
        why = f"{len(x)} readable validation images, not both classes"
    log.warning("parity check of %s on synthetic inputs: %s", info.version, why)
    x_syn = synthetic_inputs(info.image_size)
    return ParityInputs(
        x_syn,
        None,
        {
            "source": "synthetic",
            "why": why,
            "description": SYNTHETIC_DESCRIPTION,
            "count": len(x_syn),
        },
    )


def synthetic_inputs(size: int, seed: int = 0) -> npt.NDArray[np.float32]:
    """The documented fallback set (see ``SYNTHETIC_DESCRIPTION``)."""
    rng = np.random.default_rng(seed)
    grey: list[npt.NDArray[np.float64]] = []
    grey += [rng.uniform(-1, 1, (size, size)) for _ in range(8)]
    for _ in range(8):
        coarse = rng.uniform(-1, 1, (8, 8))
        block = -(-size // 8)
        grey.append(np.asarray(np.kron(coarse, np.ones((block, block))), np.float64)[:size, :size])
    ramp = np.linspace(-1, 1, size)
    for i in range(8):
        a = rng.uniform(-1, 1)
        grey.append(a * (ramp[None, :] if i % 2 else ramp[:, None]) * np.ones((size, size)))
    yy, xx = np.mgrid[0:size, 0:size] / size
    for _ in range(8):
        img = rng.uniform(0.2, 0.6) + rng.normal(0, 0.1, (size, size))
        for cx in (0.3, 0.7):
            r = ((xx - cx) / rng.uniform(0.12, 0.18)) ** 2 + ((yy - 0.5) / 0.3) ** 2
            img[r < 1] -= rng.uniform(0.8, 1.3)
        grey.append(img)
    arr = np.clip(np.stack(grey), -1, 1).astype(np.float32)
    return np.repeat(arr[..., None], 3, axis=-1)


def float32_parity(ref: npt.NDArray[np.float64], got: npt.NDArray[np.float64]) -> dict[str, Any]:
    """ONNX's criterion: the largest |Δprobability| against Keras (float32: 1e-3)."""
    delta = float(np.max(np.abs(got - ref))) if len(ref) else float("nan")
    passed = bool(delta <= MAX_FLOAT32_DELTA)
    return {
        "max_abs_delta_probability": delta,
        "mean_abs_delta_probability": float(np.mean(np.abs(got - ref))) if len(ref) else None,
        "passed": passed,
        "failed": [] if passed else [f"max |Δprobability| {delta:.2e} > {MAX_FLOAT32_DELTA:g}"],
    }


def int8_parity(
    ref: npt.NDArray[np.float64],
    got: npt.NDArray[np.float64],
    threshold: float,
    labels: npt.NDArray[np.int64] | None,
) -> dict[str, Any]:
    """int8's criteria: |Δprobability| ≤ ``MAX_PROBABILITY_DELTA``, label agreement at the
    threshold, and AUC against Keras's.

    ``labels`` are the true labels; without them Keras's own labels stand in (see the
    module docstring).
    """
    max_delta = float(np.max(np.abs(got - ref))) if len(ref) else 0.0
    ref_labels = ref >= threshold
    agreement = float(np.mean(ref_labels == (got >= threshold))) if len(ref) else 0.0
    truth = labels if labels is not None else ref_labels.astype(np.int64)
    auc_ref, auc_got = roc_auc(truth, ref), roc_auc(truth, got)
    auc_defined = not (np.isnan(auc_ref) or np.isnan(auc_got))
    auc_delta = abs(auc_got - auc_ref) if auc_defined else None
    failed = []
    if max_delta > MAX_PROBABILITY_DELTA:
        failed.append(f"max |Δprobability| {max_delta:.4f} > {MAX_PROBABILITY_DELTA:g}")
    if agreement < MIN_INT8_LABEL_AGREEMENT:
        failed.append(f"label agreement {agreement:.4f} < {MIN_INT8_LABEL_AGREEMENT:g}")
    if auc_delta is not None and auc_delta > MAX_INT8_AUC_DELTA:
        failed.append(f"AUC differs by {auc_delta:.4f} > {MAX_INT8_AUC_DELTA:g}")
    passed = not failed
    return {
        "label_agreement": agreement,
        "labels_differing": int(np.sum(ref_labels != (got >= threshold))),
        "threshold": threshold,
        "auc_against": "true labels" if labels is not None else "keras labels",
        "auc_keras": auc_ref if auc_defined else None,
        "auc": auc_got if auc_defined else None,
        "auc_delta": auc_delta,
        "max_abs_delta_probability": max_delta,
        "mean_abs_delta_probability": float(np.mean(np.abs(got - ref))) if len(ref) else None,
        "passed": bool(passed),
        "failed": failed,
    }


@dataclass(frozen=True)
class _ParityCheck:
    """What every runtime is compared with: Keras on the parity inputs."""

    info: BundleInfo
    inputs: ParityInputs
    ref: Inference
    ood: _OodReference | None
    threads: int | None
    data_root: Path | None
    static_int8: bool


@dataclass(frozen=True)
class _OodReference:
    """Keras's OOD scores on the parity inputs and the synthetic set."""

    model: OodModel
    synthetic: npt.NDArray[np.float32]
    scores: npt.NDArray[np.float64]


def _ood_reference(info: BundleInfo, keras_pred: Predictor, ref: Inference) -> _OodReference | None:
    try:
        model = read_ood(info)
    except ModelError as exc:
        log.warning("%s: OOD scores not compared: %s", info.version, exc)
        return None
    synthetic = synthetic_inputs(info.image_size)
    syn_features = keras_pred.infer(synthetic).features if model is not None else None
    if model is None or ref.features is None or syn_features is None:
        return None
    scores = np.concatenate([model.score(ref.features), model.score(syn_features)])
    return _OodReference(model, synthetic, scores)


def _export_and_check(name: str, model: Any, check: _ParityCheck) -> dict[str, Any]:
    if name != "tflite-int8":
        return _export_one(name, _CONVERTERS[name], model, check)
    entry = _export_one(name, to_tflite_int8, model, check)
    entry["quantisation"] = "dynamic-range"
    if entry["usable"] or "parity" not in entry:
        return entry
    if not check.static_int8:
        entry["static"] = "not tried (model register --static-int8 tries it)"
        return entry
    calibration = _calibration_images(check.info, check.data_root)
    if calibration is None:
        entry["static"] = "not tried: no training images of the bundle to calibrate on"
        return entry
    log.info(
        "dynamic-range int8 failed parity; trying static int8 (calibrated on %d training images)",
        len(calibration),
    )
    static = _export_one(name, lambda m, size: to_tflite_int8_static(m, calibration), model, check)
    static["quantisation"] = "static"
    static["calibration_images"] = len(calibration)
    static["dynamic_range"] = {
        k: entry[k] for k in ("parity", "images_per_s", "refused", "ood") if k in entry
    }
    if static["usable"] or "parity" in static:
        return static
    entry["static"] = static.get("error", "failed")
    return entry


def _export_one(
    name: str, convert: Callable[[Any, int], bytes], model: Any, check: _ParityCheck
) -> dict[str, Any]:
    info, inputs, ref = check.info, check.inputs, check.ref
    file = info.path / EXPORTED_FILES[name]
    entry: dict[str, Any] = {"file": file.name, "usable": False}
    started = time.perf_counter()
    log.info("converting %s to %s", info.version, name)
    try:
        data = convert(model, info.image_size)
        _write_atomic_bytes(file, data)
        entry["export_s"] = round(time.perf_counter() - started, 2)
        entry["sha256"] = sha256_file(file)
        entry["size_bytes"] = len(data)
        entry["versions"] = _versions(name)
        predictor = _load_file(name, info, entry["sha256"], check.threads)
        got, speed = _timed_predict(predictor, inputs.x)
        if check.ood is not None:
            entry["ood"] = _ood_parity(check.ood, predictor, got)
    except Exception as exc:  # any converter failure is recorded; Keras still serves
        log.exception("export of %s to %s failed", info.version, name)
        entry["error"] = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:300]}"
        return entry
    entry["images_per_s"] = speed
    if name == "onnx":
        entry["parity"] = float32_parity(ref.probability, got.probability)
    else:
        entry["parity"] = int8_parity(
            ref.probability, got.probability, info.threshold, inputs.labels
        )
    entry["features"] = got.features is not None
    entry["usable"] = entry["parity"]["passed"]
    if not entry["usable"]:
        entry["refused"] = refusal(entry["parity"])
        log.warning("%s of %s refused: %s", name, info.version, entry["refused"])
    else:
        log.info("%s passed its parity check (%s images/s)", name, speed or "?")
    return entry


def _ood_parity(ood: _OodReference, predictor: Predictor, got: Inference) -> dict[str, Any]:
    """This runtime's OOD scores against Keras's (parity inputs, then the synthetic set)."""
    syn = predictor.infer(ood.synthetic).features
    if got.features is None or syn is None:
        return {"features": False}
    scores = np.concatenate([ood.model.score(got.features), ood.model.score(syn)])
    t = ood.model.threshold
    rel = np.abs(scores - ood.scores) / np.maximum(ood.scores, 1e-9)
    return {
        "images": len(scores),
        "max_rel_delta_score": float(np.max(rel)),
        "decisions_differing": int(np.sum((scores > t) != (ood.scores > t))),
    }


def _load_file(name: str, info: BundleInfo, sha256: str, threads: int | None) -> Predictor:
    """The predictor of a freshly written file, before it is recorded as usable."""
    from pacs_classifier.model.runtime import OnnxPredictor, TfliteInt8Predictor

    data = read_verified(info.path / EXPORTED_FILES[name], sha256)
    if name == "onnx":
        return OnnxPredictor(info, data, threads=threads)
    return TfliteInt8Predictor(info, data, threads=threads)


def to_onnx(model: Any, image_size: int) -> bytes:
    """The Keras model as ONNX (float32), input ``image`` of shape (N, S, S, 3)."""
    import tensorflow as tf
    import tf2onnx

    spec = (tf.TensorSpec([None, image_size, image_size, 3], tf.float32, name="image"),)
    proto, _ = tf2onnx.convert.from_keras(model, input_signature=spec, opset=ONNX_OPSET)
    return bytes(proto.SerializeToString())


def to_tflite_int8(model: Any, image_size: int) -> bytes:
    """The Keras model as TFLite with dynamic-range int8 weights.

    Converted from a SavedModel: converting a ``tf.function`` of a Keras 3 model directly
    leaves its variables as resource reads, which LiteRT runs as NaN.
    """
    del image_size  # the SavedModel's signature carries it
    return _to_tflite(model, None)


def to_tflite_int8_static(model: Any, calibration: npt.NDArray[np.float32]) -> bytes:
    """The Keras model as TFLite with int8 weights and activations (float32 in and out).

    Activation ranges are calibrated on ``calibration`` (normalised training images);
    operations without an int8 kernel stay in float32.
    """
    return _to_tflite(model, calibration)


def _to_tflite(model: Any, calibration: npt.NDArray[np.float32] | None) -> bytes:
    import tensorflow as tf

    with tempfile.TemporaryDirectory(prefix="pacs-tflite-") as tmp:
        model.export(tmp, format="tf_saved_model", verbose=False)
        converter = tf.lite.TFLiteConverter.from_saved_model(tmp)
        converter.optimizations = [tf.lite.Optimize.DEFAULT]  # no dataset: dynamic range
        if calibration is not None:
            images = calibration

            def representative() -> Any:
                for i in range(len(images)):
                    yield [images[i : i + 1]]

            converter.representative_dataset = representative
        return bytes(converter.convert())


_CONVERTERS: dict[str, Callable[[Any, int], bytes]] = {
    "onnx": to_onnx,
    "tflite-int8": to_tflite_int8,
}


def _timed_predict(
    predictor: Predictor, x: npt.NDArray[np.float32], batch: int = SPEED_BATCH
) -> tuple[Inference, float | None]:
    """Probabilities and features for ``x``; images/s after the first (warm-up) batch."""
    out = [predictor.infer(x[:batch])]
    started = time.perf_counter()
    for i in range(batch, len(x), batch):
        out.append(predictor.infer(x[i : i + batch]))
    elapsed = time.perf_counter() - started
    timed = len(x) - min(batch, len(x))
    speed = round(timed / elapsed, 2) if timed and elapsed > 0 else None
    return _concat(out), speed


def _concat(parts: Sequence[Inference]) -> Inference:
    feats = [p.features for p in parts]
    return Inference(
        np.concatenate([p.probability for p in parts]),
        None if any(f is None for f in feats) else np.concatenate(feats),  # type: ignore[arg-type]
    )


def _calibration_images(info: BundleInfo, data_root: Path | None) -> npt.NDArray[np.float32] | None:
    """Up to ``STATIC_CALIBRATION_IMAGES`` normalised training images, or None."""
    if data_root is None:
        return None
    try:
        files = split_images(info, data_root, "train")
    except ModelError as exc:
        log.warning("%s: no training images for static int8: %s", info.version, exc)
        return None
    if not files:
        return None
    x, _, _ = _normalise(_spread(files, STATIC_CALIBRATION_IMAGES), info.image_size)
    return np.stack(x) if x else None


def _validation_files(
    info: BundleInfo, data_root: Path | None
) -> tuple[list[tuple[Path, int]], str]:
    """(path, label) of every validation image of the bundle found under ``data_root``, or
    no files and why not."""
    if data_root is None:
        return [], "no dataset root given (model register --data DIR, or [model] data_root)"
    try:
        found = split_images(info, data_root, "val")
    except ModelError as exc:
        return [], str(exc)
    if not found:
        return [], f"none of the bundle's validation images is under {data_root}"
    return found, ""


def _spread(items: Sequence[tuple[Path, int]], n: int) -> list[tuple[Path, int]]:
    """At most ``n`` items evenly spaced over the list (deterministic, both classes kept)."""
    if len(items) <= n:
        return list(items)
    index = np.linspace(0, len(items) - 1, n).round().astype(int)
    return [items[i] for i in sorted(set(index.tolist()))]


def _normalise(
    files: Sequence[tuple[Path, int]], size: int
) -> tuple[list[npt.NDArray[np.float32]], list[int], int]:
    from pacs_classifier.preprocess import normalize_file

    xs, labels, skipped = [], [], 0
    for path, label in files:
        try:
            xs.append(normalize_file(path, size))
        except (NotAssessable, OSError) as exc:
            log.warning("parity input %s skipped: %s", path.name, exc)
            skipped += 1
            continue
        labels.append(label)
    return xs, labels, skipped


def _current_record(info: BundleInfo, runtimes: Sequence[str]) -> dict[str, Any] | None:
    """The existing record when it covers ``runtimes`` and every usable file is intact."""
    try:
        record = read_runtimes(info)
        if (
            record is None
            or record.get("format") != RUNTIMES_FORMAT
            or set(runtimes) - set(record["runtimes"])
        ):
            return None
        for name, entry in record["runtimes"].items():
            if entry.get("usable"):
                read_verified(info.path / EXPORTED_FILES[name], str(entry.get("sha256")))
    except ModelError:
        return None
    return record


def _versions(name: str) -> dict[str, str]:
    import importlib.metadata as md

    packages = {"onnx": ("tf2onnx", "onnx", "onnxruntime"), "tflite-int8": ("ai-edge-litert",)}
    out = {}
    for pkg in ("tensorflow", *packages[name]):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = "absent"
    return out


def _write_atomic(path: Path, text: str) -> None:
    _write_atomic_bytes(path, text.encode("utf-8"))


def _write_atomic_bytes(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
