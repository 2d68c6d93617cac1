"""``reclassify [--since ISO] [--until ISO] [--all]``: run the nightly job now and wait.

The run goes through the same queue as the nightly one; this process works on the run's
jobs itself (any running ``serve`` workers share them) and prints the run's summary.
"""

from __future__ import annotations

import argparse
import getpass
from typing import Any

from pacs_classifier.commands.report import parse_time
from pacs_classifier.db.models import RunTrigger
from pacs_classifier.errors import PermanentError
from pacs_classifier.wiring import load_app

ORDER = 55


def register(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser(
        "reclassify", help="reclassify now with the active model (what the nightly job runs)"
    )
    p.add_argument("--since", type=parse_time, metavar="ISO", help="received from (UTC)")
    p.add_argument("--until", type=parse_time, metavar="ISO", help="received before (UTC)")
    p.add_argument(
        "--all",
        action="store_true",
        help="every assessed instance, also those already classified by the active model",
    )
    p.set_defaults(func=run_reclassify)


def run_reclassify(args: argparse.Namespace) -> int:
    from pacs_classifier.reclassify import run_finished, run_summary, start_run

    if args.since and args.until and args.since >= args.until:
        raise PermanentError("--since must be before --until")
    actor = f"cli:{getpass.getuser()}"
    with load_app(args) as app:
        db = app.checked_db()
        run_id = start_run(
            db,
            trigger=RunTrigger.CLI,
            actor=actor,
            since=args.since,
            until=args.until,
            all_instances=args.all,
        )
        # Whichever worker ends the run's last job closes the run (the queue's hook).
        if not run_finished(db, run_id):
            app.worker(run_id=run_id).drain(until=lambda: run_finished(db, run_id))
        with db.read_session() as session:
            s = run_summary(session, run_id)
    print(
        f"run {s.id} ({s.trigger}, model {s.model_version}): {s.state}, "
        f"{s.instances_done}/{s.instances_total} instance(s) reclassified, "
        f"{s.labels_changed} label(s) changed"
    )
    return 0
