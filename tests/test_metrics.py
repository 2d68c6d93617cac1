"""Metrics, threshold rule, calibration and the evaluate output on hand-built cases."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from pacs_classifier.model import metrics as mt
from pacs_classifier.model.runtime import calibrate
from pacs_classifier.train.evaluate import write_evaluation

# 4 positives, 4 negatives; at threshold 0.5: tp 3, fn 1, fp 1, tn 3
Y = [1, 1, 1, 1, 0, 0, 0, 0]
P = [0.9, 0.8, 0.6, 0.4, 0.7, 0.3, 0.2, 0.1]


def test_point_metrics_by_hand() -> None:
    m = mt.point_metrics(Y, P, 0.5)
    assert m["confusion"] == {"tp": 3, "fp": 1, "tn": 3, "fn": 1}
    assert m["sensitivity"] == pytest.approx(0.75)
    assert m["specificity"] == pytest.approx(0.75)
    assert m["precision"] == pytest.approx(0.75)
    assert m["f1"] == pytest.approx(0.75)
    assert m["accuracy"] == pytest.approx(0.75)
    # AUC: of 16 positive-negative pairs, the positive scores higher in 14
    assert m["auc"] == pytest.approx(14 / 16)
    assert m["brier"] == pytest.approx(np.mean((np.array(P) - np.array(Y)) ** 2))


def test_auc_counts_ties_as_half() -> None:
    assert mt.roc_auc([1, 0], [0.5, 0.5]) == pytest.approx(0.5)
    assert mt.roc_auc([1, 1, 0], [0.5, 0.9, 0.5]) == pytest.approx(0.75)
    assert np.isnan(mt.roc_auc([1, 1], [0.2, 0.3]))


def test_auc_equals_the_pairwise_definition_with_many_ties() -> None:
    """P(score of a positive > score of a negative) + half the ties, counted pair by pair."""
    rng = np.random.default_rng(0)
    for _ in range(100):
        n = int(rng.integers(2, 50))
        y = rng.integers(0, 2, n).astype(bool)
        p = rng.integers(0, 5, n) / 4.0  # five distinct scores: ties everywhere
        if y.all() or not y.any():
            continue
        pos, neg = p[y][:, None], p[~y][None, :]
        pairwise = ((pos > neg).sum() + 0.5 * (pos == neg).sum()) / (pos.size * neg.size)
        assert mt.roc_auc(y, p) == pytest.approx(pairwise, abs=1e-12)


def test_ece_by_hand() -> None:
    # bin [0.9, 1.0): mean p 0.95, frequency 0.5 -> |0.45| * 2/4; bin [0.1, 0.2): 0.1 vs 0
    ece = mt.expected_calibration_error([1, 0, 0, 0], [0.95, 0.95, 0.1, 0.1])
    assert ece == pytest.approx(0.45 * 0.5 + 0.1 * 0.5)


def test_threshold_rule_keeps_sensitivity_and_sits_between_scores() -> None:
    t = mt.threshold_for_sensitivity(Y, P, 0.75)
    # 3 of 4 positives must stay above: the 3rd highest positive is 0.6, next lower 0.4
    assert t == pytest.approx(0.5)
    assert mt.point_metrics(Y, P, t)["sensitivity"] >= 0.75
    t_all = mt.threshold_for_sensitivity(Y, P, 0.97)
    assert t_all == pytest.approx((0.4 + 0.3) / 2)
    assert mt.point_metrics(Y, P, t_all)["sensitivity"] == 1.0


def test_temperature_recovers_a_known_scale() -> None:
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 2, 20000)
    y = rng.uniform(size=logits.size) < 1 / (1 + np.exp(-logits))
    overconfident = 1 / (1 + np.exp(-3 * logits))  # true logits scaled by 3
    t = mt.fit_temperature(y, overconfident)
    assert t == pytest.approx(3.0, rel=0.05)
    fixed = calibrate(overconfident, t)
    assert mt.expected_calibration_error(y, fixed) < mt.expected_calibration_error(y, overconfident)


def test_bootstrap_intervals_contain_the_point_estimate() -> None:
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 300)
    p = np.clip(y * 0.3 + rng.uniform(0, 0.7, 300), 0, 1)
    m = mt.point_metrics(y, p, 0.5)
    ci = mt.bootstrap_intervals(y, p, 0.5, n_boot=200, seed=3)
    for key in ("auc", "sensitivity", "specificity", "f1"):
        lo, hi = ci[key]
        assert lo <= m[key] <= hi
        assert hi - lo < 0.3


def test_write_evaluation_files(tmp_path: Path) -> None:
    paths = [Path(f"img{i}.png") for i in range(len(Y))]
    write_evaluation(tmp_path, paths, Y, P, 0.5, n_boot=50)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    for key in (
        "n",
        "auc",
        "sensitivity",
        "specificity",
        "precision",
        "f1",
        "accuracy",
        "threshold",
        "ece",
        "brier",
        "confusion",
        "ci95",
    ):
        assert key in metrics
    assert metrics["n"] == 8
    assert metrics["confusion"] == {"tp": 3, "fp": 1, "tn": 3, "fn": 1}
    with (tmp_path / "predictions.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["path", "label_true", "probability", "label_pred"]
    assert rows[3] == {
        "path": "img3.png",
        "label_true": "PNEUMONIA",
        "probability": "0.400000",
        "label_pred": "NORMAL",
    }
    assert rows[4]["label_pred"] == "PNEUMONIA" and rows[4]["label_true"] == "NORMAL"
    for plot in ("roc", "precision_recall", "confusion_matrix", "calibration"):
        assert (tmp_path / f"{plot}.png").stat().st_size > 1000


def test_platt_recovers_temperature_and_bias_and_beats_temperature_alone() -> None:
    from pacs_classifier.train.trainer import fit_operating_point

    rng = np.random.default_rng(2)
    logits = rng.normal(0, 2, 20000)
    y = rng.uniform(size=logits.size) < 1 / (1 + np.exp(-logits))
    # what class weighting does: scores scaled and shifted towards the negative class
    shifted = 1 / (1 + np.exp(-(2 * logits - 1.5)))
    t, b = mt.fit_platt(y, shifted)
    assert t == pytest.approx(2.0, rel=0.05)
    assert b == pytest.approx(0.75, abs=0.05)
    platt = fit_operating_point(y, shifted, "platt", 0.97)
    temp = fit_operating_point(y, shifted, "temperature", 0.97)
    assert platt.metrics.ece is not None and temp.metrics.ece is not None
    assert platt.metrics.ece < 0.01 < temp.metrics.ece
    # a monotone calibration leaves every decision of the threshold rule as it was
    assert platt.metrics.confusion == temp.metrics.confusion
    assert platt.calibration.bias == pytest.approx(b)
    assert temp.calibration.bias == 0.0
    np.testing.assert_allclose(calibrate(shifted, t, b), platt.p_val)
