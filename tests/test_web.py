"""The web application in-process over real databases: auth, CSRF, API, pages, audit.

The ASGI app is driven through FastAPI's TestClient (real routing, real forms and
cookies); the daemon as a process, PostgreSQL going away and a real browser are in
``test_web_serve.py`` and ``test_browser.py``.
"""

from __future__ import annotations

import hashlib
import io
import json
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from fastapi.routing import APIRoute
from fastapi.testclient import TestClient
from PIL import Image
from pipeline_support import add_instances, make_config, subprocess_env, write_config_file
from sqlalchemy import select
from web_support import (
    PASSWORD,
    cheap_password_hashes,
    csrf_of,
    login,
    make_user,
    promtool_check,
    register_reference,
    samples,
)

from pacs_classifier.config import Config
from pacs_classifier.db.audit import verify_chain
from pacs_classifier.db.engine import Database
from pacs_classifier.db.models import (
    ApiToken,
    AuditEvent,
    Job,
    JobState,
    Model,
    Prediction,
    ResultKind,
    ResultObject,
    User,
    UserRole,
)
from pacs_classifier.queue.jobs import JobQueue, QueuePolicy
from pacs_classifier.record.predictions import ModelRef, record_prediction
from pacs_classifier.web import api, dashboard
from pacs_classifier.web.app import create_app
from pacs_classifier.web.auth import add_api_token
from pacs_classifier.web.images import OVERLAY_DIR

REPO = Path(__file__).resolve().parents[1]
STUDY = "1.2.826.0.1.3680043.8.498.77"
SECRET = b"test-secret"


@dataclass
class Site:
    db: Database
    config: Config
    client: TestClient
    ids: list[int]
    model: Model


def _events(db: Database, action: str) -> list[AuditEvent]:
    with db.read_session() as s:
        return list(
            s.execute(
                select(AuditEvent).where(AuditEvent.action == action).order_by(AuditEvent.id)
            ).scalars()
        )


@pytest.fixture(autouse=True)
def _cheap_hashes(monkeypatch: pytest.MonkeyPatch) -> None:
    cheap_password_hashes(monkeypatch)


@pytest.fixture
def site(database: Database, tmp_path: Path, dicom_dir: Path) -> Iterator[Site]:
    """Three classified instances of one study, one failed job, and two accounts."""
    config = make_config(tmp_path, database.url)
    model = register_reference(database, config.model_dir)
    chest = dicom_dir / "chest_dx_mono2_8bit_implicit_le.dcm"
    ids = add_instances(database, [chest] * 4, study_uid=STUDY)
    q = JobQueue(database, QueuePolicy(max_attempts=1), worker_id="w:1")
    jobs = q.claim(4)
    ref = ModelRef(model.id, model.version, model.threshold, model.image_size)
    with database.session() as s:
        for job, p in zip(jobs[:3], (0.1, 0.5, 0.95), strict=True):
            record_prediction(s, instance_id=job.instance_id, model=ref, probability=p)
            q.mark_done(s, job, {})
    q.fail([(jobs[3], "OSError: disk gone", True)])
    make_user(database, "vera", UserRole.VIEWER)
    make_user(database, "adam", UserRole.ADMIN)
    app = create_app(config, database, secret=SECRET)
    with TestClient(app, base_url="http://127.0.0.1") as client:
        yield Site(database, config, client, ids, model)


def test_without_a_session_every_page_redirects_and_every_api_route_is_401(
    sqlite_url: str, tmp_path: Path
) -> None:
    db = Database(sqlite_url)
    app = create_app(make_config(tmp_path, sqlite_url), db, secret=SECRET)
    public = {"/health/live", "/health/ready", "/metrics", "/login"}
    checked = 0
    try:
        with TestClient(app) as client:
            # Included routers are not flattened into app.routes in this FastAPI.
            routes = [*app.routes, *api.router.routes, *dashboard.router.routes]
            for route in routes:
                if not isinstance(route, APIRoute) or route.path in public:
                    continue
                path = route.path.replace("{instance_id}", "1").replace("{job_id}", "1")
                path = path.replace("{study_uid}", STUDY)
                for method in route.methods or ():
                    answer = client.request(method, path, follow_redirects=False)
                    checked += 1
                    if path.startswith("/api/"):
                        assert answer.status_code == 401, (method, path)
                        assert answer.headers["www-authenticate"] == "Bearer"
                    else:
                        assert answer.status_code == 303, (method, path, answer.text)
                        assert answer.headers["location"].startswith("/login?next="), path
            # A bearer token that does not exist is no better than none.
            bad = client.get("/api/v1/models", headers={"Authorization": "Bearer nope"})
            assert bad.status_code == 401
    finally:
        db.dispose()
    assert checked >= 14


