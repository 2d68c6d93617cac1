"""The command line: help, status, and one clean line for a user's mistake."""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import pytest

from pacs_classifier import cli
from pacs_classifier.db import migrate
from pacs_classifier.db.engine import Database
from pacs_classifier.db.models import (
    Instance,
    Job,
    JobKind,
    JobState,
    Model,
    ReclassificationRun,
    RunState,
    RunTrigger,
)

UNREACHABLE_PG = "postgresql+psycopg://postgres@127.0.0.1:1/x"


def _env(**extra: str) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("PACS_CLASSIFIER_") or k == "PACS_CLASSIFIER_SHARED"
    }
    env.update(extra)
    return env


def _run(args: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pacs_classifier", *args],
        cwd=cwd,
        env=_env(**env),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def _one_error_line(proc: subprocess.CompletedProcess[str]) -> str:
    assert proc.returncode != 0, proc
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got {proc.stderr!r}"
    assert lines[0].startswith("pacs-classifier: ")
    return lines[0]


def _config(tmp_path: Path, url: str) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(f'[database]\nurl = "{url}"\n', encoding="utf-8")
    return path


def test_help_lists_the_commands(tmp_path: Path) -> None:
    proc = _run(["--help"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    for command in ("db", "status", "audit"):
        assert command in proc.stdout


def test_light_commands_do_not_import_tensorflow(tmp_path: Path) -> None:
    """``--help``, ``db upgrade``, ``status``, ``audit verify``, ``user``, ``report``: no TF."""
    script = """
import sys
from pacs_classifier import cli
try:
    cli.main(["--help"])
except SystemExit:
    pass
for argv in (["db", "upgrade"], ["status"], ["audit", "verify"], ["user", "list"],
             ["report", "results"]):
    assert cli.main(argv) == 0, argv
heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("tensorflow", "keras", "matplotlib"))
print("heavy:", heavy)
"""
    (tmp_path / "config.toml").write_text('[database]\nurl = "sqlite:///pacs.sqlite3"\n')
    proc = subprocess.run(
        [sys.executable, "-c", script],
        cwd=tmp_path,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[-1] == "heavy: []"
    assert "ok 0 events" in proc.stdout


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ("[listener\nport = 1\n", "malformed TOML"),
        ("[listener]\nprot = 1\n", "listener.prot: unknown key"),
        ('[listener]\nport = "x"\n', "listener.port: expected an integer"),
    ],
)
@pytest.mark.parametrize("command", [["status"], ["db", "upgrade"], ["audit", "verify"]])
def test_bad_config_is_one_line_and_exit_2(
    tmp_path: Path, body: str, expected: str, command: list[str]
) -> None:
    (tmp_path / "config.toml").write_text(body, encoding="utf-8")
    proc = _run(command, tmp_path)
    assert proc.returncode == 2
    assert expected in _one_error_line(proc)


@pytest.mark.parametrize("args", [[], ["some/dir", "--reference"]])
def test_model_register_wants_a_folder_or_reference(tmp_path: Path, args: list[str]) -> None:
    proc = _run(["model", "register", *args], tmp_path)
    assert "DIR or --reference" in _one_error_line(proc)
    assert proc.returncode == 2


def test_missing_config_file_is_one_line_and_exit_2(tmp_path: Path) -> None:
    proc = _run(["--config", "nope.toml", "status"], tmp_path)
    assert proc.returncode == 2
    assert "nope.toml: configuration file not found" in _one_error_line(proc)


def test_bad_environment_override_is_one_line_and_exit_2(tmp_path: Path) -> None:
    proc = _run(["status"], tmp_path, PACS_CLASSIFIER__LISTENER__PORT="many")
    assert proc.returncode == 2
    assert "PACS_CLASSIFIER__LISTENER__PORT" in _one_error_line(proc)


@pytest.mark.parametrize("command", [["status"], ["db", "upgrade"], ["audit", "verify"]])
def test_unreachable_database_is_one_line(tmp_path: Path, command: list[str]) -> None:
    proc = _run(command, tmp_path, PACS_CLASSIFIER__DATABASE__URL=UNREACHABLE_PG)
    line = _one_error_line(proc)
    assert "database unavailable" in line
    assert "127.0.0.1" in line


def test_unopenable_sqlite_file_is_one_line(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}"  # a folder, not a database file
    proc = _run(["status"], tmp_path, PACS_CLASSIFIER__DATABASE__URL=url)
    assert "database unavailable" in _one_error_line(proc)


@pytest.mark.parametrize("command", [["status"], ["audit", "verify"]])
def test_missing_sqlite_file_names_db_upgrade_and_is_not_created(
    tmp_path: Path, command: list[str]
) -> None:
    db_file = tmp_path / "var" / "pacs.sqlite3"
    proc = _run(
        ["--config", str(_config(tmp_path, "sqlite:///var/pacs.sqlite3")), *command], tmp_path
    )
    assert proc.returncode == 2
    line = _one_error_line(proc)
    assert f"{db_file} does not exist" in line
    assert "pacs-classifier db upgrade" in line
    assert not db_file.exists()


@pytest.mark.parametrize("command", [["status"], ["audit", "verify"]])
def test_old_schema_is_refused_naming_db_upgrade(
    db_url: str, tmp_path: Path, command: list[str]
) -> None:
    migrate.downgrade(db_url, "base")
    proc = _run(["--config", str(_config(tmp_path, db_url)), *command], tmp_path)
    assert proc.returncode == 2
    assert "pacs-classifier db upgrade" in _one_error_line(proc)


def test_db_upgrade_then_status_on_a_fresh_sqlite_file(tmp_path: Path) -> None:
    config = _config(tmp_path, "sqlite:///var/pacs.sqlite3")  # var/ does not exist yet
    up = _run(["--config", str(config), "db", "upgrade"], tmp_path)
    assert up.returncode == 0, up.stderr
    assert (
        up.stdout.strip() == f"database upgraded from nothing to revision {migrate.head_revision()}"
    )
    again = _run(["--config", str(config), "db", "upgrade"], tmp_path)
    assert again.stdout.strip() == f"database at revision {migrate.head_revision()} (already)"
    status = _run(["--config", str(config), "status"], tmp_path)
    assert status.returncode == 0, status.stderr
    assert "never" in status.stdout  # no reclassification run yet


def _seed_status(url: str) -> None:
    t0 = datetime(2024, 5, 1, 2, 0, 5, tzinfo=UTC)
    db = Database(url)
    try:
        with db.session() as session:
            inst = Instance(
                sop_instance_uid="1.2.3",
                sop_class_uid="1.2.840.10008.5.1.4.1.1.1",
                file_path="/x.dcm",
                file_sha256="a" * 64,
                file_size=1,
            )
            old = Model(
                version="2024.04",
                path="/m/old",
                sha256="b" * 64,
                threshold=0.5,
                image_size=299,
                created_at=t0,
                active=False,
            )
            new = Model(
                version="2024.05",
                path="/m/new",
                sha256="c" * 64,
                threshold=0.4125,
                image_size=224,
                created_at=t0,
                active=True,
            )
            session.add_all([inst, old, new])
            session.flush()
            states = [JobState.QUEUED] * 3 + [JobState.RUNNING] + [JobState.DONE] * 2
            session.add_all(
                Job(instance_id=inst.id, kind=JobKind.CLASSIFY, state=s) for s in states
            )
            session.add(Job(instance_id=inst.id, kind=JobKind.RECLASSIFY, state=JobState.QUEUED))
            session.add(Job(instance_id=inst.id, kind=JobKind.CLASSIFY, state=JobState.FAILED))
            session.add_all(
                [
                    ReclassificationRun(
                        trigger=RunTrigger.CLI,
                        model_id=old.id,
                        started_at=t0.replace(day=1),
                        state=RunState.DONE,
                    ),
                    ReclassificationRun(
                        trigger=RunTrigger.SCHEDULE,
                        model_id=new.id,
                        started_at=t0,
                        finished_at=t0.replace(minute=7),
                        instances_total=12,
                        instances_done=12,
                        labels_changed=3,
                        state=RunState.DONE,
                    ),
                ]
            )
    finally:
        db.dispose()


def test_status_shows_queue_model_run_and_listener(
    db_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    _seed_status(db_url)
    monkeypatch.setenv("PACS_CLASSIFIER__LISTENER__PORT", "11199")
    monkeypatch.setenv("PACS_CLASSIFIER__LISTENER__AE_TITLE", "GATEWAY_AI")
    capsys.readouterr()
    assert cli.main(["--config", str(_config(tmp_path, db_url)), "status"]) == 0
    out = capsys.readouterr().out
    lines = {line.split("  ")[0].strip(): line for line in out.splitlines() if line.strip()}
    assert "GATEWAY_AI@127.0.0.1:11199" in lines["listener"]
    assert "TLS off" in lines["listener"]
    assert lines["web"].split()[-1] == "http://127.0.0.1:8080/"
    assert "2024.05" in lines["active model"] and "threshold 0.4125" in lines["active model"]
    run = lines["last reclassification"]
    assert "done (schedule)" in run
    assert "started 2024-05-01 02:00:05Z" in run
    assert "finished 2024-05-01 02:07:05Z" in run
    assert "instances 12/12" in run and "labels changed 3" in run
    assert lines["queued"].split() == ["queued", "3", "1", "4"]
    assert lines["running"].split() == ["running", "1", "0", "1"]
    assert lines["done"].split() == ["done", "2", "0", "2"]
    assert lines["not_assessed"].split() == ["not_assessed", "0", "0", "0"]
    assert lines["failed"].split() == ["failed", "1", "0", "1"]
