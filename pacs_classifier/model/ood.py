"""Image-based out-of-distribution check on the model's own pooled features.

Metadata can lie: a dental panoramic sent as CR with no body part and no description passes
every eligibility rule, and the classifier then calls it PNEUMONIA with high confidence.
This check looks at what the network itself saw. Every runtime returns, beside the
probability, the globally pooled features of the base (layer ``pool``, 1280 values at the
``mixed8`` cut). A bundle's ``ood.npz`` holds a description of those features on training
chest radiographs:

- ``mean`` (D,) and ``components`` (K, D): a PCA of the training features (K ≈ 48);
- ``precision`` (K, K): the inverse covariance of the projected training features
  (diagonal after PCA, shrunk towards its mean eigenvalue so it is well conditioned);
- ``residual_variance``: the mean squared distance of a training image from the
  K-dimensional subspace, per remaining dimension;
- ``threshold``: on the score below, chosen on the validation chest images so that at most
  ``max_false_refusal`` of them would be refused (their ``quantile``, with a margin: see
  :func:`fit_ood`).

The score of an image is ``sqrt((d_M² + r² / residual_variance) / (K + 1))``: the
Mahalanobis distance inside the subspace, plus the squared distance from it in units of
the training images' typical residual (so an image unlike anything in training, which
the PCA of chest features cannot represent, is caught even if its projection looks
ordinary), normalised so a typical training image scores about 1. Images scoring above
``threshold`` end ``not_assessed`` with reason ``out_of_distribution``.

``ood.npz`` is a new file beside the checksummed model files; it names the bundle it was
fitted for (``bundle_sha256``) and is refused for any other. A bundle without it serves as
before, with the check off.
"""

from __future__ import annotations

import io
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from pacs_classifier.errors import ModelError
from pacs_classifier.model.bundle import BundleInfo

log = logging.getLogger(__name__)

OOD_FILE = "ood.npz"
OOD_FORMAT = 1
#: Components kept by the PCA (fewer when there are fewer training images).
DEFAULT_COMPONENTS = 48
#: At most this share of validation chest radiographs may be refused.
MAX_FALSE_REFUSAL = 0.01
#: The threshold is the validation quantile that refuses this share of the allowed rate:
#: half of it, so a new sample of chest images stays under the bound despite sampling noise.
THRESHOLD_MARGIN = 0.5
#: Shrinkage of the projected covariance towards its mean eigenvalue.
SHRINKAGE = 0.01


@dataclass(frozen=True)
class OodModel:
    """A fitted out-of-distribution check (the contents of ``ood.npz``)."""

    mean: npt.NDArray[np.float64]
    components: npt.NDArray[np.float64]
    precision: npt.NDArray[np.float64]
    residual_variance: float
    threshold: float
    bundle_sha256: str
    fitted_on: int
    validation_n: int
    validation_refused: float
    max_false_refusal: float

    @property
    def dims(self) -> tuple[int, int]:
        """(feature dimension D, kept components K)."""
        return int(self.components.shape[1]), int(self.components.shape[0])

    def score(self, features: npt.ArrayLike) -> npt.NDArray[np.float64]:
        """The score of each row of ``features`` (N, D); about 1 for a training image."""
        f = np.asarray(features, dtype=np.float64)
        if f.ndim != 2 or f.shape[1] != self.mean.shape[0]:
            raise ModelError(
                f"out-of-distribution check expects features of width {self.mean.shape[0]}, "
                f"received {f.shape}"
            )
        centred = f - self.mean
        z = centred @ self.components.T
        d2 = np.einsum("ij,jk,ik->i", z, self.precision, z)
        residual = np.sum(centred**2, axis=1) - np.sum(z**2, axis=1)
        r2 = np.maximum(residual, 0.0) / self.residual_variance
        return np.asarray(np.sqrt((d2 + r2) / (self.components.shape[0] + 1)), np.float64)

    def refused(self, features: npt.ArrayLike) -> npt.NDArray[np.bool_]:
        """True for each image the check refuses."""
        return np.asarray(self.score(features) > self.threshold)

    def summary(self) -> dict[str, Any]:
        """What an audit event or a report says about the check."""
        return {
            "threshold": self.threshold,
            "components": self.dims[1],
            "fitted_on": self.fitted_on,
            "validation_n": self.validation_n,
            "validation_refused": self.validation_refused,
            "max_false_refusal": self.max_false_refusal,
        }


