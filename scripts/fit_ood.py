"""Fit the out-of-distribution check of an existing bundle: writes BUNDLE/ood.npz.

    .venv/bin/python scripts/fit_ood.py models/reference --data ../shared/data/cxr224/train

Uses the bundle's own split (``split.json``): up to ``--train-images`` training images for
the feature distribution, every validation image for the threshold (at most 1 % of them
refused; half that on the validation set itself), each pool with ``--shift-images`` of its
images under every trained-in acquisition shift (``train/stress.py``). The model files
and ``metadata.json`` are not changed. A registered copy needs registering again (or this
run on the copy in ``model.dir``); the trainer fits the check for every new bundle itself.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pacs_classifier.model.ood import DEFAULT_COMPONENTS  # noqa: E402
from pacs_classifier.train.ood import (  # noqa: E402
    DEFAULT_SHIFT_IMAGES,
    DEFAULT_TRAIN_IMAGES,
    fit_bundle_ood,
)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("bundle", type=Path)
    ap.add_argument(
        "--data", type=Path, required=True, help="dataset root the bundle's split.json is under"
    )
    ap.add_argument("--train-images", type=int, default=DEFAULT_TRAIN_IMAGES)
    ap.add_argument("--components", type=int, default=DEFAULT_COMPONENTS)
    ap.add_argument(
        "--shift-images",
        type=int,
        default=DEFAULT_SHIFT_IMAGES,
        help="images of each split under each trained-in acquisition shift (0: clean only)",
    )
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    model = fit_bundle_ood(
        args.bundle,
        data=args.data,
        max_train=args.train_images,
        components=args.components,
        shift_images=args.shift_images,
    )
    print(
        f"{args.bundle / 'ood.npz'}: {model.dims[1]} components of {model.dims[0]} features, "
        f"fitted on {model.fitted_on} training images; threshold {model.threshold:.4f} "
        f"refuses {100 * model.validation_refused:.2f} % of {model.validation_n} validation "
        "images"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
