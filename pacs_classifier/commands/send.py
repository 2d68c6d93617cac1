"""``send retry [--failed] [--destination AE]``: requeue outbound sends (SPEC §11).

Without ``--failed`` the sends waiting out a backoff become due now; with it the sends
that ran out of attempts start over too. A running ``serve --roles sender`` picks them
up; the command itself only changes the queue (audited as ``result.send_retry``).
"""

from __future__ import annotations

import argparse
import getpass
from typing import Any

from pacs_classifier.errors import ConfigError
from pacs_classifier.wiring import load_app

ORDER = 70


def register(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser(
        "send", help="outbound sends of SRs and overlays to the destinations"
    )
    actions = p.add_subparsers(dest="send_command", metavar="ACTION", required=True)
    retry = actions.add_parser("retry", help="requeue waiting (and with --failed, failed) sends")
    retry.add_argument(
        "--failed", action="store_true", help="also requeue sends that ran out of attempts"
    )
    retry.add_argument("--destination", metavar="AE", help="only sends to this AE title")
    retry.set_defaults(func=run_retry)


def run_retry(args: argparse.Namespace) -> int:
    from pacs_classifier.results.outbound import requeue_sends

    app = load_app(args)
    try:
        known = {d.ae_title for d in app.config.destinations}
        if args.destination is not None and args.destination not in known:
            # A typo should not silently match nothing; and sends to a destination
            # removed from the config would only fail again.
            names = ", ".join(sorted(known)) or "none configured"
            raise ConfigError(
                f"--destination: {args.destination!r} is not in [[destinations]] ({names})"
            )
        count = requeue_sends(
            app.checked_db(),
            include_failed=args.failed,
            destination=args.destination,
            actor=f"cli:{getpass.getuser()}",
        )
    finally:
        app.close()
    print(f"requeued {count} send(s)")
    return 0
