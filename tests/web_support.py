"""Helpers of the web tests: users, logins, scrapes and the reference model, all real."""

from __future__ import annotations

import re
import shutil
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from argon2 import PasswordHasher
from conftest import missing
from fastapi.testclient import TestClient

from pacs_classifier.db.engine import Database
from pacs_classifier.db.models import Model, UserRole
from pacs_classifier.model.registry import register_bundle
from pacs_classifier.web import auth
from pacs_classifier.web.auth import add_user

REPO = Path(__file__).resolve().parents[1]
REFERENCE_MODEL = REPO / "models" / "reference"
PASSWORD = "correct horse battery"  # noqa: S105 - a test account's password


def cheap_password_hashes(monkeypatch: pytest.MonkeyPatch) -> None:
    """Real argon2id at its lowest cost for accounts a test makes in its own process.

    The production parameters cost ~0.1 s a hash on an idle core and seconds on a loaded
    CI machine; verifying reads the parameters from the stored hash, so a server process
    checks these hashes cheaply too (and re-hashes them at full cost on first login).
    """
    monkeypatch.setattr(auth, "_hasher", PasswordHasher(time_cost=1, memory_cost=8, parallelism=1))


def register_reference(db: Database, model_dir: Path) -> Model:
    """The committed reference bundle, registered and active (no runtime export: no TF)."""
    return register_bundle(db, REFERENCE_MODEL, model_dir, actor="test", activate=True)


def make_user(db: Database, name: str, role: UserRole = UserRole.VIEWER) -> None:
    with db.session() as session:
        add_user(session, name, role, PASSWORD, actor="test")


def login(client: TestClient, name: str, password: str = PASSWORD) -> int:
    """Log in through the form as a browser would; the HTTP status of the POST."""
    form = client.get("/login")
    token = re.search(r'name="csrf" value="([^"]+)"', form.text)
    assert token is not None, form.text
    answer = client.post(
        "/login",
        data={"username": name, "password": password, "csrf": token.group(1), "next": "/"},
        follow_redirects=False,
    )
    return answer.status_code


def csrf_of(page_html: str) -> str:
    token = re.search(r'name="csrf" value="([^"]+)"', page_html)
    assert token is not None, page_html
    return token.group(1)


def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        missing("promtool is not installed (Debian package prometheus)")
    assert path is not None
    return path


def promtool_check(text: str) -> None:
    """``promtool check metrics`` on an exposition; fails the test with its complaints."""
    result = subprocess.run(
        [promtool(), "check", "metrics"],
        input=text,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def samples(text: str) -> dict[str, float]:
    """``name{labels}`` → value of every sample line of an exposition."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            out[key] = float(value)
    return out


def http_get(url: str, timeout_s: float = 10) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as r:  # noqa: S310 - loopback
            return int(r.status), r.read().decode("utf-8")
    except urllib.error.HTTPError as exc:
        return int(exc.code), exc.read().decode("utf-8")


def wait_http(url: str, want: int, timeout_s: float) -> str:
    """Poll ``url`` until it answers ``want``; its last body."""
    deadline = time.monotonic() + timeout_s
    code, body = 0, ""
    while time.monotonic() < deadline:
        try:
            code, body = http_get(url)
        except OSError:
            code, body = 0, ""
        if code == want:
            return body
        time.sleep(0.25)
    raise AssertionError(f"{url} answered {code}, not {want}, for {timeout_s:.0f}s: {body}")
