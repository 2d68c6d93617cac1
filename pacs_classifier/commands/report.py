"""``report [NAME] [--since ISO] [--until ISO] [--format F] [--study UID] [--label L]``."""

from __future__ import annotations

import argparse
from datetime import UTC, datetime
from typing import Any

from pacs_classifier.db.models import Label
from pacs_classifier.errors import PermanentError
from pacs_classifier.report import drift, queries
from pacs_classifier.wiring import load_app

ORDER = 60
#: Computed in Python (statistics against the bundle's validation), not a SQL file.
DRIFT = "drift"


def register(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser(
        "report", help="run a named reporting query; no NAME lists them"
    )
    p.add_argument("name", nargs="?", metavar="NAME", help="the report to run")
    p.add_argument("--since", type=parse_time, metavar="ISO", help="from this UTC time (incl.)")
    p.add_argument("--until", type=parse_time, metavar="ISO", help="up to this UTC time (excl.)")
    p.add_argument("--format", choices=queries.FORMATS, default="table")
    p.add_argument("--study", metavar="UID", help="Study Instance UID (audit_trail)")
    p.add_argument("--label", choices=[m.value for m in Label], help="keep one label (results)")
    p.set_defaults(func=run_report)


def parse_time(text: str) -> datetime:
    """An ISO date or date-time; without a zone it is UTC."""
    try:
        value = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an ISO date or time: {text!r}") from None
    if value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    try:
        return value.astimezone(UTC)
    except OverflowError:
        # 0001-01-01T00:00+14:00 is before year 1 in UTC, 9999-12-31T23:59-12:00 after
        # 9999: as bounds they mean "from the beginning" and "to the end", so say that.
        end = datetime.min if value.year == 1 else datetime.max
        return end.replace(tzinfo=UTC)


def run_report(args: argparse.Namespace) -> int:
    if args.name is None:
        for report in queries.available().values():
            extra = " (--study UID)" if "study" in report.params else ""
            extra += " [--label L]" if "label" in report.params else ""
            print(f"{report.name:<16} {report.title}{extra}")
        print(f"{DRIFT:<16} Live traffic against validation per model version and week; alerts")
        return 0
    if args.since and args.until and args.since >= args.until:
        raise PermanentError("--since must be before --until")
    if args.name == DRIFT:
        return run_drift(args)
    report = queries.get(args.name)
    app = load_app(args)
    try:
        db = app.checked_db()
        with db.read_session() as session:
            result = queries.run(
                session,
                report,
                since=args.since,
                until=args.until,
                study=args.study,
                label=args.label,
            )
    finally:
        app.close()
    print(queries.render(result, args.format))
    return 0


def run_drift(args: argparse.Namespace) -> int:
    """``report drift``: the drift report; its new alerts are logged and audited."""
    import json

    app = load_app(args)
    try:
        db = app.checked_db()
        report = drift.evaluate(
            db, app.config, actor="cli:report", since=args.since, until=args.until
        )
    finally:
        app.close()
    if args.format == "json":
        print(json.dumps(drift.as_dict(report), indent=2))
    elif args.format == "csv":
        print(queries.render(_versions_result(report), "csv"))
    else:
        print(drift.render_text(report))
    return 0


def _versions_result(report: drift.DriftReport) -> queries.Result:
    """The per-version table as a query result (``--format csv``)."""
    columns = [
        "model_version",
        "week",
        "predictions",
        "positive_rate",
        "reference_positive_rate",
        "psi",
        "ks",
        "reference",
    ]
    rows = [
        (
            v.model_version,
            v.week,
            v.predictions,
            v.positive_rate,
            v.reference_positive_rate,
            v.psi,
            v.ks,
            v.reference,
        )
        for v in report.versions
    ]
    return queries.Result(columns, list(rows))
