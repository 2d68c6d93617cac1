"""Named reporting queries: ``report/sql/NAME.sql``, one portable SQL text each.

Each file starts with ``--`` header lines (``title``, ``description``, ``params``) and
holds one SELECT with named parameters: ``:since`` and ``:until`` (UTC, half-open
``[since, until)``; open-ended when not given), ``:study`` where the report needs a
Study Instance UID and ``:label`` where it can keep one label (``''`` keeps all). The
same text runs on SQLite and PostgreSQL; what differs between them (a day from a
timestamp, seconds between two) is inside the ``v_results`` view that the migrations
create for each database.
"""

from __future__ import annotations

import csv
import io
import json
import re
from dataclasses import dataclass
from datetime import UTC, date, datetime
from decimal import Decimal
from importlib import resources
from typing import Any

from sqlalchemy import bindparam, text
from sqlalchemy.orm import Session

from pacs_classifier.db.models import UTCDateTime
from pacs_classifier.errors import PermanentError
from pacs_classifier.times import format_sql_time, format_utc

FORMATS = ("table", "csv", "json")
#: Bounds used when --since/--until are not given: the query text stays the same.
EARLIEST = datetime(1970, 1, 1, tzinfo=UTC)
LATEST = datetime(9999, 12, 31, tzinfo=UTC)
_HEADER = re.compile(r"^--\s*(\w+):\s*(.*)$")


@dataclass(frozen=True)
class Report:
    name: str
    title: str
    description: str
    params: tuple[str, ...]
    sql: str


@dataclass(frozen=True)
class Result:
    columns: list[str]
    rows: list[tuple[Any, ...]]


def available() -> dict[str, Report]:
    """Every shipped report by name, sorted."""
    folder = resources.files("pacs_classifier.report").joinpath("sql")
    reports = {}
    for entry in sorted(folder.iterdir(), key=lambda e: e.name):
        if entry.name.endswith(".sql"):
            report = parse(entry.name.removesuffix(".sql"), entry.read_text(encoding="utf-8"))
            reports[report.name] = report
    return reports


def get(name: str) -> Report:
    reports = available()
    if name not in reports:
        raise PermanentError(f"no report named {name!r} (available: {', '.join(reports)})")
    return reports[name]


def parse(name: str, source: str) -> Report:
    """Split a report file into its header fields and its SQL."""
    fields: dict[str, str] = {}
    last = None
    body: list[str] = []
    for line in source.splitlines():
        m = _HEADER.match(line)
        if m and not body:
            last = m.group(1)
            fields[last] = m.group(2).strip()
        elif line.startswith("--") and last and not body:
            fields[last] += " " + line.lstrip("-").strip()
        else:
            body.append(line)
    params = tuple(p.strip() for p in fields.get("params", "").split(",") if p.strip())
    return Report(
        name=name,
        title=fields.get("title", name),
        description=fields.get("description", ""),
        params=params,
        sql="\n".join(body).strip(),
    )


def run(
    session: Session,
    report: Report,
    *,
    since: datetime | None = None,
    until: datetime | None = None,
    study: str | None = None,
    label: str | None = None,
) -> Result:
    """Execute a report with its parameters bound (times as UTC on both databases)."""
    values: dict[str, Any] = {"since": since or EARLIEST, "until": until or LATEST}
    binds = [
        bindparam("since", type_=UTCDateTime()),
        bindparam("until", type_=UTCDateTime()),
    ]
    if "study" in report.params:
        if not study:
            raise PermanentError(f"report {report.name} needs --study UID")
        values["study"] = study
        binds.append(bindparam("study"))
    if "label" in report.params:
        # '' rather than NULL: PostgreSQL cannot type a bare "$1 IS NULL" parameter.
        values["label"] = label or ""
        binds.append(bindparam("label"))
    elif label:
        raise PermanentError(f"report {report.name} has no --label")
    stmt = text(report.sql).bindparams(*binds)
    result = session.execute(stmt, values)
    columns = list(result.keys())
    rows = [tuple(_plain(v) for v in row) for row in result.all()]
    return Result(columns, rows)


def _plain(value: Any) -> Any:
    """One representation on both databases: times as UTC text with its zone (SQLite
    hands them over as text already), decimals as floats."""
    if isinstance(value, datetime):
        return format_utc(value, "microseconds")
    if isinstance(value, str):
        return format_sql_time(value)
    if isinstance(value, date):
        return value.isoformat()
    if isinstance(value, Decimal):
        return float(value)
    return value


def render(result: Result, fmt: str) -> str:
    """The result as an aligned table, CSV, or a JSON list of objects."""
    if fmt == "json":
        return json.dumps(
            [dict(zip(result.columns, r, strict=True)) for r in result.rows], indent=2
        )
    if fmt == "csv":
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(result.columns)
        writer.writerows(result.rows)
        return out.getvalue().rstrip("\n")
    if fmt != "table":
        raise PermanentError(f"--format must be one of {', '.join(FORMATS)}, received {fmt!r}")
    cells = [result.columns] + [["" if v is None else str(v) for v in r] for r in result.rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(result.columns))]
    lines = [
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in cells
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    if not result.rows:
        lines.append("(no rows)")
    return "\n".join(lines)