def test_login_needs_csrf_refuses_a_wrong_password_and_audits_both(site: Site) -> None:
    c = site.client
    no_csrf = c.post(
        "/login", data={"username": "vera", "password": PASSWORD}, follow_redirects=False
    )
    assert no_csrf.status_code == 403
    assert login(c, "vera", "not the password") == 401
    assert login(c, "nobody", PASSWORD) == 401
    assert c.get("/", follow_redirects=False).status_code == 303
    refused = [e for e in _events(site.db, "web.login") if e.outcome == "refused"]
    assert [(e.actor, e.detail["reason"]) for e in refused] == [
        ("web:vera", "wrong password"),
        ("web:nobody", "unknown user"),
    ]
    assert all(PASSWORD not in json.dumps(e.detail) for e in _events(site.db, "web.login"))

    assert login(c, "vera") == 303
    page = c.get("/")
    assert page.status_code == 200 and "vera (viewer)" in page.text
    # Logging out needs the session's CSRF token; a forged form is refused.
    assert c.post("/logout", data={"csrf": "forged"}, follow_redirects=False).status_code == 403
    out = c.post("/logout", data={"csrf": csrf_of(page.text)}, follow_redirects=False)
    assert out.status_code == 303
    assert c.get("/", follow_redirects=False).status_code == 303
    with site.db.read_session() as s:
        assert verify_chain(s).ok


def test_api_results_by_accession_study_and_dates_with_audit(site: Site) -> None:
    with site.db.session() as s:
        token = add_api_token(s, "vera", "ris", actor="test")
    auth = {"Authorization": f"Bearer {token}"}
    c = site.client
    one = c.get("/api/v1/results", params={"accession": "ACC00002"}, headers=auth).json()
    assert one["total"] == 1
    (r,) = one["results"]
    assert r["accession_number"] == "ACC00002" and r["patient_id"] == "PID00002"
    assert r["probability"] == pytest.approx(0.95)
    assert r["label"] == "PNEUMONIA" and r["state"] == "done"
    assert r["threshold"] == pytest.approx(site.model.threshold)
    assert r["model_version"] == site.model.version

    study = c.get("/api/v1/results", params={"study_uid": STUDY}, headers=auth).json()
    assert study["total"] == 4
    failed = [x for x in study["results"] if x["state"] == "failed"]
    assert [x["reason"] for x in failed] == ["OSError: disk gone"]
    assert {x["label"] for x in study["results"]} == {"NORMAL", "PNEUMONIA", None}

    now = datetime.now(UTC)
    window = {"since": (now - timedelta(hours=1)).isoformat(), "until": now.isoformat()}
    assert c.get("/api/v1/results", params=window, headers=auth).json()["total"] == 4
    later = {"since": (now + timedelta(hours=1)).isoformat()}
    assert c.get("/api/v1/results", params=later, headers=auth).json()["total"] == 0
    positives = c.get("/api/v1/results", params={"label": "PNEUMONIA"}, headers=auth).json()
    assert [x["accession_number"] for x in positives["results"]] == ["ACC00002"]
    assert c.get("/api/v1/results", params={"label": "MAYBE"}, headers=auth).status_code == 422

    detail = c.get(f"/api/v1/results/{site.ids[2]}", headers=auth).json()
    assert [h["label"] for h in detail["history"]] == ["PNEUMONIA"]
    assert c.get("/api/v1/results/999999", headers=auth).status_code == 404

    jobs = c.get("/api/v1/jobs", params={"state": "failed"}, headers=auth).json()
    assert [(j["instance_id"], j["reason"]) for j in jobs] == [(site.ids[3], "OSError: disk gone")]
    models = c.get("/api/v1/models", headers=auth).json()
    assert [(m["version"], m["active"]) for m in models] == [(site.model.version, True)]
    drift = c.get("/api/v1/drift", headers=auth).json()
    assert {v["model_version"] for v in drift["versions"]} == {site.model.version}
    assert sum(t["ended"] for t in drift["traffic"]) >= 1
    spec = c.get("/api/v1/openapi.json", headers=auth).json()
    assert {"/api/v1/results", "/api/v1/jobs", "/api/v1/models", "/api/v1/drift"} <= set(
        spec["paths"]
    )
    assert "/login" not in spec["paths"]

    views = _events(site.db, "result.view")
    assert {e.actor for e in views} == {"api:vera"}
    # One event per answer: by accession, by study, in the window, the positives, the detail.
    hit = str(site.ids[2])
    assert [e.entity_id for e in views] == [hit, None, None, hit, hit]
    assert sorted(views[1].detail["instance_ids"]) == sorted(site.ids)


