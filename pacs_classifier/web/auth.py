"""Local accounts, dashboard sessions, API tokens and CSRF tokens.

Passwords are stored as argon2id hashes (argon2-cffi's defaults, the PHC string carries its
parameters, so raising them later re-hashes on the next login). A session cookie and an
API token are random 256-bit strings; the database holds only their SHA-256, so a copy of
the database does not hand out live logins. A disabled user's sessions and tokens stop
working on their next request (every request re-reads the user).

CSRF: every form that changes something carries ``csrf_token(secret, session token)``, an
HMAC the server recomputes; a page on another origin cannot read it. The login form, which
has no session yet, uses a double-submit cookie instead.

Every login attempt is audited (``web.login``), refused ones with the reason but never the
password. Those events also throttle guessing: after :data:`MAX_FAILED_LOGINS` refusals for
one name within :data:`FAILED_LOGIN_WINDOW`, that name is refused until the window passes,
whichever web process is asked.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import logging
import secrets
from dataclasses import dataclass
from datetime import timedelta

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError
from sqlalchemy import delete, func, select, update
from sqlalchemy.orm import Session

from pacs_classifier.db.audit import append_event
from pacs_classifier.db.models import ApiToken, AuditEvent, User, UserRole, WebSession, utcnow
from pacs_classifier.errors import PermanentError

log = logging.getLogger(__name__)

MIN_PASSWORD_CHARS = 8
MAX_FAILED_LOGINS = 5
FAILED_LOGIN_WINDOW = timedelta(minutes=15)
MAX_NAME_CHARS = 64
ACTION_LOGIN = "web.login"
ACTION_LOGOUT = "web.logout"
ACTION_USER_ADD = "user.add"
ACTION_USER_DISABLE = "user.disable"
ACTION_TOKEN_ADD = "user.token"  # noqa: S105 - an audit action name
ENTITY_USER = "user"

_hasher = PasswordHasher()


@functools.cache
def _dummy_hash() -> str:
    """Verified against when the name is unknown, so a wrong name costs as long as a wrong
    password and response times do not reveal which accounts exist."""
    return _hasher.hash(secrets.token_hex(16))


class UserError(PermanentError):
    """A user command or login that cannot be done as asked (one line for the CLI)."""


@dataclass(frozen=True)
class Principal:
    """Who is asking: a logged-in person or a machine client's token."""

    user_id: int
    name: str
    role: UserRole
    #: ``session`` (dashboard cookie) or ``token`` (``Authorization: Bearer``).
    via: str
    #: The session's cookie value, for its CSRF token; empty for API tokens.
    session_token: str = ""

    @property
    def actor(self) -> str:
        """The audit actor: ``web:NAME`` for the dashboard, ``api:NAME`` for tokens."""
        return f"{'web' if self.via == 'session' else 'api'}:{self.name}"

    @property
    def is_admin(self) -> bool:
        return self.role == UserRole.ADMIN


@dataclass(frozen=True)
class UserInfo:
    name: str
    role: UserRole
    active: bool
    created_at: str


