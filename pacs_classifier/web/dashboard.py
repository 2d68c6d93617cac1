"""The dashboard: server-rendered pages behind a login.

Pages: the worklist (recent results, search, paging), a study (each instance's image as
classified, its Grad-CAM overlay when there is one, its prediction history), the queue
(failed jobs; admins retry them), reclassification runs and label changes, models, and the
audit chain's state. Every page or image that shows a patient's result is audited
(``result.view``, actor ``web:USER``). Forms that change something carry the session's CSRF
token; the login form uses a double-submit cookie.
"""

from __future__ import annotations

import logging
import secrets
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import urlencode

from fastapi import APIRouter, Depends, Form, HTTPException, Request, status
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.templating import Jinja2Templates

from pacs_classifier.db.audit import verify_chain
from pacs_classifier.db.models import AuditEvent, JobState, Label
from pacs_classifier.errors import NotAssessable
from pacs_classifier.model.registry import list_models
from pacs_classifier.queue.jobs import list_jobs, queue_depth, retry_failed
from pacs_classifier.report import queries
from pacs_classifier.report.results import (
    ResultQuery,
    count_results,
    find_results,
    prediction_history,
    recent_runs,
    result_for_instance,
)
from pacs_classifier.web.auth import (
    Principal,
    authenticate,
    csrf_ok,
    csrf_token,
    end_session,
    start_session,
)
from pacs_classifier.web.context import (
    LOGIN_CSRF_COOKIE,
    SESSION_COOKIE,
    WebContext,
    audit_view,
    ctx_of,
    page_principal,
)
from pacs_classifier.web.images import classified_png, overlay_path

log = logging.getLogger(__name__)

router = APIRouter(include_in_schema=False)
templates = Jinja2Templates(directory=str(Path(__file__).with_name("templates")))

Who = Annotated[Principal, Depends(page_principal)]
MODEL_CARD = "MODEL_CARD.md"


def _page(request: Request, name: str, who: Principal | None, **values: Any) -> HTMLResponse:
    ctx = ctx_of(request)
    values.setdefault("error", "")
    return templates.TemplateResponse(
        request,
        name,
        {
            "who": who,
            "csrf": csrf_token(ctx.secret, who.session_token) if who else "",
            **values,
        },
        status_code=values.pop("status_code", 200),
    )


def _check_csrf(ctx: WebContext, who: Principal, submitted: str) -> None:
    if not csrf_ok(ctx.secret, who.session_token, submitted):
        raise HTTPException(status.HTTP_403_FORBIDDEN, "CSRF token missing or wrong")


def _safe_next(path: str) -> str:
    # Only a path on this site: "//host" or "https://host" would make the login an open redirect.
    # Browsers read "/\\host" as "//host" too.
    local = path.startswith("/") and not path.startswith("//") and "\\" not in path
    return path if local else "/"


# ------------------------------------------------------------------------------- login


@router.get("/login", response_class=HTMLResponse)
def login_form(request: Request, next: str = "/") -> HTMLResponse:
    token = secrets.token_urlsafe(24)
    response = _page(request, "login.html", None, next=_safe_next(next), login_csrf=token)
    _set_cookie(request, response, LOGIN_CSRF_COOKIE, token, max_age=3600)
    return response


@router.post("/login", response_class=HTMLResponse)
def login(
    request: Request,
    username: Annotated[str, Form()],
    password: Annotated[str, Form()],
    csrf: Annotated[str, Form()] = "",
    next: Annotated[str, Form()] = "/",
) -> Response:
    ctx = ctx_of(request)
    expected = request.cookies.get(LOGIN_CSRF_COOKIE, "")
    if not expected or not secrets.compare_digest(expected, csrf):
        raise HTTPException(status.HTTP_403_FORBIDDEN, "CSRF token missing or wrong")
    peer = request.client.host if request.client else "?"
    with ctx.db.session() as session:
        user = authenticate(session, username, password, peer=peer)
        token = start_session(session, user, ctx.config.web.session_minutes) if user else ""
    if not token:
        fresh = secrets.token_urlsafe(24)
        response = _page(
            request,
            "login.html",
            None,
            next=_safe_next(next),
            login_csrf=fresh,
            error="Wrong user name or password.",
            status_code=status.HTTP_401_UNAUTHORIZED,
        )
        _set_cookie(request, response, LOGIN_CSRF_COOKIE, fresh, max_age=3600)
        return response
    redirect = RedirectResponse(_safe_next(next), status.HTTP_303_SEE_OTHER)
    _set_cookie(
        request, redirect, SESSION_COOKIE, token, max_age=ctx.config.web.session_minutes * 60
    )
    redirect.delete_cookie(LOGIN_CSRF_COOKIE)
    return redirect