def test_worklist_study_image_and_overlay_are_audited(site: Site) -> None:
    c = site.client
    assert login(c, "vera") == 303
    page = c.get("/", params={"q": "ACC00001"})
    assert page.status_code == 200
    assert "ACC00001" in page.text and "ACC00002" not in page.text
    assert "0.500" in page.text and site.model.version in page.text
    paged = c.get("/", params={"label": "NORMAL"})
    assert "ACC00000" in paged.text and "ACC00002" not in paged.text
    assert c.get("/", params={"since": "yesterday"}).status_code == 400

    # An overlay exists for one instance only (the results-to-PACS work writes them).
    overlay = site.config.storage_root / OVERLAY_DIR / f"{site.ids[2]}.png"
    overlay.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), (255, 0, 0)).save(overlay)
    study = c.get(f"/studies/{STUDY}")
    assert study.status_code == 200
    assert study.text.count('class="classified"') == 4
    assert study.text.count('class="overlay"') == 1
    assert "PNEUMONIA" in study.text and "0.950" in study.text

    png = c.get(f"/instances/{site.ids[2]}/image.png")
    assert png.status_code == 200 and png.headers["content-type"] == "image/png"
    assert png.headers["cache-control"] == "no-store"
    with Image.open(io.BytesIO(png.content)) as im:
        assert im.size == (site.model.image_size, site.model.image_size)
        assert im.mode == "L"
    assert c.get(f"/instances/{site.ids[2]}/overlay.png").content == overlay.read_bytes()
    assert c.get(f"/instances/{site.ids[1]}/overlay.png").status_code == 404

    # The sender's overlay object: its PNG lies beside the SC under results/ and is found
    # through the result_objects row.
    with site.db.session() as s:
        pred_id = s.execute(
            select(Prediction.id).where(Prediction.instance_id == site.ids[1])
        ).scalar_one()
        s.add(
            ResultObject(
                instance_id=site.ids[1],
                prediction_id=pred_id,
                kind=ResultKind.SC,
                sop_class_uid="1.2.840.10008.5.1.4.1.1.7",
                sop_instance_uid="1.2.3.4.5.6",
                series_instance_uid="1.2.3.4.5",
                study_instance_uid=STUDY,
                state=JobState.DONE,
            )
        )
    rendered = site.config.storage_root / "results" / STUDY / "1.2.3.4.5" / "1.2.3.4.5.6.png"
    rendered.parent.mkdir(parents=True)
    Image.new("RGB", (8, 8), (0, 255, 0)).save(rendered)
    assert c.get(f"/instances/{site.ids[1]}/overlay.png").content == rendered.read_bytes()

    views = _events(site.db, "result.view")
    assert {e.actor for e in views} == {"web:vera"}
    vias = [e.detail["via"] for e in views]
    assert vias.count("worklist") == 2  # the failed search showed nothing and is not a view
    assert vias.count("study_page") == 4
    assert vias.count("image") == 1 and vias.count("overlay") == 2


