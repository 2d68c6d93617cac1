"""Shared fixtures: real databases, the shared data folder, dcmtk.

Outside CI, a test whose real part is missing (``../shared``, PostgreSQL, dcmtk) skips with
the reason; in CI (``CI=true``) it fails instead, so a missing install step cannot hide.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import OperationalError

from pacs_classifier.db import migrate
from pacs_classifier.db.engine import Database

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
REPO = Path(__file__).resolve().parents[1]
DEFAULT_PG_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"


def missing(reason: str) -> None:
    """Skip locally, fail in CI."""
    if IN_CI:
        pytest.fail(f"required in CI: {reason}")
    pytest.skip(reason)


def _shared_dir() -> Path | None:
    env = os.environ.get("PACS_CLASSIFIER_SHARED")
    candidate = Path(env) if env else REPO.parent / "shared"
    return candidate.resolve() if (candidate / "SPEC.md").is_file() else None


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    path = _shared_dir()
    if path is None:
        missing("../shared is absent (set PACS_CLASSIFIER_SHARED)")
    assert path is not None
    return path


@pytest.fixture(scope="session")
def dicom_dir(shared_dir: Path) -> Path:
    return shared_dir / "data" / "dicom"


@pytest.fixture(scope="session")
def cxr_dir(shared_dir: Path) -> Path:
    return shared_dir / "data" / "cxr224" / "train"


@pytest.fixture(scope="session")
def base_weights(shared_dir: Path) -> Path:
    return shared_dir / "weights" / "inception_v3_notop.weights.h5"


@pytest.fixture(scope="session")
def dcmtk() -> dict[str, str]:
    tools = {name: shutil.which(name) for name in ("storescu", "echoscu", "storescp")}
    absent = [name for name, path in tools.items() if path is None]
    if absent:
        missing(f"dcmtk is not installed ({', '.join(absent)} not on PATH)")
    return {name: str(path) for name, path in tools.items()}


def pg_admin_url() -> str:
    return os.environ.get("PACS_CLASSIFIER_TEST_PG_URL", DEFAULT_PG_URL)


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    url = f"sqlite:///{tmp_path / 'pacs.sqlite3'}"
    migrate.upgrade(url)
    return url


@pytest.fixture
def pg_url() -> Iterator[str]:
    """A fresh, migrated PostgreSQL database for one test, dropped afterwards."""
    admin = make_url(pg_admin_url())
    name = f"pacs_test_{uuid.uuid4().hex[:12]}"
    engine = create_engine(admin, isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
    except OperationalError as exc:
        engine.dispose()
        missing(f"PostgreSQL not reachable at {admin.render_as_string()}: {exc}")
    url = admin.set(database=name).render_as_string(hide_password=False)
    migrate.upgrade(url)
    try:
        yield url
    finally:
        with engine.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        engine.dispose()


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest) -> str:
    """A fresh migrated database of each kind: tests using it run on both."""
    fixture = "sqlite_url" if request.param == "sqlite" else "pg_url"
    return str(request.getfixturevalue(fixture))


@pytest.fixture
def database(db_url: str) -> Iterator[Database]:
    db = Database(db_url)
    try:
        yield db
    finally:
        db.dispose()


@pytest.fixture(scope="session")
def tiny_bundles(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """Two real 75 px model bundles (pipeline_support.Bundles), built once per session."""
    from pipeline_support import build_bundles

    return build_bundles(tmp_path_factory.mktemp("bundles"))
