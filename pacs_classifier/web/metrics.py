"""``/metrics``: the daemon's counters, read from the database on every scrape.

The listener, the workers and the web role may run in different processes or on
different machines; what they share is the database. So no counter lives in a process:
each scrape counts what the append-only tables and the audit chain already record, and
any web process answers the same numbers. A restart loses nothing and no multiprocess
directory has to be shared. Counters only rise because the rows they count are never
deleted.

Sources:

- associations: ``audit_events`` ``association`` by outcome (accepted / rejected);
- C-STOREs: ``audit_events`` ``store`` by outcome (stored, new_version, duplicate: status
  success; refused: the DIMSE status the listener answered). A C-STORE refused because
  the database was down cannot be recorded there and is not counted;
- bytes received: the size of every stored instance version (duplicates are not stored);
- jobs: ``jobs`` by kind and state (a gauge);
- classification latency: seconds from receipt to each live prediction (a histogram);
- predictions: ``predictions`` by label and model version;
- not assessed: ``jobs`` ended ``not_assessed`` by reason;
- reclassification runs: ``reclassification_runs`` by trigger and state, and the labels
  they changed;
- sends: ``audit_events`` :data:`ACTION_SEND` by outcome (written by the outbound sender).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Iterator
from typing import Any

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector, CollectorRegistry
from sqlalchemy import ColumnElement, Float, case, cast, func, select
from sqlalchemy.orm import Session

from pacs_classifier.db.engine import Database
from pacs_classifier.db.models import (
    AuditEvent,
    Instance,
    Job,
    JobState,
    Model,
    Prediction,
    ReclassificationRun,
)
from pacs_classifier.errors import PacsClassifierError
from pacs_classifier.receive import statuses
from pacs_classifier.receive.listener import ACTION_ASSOCIATION
from pacs_classifier.results.outbound import ACTION_SEND
from pacs_classifier.store.ingest import ACTION_STORE, IngestOutcome

log = logging.getLogger(__name__)

PREFIX = "pacs_classifier"
#: The audit action of one outbound send attempt's outcome (results to the PACS).
#: Upper bounds of the latency histogram, seconds: a batch within a second up to a
#: backlog of an hour.
LATENCY_BUCKETS_S: tuple[float, ...] = (0.5, 1, 2, 5, 10, 30, 60, 120, 300, 900, 3600)
_SUCCESS = statuses.NAMES[statuses.SUCCESS]


def _seconds_between(dialect: str, start: Any, end: Any) -> ColumnElement[Any]:
    """Seconds from ``start`` to ``end``, which SQLite and PostgreSQL spell differently."""
    if dialect == "postgresql":
        return func.extract("epoch", end - start)
    return (func.julianday(end) - func.julianday(start)) * 86400.0


class DatabaseCollector(Collector):
    """A prometheus-client collector whose every sample is a count in the database."""

    def __init__(self, db: Database) -> None:
        self.db = db

    def collect(self) -> Iterator[Metric]:
        started = time.perf_counter()
        try:
            with self.db.read_session() as session:
                families = list(self._families(session))
        except PacsClassifierError as exc:
            log.warning("metrics: %s", exc)
            families = []
        up = GaugeMetricFamily(
            f"{PREFIX}_database_up", "1 when this scrape could read the database, else 0"
        )
        up.add_metric([], 1.0 if families else 0.0)
        took = GaugeMetricFamily(
            f"{PREFIX}_scrape_duration_seconds", "Seconds this scrape spent in the database"
        )
        took.add_metric([], time.perf_counter() - started)
        yield from families
        yield up
        yield took

    def _families(self, session: Session) -> Iterable[Metric]:
        yield self._associations(session)
        yield self._cstores(session)
        received = CounterMetricFamily(
            f"{PREFIX}_received_bytes", "Bytes of instance versions stored (duplicates excluded)"
        )
        received.add_metric(
            [], float(session.scalar(select(func.coalesce(func.sum(Instance.file_size), 0))) or 0)
        )
        yield received
        yield self._jobs(session)
        yield self._latency(session)
        yield self._predictions(session)
        yield self._not_assessed(session)
        yield from self._runs(session)
        yield self._sends(session)

    def _associations(self, session: Session) -> Metric:
        family = CounterMetricFamily(
            f"{PREFIX}_associations",
            "DICOM associations requested of the listener, by outcome",
            labels=["outcome"],
        )
        rows = session.execute(
            select(AuditEvent.outcome, func.count())
            .where(AuditEvent.action == ACTION_ASSOCIATION)
            .group_by(AuditEvent.outcome)
        ).all()
        for outcome, n in sorted(rows):
            family.add_metric([str(outcome)], float(n))
        return family

    def _cstores(self, session: Session) -> Metric:
        family = CounterMetricFamily(
            f"{PREFIX}_cstores",
            "C-STORE requests answered, by DIMSE status and by what was done with the instance",
            labels=["status", "outcome"],
        )
        status_name = AuditEvent.detail["status_name"].as_string()
        rows = session.execute(
            select(AuditEvent.outcome, status_name, func.count())
            .where(AuditEvent.action == ACTION_STORE)
            .group_by(AuditEvent.outcome, status_name)
        ).all()
        counts: dict[tuple[str, str], float] = {}
        for outcome, name, n in rows:
            stored = outcome in {o.value for o in IngestOutcome}
            key = (_SUCCESS if stored else str(name or "unknown"), str(outcome))
            counts[key] = counts.get(key, 0.0) + float(n)
        for (status, outcome), n in sorted(counts.items()):
            family.add_metric([status, outcome], n)
        return family

    def _jobs(self, session: Session) -> Metric:
        family = GaugeMetricFamily(
            f"{PREFIX}_jobs", "Classification jobs by kind and state", labels=["kind", "state"]
        )
        rows = session.execute(
            select(Job.kind, Job.state, func.count()).group_by(Job.kind, Job.state)
        ).all()
        for kind, state, n in sorted(rows, key=lambda r: (str(r[0]), str(r[1]))):
            family.add_metric([str(kind), str(state)], float(n))
        return family

    def _latency(self, session: Session) -> Metric:
        seconds = _seconds_between(
            self.db.dialect, Instance.received_at, Prediction.created_at
        ).label("s")
        live = (
            select(seconds)
            .join(Instance, Instance.id == Prediction.instance_id)
            .where(Prediction.run_id.is_(None))
            .subquery()
        )
        columns = [
            func.coalesce(func.sum(case((live.c.s <= bound, 1), else_=0)), 0)
            for bound in LATENCY_BUCKETS_S
        ]
        row = session.execute(
            select(func.count(), func.coalesce(func.sum(cast(live.c.s, Float)), 0.0), *columns)
        ).one()
        total, total_s = int(row[0]), float(row[1])
        buckets = [
            (_le(bound), float(n)) for bound, n in zip(LATENCY_BUCKETS_S, row[2:], strict=True)
        ]
        buckets.append(("+Inf", float(total)))
        family = HistogramMetricFamily(
            f"{PREFIX}_classification_latency_seconds",
            "Seconds from receipt of an instance to its prediction (live classification)",
        )
        family.add_metric([], buckets, sum_value=total_s)
        return family

    def _predictions(self, session: Session) -> Metric:
        family = CounterMetricFamily(
            f"{PREFIX}_predictions",
            "Predictions recorded, by label and model version",
            labels=["label", "model_version"],
        )
        rows = session.execute(
            select(Prediction.label, Model.version, func.count())
            .join(Model, Model.id == Prediction.model_id)
            .group_by(Prediction.label, Model.version)
        ).all()
        for label, version, n in sorted(rows, key=lambda r: (str(r[0]), str(r[1]))):
            family.add_metric([str(label), str(version)], float(n))
        return family

    def _not_assessed(self, session: Session) -> Metric:
        family = CounterMetricFamily(
            f"{PREFIX}_not_assessed",
            "Jobs that ended not assessed, by reason code",
            labels=["reason"],
        )
        rows = session.execute(
            select(Job.reason, func.count())
            .where(Job.state == JobState.NOT_ASSESSED)
            .group_by(Job.reason)
        ).all()
        for reason, n in sorted(rows, key=lambda r: str(r[0])):
            family.add_metric([str(reason or "")], float(n))
        return family

    def _runs(self, session: Session) -> Iterable[Metric]:
        runs = CounterMetricFamily(
            f"{PREFIX}_reclassification_runs",
            "Reclassification runs started, by trigger and state",
            labels=["trigger", "state"],
        )
        rows = session.execute(
            select(ReclassificationRun.trigger, ReclassificationRun.state, func.count()).group_by(
                ReclassificationRun.trigger, ReclassificationRun.state
            )
        ).all()
        for trigger, state, n in sorted(rows, key=lambda r: (str(r[0]), str(r[1]))):
            runs.add_metric([str(trigger), str(state)], float(n))
        yield runs
        changed = CounterMetricFamily(
            f"{PREFIX}_reclassification_labels_changed",
            "Labels changed by reclassification runs",
        )
        changed.add_metric(
            [],
            float(
                session.scalar(
                    select(func.coalesce(func.sum(ReclassificationRun.labels_changed), 0))
                )
                or 0
            ),
        )
        yield changed

    def _sends(self, session: Session) -> Metric:
        family = CounterMetricFamily(
            f"{PREFIX}_sends",
            "Outbound C-STOREs of results to destinations, by outcome",
            labels=["outcome"],
        )
        rows = session.execute(
            select(AuditEvent.outcome, func.count())
            .where(AuditEvent.action == ACTION_SEND)
            .group_by(AuditEvent.outcome)
        ).all()
        for outcome, n in sorted(rows):
            family.add_metric([str(outcome)], float(n))
        return family


def _le(bound: float) -> str:
    return f"{bound:g}" if bound != int(bound) else f"{bound:.1f}"


def registry_for(db: Database) -> CollectorRegistry:
    """A registry holding only the database collector (no per-process samples)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(DatabaseCollector(db))
    return registry
