"""``status``: queue depth by state, the active model, the last reclassification run, and
where the listener listens. Read-only; refuses on a schema older than this code."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session

from pacs_classifier.config import Config
from pacs_classifier.db.models import Job, JobKind, JobState, Model, ReclassificationRun
from pacs_classifier.times import format_utc
from pacs_classifier.wiring import load_app

ORDER = 20


@dataclass(frozen=True)
class ModelInfo:
    version: str
    threshold: float
    image_size: int


@dataclass(frozen=True)
class RunInfo:
    id: int
    trigger: str
    state: str
    started_at: datetime
    finished_at: datetime | None
    instances_total: int
    instances_done: int
    labels_changed: int


@dataclass(frozen=True)
class Status:
    """Everything ``status`` shows, read in one transaction."""

    #: (state, kind) -> number of jobs; absent pairs are zero.
    jobs: dict[tuple[str, str], int]
    active_model: ModelInfo | None
    last_run: RunInfo | None
    #: (destination AE, state) -> number of send jobs (SPEC §11).
    sends: dict[tuple[str, str], int] = field(default_factory=dict)
    #: (kind, state) -> number of result objects (SR, overlay) to render.
    renders: dict[tuple[str, str], int] = field(default_factory=dict)


def register(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser(
        "status", help="queue depth, active model, last nightly run, listener address"
    )
    p.set_defaults(func=run_status)


def run_status(args: argparse.Namespace) -> int:
    """Print the status table; exit 0."""
    app = load_app(args)
    try:
        db = app.checked_db()
        with db.read_session() as session:
            status = read_status(session)
    finally:
        app.close()
    print(format_status(status, app.config))
    return 0


def read_status(session: Session) -> Status:
    """Read the queue, the active model and the newest reclassification run."""
    rows = session.execute(
        select(Job.state, Job.kind, func.count()).group_by(Job.state, Job.kind)
    ).all()
    jobs = {(str(state), str(kind)): int(n) for state, kind, n in rows}
    model = session.execute(
        select(Model).where(Model.active.is_(True)).order_by(Model.id.desc()).limit(1)
    ).scalar_one_or_none()
    run = session.execute(
        select(ReclassificationRun)
        .order_by(ReclassificationRun.started_at.desc(), ReclassificationRun.id.desc())
        .limit(1)
    ).scalar_one_or_none()
    from pacs_classifier.results.outbound import render_counts, send_counts

    return Status(
        sends=send_counts(session),
        renders=render_counts(session),
        jobs=jobs,
        active_model=None
        if model is None
        else ModelInfo(model.version, model.threshold, model.image_size),
        last_run=None
        if run is None
        else RunInfo(
            id=run.id,
            trigger=str(run.trigger),
            state=str(run.state),
            started_at=run.started_at,
            finished_at=run.finished_at,
            instances_total=run.instances_total,
            instances_done=run.instances_done,
            labels_changed=run.labels_changed,
        ),
    )


def format_status(status: Status, config: Config) -> str:
    """The status as a plain table: a few ``name  value`` lines, then jobs by state."""
    listener = config.listener
    tls = "on" if listener.tls.enabled else "off"
    lines = [
        ("listener", f"{listener.ae_title}@{listener.host}:{listener.port}  TLS {tls}"),
        ("web", f"http://{config.web.host}:{config.web.port}/"),
        ("database", make_url(config.database_url).render_as_string(hide_password=True)),
        ("active model", _model_line(status.active_model)),
        ("last reclassification", _run_line(status.last_run)),
    ]
    width = max(len(name) for name, _ in lines)
    out = [f"{name:<{width}}  {value}" for name, value in lines]
    out.append("")
    out.extend(_jobs_table(status.jobs))
    destinations = [d.ae_title for d in config.destinations]
    destinations += sorted({d for d, _ in status.sends} - set(destinations))
    if destinations or status.renders:
        out.append("")
        renders = {(s, k): n for (k, s), n in status.renders.items()}
        out.extend(_table("results", ["sr", "sc"], renders))
    if destinations:
        out.append("")
        out.extend(_table("sends", destinations, {(s, d): n for (d, s), n in status.sends.items()}))
    return "\n".join(out)


def _model_line(model: ModelInfo | None) -> str:
    if model is None:
        return "none (register one: pacs-classifier model register DIR --activate)"
    return f"{model.version}  threshold {model.threshold:.4f}  image size {model.image_size}"


def _run_line(run: RunInfo | None) -> str:
    if run is None:
        return "never"
    finished = _time(run.finished_at) if run.finished_at is not None else "-"
    return (
        f"#{run.id} {run.state} ({run.trigger})  started {_time(run.started_at)}  "
        f"finished {finished}  instances {run.instances_done}/{run.instances_total}  "
        f"labels changed {run.labels_changed}"
    )


def _jobs_table(jobs: dict[tuple[str, str], int]) -> list[str]:
    return _table("jobs", [k.value for k in JobKind], jobs)


def _table(title: str, kinds: list[str], jobs: dict[tuple[str, str], int]) -> list[str]:
    """Rows per state, a column per kind (or destination), from ``(state, kind)`` counts."""
    header = [title, *kinds, "total"]
    body: list[list[str]] = []
    for state in JobState:
        counts = [jobs.get((state.value, kind), 0) for kind in kinds]
        body.append([state.value, *(str(n) for n in counts), str(sum(counts))])
    widths = [max(len(row[i]) for row in [header, *body]) for i in range(len(header))]

    def fmt(row: list[str]) -> str:
        first = f"{row[0]:<{widths[0]}}"
        rest = (f"{cell:>{w}}" for cell, w in zip(row[1:], widths[1:], strict=True))
        return "  ".join([first, *rest])

    return [fmt(header), *(fmt(row) for row in body)]


def _time(value: datetime) -> str:
    return format_utc(value)