def test_admins_retry_failed_jobs_viewers_cannot(site: Site) -> None:
    c = site.client
    failed_job = site.db
    with failed_job.read_session() as s:
        job_id = s.execute(select(Job.id).where(Job.state == JobState.FAILED)).scalar_one()
    assert login(c, "vera") == 303
    queue = c.get("/queue")
    assert "OSError: disk gone" in queue.text and "Retry" not in queue.text
    denied = c.post(f"/queue/{job_id}/retry", data={"csrf": csrf_of(queue.text)})
    assert denied.status_code == 403

    admin = TestClient(c.app, base_url="http://127.0.0.1")
    assert login(admin, "adam") == 303
    queue = admin.get("/queue")
    assert "Retry" in queue.text
    forged = admin.post(f"/queue/{job_id}/retry", data={"csrf": "x"}, follow_redirects=False)
    assert forged.status_code == 403
    ok = admin.post(
        f"/queue/{job_id}/retry", data={"csrf": csrf_of(queue.text)}, follow_redirects=False
    )
    assert ok.status_code == 303
    with site.db.read_session() as s:
        job = s.get(Job, job_id)
        assert job is not None and job.state == JobState.QUEUED and job.attempts == 0
    again = admin.post(f"/queue/{job_id}/retry", data={"csrf": csrf_of(queue.text)})
    assert again.status_code == 409
    (event,) = _events(site.db, "job.retry")
    assert event.actor == "web:adam" and event.detail["previous_reason"] == "OSError: disk gone"

    for path in ("/runs", "/models", "/audit", "/drift"):
        assert admin.get(path).status_code == 200, path
    assert site.model.version in admin.get("/drift").text
    assert "Model card" in admin.get("/models").text
    assert "ok " in admin.get("/audit").text


def test_a_disabled_user_is_logged_out_at_once(site: Site) -> None:
    c = site.client
    assert login(c, "vera") == 303
    assert c.get("/").status_code == 200
    from pacs_classifier.web.auth import disable_user

    with site.db.session() as s:
        disable_user(s, "vera", actor="test")
    assert c.get("/", follow_redirects=False).status_code == 303
    assert login(c, "vera") == 401


def test_metrics_pass_promtool_and_count_the_database(site: Site) -> None:
    text = site.client.get("/metrics").text
    promtool_check(text)
    got = samples(text)
    version = site.model.version
    assert (
        got[f'pacs_classifier_predictions_total{{label="NORMAL",model_version="{version}"}}'] == 2
    )
    assert (
        got[f'pacs_classifier_predictions_total{{label="PNEUMONIA",model_version="{version}"}}']
        == 1
    )
    assert got['pacs_classifier_jobs{kind="classify",state="done"}'] == 3
    assert got['pacs_classifier_jobs{kind="classify",state="failed"}'] == 1
    assert got["pacs_classifier_classification_latency_seconds_count"] == 3
    assert got['pacs_classifier_classification_latency_seconds_bucket{le="+Inf"}'] == 3
    assert got["pacs_classifier_database_up"] == 1


