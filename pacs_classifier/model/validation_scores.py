"""``validation_scores.npz``: a bundle's validation labels and calibrated probabilities.

The drift report (``report/drift.py``) compares live scores with these. The file sits
beside ``model.json`` and ``weights.npz`` but is not one of the model files: adding it to
a bundle changes neither the model's checksums nor its version. Arrays:

- ``labels``: int8, 1 for PNEUMONIA, 0 for NORMAL, one per validation image;
- ``probabilities``: float32, the calibrated probability the bundle serves, same order.

The trainer writes it for new bundles; ``scripts/validation_scores.py`` adds it to an
existing one (the committed reference bundle).
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

from pacs_classifier.errors import ModelError

FILE = "validation_scores.npz"


@dataclass(frozen=True)
class ValidationScores:
    labels: npt.NDArray[np.int8]
    probabilities: npt.NDArray[np.float32]

    def positive_rate(self, threshold: float) -> float:
        """Share of validation images at or above ``threshold`` (labelled positive)."""
        return float(np.mean(self.probabilities >= threshold))


def write_validation_scores(
    folder: Path, labels: npt.ArrayLike, probabilities: npt.ArrayLike
) -> Path:
    """Write ``folder/validation_scores.npz`` atomically; return its path."""
    y = np.asarray(labels).reshape(-1)
    p = np.asarray(probabilities, dtype=np.float64).reshape(-1)
    if y.shape != p.shape or y.size == 0:
        raise ModelError(
            f"validation scores: {y.size} labels and {p.size} probabilities (need as many, > 0)"
        )
    if not np.all(np.isfinite(p)) or p.min() < 0 or p.max() > 1:
        raise ModelError("validation scores: probabilities must be finite and in [0, 1]")
    if not np.all((y == 0) | (y == 1)):
        raise ModelError("validation scores: labels must be 0 or 1")
    target = folder / FILE
    buffer = io.BytesIO()
    np.savez_compressed(buffer, labels=y.astype(np.int8), probabilities=p.astype(np.float32))
    tmp = target.with_name(f".{FILE}.{os.getpid()}.tmp")
    try:
        tmp.write_bytes(buffer.getvalue())
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return target


def read_validation_scores(folder: Path) -> ValidationScores | None:
    """The bundle's validation scores, or None when it has no such file.

    A file that is there but unreadable raises :class:`ModelError`: a broken reference
    must not pass for a missing one.
    """
    path = folder / FILE
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as data:
            labels = np.asarray(data["labels"], dtype=np.int8).reshape(-1)
            probabilities = np.asarray(data["probabilities"], dtype=np.float32).reshape(-1)
    except (OSError, ValueError, KeyError) as exc:
        raise ModelError(f"{path}: not a validation scores file ({exc})") from None
    if labels.shape != probabilities.shape or labels.size == 0:
        raise ModelError(f"{path}: labels and probabilities differ in length or are empty")
    return ValidationScores(labels, probabilities)