@router.post("/logout")
def logout(request: Request, who: Who, csrf: Annotated[str, Form()] = "") -> Response:
    ctx = ctx_of(request)
    _check_csrf(ctx, who, csrf)
    with ctx.db.session() as session:
        end_session(session, who)
    response = RedirectResponse("/login", status.HTTP_303_SEE_OTHER)
    response.delete_cookie(SESSION_COOKIE)
    return response


def _set_cookie(request: Request, response: Response, name: str, value: str, max_age: int) -> None:
    response.set_cookie(
        name,
        value,
        max_age=max_age,
        httponly=True,
        samesite="strict",
        secure=ctx_of(request).config.web.secure_cookies,
    )


# ------------------------------------------------------------------------------- pages


def _day(text: str, field: str) -> datetime | None:
    if not text:
        return None
    try:
        return datetime.fromisoformat(text).replace(tzinfo=UTC)
    except ValueError:
        raise HTTPException(
            status.HTTP_400_BAD_REQUEST, f"{field}: not a date (YYYY-MM-DD): {text!r}"
        ) from None


@router.get("/", response_class=HTMLResponse)
def worklist(
    request: Request,
    who: Who,
    q: str = "",
    label: str = "",
    since: str = "",
    until: str = "",
    page: int = 1,
) -> HTMLResponse:
    ctx = ctx_of(request)
    size = ctx.config.web.page_size
    page = max(page, 1)
    if label and label not in {m.value for m in Label}:
        raise HTTPException(status.HTTP_400_BAD_REQUEST, f"label: unknown label {label!r}")
    query = ResultQuery(
        text=q or None,
        label=label or None,
        since=_day(since, "since"),
        until=_day(until, "until"),
        limit=size,
        offset=(page - 1) * size,
    )
    with ctx.db.read_session() as session:
        rows = find_results(session, query)
        total = count_results(session, query)
    if rows:
        audit_view(
            ctx,
            who,
            entity_id=None,
            detail={"via": "worklist", "instance_ids": [r.instance_id for r in rows]},
        )
    filters = {"q": q, "label": label, "since": since, "until": until}
    pages = max(1, -(-total // size))

    def page_link(n: int) -> str:
        return "/?" + urlencode({**{k: v for k, v in filters.items() if v}, "page": n})

    return _page(
        request,
        "worklist.html",
        who,
        rows=rows,
        total=total,
        page=page,
        pages=pages,
        prev_link=page_link(page - 1) if page > 1 else "",
        next_link=page_link(page + 1) if page < pages else "",
        labels=[m.value for m in Label],
        **filters,
    )


@router.get("/studies/{study_uid}", response_class=HTMLResponse)
def study(request: Request, who: Who, study_uid: str) -> HTMLResponse:
    ctx = ctx_of(request)
    with ctx.db.read_session() as session:
        rows = find_results(session, ResultQuery(study_uid=study_uid, limit=500))
        histories = {r.instance_id: prediction_history(session, r.instance_id) for r in rows}
    if not rows:
        raise HTTPException(status.HTTP_404_NOT_FOUND, "no such study")
    for r in rows:
        audit_view(ctx, who, entity_id=r.instance_id, detail={"via": "study_page"})
    overlays = {
        r.instance_id: overlay_path(ctx.db, ctx.storage_root, r.instance_id) is not None
        for r in rows
    }
    return _page(
        request,
        "study.html",
        who,
        study_uid=study_uid,
        rows=rows,
        histories=histories,
        overlays=overlays,
    )


def _instance_file(ctx: WebContext, instance_id: int) -> tuple[Path, int | None]:
    with ctx.db.read_session() as session:
        row = result_for_instance(session, instance_id)
    if row is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, "no such instance")
    return ctx.storage_root / row.file_path, row.image_size


@router.get("/instances/{instance_id}/image.png")
def instance_image(request: Request, who: Who, instance_id: int) -> Response:
    ctx = ctx_of(request)
    path, size = _instance_file(ctx, instance_id)
    try:
        png = classified_png(path, size)
    except NotAssessable as exc:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no image: {exc}") from None
    except OSError as exc:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no image: {exc.strerror}") from None
    audit_view(ctx, who, entity_id=instance_id, detail={"via": "image"})
    return Response(png, media_type="image/png")


@router.get("/instances/{instance_id}/overlay.png")
def instance_overlay(request: Request, who: Who, instance_id: int) -> Response:
    ctx = ctx_of(request)
    path = overlay_path(ctx.db, ctx.storage_root, instance_id)
    if path is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, "no overlay for this instance")
    audit_view(ctx, who, entity_id=instance_id, detail={"via": "overlay"})
    return Response(path.read_bytes(), media_type="image/png")


