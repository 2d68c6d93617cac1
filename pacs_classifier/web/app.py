"""The ASGI application of ``serve --roles web``.

Routes: ``/health/live`` and ``/health/ready`` and ``/metrics`` (open, for monitoring),
``/api/v1/...`` (token or session), and the dashboard (session). Handlers run in
FastAPI's thread pool and use the synchronous :class:`~pacs_classifier.db.engine.Database`
like the rest of the daemon.
"""

from __future__ import annotations

import logging
import os
import secrets
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from fastapi import FastAPI, Request, status
from fastapi.responses import JSONResponse, PlainTextResponse, RedirectResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from pacs_classifier import __version__
from pacs_classifier.config import ENV_WEB_SECRET, Config
from pacs_classifier.db.engine import Database
from pacs_classifier.errors import DatabaseUnavailable
from pacs_classifier.web import api, dashboard
from pacs_classifier.web.context import LoginRequired, WebContext
from pacs_classifier.web.health import Endpoint, HealthChecks
from pacs_classifier.web.metrics import registry_for

if TYPE_CHECKING:
    from pacs_classifier.receive.listener import Listener

log = logging.getLogger(__name__)

#: Pages hold patient data: never cached, never framed, no scripts from anywhere.
SECURITY_HEADERS = {
    "Cache-Control": "no-store",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "same-origin",
    "Content-Security-Policy": (
        "default-src 'none'; img-src 'self'; style-src 'unsafe-inline'; form-action 'self'; "
        "frame-ancestors 'none'"
    ),
}


def web_secret() -> bytes:
    """The CSRF key from the environment; a random one (with a warning) when unset."""
    value = os.environ.get(ENV_WEB_SECRET, "")
    if value:
        return value.encode("utf-8")
    log.warning(
        "%s is not set: using a random key, so forms from before a restart (or from another "
        "web process) are refused once",
        ENV_WEB_SECRET,
    )
    return secrets.token_bytes(32)


def create_app(
    config: Config,
    db: Database,
    *,
    secret: bytes | None = None,
    destinations: Sequence[Endpoint] | None = None,
    local_listener: Listener | None = None,
) -> FastAPI:
    """The web application over ``db``, configured by ``config``.

    ``destinations`` are the peers the readiness check probes; by default the
    configuration's ``[[destinations]]``.
    """
    if destinations is None:
        destinations = [Endpoint(d.ae_title, d.host, d.port) for d in config.destinations]
    app = FastAPI(
        title="pacs-classifier",
        version=__version__,
        description="Results, jobs and models of the pacs-classifier daemon.",
        openapi_url=None,  # served behind authentication by api.get_openapi
        docs_url=None,
        redoc_url=None,
    )
    ctx = WebContext(
        config=config,
        db=db,
        secret=secret if secret is not None else web_secret(),
        health=HealthChecks(config, db, destinations, local_listener=local_listener),
    )
    app.state.ctx = ctx
    registry = registry_for(db)

    @app.middleware("http")
    async def security_headers(
        request: Request, call_next: Callable[[Request], Awaitable[Response]]
    ) -> Response:
        response = await call_next(request)
        for name, value in SECURITY_HEADERS.items():
            response.headers.setdefault(name, value)
        return response

    @app.exception_handler(LoginRequired)
    async def to_login(request: Request, exc: LoginRequired) -> Response:
        return RedirectResponse(
            f"/login?next={quote(exc.next_path, safe='')}", status.HTTP_303_SEE_OTHER
        )

    @app.exception_handler(DatabaseUnavailable)
    async def database_down(request: Request, exc: DatabaseUnavailable) -> Response:
        return JSONResponse({"detail": str(exc)}, status.HTTP_503_SERVICE_UNAVAILABLE)

    @app.get("/health/live", tags=["health"], summary="The web process answers")
    def live() -> dict[str, Any]:
        return {"status": "live", "version": __version__}

    @app.get("/health/ready", tags=["health"], summary="Every component answers")
    def ready() -> JSONResponse:
        checks = ctx.health.run()
        ok = all(c.ok for c in checks)
        body = {
            "status": "ready" if ok else "not_ready",
            "components": [{"name": c.name, "ok": c.ok, "detail": c.detail} for c in checks],
        }
        code = status.HTTP_200_OK if ok else status.HTTP_503_SERVICE_UNAVAILABLE
        return JSONResponse(body, code)

    @app.get("/metrics", tags=["health"], summary="Prometheus exposition format")
    def metrics() -> PlainTextResponse:
        return PlainTextResponse(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    app.include_router(api.router)
    app.include_router(dashboard.router)
    return app