def token_sha256(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def hash_password(password: str) -> str:
    return _hasher.hash(password)


def check_password_rules(password: str) -> None:
    if len(password) < MIN_PASSWORD_CHARS:
        raise UserError(f"password too short: at least {MIN_PASSWORD_CHARS} characters")


def check_name(name: str) -> str:
    clean = name.strip()
    if not clean or len(clean) > MAX_NAME_CHARS or not clean.isprintable() or " " in clean:
        raise UserError(
            f"user name must be 1-{MAX_NAME_CHARS} printable characters without spaces, "
            f"received {name!r}"
        )
    return clean


def add_user(session: Session, name: str, role: UserRole, password: str, *, actor: str) -> User:
    """Create an account; refuses a name that exists (active or not)."""
    name = check_name(name)
    check_password_rules(password)
    if session.execute(select(User.id).where(User.name == name)).first() is not None:
        raise UserError(f"user {name!r} exists")
    user = User(
        name=name,
        role=role,
        password_hash=hash_password(password),
        active=True,
        created_at=utcnow(),
    )
    session.add(user)
    session.flush()
    append_event(
        session,
        actor=actor,
        action=ACTION_USER_ADD,
        entity_type=ENTITY_USER,
        entity_id=user.id,
        outcome="ok",
        detail={"name": name, "role": str(role)},
    )
    return user


def list_users(session: Session) -> list[UserInfo]:
    rows = session.execute(select(User).order_by(User.name)).scalars()
    return [
        UserInfo(u.name, u.role, u.active, u.created_at.strftime("%Y-%m-%d %H:%M:%S")) for u in rows
    ]


def disable_user(session: Session, name: str, *, actor: str) -> None:
    """Disable an account and end its sessions; its API tokens stop working with it."""
    user = _user_by_name(session, name)
    if not user.active:
        raise UserError(f"user {name!r} is already disabled")
    now = utcnow()
    user.active = False
    user.disabled_at = now
    session.execute(
        update(WebSession)
        .where(WebSession.user_id == user.id, WebSession.ended_at.is_(None))
        .values(ended_at=now)
    )
    append_event(
        session,
        actor=actor,
        action=ACTION_USER_DISABLE,
        entity_type=ENTITY_USER,
        entity_id=user.id,
        outcome="ok",
        detail={"name": user.name},
    )


def add_api_token(session: Session, name: str, label: str, *, actor: str) -> str:
    """A new bearer token for ``name``; returned once, only its hash is kept."""
    user = _user_by_name(session, name)
    if not user.active:
        raise UserError(f"user {name!r} is disabled")
    token = secrets.token_urlsafe(32)
    row = ApiToken(
        user_id=user.id, name=label[:64], token_sha256=token_sha256(token), created_at=utcnow()
    )
    session.add(row)
    session.flush()
    append_event(
        session,
        actor=actor,
        action=ACTION_TOKEN_ADD,
        entity_type=ENTITY_USER,
        entity_id=user.id,
        outcome="ok",
        detail={"name": user.name, "token_id": row.id, "label": row.name},
    )
    return token


def _user_by_name(session: Session, name: str) -> User:
    user = session.execute(select(User).where(User.name == name)).scalar_one_or_none()
    if user is None:
        raise UserError(f"no user named {name!r}")
    return user


def authenticate(session: Session, name: str, password: str, *, peer: str) -> User | None:
    """The user whose name and password these are, else ``None``; audited either way."""
    actor = f"web:{name[:MAX_NAME_CHARS]}"
    user = session.execute(
        select(User).where(User.name == name[:MAX_NAME_CHARS])
    ).scalar_one_or_none()
    reason = ""
    if _recent_failures(session, actor) >= MAX_FAILED_LOGINS:
        _verify(_dummy_hash(), password)
        reason = "too many failed attempts"
    elif user is None:
        _verify(_dummy_hash(), password)
        reason = "unknown user"
    elif not _verify(user.password_hash, password):
        reason = "wrong password"
    elif not user.active:
        reason = "user disabled"
    append_event(
        session,
        actor=actor,
        action=ACTION_LOGIN,
        entity_type=ENTITY_USER,
        entity_id=None if user is None else user.id,
        outcome="refused" if reason else "ok",
        detail={"peer": peer, **({"reason": reason} if reason else {})},
    )
    if reason:
        log.warning("login refused for %r from %s: %s", name[:MAX_NAME_CHARS], peer, reason)
        return None
    assert user is not None
    if _hasher.check_needs_rehash(user.password_hash):
        user.password_hash = hash_password(password)
    return user


def _recent_failures(session: Session, actor: str) -> int:
    since = utcnow() - FAILED_LOGIN_WINDOW
    return int(
        session.scalar(
            select(func.count()).where(
                AuditEvent.action == ACTION_LOGIN,
                AuditEvent.outcome == "refused",
                AuditEvent.actor == actor,
                AuditEvent.occurred_at >= since,
            )
        )
        or 0
    )


def _verify(stored: str, password: str) -> bool:
    try:
        return _hasher.verify(stored, password)
    except (VerifyMismatchError, VerificationError, InvalidHashError):
        return False


def start_session(session: Session, user: User, minutes: int) -> str:
    """A new login for ``user``; returns the cookie value."""
    token = secrets.token_urlsafe(32)
    now = utcnow()
    # Logins are rare: tidy the table of sessions that ended long ago while here.
    session.execute(delete(WebSession).where(WebSession.expires_at < now - timedelta(days=1)))
    session.add(
        WebSession(
            token_sha256=token_sha256(token),
            user_id=user.id,
            created_at=now,
            expires_at=now + timedelta(minutes=minutes),
        )
    )
    session.flush()
    return token


def end_session(session: Session, principal: Principal) -> None:
    session.execute(
        update(WebSession)
        .where(
            WebSession.token_sha256 == token_sha256(principal.session_token),
            WebSession.ended_at.is_(None),
        )
        .values(ended_at=utcnow())
    )
    append_event(
        session,
        actor=principal.actor,
        action=ACTION_LOGOUT,
        entity_type=ENTITY_USER,
        entity_id=principal.user_id,
        outcome="ok",
    )


def session_principal(session: Session, token: str) -> Principal | None:
    """The person behind a session cookie, if the session is live and the user active."""
    if not token:
        return None
    row = session.execute(
        select(User, WebSession.expires_at)
        .join(WebSession, WebSession.user_id == User.id)
        .where(WebSession.token_sha256 == token_sha256(token), WebSession.ended_at.is_(None))
    ).one_or_none()
    if row is None:
        return None
    user, expires_at = row
    if not user.active or expires_at <= utcnow():
        return None
    return Principal(user.id, user.name, user.role, "session", token)


def token_principal(session: Session, token: str) -> Principal | None:
    """The user behind an API token, if the token is not revoked and the user active."""
    if not token:
        return None
    user = session.execute(
        select(User)
        .join(ApiToken, ApiToken.user_id == User.id)
        .where(ApiToken.token_sha256 == token_sha256(token), ApiToken.revoked_at.is_(None))
    ).scalar_one_or_none()
    if user is None or not user.active:
        return None
    return Principal(user.id, user.name, user.role, "token")


def csrf_token(secret: bytes, session_token: str) -> str:
    """The form token of one session: forms carry it, POST handlers recompute it."""
    return hmac.new(secret, session_token.encode("utf-8"), hashlib.sha256).hexdigest()


def csrf_ok(secret: bytes, session_token: str, submitted: str) -> bool:
    return bool(session_token) and hmac.compare_digest(
        csrf_token(secret, session_token), submitted or ""
    )
