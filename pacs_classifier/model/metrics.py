"""Binary classification metrics, calibration and threshold rules (pure numpy).

Positive class = PNEUMONIA. Sensitivity = recall of PNEUMONIA; specificity = recall of
NORMAL.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import numpy.typing as npt

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]


def roc_auc(y: npt.ArrayLike, p: npt.ArrayLike) -> float:
    """Area under the ROC curve by the rank (Mann-Whitney U) formula, ties averaged."""
    y_arr = np.asarray(y).astype(bool)
    p_arr = np.asarray(p, dtype=np.float64)
    n_pos, n_neg = int(y_arr.sum()), int((~y_arr).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(p_arr, kind="mergesort")
    sorted_p = p_arr[order]
    # Tied scores share the mean of their 1-based ranks (vectorised: the bootstrap calls
    # this a thousand times).
    starts = np.flatnonzero(np.concatenate([[True], sorted_p[1:] != sorted_p[:-1]]))
    ends = np.append(starts[1:], len(sorted_p)) - 1
    ranks = np.empty(len(p_arr), dtype=np.float64)
    ranks[order] = np.repeat((starts + ends) / 2 + 1, ends - starts + 1)
    return float((ranks[y_arr].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def confusion(y: npt.ArrayLike, p: npt.ArrayLike, threshold: float) -> dict[str, int]:
    y_arr = np.asarray(y).astype(bool)
    pred = np.asarray(p, dtype=np.float64) >= threshold
    return {
        "tp": int((pred & y_arr).sum()),
        "fp": int((pred & ~y_arr).sum()),
        "tn": int((~pred & ~y_arr).sum()),
        "fn": int((~pred & y_arr).sum()),
    }


def _ratio(a: int, b: int) -> float:
    return a / b if b else float("nan")


def expected_calibration_error(y: npt.ArrayLike, p: npt.ArrayLike, bins: int = 10) -> float:
    """ECE with equal-width bins over [0, 1]."""
    y_arr = np.asarray(y, dtype=np.float64)
    p_arr = np.asarray(p, dtype=np.float64)
    idx = np.minimum((p_arr * bins).astype(int), bins - 1)
    ece = 0.0
    for b in range(bins):
        mask = idx == b
        if mask.any():
            ece += mask.mean() * abs(p_arr[mask].mean() - y_arr[mask].mean())
    return float(ece)


def point_metrics(y: npt.ArrayLike, p: npt.ArrayLike, threshold: float) -> dict[str, Any]:
    """The metrics of SPEC §10 at one threshold."""
    y_arr = np.asarray(y).astype(int)
    p_arr = np.asarray(p, dtype=np.float64)
    c = confusion(y_arr, p_arr, threshold)
    sens = _ratio(c["tp"], c["tp"] + c["fn"])
    prec = _ratio(c["tp"], c["tp"] + c["fp"])
    f1 = 2 * prec * sens / (prec + sens) if prec + sens > 0 else float("nan")
    return {
        "n": len(y_arr),
        "auc": roc_auc(y_arr, p_arr),
        "sensitivity": sens,
        "specificity": _ratio(c["tn"], c["tn"] + c["fp"]),
        "precision": prec,
        "f1": f1,
        "accuracy": _ratio(c["tp"] + c["tn"], len(y_arr)),
        "threshold": float(threshold),
        "ece": expected_calibration_error(y_arr, p_arr),
        "brier": float(np.mean((p_arr - y_arr) ** 2)) if len(y_arr) else float("nan"),
        "confusion": c,
    }


def bootstrap_intervals(
    y: npt.ArrayLike,
    p: npt.ArrayLike,
    threshold: float,
    *,
    n_boot: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
) -> dict[str, list[float]]:
    """Percentile bootstrap (1 - alpha) intervals of each scalar metric."""
    y_arr = np.asarray(y).astype(int)
    p_arr = np.asarray(p, dtype=np.float64)
    rng = np.random.default_rng(seed)
    keys = ("auc", "sensitivity", "specificity", "precision", "f1", "accuracy", "ece", "brier")
    samples: dict[str, list[float]] = {k: [] for k in keys}
    n = len(y_arr)
    for _ in range(n_boot):
        idx = rng.integers(0, n, n)
        m = point_metrics(y_arr[idx], p_arr[idx], threshold)
        for k in keys:
            samples[k].append(m[k])
    out: dict[str, list[float]] = {}
    for k, values in samples.items():
        arr = np.asarray(values, dtype=np.float64)
        arr = arr[np.isfinite(arr)]
        if len(arr) == 0:
            out[k] = [float("nan"), float("nan")]
        else:
            out[k] = [float(np.quantile(arr, alpha / 2)), float(np.quantile(arr, 1 - alpha / 2))]
    return out


def threshold_for_sensitivity(y: npt.ArrayLike, p: npt.ArrayLike, target: float) -> float:
    """The highest threshold that keeps sensitivity ≥ ``target`` (label = p ≥ threshold).

    Every threshold in ``(next lower probability, k-th highest positive]`` gives the same
    validation confusion matrix; the midpoint of that interval is returned, so a last-bit
    difference in a served probability cannot flip the positive that sits on the boundary.
    """
    y_arr = np.asarray(y).astype(bool)
    p_arr = np.asarray(p, dtype=np.float64)
    pos = np.sort(p_arr[y_arr])[::-1]
    if len(pos) == 0:
        raise ValueError("no positive examples to choose a threshold on")
    k = max(1, math.ceil(target * len(pos) - 1e-9))
    edge = float(pos[k - 1])
    below = p_arr[p_arr < edge]
    lower = float(below.max()) if len(below) else 0.0
    return (edge + lower) / 2


def fit_temperature(y: npt.ArrayLike, p: npt.ArrayLike) -> float:
    """Temperature T minimising the validation log-loss of ``sigmoid(logit(p) / T)``."""
    from scipy.optimize import minimize_scalar

    y_arr = np.asarray(y, dtype=np.float64)
    q = np.clip(np.asarray(p, dtype=np.float64), 1e-7, 1 - 1e-7)
    logits = np.log(q) - np.log1p(-q)

    def nll(t: float) -> float:
        z = logits / t
        # log(1 + e^-z) computed stably for both signs
        return float(np.mean(np.logaddexp(0, -z) * y_arr + np.logaddexp(0, z) * (1 - y_arr)))

    res = minimize_scalar(nll, bounds=(0.05, 20.0), method="bounded")
    return float(res.x)


def fit_platt(y: npt.ArrayLike, p: npt.ArrayLike) -> tuple[float, float]:
    """Temperature T and bias b minimising the log-loss of ``sigmoid(logit(p) / T + b)``.

    Temperature alone cannot move the intercept that class weighting shifts; the bias can.
    """
    from scipy.optimize import minimize

    y_arr = np.asarray(y, dtype=np.float64)
    q = np.clip(np.asarray(p, dtype=np.float64), 1e-7, 1 - 1e-7)
    logits = np.log(q) - np.log1p(-q)

    def nll(params: npt.NDArray[np.float64]) -> float:
        z = logits / params[0] + params[1]
        return float(np.mean(np.logaddexp(0, -z) * y_arr + np.logaddexp(0, z) * (1 - y_arr)))

    res = minimize(
        nll, x0=np.array([1.0, 0.0]), method="L-BFGS-B", bounds=[(0.05, 20.0), (-20.0, 20.0)]
    )
    return float(res.x[0]), float(res.x[1])


def curve_points(y: npt.ArrayLike, p: npt.ArrayLike) -> dict[str, FloatArray]:
    """ROC (fpr, tpr) and precision-recall points over every distinct threshold."""
    y_arr = np.asarray(y).astype(bool)
    p_arr = np.asarray(p, dtype=np.float64)
    order = np.argsort(-p_arr, kind="mergesort")
    y_sorted = y_arr[order]
    tps = np.cumsum(y_sorted).astype(np.float64)
    fps = np.cumsum(~y_sorted).astype(np.float64)
    n_pos, n_neg = max(1, int(y_arr.sum())), max(1, int((~y_arr).sum()))
    tpr = np.concatenate([[0.0], tps / n_pos])
    fpr = np.concatenate([[0.0], fps / n_neg])
    precision = tps / np.maximum(tps + fps, 1)
    recall = tps / n_pos
    return {"fpr": fpr, "tpr": tpr, "precision": precision, "recall": recall}


def reliability_bins(
    y: npt.ArrayLike, p: npt.ArrayLike, bins: int = 10
) -> list[tuple[float, float, int]]:
    """(mean predicted, observed frequency, count) per equal-width bin."""
    y_arr = np.asarray(y, dtype=np.float64)
    p_arr = np.asarray(p, dtype=np.float64)
    idx = np.minimum((p_arr * bins).astype(int), bins - 1)
    out = []
    for b in range(bins):
        mask = idx == b
        if mask.any():
            out.append((float(p_arr[mask].mean()), float(y_arr[mask].mean()), int(mask.sum())))
    return out
