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
    p.add_argument(
        "--runtime",
        choices=("keras", "onnx", "tflite-int8", "auto"),
        default="keras",
        help="serving runtime to evaluate through (exported ones exist after 'model register')",
    )
    p.add_argument(
        "--stress",
        action="store_true",
        help="also run the shift stress suite (13 acquisition changes) at the frozen threshold",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pacs_classifier.train.evaluate import evaluate_bundle

    ev = evaluate_bundle(
        args.model,
        args.data,
        args.out,
        progress=not args.quiet,
        runtime=args.runtime,
        stress=args.stress,
    )
    m = ev.metrics
    ci = m["ci95"]
    print(f"n={m['n']}  threshold {m['threshold']:.4f}  runtime {m['runtime']}")
    for key in ("auc", "sensitivity", "specificity", "precision", "f1", "accuracy", "ece", "brier"):
        lo, hi = ci[key]
        print(f"{key:<12} {m[key]:.4f}  (95% CI {lo:.4f}-{hi:.4f})")
    c = m["confusion"]
    print(f"confusion    tp={c['tp']} fp={c['fp']} tn={c['tn']} fn={c['fn']}")
    if args.stress:
        print_stress(m["stress"])
    if args.out:
        print(f"written to {args.out}")
    return 0


def print_stress(stress: dict[str, Any]) -> None:
    """The stress suite as a table, held-out shifts marked with *."""
    held_out = set(stress["held_out_of_training"])
    print(f"stress suite at threshold {stress['threshold']:.4f} (* = held out of training)")
    print(f"{'shift':<18} {'AUC':>6} {'sens':>6} {'spec':>6} {'ECE':>6}")
    for name, row in stress["shifts"].items():
        mark = "*" if name in held_out else " "
        print(
            f"{name:<17}{mark} {row['auc']:6.4f} {row['sensitivity']:6.3f} "
            f"{row['specificity']:6.3f} {row['ece']:6.3f}"
        )
    worst = stress["worst"]
    print(
        "worst: "
        + ", ".join(f"{k} {v['value']:.3f} ({v['shift']})" for k, v in sorted(worst.items()))
    )