@router.get("/queue", response_class=HTMLResponse)
def queue(request: Request, who: Who, retried: int = 0) -> HTMLResponse:
    ctx = ctx_of(request)
    with ctx.db.read_session() as session:
        depth = queue_depth(session)
        failed = list_jobs(session, state=JobState.FAILED, limit=200)
    return _page(
        request,
        "queue.html",
        who,
        depth=sorted(depth.items()),
        failed=failed,
        retried=retried,
    )


@router.post("/queue/{job_id}/retry")
def retry(request: Request, who: Who, job_id: int, csrf: Annotated[str, Form()] = "") -> Response:
    ctx = ctx_of(request)
    _check_csrf(ctx, who, csrf)
    if not who.is_admin:
        raise HTTPException(status.HTTP_403_FORBIDDEN, "only admins retry jobs")
    with ctx.db.session() as session:
        done = retry_failed(session, job_id, actor=who.actor)
    if not done:
        raise HTTPException(status.HTTP_409_CONFLICT, f"job {job_id} is not failed")
    return RedirectResponse(f"/queue?retried={job_id}", status.HTTP_303_SEE_OTHER)


@router.get("/runs", response_class=HTMLResponse)
def runs(request: Request, who: Who) -> HTMLResponse:
    ctx = ctx_of(request)
    with ctx.db.read_session() as session:
        run_rows = recent_runs(session)
        changes = queries.run(session, queries.get("label_changes"))
    return _page(request, "runs.html", who, runs=run_rows, changes=changes)


@router.get("/models", response_class=HTMLResponse)
def models(request: Request, who: Who) -> HTMLResponse:
    ctx = ctx_of(request)
    with ctx.db.read_session() as session:
        rows = list_models(session)
    cards: dict[str, str] = {}
    for m in rows:
        card = Path(m.path) / MODEL_CARD
        if card.is_file():
            cards[m.version] = card.read_text(encoding="utf-8", errors="replace")
    return _page(request, "models.html", who, models=rows, cards=cards)


@router.get("/drift", response_class=HTMLResponse)
def drift_page(request: Request, who: Who) -> HTMLResponse:
    """Live traffic against validation, the last 12 ISO weeks (docs/reports.md)."""
    from datetime import UTC, datetime, timedelta

    from pacs_classifier.report import drift

    ctx = ctx_of(request)
    since = drift.week_start(datetime.now(UTC)) - timedelta(weeks=11)
    with ctx.db.read_session() as session:
        report = drift.compute(session, ctx.config, since=since)
    return _page(request, "drift.html", who, report=report, settings=ctx.config.drift)


@router.get("/audit", response_class=HTMLResponse)
def audit(request: Request, who: Who) -> HTMLResponse:
    from sqlalchemy import select

    ctx = ctx_of(request)
    with ctx.db.read_session() as session:
        report = verify_chain(session)
        recent = list(
            session.execute(select(AuditEvent).order_by(AuditEvent.id.desc()).limit(30)).scalars()
        )
    return _page(request, "audit.html", who, chain=report, events=recent)
