"""Evaluate a bundle on a labelled folder (SPEC §10)."""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from pacs_classifier.errors import NotAssessable, PermanentError
from pacs_classifier.model import metrics as mt
from pacs_classifier.model.bundle import CLASS_NAMES, read_bundle
from pacs_classifier.model.runtime import load_predictor
from pacs_classifier.train.data import Sample, list_samples, load_units


@dataclass(frozen=True)
class Evaluation:
    metrics: dict[str, Any]
    paths: list[Path]
    y_true: npt.NDArray[np.int64]
    probability: npt.NDArray[np.float64]


def write_evaluation(
    out: Path,
    paths: list[Path],
    y: npt.ArrayLike,
    p: npt.ArrayLike,
    threshold: float,
    *,
    seed: int = 0,
    n_boot: int = 1000,
) -> dict[str, Any]:
    """Write metrics.json, predictions.csv and the plots; return the metrics."""
    from pacs_classifier.train.plots import write_evaluation_plots

    y_arr = np.asarray(y).astype(int)
    p_arr = np.asarray(p, dtype=np.float64)
    out.mkdir(parents=True, exist_ok=True)
    metrics = mt.point_metrics(y_arr, p_arr, threshold)
    metrics["ci95"] = mt.bootstrap_intervals(y_arr, p_arr, threshold, seed=seed, n_boot=n_boot)
    (out / "metrics.json").write_text(
        json.dumps(_jsonable(metrics), indent=2) + "\n", encoding="utf-8"
    )
    with (out / "predictions.csv").open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["path", "label_true", "probability", "label_pred"])
        for path, yt, pr in zip(paths, y_arr, p_arr, strict=True):
            w.writerow([str(path), CLASS_NAMES[yt], f"{pr:.6f}", CLASS_NAMES[int(pr >= threshold)]])
    write_evaluation_plots(out, y_arr, p_arr, threshold)
    return metrics


def evaluate_bundle(
    model_dir: Path,
    data_dir: Path,
    out: Path | None,
    *,
    batch_size: int = 16,
    progress: bool = True,
    runtime: str = "keras",
    stress: bool = False,
) -> Evaluation:
    """Predict every image of ``data_dir`` with the bundle and compute SPEC §10 metrics.

    ``runtime`` is any serving runtime (``keras``, ``onnx``, ``tflite-int8``, ``auto``), so
    the figures can be those of what serves. ``stress`` adds the shift stress suite
    (``train/stress.py``) at the bundle's frozen threshold: ``stress.json`` in ``out`` and
    ``metrics["stress"]``.
    """
    from tqdm import tqdm

    from pacs_classifier.preprocess import normalize_file

    info = read_bundle(model_dir)
    predictor = load_predictor(info, runtime)
    samples = list_samples(data_dir)
    probs: list[float] = []
    for i in tqdm(
        range(0, len(samples), batch_size),
        desc="evaluating",
        unit="batch",
        disable=not progress,
        leave=False,
    ):
        chunk = samples[i : i + batch_size]
        batch = []
        for s in chunk:
            try:
                batch.append(normalize_file(s.path, image_size=info.image_size))
            except NotAssessable as exc:
                raise PermanentError(f"{s.path}: cannot be evaluated: {exc}") from exc
        probs.extend(float(v) for v in predictor.predict(np.stack(batch)))
    y = np.array([s.label for s in samples], dtype=np.int64)
    p = np.array(probs, dtype=np.float64)
    paths = [s.path for s in samples]
    if out is not None:
        metrics = write_evaluation(out, paths, y, p, info.threshold)
    else:
        metrics = mt.point_metrics(y, p, info.threshold)
        metrics["ci95"] = mt.bootstrap_intervals(y, p, info.threshold)
    metrics["runtime"] = predictor.runtime
    if stress:
        metrics["stress"] = _stress(
            predictor, samples, y, info.image_size, info.threshold, progress
        )
        if out is not None:
            (out / "stress.json").write_text(
                json.dumps(_jsonable(metrics["stress"]), indent=2) + "\n", encoding="utf-8"
            )
    return Evaluation(metrics, paths, y, p)


def _stress(
    predictor: Any,
    samples: list[Sample],
    y: npt.NDArray[np.int64],
    image_size: int,
    threshold: float,
    progress: bool,
) -> dict[str, Any]:
    from pacs_classifier.train.stress import SHIFTS, shifted_predictions, stress_report

    units = load_units(samples, progress=progress)
    by_shift = shifted_predictions(
        predictor.predict,
        units,
        [s.path.name for s in samples],
        image_size,
        SHIFTS,
        progress=progress,
    )
    return stress_report(y, by_shift, threshold).as_dict() | {"n": len(samples)}


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_jsonable(v) for v in obj]
    return obj
