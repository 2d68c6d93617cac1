"""``model register|list|activate|calibrate|compare``: the model registry in the database,
and local acceptance at a site (:mod:`pacs_classifier.model.site`)."""

from __future__ import annotations

import argparse
import getpass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pacs_classifier.errors import PermanentError
from pacs_classifier.times import format_utc
from pacs_classifier.wiring import load_app

if TYPE_CHECKING:
    from pacs_classifier.model.site import Scores

ORDER = 42


def register(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser("model", help="the model registry")
    msub = p.add_subparsers(dest="model_command", metavar="ACTION", required=True)
    reg = msub.add_parser("register", help="check a bundle and copy it into model.dir")
    reg.add_argument("dir", type=Path, nargs="?", help="bundle folder")
    reg.add_argument(
        "--reference",
        action="store_true",
        help="the reference model shipped with the package, instead of DIR",
    )
    reg.add_argument("--activate", action="store_true", help="make it the active model")
    reg.add_argument(
        "--data",
        type=Path,
        metavar="DIR",
        help="labelled dataset root (NORMAL/, PNEUMONIA/) the bundle's split.json is "
        "relative to: the export's parity check runs on its validation images "
        "(default: [model] data_root; without either, on synthetic inputs)",
    )
    reg.add_argument(
        "--no-export",
        action="store_true",
        help="skip exporting to ONNX / int8 TFLite (each is kept only if it "
        "passes its parity check against Keras); Keras serves alone",
    )
    reg.add_argument(
        "--static-int8",
        action="store_true",
        help="when dynamic-range int8 fails its parity check, also try static int8 "
        "calibrated on training images under --data (minutes; docs/benchmarks.md)",
    )
    reg.set_defaults(func=run_register)
    lst = msub.add_parser("list", help="registered models")
    lst.set_defaults(func=run_list)
    act = msub.add_parser("activate", help="make a registered model the active one")
    act.add_argument("version")
    act.set_defaults(func=run_activate)
    cal = msub.add_parser(
        "calibrate",
        help="local acceptance: evaluate a model on the site's labelled sample, refit its "
        "calibration and threshold there and register the result as a new (inactive) version",
    )
    cal.add_argument("--model", required=True, metavar="VERSION", help="registered version")
    cal.add_argument(
        "--labels",
        required=True,
        type=Path,
        metavar="FILE|DIR",
        help="CSV of stored instances (columns sop_instance_uid,label) or a folder with "
        "NORMAL/ and PNEUMONIA/ sub-folders; labels are PNEUMONIA or NORMAL",
    )
    cal.set_defaults(func=run_calibrate)
    cmp = msub.add_parser(
        "compare", help="registered versions, as each would serve, on the same labelled sample"
    )
    cmp.add_argument("versions", nargs="+", metavar="VERSION")
    cmp.add_argument("--labels", required=True, type=Path, metavar="FILE|DIR")
    cmp.set_defaults(func=run_compare)


def actor() -> str:
    return f"cli:{getpass.getuser()}"


def run_register(args: argparse.Namespace) -> int:
    from pacs_classifier import REFERENCE_MODEL_DIR
    from pacs_classifier.model.registry import register_bundle

    if (args.dir is None) == (not args.reference):
        raise PermanentError("model register: give a bundle folder DIR or --reference, not both")
    bundle = REFERENCE_MODEL_DIR if args.reference else args.dir
    app = load_app(args)
    try:
        data_root = args.data or app.config.model_data_root
        if data_root is not None and not args.no_export and not data_root.is_dir():
            source = "--data" if args.data else "model.data_root"
            raise PermanentError(f"{source} {data_root}: not a folder")
        row = register_bundle(
            app.checked_db(),
            bundle,
            app.config.model_dir,
            actor=actor(),
            activate=args.activate,
            export=not args.no_export,
            data_root=data_root,
            static_int8=args.static_int8,
        )
    finally:
        app.close()
    state = "active" if row.active else "registered"
    print(
        f"model {row.version} {state} (threshold {row.threshold:.4f}, image size {row.image_size})"
    )
    return 0


def run_list(args: argparse.Namespace) -> int:
    from pacs_classifier.model.registry import list_models

    app = load_app(args)
    try:
        with app.checked_db().read_session() as session:
            rows = list_models(session)
            lines = [
                (
                    ("*" if r.active else " "),
                    r.version,
                    f"{r.threshold:.4f}",
                    str(r.image_size),
                    _auc(r.metrics),
                    format_utc(r.registered_at),
                )
                for r in rows
            ]
    finally:
        app.close()
    if not lines:
        print("no models registered")
        return 0
    header = (" ", "version", "threshold", "size", "val AUC", "registered_at")
    widths = [max(len(str(x[i])) for x in [header, *lines]) for i in range(len(header))]
    for row in [header, *lines]:
        print("  ".join(str(v).ljust(w) for v, w in zip(row, widths, strict=True)).rstrip())
    return 0


def _auc(metrics: dict[str, Any]) -> str:
    value = metrics.get("auc") if isinstance(metrics, dict) else None
    return f"{value:.4f}" if isinstance(value, int | float) else "-"


def run_activate(args: argparse.Namespace) -> int:
    from pacs_classifier.model.registry import activate_version

    app = load_app(args)
    try:
        row = activate_version(app.checked_db(), args.version, actor=actor())
    finally:
        app.close()
    print(f"model {row.version} is now active")
    return 0


def _table(rows: list[tuple[str, ...]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip() for row in rows
    )


def _sample_line(scores: Scores) -> str:
    refused = sum(scores.not_assessed.values())
    why = ", ".join(f"{n} {reason}" for reason, n in scores.not_assessed.items())
    return (
        f"sample {scores.sample.source}: {len(scores.sample.cases)} cases, {scores.n} assessed "
        f"({scores.positives} PNEUMONIA, {scores.negatives} NORMAL)"
        + (f", {refused} not assessed ({why})" if refused else "")
        + f"; runtime {scores.runtime}"
    )


def run_calibrate(args: argparse.Namespace) -> int:
    from pacs_classifier.model.site import calibrate_site, compare_table

    app = load_app(args)
    try:
        done = calibrate_site(app.checked_db(), app.config, args.model, args.labels, actor=actor())
    finally:
        app.close()
    fit = done.fit
    print(_sample_line(fit.scores))
    print(_table(compare_table([fit.before, fit.after])))
    print(f"at the new threshold: {fit.adequacy.bounds_text()}")
    print(
        f"model {done.version} registered, not active (derived from {args.model}); "
        f"to serve it: pacs-classifier model activate {done.version}"
    )
    return 0


def run_compare(args: argparse.Namespace) -> int:
    from pacs_classifier.model.site import compare_table, compare_versions

    app = load_app(args)
    try:
        scores, evaluations = compare_versions(
            app.checked_db(), app.config, args.versions, args.labels
        )
    finally:
        app.close()
    print(_sample_line(scores))
    print(_table(compare_table(evaluations)))
    return 0
