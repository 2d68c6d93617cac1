"""``user add NAME --role viewer|admin`` · ``user list|disable NAME|token NAME``.

Dashboard and API accounts (SPEC §12). The password is read from the terminal (asked
twice, not echoed) or, when stdin is not a terminal, from its first line; never from an
argument, where ``ps`` and the shell history would show it. ``user token`` prints a new API
token once; only its hash is stored.
"""

from __future__ import annotations

import argparse
import getpass
import sys
from typing import Any

from pacs_classifier.db.models import UserRole
from pacs_classifier.wiring import load_app

ORDER = 75


def register(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser("user", help="dashboard and API accounts")
    users = p.add_subparsers(dest="user_command", metavar="ACTION", required=True)
    add = users.add_parser(
        "add", help="add an account; the password is read from the terminal or stdin"
    )
    add.add_argument("name", metavar="NAME")
    add.add_argument("--role", choices=[r.value for r in UserRole], required=True)
    add.set_defaults(func=run_add)
    lst = users.add_parser("list", help="list accounts")
    lst.set_defaults(func=run_list)
    dis = users.add_parser("disable", help="disable an account and end its sessions")
    dis.add_argument("name", metavar="NAME")
    dis.set_defaults(func=run_disable)
    tok = users.add_parser("token", help="print a new API token for an account")
    tok.add_argument("name", metavar="NAME")
    tok.add_argument("--label", default="api", help="what the token is for (default: api)")
    tok.set_defaults(func=run_token)


def _actor() -> str:
    return f"cli:{getpass.getuser()}"


def read_password() -> str:
    """From the terminal (twice, not echoed) or the first line of stdin."""
    from pacs_classifier.web.auth import UserError, check_password_rules

    if sys.stdin.isatty():
        first = getpass.getpass("Password: ")
        check_password_rules(first)
        if getpass.getpass("Again: ") != first:
            raise UserError("the two passwords differ")
        return first
    line = sys.stdin.readline()
    if not line:
        raise UserError("no password on stdin")
    return line.rstrip("\r\n")


def run_add(args: argparse.Namespace) -> int:
    from pacs_classifier.web.auth import add_user

    password = read_password()
    app = load_app(args)
    try:
        with app.checked_db().session() as session:
            add_user(session, args.name, UserRole(args.role), password, actor=_actor())
    finally:
        app.close()
    print(f"user {args.name.strip()} added ({args.role})")
    return 0


def run_list(args: argparse.Namespace) -> int:
    from pacs_classifier.web.auth import list_users

    app = load_app(args)
    try:
        with app.checked_db().read_session() as session:
            users = list_users(session)
    finally:
        app.close()
    if not users:
        print("(no users; add one with: pacs-classifier user add NAME --role admin)")
    for u in users:
        print(f"{u.name:<24} {u.role:<7} {'active' if u.active else 'disabled':<9} {u.created_at}")
    return 0


def run_disable(args: argparse.Namespace) -> int:
    from pacs_classifier.web.auth import disable_user

    app = load_app(args)
    try:
        with app.checked_db().session() as session:
            disable_user(session, args.name, actor=_actor())
    finally:
        app.close()
    print(f"user {args.name} disabled")
    return 0


def run_token(args: argparse.Namespace) -> int:
    from pacs_classifier.web.auth import add_api_token

    app = load_app(args)
    try:
        with app.checked_db().session() as session:
            token = add_api_token(session, args.name, args.label, actor=_actor())
    finally:
        app.close()
    print(token)
    return 0
