"""Add ``validation_scores.npz`` to an existing bundle (the drift report's reference).

Predicts the bundle's validation split (``split.json`` → ``val``, relative to the
dataset root ``--data``) through the serving path (``normalize_file`` and the
``keras`` runtime, calibrated), writes the labels and probabilities beside the model
files, and checks them against the bundle's recorded validation confusion matrix. The
model files and ``metadata.json`` are not touched. New bundles get the file from the
trainer.

    nice -n 10 .venv/bin/python scripts/validation_scores.py \\
        --bundle models/reference --data ../shared/data/cxr224/train
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from pacs_classifier.model.bundle import read_bundle, split_images
from pacs_classifier.model.runtime import load_predictor
from pacs_classifier.model.validation_scores import write_validation_scores
from pacs_classifier.preprocess import normalize_file


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--bundle", type=Path, required=True)
    parser.add_argument("--data", type=Path, required=True, help="the dataset root")
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args(argv)
    info = read_bundle(args.bundle)
    predictor = load_predictor(info, "keras")
    samples = split_images(info, args.data)
    expected = info.metadata.metrics.final.n
    if len(samples) != expected:
        raise SystemExit(f"{len(samples)} validation images under {args.data}, expected {expected}")
    probs: list[float] = []
    for i in range(0, len(samples), args.batch_size):
        chunk = samples[i : i + args.batch_size]
        batch = np.stack([normalize_file(p, image_size=info.image_size) for p, _ in chunk])
        probs.extend(float(v) for v in predictor.predict(batch))
        print(f"\r{len(probs)}/{len(samples)}", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    y = np.array([label for _, label in samples], dtype=np.int8)
    p = np.array(probs, dtype=np.float64)
    path = write_validation_scores(args.bundle, y, p)
    positive = p >= info.threshold
    found = {
        "tp": int(np.sum(positive & (y == 1))),
        "fp": int(np.sum(positive & (y == 0))),
        "tn": int(np.sum(~positive & (y == 0))),
        "fn": int(np.sum(~positive & (y == 1))),
    }
    recorded = info.metadata.metrics.final.confusion
    print(f"wrote {path}: {len(p)} images, confusion at {info.threshold:.4f}: {found}")
    print(f"recorded in metadata.json:            {recorded}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
