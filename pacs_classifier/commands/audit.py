"""``audit verify``: check the audit trail's hash chain from the first event to the tip."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from pacs_classifier.db.audit import verify_chain
from pacs_classifier.wiring import load_app

ORDER = 80

EXIT_BROKEN = 1


def register(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser("audit", help="audit trail integrity")
    asub = p.add_subparsers(dest="audit_command", metavar="ACTION", required=True)
    verify = asub.add_parser(
        "verify",
        help="check the hash chain; print 'ok N events' or name the first broken row",
    )
    verify.set_defaults(func=run_verify)


def run_verify(args: argparse.Namespace) -> int:
    """Print ``ok N events`` (exit 0), or the first broken row on stderr (exit 1)."""
    app = load_app(args)
    try:
        db = app.checked_db()
        with db.read_session() as session:
            report = verify_chain(session)
    finally:
        app.close()
    if report.ok:
        print(report.describe())
        return 0
    print(f"pacs-classifier: {report.describe()}", file=sys.stderr)
    return EXIT_BROKEN
