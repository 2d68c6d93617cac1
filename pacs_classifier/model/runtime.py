"""Serving runtimes behind one small interface.

A :class:`Predictor` takes a batch of normalised tensors (``N × S × S × 3`` float32 in
[-1, 1], from :func:`pacs_classifier.preprocess.normalize_file`) and returns the calibrated
probability of PNEUMONIA for each. Calibration (temperature scaling fitted on validation)
is applied here, so every runtime returns the probabilities the threshold was chosen on.
:meth:`Predictor.infer` also returns the pooled features of each image (the output of the
model's layer ``pool``, a second output of every runtime), which the out-of-distribution
check (:mod:`pacs_classifier.model.ood`) scores; a runtime file exported before features
were an output returns None there.

Runtimes: ``keras`` (the bundle's own model behind a fixed-signature ``tf.function``),
``onnx`` (ONNX Runtime, float32) and ``tflite-int8`` (LiteRT, dynamic-range int8). The
last two are files that :mod:`pacs_classifier.model.export` writes into a registered
bundle, each recorded in ``runtimes.json`` with its SHA-256, its parity check against
Keras and its measured speed. ``auto`` serves the fastest one that passed parity.
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from pacs_classifier.errors import ModelError
from pacs_classifier.model.bundle import BundleInfo, load_keras_model, read_bundle

log = logging.getLogger(__name__)

_EPS = 1e-7

RUNTIMES_FILE = "runtimes.json"
#: 2: every exported file has the pooled features as a second output, and parity bounds
#: |Δprobability| for every runtime.
RUNTIMES_FORMAT = 2
#: The model layer whose output is returned as the image's features.
FEATURE_LAYER = "pool"
#: The served probability may differ from the evaluated (Keras) one by at most this much;
#: an exported runtime beyond it is never served (export.py checks it at registration).
MAX_PROBABILITY_DELTA = 0.02
#: The exported runtimes and the file each one lives in, inside the registered bundle.
EXPORTED_FILES = {"onnx": "model.onnx", "tflite-int8": "model.int8.tflite"}
RUNTIMES = ("auto", "keras", *EXPORTED_FILES)


@dataclass(frozen=True)
class Inference:
    """What a runtime returns for a batch."""

    #: Calibrated P(PNEUMONIA), shape (N,).
    probability: npt.NDArray[np.float64]
    #: The pooled features, shape (N, D); None when the runtime does not return them.
    features: npt.NDArray[np.float32] | None


class Predictor(Protocol):
    info: BundleInfo
    runtime: str

    def predict(self, batch: npt.NDArray[np.float32]) -> npt.NDArray[np.float64]:
        """Calibrated P(PNEUMONIA) for each image of the batch."""
        ...

    def infer(self, batch: npt.NDArray[np.float32]) -> Inference:
        """Calibrated probabilities and pooled features of the batch."""
        ...

    def raw_predict(self, batch: npt.NDArray[np.float32]) -> npt.NDArray[np.float64]:
        """The model's own sigmoid output, before the bundle's calibration (refitting a
        calibration, as ``model calibrate`` does, starts from it)."""
        ...


def calibrate(raw: npt.ArrayLike, temperature: float, bias: float = 0.0) -> npt.NDArray[np.float64]:
    """``sigmoid(logit(p) / T + b)``: temperature scaling, with an optional bias (Platt)."""
    p = np.clip(np.asarray(raw, dtype=np.float64), _EPS, 1 - _EPS)
    logits = np.log(p) - np.log1p(-p)
    return 1.0 / (1.0 + np.exp(-(logits / temperature + bias)))


def default_threads() -> int:
    """The CPUs this process may run on (2 on the serving VM)."""
    return max(1, len(os.sched_getaffinity(0)))


def _fit_output(raw: Any, n: int) -> npt.NDArray[np.float64]:
    out = np.asarray(raw, dtype=np.float64).reshape(-1)
    if out.shape[0] != n or not np.all(np.isfinite(out)):
        raise ModelError(f"model returned {out.shape[0]} values for {n} images, or non-finite")
    return out


def _fit_features(raw: Any, n: int) -> npt.NDArray[np.float32]:
    out = np.asarray(raw, dtype=np.float32)
    if out.ndim != 2 or out.shape[0] != n or not np.all(np.isfinite(out)):
        raise ModelError(f"model returned features of shape {out.shape} for {n} images")
    return out


def with_features(model: Any) -> Any:
    """The Keras model with the pooled features as a second output (same weights).

    A model without a layer named ``pool`` is returned as it is (one output).
    """
    import keras

    names = {layer.name for layer in model.layers}
    if FEATURE_LAYER not in names:
        return model
    return keras.Model(
        model.inputs, [model.output, model.get_layer(FEATURE_LAYER).output], name=model.name
    )


def _split_outputs(outputs: Any, n: int) -> tuple[Any, Any]:
    """(probability output, feature output or None) of a runtime's outputs, by shape."""
    seq = list(outputs) if isinstance(outputs, list | tuple) else [outputs]
    prob = [o for o in seq if int(np.prod(np.shape(o)[1:])) == 1]
    feats = [o for o in seq if int(np.prod(np.shape(o)[1:])) > 1]
    if len(prob) != 1 or len(feats) > 1:
        raise ModelError(f"model outputs of shapes {[np.shape(o) for o in seq]} for {n} images")
    return prob[0], (feats[0] if feats else None)


