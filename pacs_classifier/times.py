"""How times are written for people: UTC, with its zone, the same in every output.

``status``, the reports, ``model list`` and the log lines all write a time as
``2026-12-02 14:27:00Z`` (with ``.123`` or ``.123456`` where the fraction matters): the
database keeps UTC (SPEC §5) and a reader should never have to guess the zone.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Literal

Precision = Literal["seconds", "milliseconds", "microseconds"]

#: How SQLite hands back a stored time through raw SQL (SQLAlchemy's storage format,
#: which our ``UTCDateTime`` columns fill with UTC): text, without a zone.
_SQLITE_TIME = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d(\.\d{1,6})?")


def format_utc(value: datetime, precision: Precision = "seconds") -> str:
    """``value`` in UTC as ``YYYY-MM-DD HH:MM:SS[.fff[fff]]Z``; a naive value is taken as UTC."""
    aware = value if value.tzinfo else value.replace(tzinfo=UTC)
    return aware.astimezone(UTC).replace(tzinfo=None).isoformat(" ", precision) + "Z"


def format_sql_time(value: str, precision: Precision = "microseconds") -> str:
    """A time that SQLite returned as text, written as :func:`format_utc` does; other
    text is returned unchanged."""
    if _SQLITE_TIME.fullmatch(value):
        return format_utc(datetime.fromisoformat(value), precision)
    return value
