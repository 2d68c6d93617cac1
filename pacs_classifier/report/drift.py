"""Drift: live traffic of each model version, per ISO week, against its validation.

Per model version and ISO week (UTC) of live classification (predictions of
reclassification runs re-score old images and are left out):

- the positive rate, against the share of validation images at or above the same threshold;
- the score distribution against validation's: the population stability index (PSI, over
  validation's score deciles) and the two-sample Kolmogorov-Smirnov statistic (KS).

Per ISO week of all traffic: the share of classification jobs that ended not assessed,
by reason code (no model is involved in most of those reasons, so it is not per version).

The reference is the bundle's ``validation_scores.npz``. A bundle without one falls back
to its validation confusion matrix (recorded at registration): the positive rate only,
with no PSI or KS.

Alerts (``[drift]``): a week with at least ``min_count`` predictions (or ended jobs) whose
PSI, positive-rate difference or not-assessed rate is above its threshold. Each alert is
logged as a warning and audited (``drift.alert``) once per version, week and metric: the
nightly scheduler and ``report drift`` both evaluate it, and a later evaluation of the
same week finds the event and stays quiet.
"""

from __future__ import annotations

import logging
import math
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import numpy.typing as npt
from sqlalchemy import select
from sqlalchemy.orm import Session

from pacs_classifier.config import Config, DriftConfig
from pacs_classifier.db.audit import append_event, lock_chain
from pacs_classifier.db.engine import Database
from pacs_classifier.db.models import (
    AuditEvent,
    Job,
    JobKind,
    JobState,
    Label,
    Model,
    Prediction,
    utcnow,
)
from pacs_classifier.errors import ModelError
from pacs_classifier.model.validation_scores import read_validation_scores

log = logging.getLogger(__name__)

ACTION_ALERT = "drift.alert"
#: The version named by traffic-wide alerts (the not-assessed rate).
ALL_VERSIONS = "*"
METRIC_PSI = "psi"
METRIC_POSITIVE_RATE = "positive_rate"
METRIC_NOT_ASSESSED = "not_assessed_rate"
#: The audit actor of the scheduler's daily check (the scheduler's own).
SCHEDULER_ACTOR = "scheduler"
PSI_BINS = 10
#: Floor for an empty bin's share: PSI is infinite otherwise.
PSI_EPSILON = 1e-4


@dataclass(frozen=True)
class Reference:
    """What a version's live traffic is compared against."""

    #: ``validation_scores.npz``, ``confusion matrix`` or ``none``.
    source: str
    n: int
    positive_rate: float | None
    #: Calibrated validation probabilities, sorted; None without the scores file.
    scores: npt.NDArray[np.float64] | None = None


@dataclass(frozen=True)
class VersionWeek:
    model_version: str
    week: str
    predictions: int
    positive_rate: float
    reference_positive_rate: float | None
    psi: float | None
    ks: float | None
    reference: str


@dataclass(frozen=True)
class TrafficWeek:
    week: str
    ended: int
    not_assessed: int
    by_reason: dict[str, int] = field(default_factory=dict)

    @property
    def not_assessed_rate(self) -> float:
        return self.not_assessed / self.ended if self.ended else 0.0


@dataclass(frozen=True)
class Alert:
    model_version: str
    week: str
    metric: str
    value: float
    threshold: float
    #: Audited by this evaluation (False: an earlier one did, or not evaluated).
    new: bool = False

    @property
    def key(self) -> str:
        """The audit event's entity id: one event per version, week and metric."""
        return f"{self.model_version} {self.week} {self.metric}"


@dataclass(frozen=True)
class DriftReport:
    versions: list[VersionWeek]
    traffic: list[TrafficWeek]
    alerts: list[Alert]


def iso_week(when: datetime) -> str:
    """``2026-W49``: the ISO week of a UTC time."""
    year, week, _ = when.astimezone(UTC).isocalendar()
    return f"{year}-W{week:02d}"


