"""Refit a bundle's calibration and threshold on its own validation split, as a new bundle.

The model files are copied unchanged (same SHA-256); only the calibration, the threshold
and the validation metrics in ``metadata.json`` are new, and the new version records the
one it was derived from. The validation images are those the bundle's ``split.json``
names, relative to the dataset root ``--data``, read through the same ``normalize_file``
the daemon serves with. The test data is never consulted.

    .venv/bin/python scripts/recalibrate_bundle.py models/reference --out /tmp/recal \\
        --data ../shared/data/cxr224/train --method platt
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from pacs_classifier.model.bundle import (
    MODEL_FILES,
    BundleInfo,
    read_bundle,
    split_images,
    write_metadata,
)
from pacs_classifier.model.metadata import DerivedFrom
from pacs_classifier.model.runtime import KerasPredictor
from pacs_classifier.train.data import Sample, load_arrays, patient_group
from pacs_classifier.train.plots import write_training_plots
from pacs_classifier.train.trainer import CALIBRATIONS, fit_operating_point


def validation_samples(info: BundleInfo, data: Path) -> list[Sample]:
    """The bundle's validation images under the dataset root ``data``; all of them."""
    found = split_images(info, data, "val")
    split_file = info.metadata.data.split_file if info.metadata.data else "split.json"
    named = len(json.loads((info.path / split_file).read_text(encoding="utf-8"))["val"])
    if len(found) != named:
        raise SystemExit(
            f"{data}: found {len(found)} of the {named} validation images the bundle's "
            f"{split_file} names"
        )
    return [Sample(path, label, patient_group(path.name)) for path, label in found]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("bundle", type=Path)
    parser.add_argument("--out", type=Path, required=True, help="new bundle folder")
    parser.add_argument("--method", choices=CALIBRATIONS, default="platt")
    parser.add_argument(
        "--data",
        type=Path,
        required=True,
        help="labelled dataset root (NORMAL/, PNEUMONIA/) the bundle's split.json is relative to",
    )
    parser.add_argument(
        "--target-sensitivity",
        type=float,
        help="the threshold rule's target (default: the bundle's threshold.target_sensitivity)",
    )
    args = parser.parse_args()
    if args.out.exists():
        parser.error(f"--out {args.out} exists")

    info = read_bundle(args.bundle)
    meta = info.metadata
    samples = validation_samples(info, args.data)
    target = (
        args.target_sensitivity
        if args.target_sensitivity is not None
        else meta.threshold.target_sensitivity
    )
    if target is None:
        parser.error(
            "the bundle records no threshold.target_sensitivity: give --target-sensitivity"
        )

    grey = load_arrays(samples, info.image_size)
    predictor = KerasPredictor(info)
    raw = np.concatenate(
        [
            predictor.raw_predict(np.repeat(grey[i : i + 32, ..., np.newaxis], 3, axis=-1))
            for i in range(0, len(grey), 32)
        ]
    )
    y = np.array([s.label for s in samples])
    point = fit_operating_point(y, raw, args.method, target, seed=meta.seed or 0)

    args.out.mkdir(parents=True)
    for name in (*MODEL_FILES, "split.json"):
        shutil.copy2(info.path / name, args.out / name)
    new = meta.replace(
        version=f"{info.version}-{args.method}"[:64],
        created_at=datetime.now(UTC),
        derived_from=DerivedFrom(
            version=info.version,
            change=f"calibration ({args.method}) and threshold refit on "
            "the same validation split; model files unchanged",
        ),
        calibration=point.calibration,
        threshold=point.threshold,
        metrics=meta.metrics.replace(
            final=point.metrics, final_before_recalibration=meta.metrics.final
        ),
    )
    write_metadata(args.out, new)
    write_training_plots(args.out / "plots", new, y, point.p_val)
    read_bundle(args.out)  # the new bundle checks out before anyone registers it
    m, old = point.metrics, meta.metrics.final
    print(f"bundle {new.version} written to {args.out}")
    for key in ("auc", "sensitivity", "specificity", "precision", "f1", "ece", "brier"):
        print(f"{key:<12} {_num(getattr(old, key))} -> {_num(getattr(m, key))}")
    print(f"threshold    {meta.threshold.value:.4f} -> {point.threshold.value:.4f}")
    return 0


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


if __name__ == "__main__":
    sys.exit(main())