def test_user_commands_read_the_password_from_stdin_never_argv(
    sqlite_url: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from pacs_classifier import cli

    cfg = write_config_file(tmp_path / "config.toml", make_config(tmp_path, sqlite_url))
    # Once through a real pipe in a fresh process, at the production hash cost.
    added = subprocess.run(
        [
            sys.executable,
            "-m",
            "pacs_classifier",
            "--config",
            str(cfg),
            "user",
            "add",
            "rita",
            "--role",
            "admin",
        ],
        input=f"{PASSWORD}\n",
        capture_output=True,
        text=True,
        timeout=240,  # a fresh process on a busy CI machine
        cwd=REPO,
        env=subprocess_env(),
        check=False,
    )
    assert added.returncode == 0, added.stderr
    assert added.stdout.strip() == "user rita added (admin)"

    def user(*args: str, stdin: str = "") -> tuple[int, str, str]:
        monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
        try:
            code = cli.main(["--config", str(cfg), "user", *args])
        except SystemExit as exc:  # argparse refusing the arguments
            code = int(exc.code or 0)
        out = capsys.readouterr()
        return code, out.out, out.err

    assert user("add", "sam", "--role", "viewer", stdin="short\n") == (
        2,
        "",
        "pacs-classifier: error: password too short: at least 8 characters\n",
    )
    assert user("add", "rita", "--role", "viewer", stdin=f"{PASSWORD}\n")[2] == (
        "pacs-classifier: error: user 'rita' exists\n"
    )
    assert user("add", "x", "--role", "viewer", "--password", "p")[0] == 2
    assert (
        user("add", "x", "--role", "viewer")[2] == "pacs-classifier: error: no password on stdin\n"
    )
    assert user("list")[1].split()[:3] == ["rita", "admin", "active"]
    token = user("token", "rita")[1].strip()
    assert len(token) >= 40
    assert user("disable", "rita")[0] == 0
    assert user("list")[1].split()[:3] == ["rita", "admin", "disabled"]
    assert user("disable", "ghost")[2] == "pacs-classifier: error: no user named 'ghost'\n"
    db = Database(sqlite_url)
    try:
        with db.read_session() as s:
            (stored_hash,) = s.execute(select(User.password_hash)).scalars().all()
            details = s.execute(select(AuditEvent.detail)).scalars().all()
            token_hashes = s.execute(select(ApiToken.token_sha256)).scalars().all()
    finally:
        db.dispose()
    assert stored_hash.startswith("$argon2id$") and PASSWORD not in stored_hash
    assert token_hashes == [hashlib.sha256(token.encode()).hexdigest()]
    assert all(PASSWORD not in json.dumps(d) and token not in json.dumps(d) for d in details)


def test_listener_health_in_process_and_probed_without_eating_association_slots(
    sqlite_url: str, tmp_path: Path
) -> None:
    import socket

    from pacs_classifier.web.health import HealthChecks
    from pacs_classifier.wiring import App

    config = make_config(tmp_path, sqlite_url)
    db = Database(sqlite_url)
    listener = App(config).listener()
    listener.start()
    try:
        local = HealthChecks(config, db, local_listener=listener).listener()
        assert local.ok and "serving in this process" in local.detail
    finally:
        listener.stop()
    assert not HealthChecks(config, db, local_listener=listener).listener().ok

    # Another process's listener is probed over TCP; pynetdicom keeps a slot for a silent
    # connection until its ACSE timeout, so one probe answers for that long.
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        server.settimeout(0.5)
        port = server.getsockname()[1]
        probed = make_config(tmp_path, sqlite_url, listener={"port": port})
        checks = HealthChecks(probed, db)
        assert all(checks.listener().ok for _ in range(3))
        server.accept()[0].close()
        with pytest.raises(TimeoutError):
            server.accept()  # the second and third answers came from the first probe
    refused = HealthChecks(probed, db)
    assert not refused.listener().ok
    db.dispose()


def test_guessing_a_password_is_throttled_per_name(site: Site) -> None:
    from pacs_classifier.web.auth import MAX_FAILED_LOGINS

    c = site.client
    for n in range(MAX_FAILED_LOGINS):
        assert login(c, "adam", f"guess {n}") == 401
    assert login(c, "adam") == 401  # the right password, too late
    assert login(c, "vera") == 303  # other names are not affected
    reasons = [
        e.detail.get("reason") for e in _events(site.db, "web.login") if e.actor == "web:adam"
    ]
    assert reasons == ["wrong password"] * MAX_FAILED_LOGINS + ["too many failed attempts"]


@pytest.mark.parametrize("target", ["//evil.example/", "/\\evil.example/", "https://evil.example/"])
def test_the_login_never_redirects_off_site(site: Site, target: str) -> None:
    c = site.client
    form = c.get("/login", params={"next": target})
    assert 'name="next" value="/"' in form.text
    answer = c.post(
        "/login",
        data={"username": "vera", "password": PASSWORD, "csrf": csrf_of(form.text), "next": target},
        follow_redirects=False,
    )
    assert answer.status_code == 303 and answer.headers["location"] == "/"
