"""``model register|list|activate``: the model registry in the database."""

from __future__ import annotations

import argparse
import getpass
from pathlib import Path
from typing import Any

from pacs_classifier.errors import PermanentError
from pacs_classifier.times import format_utc
from pacs_classifier.wiring import load_app

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
    reg.set_defaults(func=run_register)
    lst = msub.add_parser("list", help="registered models")
    lst.set_defaults(func=run_list)
    act = msub.add_parser("activate", help="make a registered model the active one")
    act.add_argument("version")
    act.set_defaults(func=run_activate)


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