def week_start(when: datetime) -> datetime:
    """Monday 00:00 UTC of ``when``'s ISO week."""
    day = when.astimezone(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    return day - timedelta(days=day.weekday())


# --------------------------------------------------------------------------- statistics


def psi(reference: npt.ArrayLike, live: npt.ArrayLike, bins: int = PSI_BINS) -> float:
    """Population stability index of ``live`` against ``reference``.

    Bins are the reference's quantiles (equal shares of validation; ties merged), so the
    index does not depend on where validation's scores cluster. ``Σ (a − e) · ln(a / e)``
    over the bins, with shares floored at ``PSI_EPSILON``. Rules of thumb: below 0.1
    stable, 0.1-0.25 moving, above 0.25 shifted.
    """
    ref = np.sort(np.asarray(reference, dtype=np.float64).reshape(-1))
    cur = np.asarray(live, dtype=np.float64).reshape(-1)
    if ref.size == 0 or cur.size == 0:
        raise ValueError("psi needs scores on both sides")
    inner = np.unique(np.quantile(ref, np.linspace(0, 1, bins + 1)[1:-1]))
    expected = np.bincount(np.searchsorted(inner, ref, side="right"), minlength=inner.size + 1)
    actual = np.bincount(np.searchsorted(inner, cur, side="right"), minlength=inner.size + 1)
    e = np.maximum(expected / ref.size, PSI_EPSILON)
    a = np.maximum(actual / cur.size, PSI_EPSILON)
    return float(np.sum((a - e) * np.log(a / e)))


def ks_statistic(reference: npt.ArrayLike, live: npt.ArrayLike) -> float:
    """Two-sample Kolmogorov-Smirnov statistic: the largest gap between the two ECDFs."""
    ref = np.sort(np.asarray(reference, dtype=np.float64).reshape(-1))
    cur = np.sort(np.asarray(live, dtype=np.float64).reshape(-1))
    if ref.size == 0 or cur.size == 0:
        raise ValueError("ks needs scores on both sides")
    points = np.concatenate([ref, cur])
    gap = np.abs(
        np.searchsorted(ref, points, side="right") / ref.size
        - np.searchsorted(cur, points, side="right") / cur.size
    )
    return float(gap.max())


# --------------------------------------------------------------------------- reference


def bundle_dir(config: Config, path: str) -> Path:
    """A registered bundle's folder (the registry stores it absolute or under model.dir)."""
    p = Path(path)
    return p if p.is_absolute() else config.model_dir / p


def reference_for(config: Config, model: Model) -> Reference:
    """The validation reference of a registered model (see the module docstring)."""
    try:
        scores = read_validation_scores(bundle_dir(config, model.path))
    except ModelError as exc:
        log.warning("drift: model %s: %s; falling back to its metrics", model.version, exc)
        scores = None
    if scores is not None:
        return Reference(
            source="validation_scores.npz",
            n=int(scores.probabilities.size),
            positive_rate=scores.positive_rate(model.threshold),
            scores=np.sort(scores.probabilities.astype(np.float64)),
        )
    confusion = (model.metrics or {}).get("confusion")
    if isinstance(confusion, dict):
        try:
            tp, fp, tn, fn = (int(confusion[k]) for k in ("tp", "fp", "tn", "fn"))
        except (KeyError, TypeError, ValueError):
            tp = fp = tn = fn = 0
        n = tp + fp + tn + fn
        if n > 0:
            return Reference(source="confusion matrix", n=n, positive_rate=(tp + fp) / n)
    return Reference(source="none", n=0, positive_rate=None)


# --------------------------------------------------------------------------- the report


def compute(
    session: Session,
    config: Config,
    *,
    since: datetime | None = None,
    until: datetime | None = None,
) -> DriftReport:
    """The drift report over ``[since, until)`` (UTC; open-ended when not given).

    Its alerts are those the thresholds find; none is marked ``new`` (see
    :func:`evaluate`).
    """
    query = (
        select(Prediction.probability, Prediction.label, Prediction.created_at, Model)
        .join(Model, Model.id == Prediction.model_id)
        .where(Prediction.run_id.is_(None))
    )
    if since is not None:
        query = query.where(Prediction.created_at >= since)
    if until is not None:
        query = query.where(Prediction.created_at < until)
    scores: dict[tuple[str, str], list[float]] = defaultdict(list)
    positives: dict[tuple[str, str], int] = defaultdict(int)
    models: dict[str, Model] = {}
    for probability, label, created_at, model in session.execute(query):
        key = (model.version, iso_week(created_at))
        scores[key].append(float(probability))
        positives[key] += Label(label) == Label.PNEUMONIA
        models[model.version] = model
    references = {v: reference_for(config, m) for v, m in models.items()}
    versions = []
    for (version, week), values in sorted(scores.items()):
        ref = references[version]
        rate = positives[(version, week)] / len(values)
        versions.append(
            VersionWeek(
                model_version=version,
                week=week,
                predictions=len(values),
                positive_rate=rate,
                reference_positive_rate=ref.positive_rate,
                psi=psi(ref.scores, values) if ref.scores is not None else None,
                ks=ks_statistic(ref.scores, values) if ref.scores is not None else None,
                reference=ref.source,
            )
        )
    traffic = _traffic(session, since, until)
    return DriftReport(versions, traffic, alerts_of(versions, traffic, config.drift))


def _traffic(session: Session, since: datetime | None, until: datetime | None) -> list[TrafficWeek]:
    """Classification jobs that ended (done or not assessed), per ISO week of their end."""
    query = select(Job.state, Job.reason, Job.updated_at).where(
        Job.kind == JobKind.CLASSIFY, Job.state.in_([JobState.DONE, JobState.NOT_ASSESSED])
    )
    if since is not None:
        query = query.where(Job.updated_at >= since)
    if until is not None:
        query = query.where(Job.updated_at < until)
    ended: dict[str, int] = defaultdict(int)
    reasons: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for state, reason, updated_at in session.execute(query):
        week = iso_week(updated_at)
        ended[week] += 1
        if JobState(state) == JobState.NOT_ASSESSED:
            reasons[week][reason or "unknown"] += 1
    return [
        TrafficWeek(
            week=week,
            ended=n,
            not_assessed=sum(reasons[week].values()),
            by_reason=dict(sorted(reasons[week].items())),
        )
        for week, n in sorted(ended.items())
    ]


def alerts_of(
    versions: Iterable[VersionWeek], traffic: Iterable[TrafficWeek], settings: DriftConfig
) -> list[Alert]:
    """The weeks above a threshold (a threshold of 0 is off; small weeks never alert)."""
    alerts = []
    for v in versions:
        if v.predictions < settings.min_count:
            continue
        if settings.psi_alert > 0 and v.psi is not None and v.psi > settings.psi_alert:
            alerts.append(Alert(v.model_version, v.week, METRIC_PSI, v.psi, settings.psi_alert))
        if settings.positive_rate_alert > 0 and v.reference_positive_rate is not None:
            diff = abs(v.positive_rate - v.reference_positive_rate)
            if diff > settings.positive_rate_alert:
                alerts.append(
                    Alert(
                        v.model_version,
                        v.week,
                        METRIC_POSITIVE_RATE,
                        diff,
                        settings.positive_rate_alert,
                    )
                )
    for t in traffic:
        if t.ended < settings.min_count or settings.not_assessed_alert <= 0:
            continue
        if t.not_assessed_rate > settings.not_assessed_alert:
            alerts.append(
                Alert(
                    ALL_VERSIONS,
                    t.week,
                    METRIC_NOT_ASSESSED,
                    t.not_assessed_rate,
                    settings.not_assessed_alert,
                )
            )
    return alerts


def evaluate(
    db: Database,
    config: Config,
    *,
    actor: str,
    since: datetime | None = None,
    until: datetime | None = None,
) -> DriftReport:
    """Compute the report and raise its alerts: a warning and an audit event for each
    alert no earlier evaluation audited (one transaction; the audit chain's lock orders
    two evaluators, so an alert is never audited twice)."""
    with db.read_session() as session:
        report = compute(session, config, since=since, until=until)
    if not report.alerts:
        return report
    raised = audit_new_alerts(db, report.alerts, actor=actor)
    return replace(report, alerts=[replace(a, new=a.key in raised) for a in report.alerts])


def audit_new_alerts(db: Database, alerts: Sequence[Alert], *, actor: str) -> set[str]:
    """Audit and log the alerts not audited before; return their keys."""
    raised: set[str] = set()
    with db.session() as session:
        lock_chain(session)
        keys = [a.key for a in alerts]
        seen = set(
            session.execute(
                select(AuditEvent.entity_id).where(
                    AuditEvent.action == ACTION_ALERT, AuditEvent.entity_id.in_(keys)
                )
            ).scalars()
        )
        for alert in alerts:
            if alert.key in seen or alert.key in raised:
                continue
            append_event(
                session,
                actor=actor,
                action=ACTION_ALERT,
                outcome="raised",
                entity_type="drift",
                entity_id=alert.key,
                detail={
                    "model_version": alert.model_version,
                    "week": alert.week,
                    "metric": alert.metric,
                    "value": round(alert.value, 6),
                    "threshold": alert.threshold,
                },
            )
            raised.add(alert.key)
    for alert in alerts:
        if alert.key in raised:
            log.warning(
                "drift: model %s, week %s: %s %.3f above %.3f",
                alert.model_version,
                alert.week,
                alert.metric,
                alert.value,
                alert.threshold,
            )
    return raised


def nightly_check(db: Database, config: Config, *, actor: str, now: datetime | None = None) -> int:
    """The scheduler's hook: evaluate this ISO week and the one before; alerts raised now.

    The week before is included so the last days of a week are judged once it is complete.
    """
    start = week_start(now or utcnow()) - timedelta(days=7)
    report = evaluate(db, config, actor=actor, since=start)
    return sum(a.new for a in report.alerts)


def daily_check(db: Database, config: Config) -> Callable[[], int]:
    """:func:`nightly_check` as the scheduler's daily check (``NightlyScheduler.daily``)."""

    def drift_check() -> int:
        return nightly_check(db, config, actor=SCHEDULER_ACTOR)

    return drift_check


# --------------------------------------------------------------------------- output


def _fmt(value: float | None, digits: int = 3) -> str:
    return "-" if value is None or math.isnan(value) else f"{value:.{digits}f}"


def render_text(report: DriftReport) -> str:
    """The report as aligned text tables (``report drift``)."""
    lines = ["Live traffic against validation, per model version and ISO week (UTC)", ""]
    header = ("model version", "week", "n", "pos rate", "val pos", "PSI", "KS", "reference")
    rows = [
        (
            v.model_version,
            v.week,
            str(v.predictions),
            _fmt(v.positive_rate),
            _fmt(v.reference_positive_rate),
            _fmt(v.psi),
            _fmt(v.ks),
            v.reference,
        )
        for v in report.versions
    ]
    lines += _table(header, rows) if rows else ["(no live predictions)"]
    lines += ["", "Not assessed, per ISO week (all versions)", ""]
    t_rows = [
        (
            t.week,
            str(t.ended),
            str(t.not_assessed),
            _fmt(t.not_assessed_rate),
            ", ".join(f"{r} {n}" for r, n in t.by_reason.items()) or "-",
        )
        for t in report.traffic
    ]
    t_header = ("week", "ended", "not assessed", "rate", "by reason")
    lines += _table(t_header, t_rows) if t_rows else ["(no ended jobs)"]
    lines += ["", "Alerts", ""]
    if report.alerts:
        for a in report.alerts:
            state = "raised now" if a.new else "raised before"
            lines.append(
                f"{a.model_version} {a.week} {a.metric} {a.value:.3f} > {a.threshold:.3f} ({state})"
            )
    else:
        lines.append("(none)")
    return "\n".join(lines)


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    out = ["  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)).rstrip()]
    out += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    return out


def as_dict(report: DriftReport) -> dict[str, object]:
    """The report as JSON-ready data (``--format json``, ``/api/v1/drift``)."""
    return {
        "versions": [
            {
                "model_version": v.model_version,
                "week": v.week,
                "predictions": v.predictions,
                "positive_rate": v.positive_rate,
                "reference_positive_rate": v.reference_positive_rate,
                "psi": v.psi,
                "ks": v.ks,
                "reference": v.reference,
            }
            for v in report.versions
        ],
        "traffic": [
            {
                "week": t.week,
                "ended": t.ended,
                "not_assessed": t.not_assessed,
                "not_assessed_rate": t.not_assessed_rate,
                "by_reason": t.by_reason,
            }
            for t in report.traffic
        ],
        "alerts": [
            {
                "model_version": a.model_version,
                "week": a.week,
                "metric": a.metric,
                "value": a.value,
                "threshold": a.threshold,
                "new": a.new,
            }
            for a in report.alerts
        ],
    }