class _Calibrated:
    """``predict`` and ``infer`` from a runtime's ``_run`` (raw outputs)."""

    info: BundleInfo

    def _run(self, x: npt.NDArray[np.float32]) -> Any:
        raise NotImplementedError

    def _infer_raw(
        self, batch: npt.NDArray[np.float32]
    ) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float32] | None]:
        x = _check_batch(self.info, batch)
        n = x.shape[0]
        if n == 0:
            return np.zeros((0,), dtype=np.float64), None
        prob, feats = _split_outputs(self._run(x), n)
        return _fit_output(prob, n), (None if feats is None else _fit_features(feats, n))

    def raw_predict(self, batch: npt.NDArray[np.float32]) -> npt.NDArray[np.float64]:
        """Uncalibrated sigmoid output, as the trainer saw it."""
        return self._infer_raw(batch)[0]

    def predict(self, batch: npt.NDArray[np.float32]) -> npt.NDArray[np.float64]:
        return calibrate(self.raw_predict(batch), *self.info.calibration)

    def infer(self, batch: npt.NDArray[np.float32]) -> Inference:
        raw, feats = self._infer_raw(batch)
        return Inference(calibrate(raw, *self.info.calibration), feats)


def _check_batch(info: BundleInfo, batch: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    size = info.image_size
    if batch.ndim != 4 or batch.shape[1:] != (size, size, 3):
        raise ModelError(
            f"expected a batch of shape (N, {size}, {size}, 3), received {batch.shape}"
        )
    return np.ascontiguousarray(batch, dtype=np.float32)


class KerasPredictor(_Calibrated):
    """The Keras model behind a fixed-signature ``tf.function`` (no retracing per batch)."""

    runtime = "keras"

    def __init__(self, info: BundleInfo) -> None:
        import tensorflow as tf

        self.info = info
        self._model = with_features(load_keras_model(info))
        size = info.image_size
        spec = tf.TensorSpec([None, size, size, 3], tf.float32)
        model = self._model
        self._fn = tf.function(
            lambda x: model(x, training=False), input_signature=[spec], reduce_retracing=True
        )

    @property
    def model(self) -> Any:
        """The Keras model with its feature output (the exporter converts this object)."""
        return self._model

    def _run(self, x: npt.NDArray[np.float32]) -> Any:
        out = self._fn(x)
        return [np.asarray(o) for o in out] if isinstance(out, list | tuple) else np.asarray(out)


def read_verified(path: Path, expected_sha256: str) -> bytes:
    """The bytes of a runtime file, refused unless they hash to the recorded SHA-256.

    The bytes checked are the bytes loaded: no window for the file to change in between.
    """
    import hashlib

    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ModelError(f"{path}: runtime file unreadable: {exc}") from None
    actual = hashlib.sha256(data).hexdigest()
    if actual != expected_sha256:
        raise ModelError(
            f"{path}: sha256 {actual[:12]}… does not match runtimes.json's "
            f"{expected_sha256[:12]}… (corrupt or altered)"
        )
    return data


class OnnxPredictor(_Calibrated):
    """ONNX Runtime, float32, on the CPU; one inference thread per core."""

    runtime = "onnx"

    def __init__(self, info: BundleInfo, model: bytes, *, threads: int | None = None) -> None:
        import onnxruntime as ort

        self.info = info
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads or default_threads()
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # Idle threads would spin for the CPU the worker's preparer thread needs.
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        try:
            self._session = ort.InferenceSession(
                model, sess_options=opts, providers=["CPUExecutionProvider"]
            )
        except Exception as exc:  # ORT raises its own untyped exceptions on bad models
            raise ModelError(f"{info.path}: ONNX model cannot be loaded: {exc}") from exc
        self._input = self._session.get_inputs()[0].name

    def _run(self, x: npt.NDArray[np.float32]) -> Any:
        return self._session.run(None, {self._input: x})


class TfliteInt8Predictor(_Calibrated):
    """LiteRT (TFLite) with int8 weights, XNNPACK on the CPU.

    The interpreter is resized only when the batch size changes; it is not thread-safe,
    so one predictor serves one inference thread (the worker has exactly one).
    """

    runtime = "tflite-int8"

    def __init__(self, info: BundleInfo, model: bytes, *, threads: int | None = None) -> None:
        from ai_edge_litert.interpreter import Interpreter

        self.info = info
        try:
            self._interp = Interpreter(
                model_content=model, num_threads=threads or default_threads()
            )
            self._input = int(self._interp.get_input_details()[0]["index"])
            self._outputs = [int(d["index"]) for d in self._interp.get_output_details()]
        except (ValueError, RuntimeError) as exc:
            raise ModelError(f"{info.path}: TFLite model cannot be loaded: {exc}") from exc
        self._batch = 0

    def _run(self, x: npt.NDArray[np.float32]) -> Any:
        n = x.shape[0]
        if n != self._batch:
            self._interp.resize_tensor_input(self._input, [n, *x.shape[1:]])
            self._interp.allocate_tensors()
            self._batch = n
        self._interp.set_tensor(self._input, x)
        self._interp.invoke()
        # get_tensor copies: the next invoke may reuse the interpreter's buffers.
        return [self._interp.get_tensor(i) for i in self._outputs]


_EXPORTED_CLASSES: dict[str, type[OnnxPredictor] | type[TfliteInt8Predictor]] = {
    "onnx": OnnxPredictor,
    "tflite-int8": TfliteInt8Predictor,
}


def read_runtimes(info: BundleInfo) -> dict[str, Any] | None:
    """The bundle's ``runtimes.json``, or None when it has none.

    It must name this bundle (its model files' digest): a record copied from another model
    is refused, never trusted.
    """
    path = info.path / RUNTIMES_FILE
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelError(f"{path}: unreadable runtime record: {exc}") from None
    if not isinstance(record, dict) or not isinstance(record.get("runtimes"), dict):
        raise ModelError(f"{path}: not a runtime record (no 'runtimes' object)")
    if record.get("bundle_sha256") != info.sha256:
        raise ModelError(f"{path}: recorded for another model, not bundle {info.sha256[:12]}…")
    return record


def refusal(parity: dict[str, Any]) -> str:
    """Why a parity result was refused, in words (the bounds it broke)."""
    failed = parity.get("failed") or ["see runtimes.json"]
    return "failed its parity check against Keras: " + "; ".join(str(f) for f in failed)


def _unusable(entry: dict[str, Any]) -> str | None:
    """Why a recorded runtime must not serve, or None.

    Records written before the probability bound (format 1) are held to it here: their
    parity already measured max |Δprobability|.
    """
    if not entry.get("usable"):
        return str(entry.get("error") or entry.get("refused") or refusal(entry.get("parity", {})))
    delta = entry.get("parity", {}).get("max_abs_delta_probability")
    if isinstance(delta, int | float) and delta > MAX_PROBABILITY_DELTA:
        return (
            f"failed its parity check against Keras: max |Δprobability| {delta:.4f} > "
            f"{MAX_PROBABILITY_DELTA:g} (recorded before the bound; register again)"
        )
    return None


def auto_choice(record: dict[str, Any] | None) -> str:
    """The fastest runtime that passed parity, by the speeds measured at export; else keras."""
    if record is None:
        return "keras"
    best, best_speed = "keras", float(record.get("keras", {}).get("images_per_s") or 0.0)
    for name, entry in sorted(record["runtimes"].items()):
        if name not in EXPORTED_FILES or _unusable(entry) is not None:
            continue
        speed = float(entry.get("images_per_s") or 0.0)
        if speed > best_speed:
            best, best_speed = name, speed
    return best


def load_exported(info: BundleInfo, runtime: str, *, threads: int | None = None) -> Predictor:
    """Load one exported runtime of a checked bundle, refusing it unless it passed parity."""
    record = read_runtimes(info)
    entry = None if record is None else record["runtimes"].get(runtime)
    if entry is None:
        raise ModelError(f"{info.path}: runtime {runtime!r} was not exported for this model")
    why = _unusable(entry)
    if why is not None:
        raise ModelError(f"{info.path}: runtime {runtime!r} is not usable: {why}")
    file = info.path / EXPORTED_FILES[runtime]
    data = read_verified(file, str(entry.get("sha256")))
    return _EXPORTED_CLASSES[runtime](info, data, threads=threads)


def load_predictor(
    bundle: str | Path | BundleInfo, runtime: str = "auto", *, threads: int | None = None
) -> Predictor:
    """Check a bundle and load it with the asked-for runtime.

    ``auto`` takes the runtime the bundle recorded as fastest-with-parity, and Keras when
    there is none or this installation lacks the package. A named runtime that was not
    exported, failed parity, or whose file does not match its checksum is a
    :class:`ModelError`; so is a corrupt file under ``auto`` (never served around).
    """
    info = bundle if isinstance(bundle, BundleInfo) else read_bundle(bundle)
    if runtime not in RUNTIMES:
        raise ModelError(f"runtime {runtime!r} is not one of {', '.join(RUNTIMES)}")
    temperature, bias = info.calibration
    if not math.isfinite(temperature) or temperature <= 0 or not math.isfinite(bias):
        raise ModelError(
            f"{info.path}: bad calibration (temperature {temperature!r}, bias {bias!r})"
        )
    if runtime == "auto":
        runtime = auto_choice(read_runtimes(info))
        if runtime != "keras":
            try:
                return load_exported(info, runtime, threads=threads)
            except ImportError as exc:
                log.warning(
                    "runtime %s recorded but not installed (%s); serving keras", runtime, exc
                )
                runtime = "keras"
    if runtime == "keras":
        return KerasPredictor(info)
    try:
        return load_exported(info, runtime, threads=threads)
    except ImportError as exc:
        raise ModelError(f"runtime {runtime!r} is not installed here: {exc}") from exc
