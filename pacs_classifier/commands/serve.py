"""``serve [--roles listener,worker,scheduler,sender,web] [--single-process]``: run the daemon.

With several roles (the default: all of them) each runs in its own OS process under the
supervisor of :mod:`pacs_classifier.commands._supervisor`, which restarts a role that
crashes. One role (``--roles worker``), or ``--single-process``, runs in this process:
each role is a function in :mod:`pacs_classifier.commands._roles` that starts it from the
:class:`~pacs_classifier.wiring.App` on threads and returns the function that stops it.

The schema is checked before any role starts (an old one names ``db upgrade``). SIGTERM
and SIGINT stop the roles in reverse order, each finishing or releasing its in-flight
work, and the command exits 0 (1 when a role kept crashing and the supervisor gave up).
"""

from __future__ import annotations

import argparse
import logging
import signal
import threading
from types import FrameType
from typing import Any

from pacs_classifier.commands._roles import KNOWN_ROLES, ROLES, StopRole
from pacs_classifier.errors import PermanentError
from pacs_classifier.wiring import load_app

ORDER = 20

log = logging.getLogger(__name__)


class RoleError(PermanentError):
    """``--roles`` names a role that does not exist or is not available."""


#: SPEC §2: every available role by default, in start order.
DEFAULT_ROLES: tuple[str, ...] = tuple(r for r in KNOWN_ROLES if r in ROLES)


def register(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser(
        "serve", help="run the daemon (listener, worker, scheduler, sender, web)"
    )
    p.add_argument(
        "--roles",
        default=",".join(DEFAULT_ROLES),
        metavar="ROLES",
        help=f"comma-separated roles to run (default: {','.join(DEFAULT_ROLES)})",
    )
    p.add_argument(
        "--single-process",
        action="store_true",
        help="run the roles as threads of one process (debugging); by default each role "
        "runs in its own process under a supervisor that restarts it if it crashes",
    )
    p.set_defaults(func=run_serve)


def parse_roles(text: str) -> list[str]:
    """``"listener,worker"`` → ``["listener", "worker"]``, refusing what cannot run."""
    roles: list[str] = []
    for raw in text.split(","):
        role = raw.strip()
        if not role or role in roles:
            continue
        if role not in ROLES:
            what = "is not available in this version" if role in KNOWN_ROLES else "is unknown"
            raise RoleError(f"--roles: role {role!r} {what} (available: {', '.join(ROLES)})")
        roles.append(role)
    if not roles:
        raise RoleError(f"--roles: no role given (available: {', '.join(ROLES)})")
    return roles


def run_serve(args: argparse.Namespace) -> int:
    from pacs_classifier.commands import _supervisor

    roles = parse_roles(args.roles)
    supervised = _supervisor.as_supervised_child()
    if supervised or args.single_process or len(roles) == 1:
        return run_in_this_process(args, roles)
    with load_app(args) as app:
        app.checked_db()  # an old schema is said once, before any role starts
        return _supervisor.Supervisor(
            app,
            roles,
            config_path=_supervisor.default_config_path(args.config),
            verbose=args.verbose,
        ).run()


def run_in_this_process(args: argparse.Namespace, roles: list[str]) -> int:
    """The roles as threads of this process (one role, or ``--single-process``)."""
    from pacs_classifier.commands._supervisor import report_ready, supervisor_gone

    stop_requested = threading.Event()

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        log.info("%s received: shutting down", signal.Signals(signum).name)
        stop_requested.set()

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    stops: list[StopRole] = []
    try:
        with load_app(args) as app:
            app.checked_db()
            try:
                for role in roles:
                    stops.append(ROLES[role](app))
                log.info("serving roles: %s", ", ".join(roles))
                report_ready()
                # A timed wait keeps the main thread responsive to signals.
                while not stop_requested.wait(0.5):
                    if supervisor_gone():
                        log.error("the supervisor is gone: stopping")
                        break
            finally:
                for stop in reversed(stops):
                    stop()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    log.info("stopped")
    return 0