def fit_ood(
    train_features: npt.ArrayLike,
    val_features: npt.ArrayLike,
    bundle_sha256: str,
    *,
    components: int = DEFAULT_COMPONENTS,
    max_false_refusal: float = MAX_FALSE_REFUSAL,
) -> OodModel:
    """Fit the check on training features; set its threshold on validation features.

    The threshold is the ``1 - THRESHOLD_MARGIN * max_false_refusal`` quantile of the
    validation scores (0.995 for the default 1 %), so the validation refusal rate is at
    most half the bound.
    """
    train = np.asarray(train_features, dtype=np.float64)
    val = np.asarray(val_features, dtype=np.float64)
    if train.ndim != 2 or val.ndim != 2 or train.shape[1] != val.shape[1]:
        raise ModelError(f"feature arrays disagree: train {train.shape}, validation {val.shape}")
    if len(train) < 3 or len(val) < 1:
        raise ModelError(
            f"too few images to fit the out-of-distribution check "
            f"({len(train)} training, {len(val)} validation)"
        )
    if not (0 < max_false_refusal < 1):
        raise ModelError(f"max_false_refusal must be in (0, 1), not {max_false_refusal}")
    mean = train.mean(axis=0)
    centred = train - mean
    k = max(1, min(components, len(train) - 2, train.shape[1] - 1))
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    comps = vt[:k]
    z = centred @ comps.T
    cov = np.cov(z, rowvar=False).reshape(k, k)
    eig = float(np.trace(cov)) / k
    precision = np.linalg.inv((1 - SHRINKAGE) * cov + SHRINKAGE * eig * np.eye(k))
    residual = np.sum(centred**2, axis=1) - np.sum(z**2, axis=1)
    residual_variance = max(float(np.mean(np.maximum(residual, 0.0))), 1e-12)
    model = OodModel(
        mean=mean,
        components=comps,
        precision=precision,
        residual_variance=residual_variance,
        threshold=float("inf"),
        bundle_sha256=bundle_sha256,
        fitted_on=len(train),
        validation_n=len(val),
        validation_refused=0.0,
        max_false_refusal=max_false_refusal,
    )
    scores = model.score(val)
    threshold = float(np.quantile(scores, 1 - THRESHOLD_MARGIN * max_false_refusal))
    return OodModel(
        **{
            **model.__dict__,
            "threshold": threshold,
            "validation_refused": float(np.mean(scores > threshold)),
        }
    )


def write_ood(path: Path, model: OodModel) -> None:
    """Write ``ood.npz`` atomically (a reader never sees half a file)."""
    buf = io.BytesIO()
    np.savez(
        buf,
        format=np.int64(OOD_FORMAT),
        mean=model.mean.astype(np.float32),
        components=model.components.astype(np.float32),
        precision=model.precision,
        residual_variance=np.float64(model.residual_variance),
        threshold=np.float64(model.threshold),
        bundle_sha256=np.str_(model.bundle_sha256),
        fitted_on=np.int64(model.fitted_on),
        validation_n=np.int64(model.validation_n),
        validation_refused=np.float64(model.validation_refused),
        max_false_refusal=np.float64(model.max_false_refusal),
    )
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(buf.getvalue())
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp's 0600 would hide it from the serving account
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_ood(info: BundleInfo) -> OodModel | None:
    """The bundle's fitted check, or None when it has no ``ood.npz``.

    A file fitted for another model, of another format or unreadable is a
    :class:`ModelError`: a check that does not match its model is never applied silently.
    """
    path = info.path / OOD_FILE
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as npz:
            data = {k: npz[k] for k in npz.files}
        fmt = int(data["format"])
        model = OodModel(
            mean=np.asarray(data["mean"], np.float64),
            components=np.asarray(data["components"], np.float64),
            precision=np.asarray(data["precision"], np.float64),
            residual_variance=float(data["residual_variance"]),
            threshold=float(data["threshold"]),
            bundle_sha256=str(data["bundle_sha256"]),
            fitted_on=int(data["fitted_on"]),
            validation_n=int(data["validation_n"]),
            validation_refused=float(data["validation_refused"]),
            max_false_refusal=float(data["max_false_refusal"]),
        )
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ModelError(f"{path}: unreadable out-of-distribution file: {exc}") from None
    if fmt != OOD_FORMAT:
        raise ModelError(f"{path}: format {fmt}, this version reads {OOD_FORMAT}")
    if model.bundle_sha256 != info.sha256:
        raise ModelError(f"{path}: fitted for another model, not bundle {info.sha256[:12]}…")
    d, k = model.dims
    if (
        model.mean.shape != (d,)
        or model.precision.shape != (k, k)
        or not np.isfinite(model.threshold)
        or model.residual_variance <= 0
    ):
        raise ModelError(f"{path}: inconsistent out-of-distribution file")
    return model
