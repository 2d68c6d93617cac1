"""``evaluate``: metrics and plots of a bundle on a labelled folder (SPEC §10)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

ORDER = 41


def register(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser(
        "evaluate", help="metrics and plots of a model bundle on a labelled folder"
    )
    p.add_argument("--model", required=True, type=Path, help="bundle folder")
    p.add_argument("--data", required=True, type=Path, help="folder with NORMAL/ and PNEUMONIA/")
    p.add_argument("--out", type=Path, help="write metrics.json, predictions.csv and plots here")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pacs_classifier.train.evaluate import evaluate_bundle

    ev = evaluate_bundle(args.model, args.data, args.out, progress=not args.quiet)
    m = ev.metrics
    ci = m["ci95"]
    print(f"n={m['n']}  threshold {m['threshold']:.4f}")
    for key in ("auc", "sensitivity", "specificity", "precision", "f1", "accuracy", "ece", "brier"):
        lo, hi = ci[key]
        print(f"{key:<12} {m[key]:.4f}  (95% CI {lo:.4f}-{hi:.4f})")
    c = m["confusion"]
    print(f"confusion    tp={c['tp']} fp={c['fp']} tn={c['tn']} fn={c['fn']}")
    if args.out:
        print(f"written to {args.out}")
    return 0
