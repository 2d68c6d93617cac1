"""What every web request needs, and who is asking.

:class:`WebContext` is built once by :func:`pacs_classifier.web.app.create_app` and hung on
``app.state``; handlers take it from there rather than from globals. The principal of a
request comes from ``Authorization: Bearer TOKEN`` (machine clients) or from the session
cookie (the dashboard); pages without one redirect to the login, API routes answer 401.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import HTTPException, Request, status

from pacs_classifier.config import Config
from pacs_classifier.db.audit import append_event
from pacs_classifier.db.engine import Database
from pacs_classifier.web.auth import Principal, session_principal, token_principal
from pacs_classifier.web.health import HealthChecks

log = logging.getLogger(__name__)

SESSION_COOKIE = "pacs_session"
LOGIN_CSRF_COOKIE = "pacs_login_csrf"
#: Audit action of every view of a patient's result (a page, an image, an API answer).
ACTION_RESULT_VIEW = "result.view"


@dataclass
class WebContext:
    config: Config
    db: Database
    #: HMAC key of the CSRF tokens (``$PACS_CLASSIFIER_WEB_SECRET``).
    secret: bytes
    health: HealthChecks

    @property
    def storage_root(self) -> Path:
        return self.config.storage_root


class LoginRequired(Exception):
    """A dashboard page was asked for without a live session: redirect to the login."""

    def __init__(self, next_path: str) -> None:
        super().__init__(next_path)
        self.next_path = next_path


def ctx_of(request: Request) -> WebContext:
    ctx: WebContext = request.app.state.ctx
    return ctx


def principal_of(request: Request) -> Principal | None:
    """The person or client behind this request, if any."""
    ctx = ctx_of(request)
    auth = request.headers.get("authorization", "")
    with ctx.db.read_session() as session:
        if auth[:7].lower() == "bearer ":
            return token_principal(session, auth[7:].strip())
        return session_principal(session, request.cookies.get(SESSION_COOKIE, ""))


def api_principal(request: Request) -> Principal:
    """FastAPI dependency of every ``/api/v1`` route: 401 without a token or session."""
    who = principal_of(request)
    if who is None:
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED,
            "authentication required (Authorization: Bearer TOKEN)",
            headers={"WWW-Authenticate": "Bearer"},
        )
    return who


def page_principal(request: Request) -> Principal:
    """FastAPI dependency of every dashboard page: redirect to the login without a session."""
    who = principal_of(request)
    if who is None or who.via != "session":
        path = request.url.path
        if request.url.query:
            path += "?" + request.url.query
        raise LoginRequired(path)
    return who


def audit_view(
    ctx: WebContext,
    who: Principal,
    *,
    entity_id: int | None,
    detail: dict[str, Any],
) -> None:
    """One ``result.view`` event: who saw which patient's result, and where."""
    with ctx.db.session() as session:
        append_event(
            session,
            actor=who.actor,
            action=ACTION_RESULT_VIEW,
            entity_type="instance",
            entity_id=entity_id,
            outcome="ok",
            detail=detail,
        )
