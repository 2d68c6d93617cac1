"""Serving runtimes behind one small interface.

A :class:`Predictor` takes a batch of normalised tensors (``N × S × S × 3`` float32 in
[-1, 1], from :func:`pacs_classifier.preprocess.normalize_file`) and returns the calibrated
probability of PNEUMONIA for each. Calibration (temperature scaling fitted on validation)
is applied here, so every runtime returns the probabilities the threshold was chosen on.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from pacs_classifier.errors import ModelError
from pacs_classifier.infer.bundle import BundleInfo, load_keras_model, read_bundle

log = logging.getLogger(__name__)

_EPS = 1e-7


class Predictor(Protocol):
    info: BundleInfo
    runtime: str

    def predict(self, batch: npt.NDArray[np.float32]) -> npt.NDArray[np.float64]:
        """Calibrated P(PNEUMONIA) for each image of the batch."""
        ...


def calibrate(raw: npt.ArrayLike, temperature: float) -> npt.NDArray[np.float64]:
    """Temperature scaling: ``sigmoid(logit(p) / T)``."""
    p = np.clip(np.asarray(raw, dtype=np.float64), _EPS, 1 - _EPS)
    logits = np.log(p) - np.log1p(-p)
    return 1.0 / (1.0 + np.exp(-logits / temperature))


def _fit_output(raw: Any, n: int) -> npt.NDArray[np.float64]:
    out = np.asarray(raw, dtype=np.float64).reshape(-1)
    if out.shape[0] != n or not np.all(np.isfinite(out)):
        raise ModelError(f"model returned {out.shape[0]} values for {n} images, or non-finite")
    return out


class KerasPredictor:
    """The Keras model behind a fixed-signature ``tf.function`` (no retracing per batch)."""

    runtime = "keras"

    def __init__(self, info: BundleInfo) -> None:
        import tensorflow as tf

        self.info = info
        self._model = load_keras_model(info)
        size = info.image_size
        spec = tf.TensorSpec([None, size, size, 3], tf.float32)
        model = self._model
        self._fn = tf.function(
            lambda x: model(x, training=False), input_signature=[spec], reduce_retracing=True
        )

    def raw_predict(self, batch: npt.NDArray[np.float32]) -> npt.NDArray[np.float64]:
        """Uncalibrated sigmoid output, as the trainer saw it."""
        if batch.ndim != 4 or batch.shape[1:] != (self.info.image_size,) * 2 + (3,):
            raise ModelError(
                f"expected a batch of shape (N, {self.info.image_size}, "
                f"{self.info.image_size}, 3), received {batch.shape}"
            )
        if batch.shape[0] == 0:
            return np.zeros((0,), dtype=np.float64)
        return _fit_output(self._fn(np.ascontiguousarray(batch, dtype=np.float32)), batch.shape[0])

    def predict(self, batch: npt.NDArray[np.float32]) -> npt.NDArray[np.float64]:
        return calibrate(self.raw_predict(batch), self.info.temperature)


RUNTIMES = ("auto", "keras")


def load_predictor(bundle: str | Path | BundleInfo, runtime: str = "auto") -> Predictor:
    """Check a bundle and load it with the asked-for runtime.

    ``auto`` takes the runtime the bundle recorded as fastest-with-parity, when this
    installation has it, and Keras otherwise.
    """
    info = bundle if isinstance(bundle, BundleInfo) else read_bundle(bundle)
    if runtime not in RUNTIMES:
        raise ModelError(
            f"runtime {runtime!r} is not available here (available: {', '.join(RUNTIMES)})"
        )
    if not math.isfinite(info.temperature) or info.temperature <= 0:
        raise ModelError(f"{info.path}: bad calibration temperature {info.temperature!r}")
    return KerasPredictor(info)
