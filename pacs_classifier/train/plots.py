"""PNG plots for bundles and evaluations (matplotlib, headless Agg backend)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from pacs_classifier.model import metrics as mt
from pacs_classifier.model.metadata import BundleMetadata


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def write_evaluation_plots(
    out_dir: Path, y: npt.ArrayLike, p: npt.ArrayLike, threshold: float, title: str = ""
) -> list[Path]:
    """ROC, precision-recall, confusion matrix and reliability diagram."""
    out_dir.mkdir(parents=True, exist_ok=True)
    plt = _plt()
    y_arr = np.asarray(y).astype(int)
    p_arr = np.asarray(p, dtype=np.float64)
    pts = mt.curve_points(y_arr, p_arr)
    m = mt.point_metrics(y_arr, p_arr, threshold)
    written = []

    fig, ax = plt.subplots(figsize=(5, 5))
    ax.plot(pts["fpr"], pts["tpr"], label=f"AUC {m['auc']:.3f}")
    ax.plot([0, 1], [0, 1], "--", color="grey", linewidth=0.8)
    ax.scatter(
        [1 - m["specificity"]],
        [m["sensitivity"]],
        color="red",
        zorder=3,
        label=f"threshold {threshold:.3f}",
    )
    ax.set(xlabel="1 - specificity", ylabel="sensitivity", title=f"ROC {title}".strip())
    ax.legend(loc="lower right")
    written.append(_save(fig, out_dir / "roc.png"))

    fig, ax = plt.subplots(figsize=(5, 5))
    ax.plot(pts["recall"], pts["precision"])
    ax.scatter([m["sensitivity"]], [m["precision"]], color="red", zorder=3)
    ax.set(
        xlabel="recall (sensitivity)",
        ylabel="precision",
        ylim=(0, 1.02),
        title=f"Precision-recall {title}".strip(),
    )
    written.append(_save(fig, out_dir / "precision_recall.png"))

    c = m["confusion"]
    grid = np.array([[c["tn"], c["fp"]], [c["fn"], c["tp"]]])
    fig, ax = plt.subplots(figsize=(4.5, 4))
    ax.imshow(grid, cmap="Blues")
    for (i, j), v in np.ndenumerate(grid):
        ax.text(
            j,
            i,
            str(v),
            ha="center",
            va="center",
            color="white" if v > grid.max() / 2 else "black",
            fontsize=14,
        )
    ax.set_xticks([0, 1], ["NORMAL", "PNEUMONIA"])
    ax.set_yticks([0, 1], ["NORMAL", "PNEUMONIA"])
    ax.set(xlabel="predicted", ylabel="true", title=f"Confusion at {threshold:.3f}")
    written.append(_save(fig, out_dir / "confusion_matrix.png"))

    fig, ax = plt.subplots(figsize=(5, 5))
    bins = mt.reliability_bins(y_arr, p_arr)
    ax.plot([0, 1], [0, 1], "--", color="grey", linewidth=0.8)
    if bins:
        mean_p, freq, count = zip(*bins, strict=True)
        ax.plot(mean_p, freq, "o-")
        for x, f, n in bins:
            ax.annotate(str(n), (x, f), textcoords="offset points", xytext=(4, -10), fontsize=7)
        del count
    ax.set(
        xlabel="mean predicted P(PNEUMONIA)",
        ylabel="observed frequency",
        xlim=(0, 1),
        ylim=(0, 1),
        title=f"Calibration (ECE {m['ece']:.3f})",
    )
    written.append(_save(fig, out_dir / "calibration.png"))
    return written


def write_training_plots(
    out_dir: Path, metadata: BundleMetadata, y_val: npt.ArrayLike, p_val: npt.ArrayLike
) -> list[Path]:
    """Per-phase training curves side by side, plus the validation plots."""
    out_dir.mkdir(parents=True, exist_ok=True)
    plt = _plt()
    history = metadata.history or {}
    fig, axes = plt.subplots(2, 2, figsize=(10, 7), sharey="row")
    for col, phase in enumerate(("phase1", "phase2")):
        h = history.get(phase) or {}
        for row, key in enumerate(("loss", "auc")):
            ax = axes[row][col]
            for name, style in ((key, "-"), (f"val_{key}", "--")):
                if h.get(name):
                    ax.plot(range(1, len(h[name]) + 1), h[name], style, label=name)
            ax.set(title=f"{phase}: {key}", xlabel="epoch")
            if ax.get_legend_handles_labels()[0]:
                ax.legend()
    fig.tight_layout()
    written = [_save(fig, out_dir / "training_curves.png")]
    threshold = metadata.threshold.value
    written += write_evaluation_plots(out_dir, y_val, p_val, threshold, title="(validation)")
    return written


def _save(fig: Any, path: Path) -> Path:
    fig.savefig(path, dpi=100, bbox_inches="tight")
    _plt().close(fig)
    return path
