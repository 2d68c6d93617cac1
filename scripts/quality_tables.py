"""Print a bundle's quality figures as Markdown tables (for the model card and docs/).

    python scripts/quality_tables.py models/reference [--stress-json eval/stress.json]

Reads ``metadata.json``: the validation metrics with their intervals, the patient-level
cross-validation of phase 1, and the shift stress suite at the frozen threshold. With
``--stress-json`` (written by ``evaluate --stress --out``) the stress table comes from that
evaluation instead, e.g. for a model trained before the suite existed.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pacs_classifier.model.bundle import read_metadata
from pacs_classifier.model.metadata import BundleMetadata


def _f(value: Any, digits: int = 3) -> str:
    return "—" if value is None else f"{float(value):.{digits}f}"


def validation_table(meta: BundleMetadata) -> str:
    final = meta.metrics.final
    ci = final.ci95 or {}
    lines = ["| | value | 95 % CI |", "| --- | --- | --- |"]
    for key in ("auc", "sensitivity", "specificity", "precision", "f1", "accuracy", "ece", "brier"):
        lo, hi = ci.get(key, (None, None))
        digits = 4 if key == "auc" else 3
        value = getattr(final, key)
        lines.append(f"| {key} | {_f(value, digits)} | {_f(lo, digits)}–{_f(hi, digits)} |")
    c = final.confusion or {}
    counts = ", ".join(f"{k.upper()} {c.get(k, '?')}" for k in ("tp", "fp", "tn", "fn"))
    lines.append(f"\nn = {final.n}; {counts}")
    return "\n".join(lines)


def cv_table(meta: BundleMetadata) -> str:
    cv = meta.cross_validation
    if not cv:
        return "(no cross-validation recorded)"
    lines = [
        f"{cv['folds']} patient-level folds, {cv['what']}; threshold "
        f"{cv['threshold_on_pooled_oof']:.4f}.\n",
        "| fold | n | AUC | sensitivity | specificity | F1 |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for i, f in enumerate(cv["per_fold"], 1):
        lines.append(
            f"| {i} | {int(f['n'])} | {_f(f['auc'], 4)} | {_f(f['sensitivity'])} | "
            f"{_f(f['specificity'])} | {_f(f['f1'])} |"
        )
    s = cv["summary"]
    lines.append(
        f"| mean ± sd | | {_f(s['auc']['mean'], 4)} ± {_f(s['auc']['sd'], 4)} | "
        f"{_f(s['sensitivity']['mean'])} ± {_f(s['sensitivity']['sd'])} | "
        f"{_f(s['specificity']['mean'])} ± {_f(s['specificity']['sd'])} | "
        f"{_f(s['f1']['mean'])} ± {_f(s['f1']['sd'])} |"
    )
    p = cv["pooled_oof"]
    lines.append(
        f"| pooled | | {_f(p['auc'], 4)} | {_f(p['sensitivity'])} | {_f(p['specificity'])} | "
        f"{_f(p['f1'])} |"
    )
    return "\n".join(lines)


def stress_table(stress: Mapping[str, Any]) -> str:
    held_out = set(stress.get("held_out_of_training", []))
    lines = [
        f"n = {stress.get('n', '?')}, threshold {stress['threshold']:.4f} (frozen); "
        "* = shift held out of training augmentation.\n",
        "| shift | AUC | sensitivity | specificity | ECE | mean p(NORMAL images) |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    rows = stress["shifts"]
    for name in ["clean", *[k for k in rows if k != "clean"]]:
        r = rows[name]
        mark = " *" if name in held_out else ""
        lines.append(
            f"| {name}{mark} | {_f(r['auc'], 4)} | {_f(r['sensitivity'])} | "
            f"{_f(r['specificity'])} | {_f(r['ece'])} | {_f(r.get('mean_probability_normal'))} |"
        )
    w = stress["worst"]
    lines.append(
        "\nWorst case over shifts: "
        + "; ".join(
            f"{k} {_f(w[k]['value'], 4 if k == 'auc' else 3)} ({w[k]['shift']})"
            for k in ("auc", "sensitivity", "specificity", "ece")
        )
    )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("bundle", type=Path)
    parser.add_argument("--stress-json", type=Path)
    args = parser.parse_args()
    meta = read_metadata(args.bundle)
    stress = (
        json.loads(args.stress_json.read_text(encoding="utf-8"))
        if args.stress_json
        else meta.stress
    )
    print("## Validation\n")
    print(validation_table(meta))
    print("\n## Cross-validation\n")
    print(cv_table(meta))
    print("\n## Stress suite\n")
    print(stress_table(stress) if stress else "(no stress suite recorded)")


if __name__ == "__main__":
    main()
