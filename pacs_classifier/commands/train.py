"""``train``: two-phase transfer learning on a labelled folder; writes a model bundle."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

ORDER = 40
log = logging.getLogger(__name__)


def register(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser(
        "train",
        help="train a model bundle (frozen base + head, then fine-tune)",
        description="Two-phase transfer learning on DATA/NORMAL and DATA/PNEUMONIA. The "
        "validation split is by patient; checkpoint, calibration and threshold "
        "are chosen on it.",
    )
    p.add_argument("--data", required=True, type=Path, help="folder with NORMAL/ and PNEUMONIA/")
    p.add_argument("--out", required=True, type=Path, help="bundle folder to create")
    p.add_argument(
        "--weights",
        default="imagenet",
        help="base weights: imagenet (downloaded by Keras), none, or a file path",
    )
    p.add_argument("--image-size", type=int, default=299)
    p.add_argument("--epochs-frozen", type=int, default=10)
    p.add_argument("--epochs-finetune", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--val-fraction", type=float, default=0.2)
    p.add_argument(
        "--base-cut",
        default="mixed10",
        help="last InceptionV3 block kept (mixed0..mixed10), or auto: pick the "
        "best of mixed7..mixed10 by phase-1 validation AUC",
    )
    p.add_argument(
        "--unfreeze-from",
        default="all",
        help="phase 2 trains this block (mixed1..mixed10) and those above; all: the whole base",
    )
    p.add_argument(
        "--base-input-range",
        choices=("symmetric", "unit"),
        default="symmetric",
        help="what the base was trained on: [-1, 1] (Keras ImageNet) or [0, 1]",
    )
    p.add_argument("--lr-finetune", type=float, default=1e-5)
    p.add_argument(
        "--target-sensitivity",
        type=float,
        default=0.97,
        help="threshold rule: highest threshold keeping validation sensitivity >= this",
    )
    p.add_argument(
        "--calibration",
        choices=("temperature", "platt"),
        default="temperature",
        help="fitted on validation: temperature scaling, or Platt scaling (temperature and "
        "bias, which also undoes the shift class weighting gives the intercept)",
    )
    p.add_argument(
        "--augment",
        choices=("none", "light", "acquisition"),
        default="light",
        help="phase 2 augmentation: light (small rotation, shift, zoom, contrast), or "
        "acquisition (that plus exposure, window, blur and resolution loss per image)",
    )
    p.add_argument("--no-augment", action="store_true", help="same as --augment none")
    p.add_argument(
        "--intensity",
        choices=("none", "equalize"),
        default="none",
        help="intensity normalisation inside the model, shared by training and every "
        "runtime: equalize = per-image histogram equalisation",
    )
    p.add_argument("--label-smoothing", type=float, default=0.0)
    p.add_argument("--dropout", type=float, default=0.3)
    p.add_argument(
        "--cv-folds",
        type=int,
        default=5,
        help="patient-level k-fold cross-validation of phase 1 (0: off)",
    )
    p.add_argument(
        "--no-stress", action="store_true", help="skip the shift stress suite on validation"
    )
    p.add_argument(
        "--stress-max-images",
        type=int,
        default=0,
        help="stress suite on a stratified subset of validation (0: all of it)",
    )
    p.add_argument(
        "--calibrate-on",
        choices=("validation", "validation+shifts"),
        default="validation",
        help="what calibration and threshold are fitted on: the clean validation split, "
        "or it pooled with its trained-in stress-suite shifts",
    )
    p.add_argument("--version", help="bundle version (default: time and content hash)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pacs_classifier.train.trainer import TrainOptions, train

    opts = TrainOptions(
        data=args.data,
        out=args.out,
        weights=args.weights,
        image_size=args.image_size,
        epochs_frozen=args.epochs_frozen,
        epochs_finetune=args.epochs_finetune,
        batch_size=args.batch_size,
        seed=args.seed,
        val_fraction=args.val_fraction,
        base_cut=args.base_cut,
        unfreeze_from=args.unfreeze_from,
        base_input_range=args.base_input_range,
        lr_finetune=args.lr_finetune,
        target_sensitivity=args.target_sensitivity,
        calibration=args.calibration,
        augment="none" if args.no_augment else args.augment,
        intensity=args.intensity,
        label_smoothing=args.label_smoothing,
        dropout=args.dropout,
        cv_folds=args.cv_folds,
        stress=not args.no_stress,
        stress_max_images=args.stress_max_images,
        calibrate_on=args.calibrate_on,
        version=args.version,
        progress=not args.quiet,
    )
    result = train(opts)
    final = result.final
    print(f"bundle {result.version} written to {result.out}")
    print(
        f"validation: AUC {_num(final.auc, 4)}  sensitivity {_num(final.sensitivity)}  "
        f"specificity {_num(final.specificity)}  precision {_num(final.precision)}  "
        f"F1 {_num(final.f1)}  threshold {result.metadata.threshold.value:.4f}"
    )
    return 0


def _num(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"
